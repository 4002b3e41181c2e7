"""``bnfold_gpu.load`` (a file's networks folded in memory, as NnpLoader hands them) and clean saves
after an in-memory fold (``FoldResult.unused``, ``prune``)."""
import zipfile

import numpy as np
import pytest

nn = pytest.importorskip("nnabla", reason="nnabla is not installed (GPU machine)")
import nnabla.functions as F  # noqa: E402
import nnabla.parametric_functions as PF  # noqa: E402
from nnabla.utils.nnp_graph import NnpLoader  # noqa: E402
from nnabla.utils.save import save  # noqa: E402

import bnfold_gpu  # noqa: E402
from bnfold_gpu import nnp as N  # noqa: E402
import nnp_files  # noqa: E402
from helpers import bn_count, feed, randomize_all, rel_err  # noqa: E402


@pytest.fixture(autouse=True)
def clean_scope():
    nn.clear_parameters()
    yield
    nn.clear_parameters()


def run(net, seed=0):
    """Outputs of an NnpNetwork on seeded random inputs."""
    rng = np.random.RandomState(seed)
    for key in sorted(net.inputs):
        feed(rng, net.inputs[key])
    outs = [net.outputs[k] for k in sorted(net.outputs)]
    nn.forward_all(outs, clear_buffer=False)
    return [o.d.copy() for o in outs]


def reference(path, network, batch_size=None):
    """The outputs of ``network`` as NNabla's own loader builds it, in a scope of its own."""
    with nn.parameter_scope("", {}):
        return run(NnpLoader(str(path)).get_network(network, batch_size=batch_size))


FILES = {"console_h5": lambda p: nnp_files.console_like(p, ".h5"),
         "single_protobuf": lambda p: nnp_files.single(p, ".protobuf"),
         "moves": lambda p: nnp_files.moves(p)}


@pytest.mark.parametrize("kind", sorted(FILES))
def test_load_folds_every_network_in_memory(kind, tmp_path):
    path = FILES[kind](tmp_path / "m.nnp")
    before = sorted(tmp_path.iterdir())
    nets = bnfold_gpu.load(path, backend="numpy")
    assert sorted(tmp_path.iterdir()) == before          # no file written
    assert set(nets) == set(N.read(str(path)).network_names())
    folded_any = False
    for name, net in nets.items():
        outs = run(net)
        for a, b in zip(outs, reference(path, name)):
            assert a.shape == b.shape
            assert rel_err(a, b) < 1e-5, (name, rel_err(a, b))
        training = name == "Main"        # console_like's training network keeps its BNs
        if not training:
            assert bn_count(list(net.outputs.values())) == 0, name
            folded_any = True
    assert folded_any


def test_load_one_network_sets_its_folded_parameters_like_nnploader(tmp_path):
    path = nnp_files.console_like(tmp_path / "m.nnp")
    net = bnfold_gpu.load(path, "MainRuntime", batch_size=3, backend="numpy")
    assert net.inputs["x"].shape[0] == 3
    names = set(nn.get_parameters(grad_only=False))
    assert names and not any(n.startswith("bn") for n in names), names
    assert set(net.variables) >= names
    for a, b in zip(run(net), reference(path, "MainRuntime", batch_size=3)):
        assert rel_err(a, b) < 1e-5


def test_load_with_report(tmp_path):
    path = nnp_files.moves(tmp_path / "m.nnp")
    net, report = bnfold_gpu.load(path, "g", backend="numpy", with_report=True)
    assert report.output is None and report.n_folded >= 5 and report.backend == "numpy"
    assert report.to_json()["folded_count"] == report.n_folded
    assert bn_count(list(net.outputs.values())) == 0


def test_load_skip_keeps_the_named_bn(tmp_path):
    path = nnp_files.single(tmp_path / "m.nnp")
    net = bnfold_gpu.load(path, "net", backend="numpy", skip=["bn1*"])
    assert bn_count(list(net.outputs.values())) == 1
    for a, b in zip(run(net), reference(path, "net")):
        assert rel_err(a, b) < 1e-5


def test_load_and_fold_nnp_warn_of_a_skip_pattern_that_matches_no_bn(tmp_path):
    path = nnp_files.single(tmp_path / "m.nnp")
    with pytest.warns(bnfold_gpu.SkipPatternWarning, match="'bn9' matches no BN of the file"):
        net = bnfold_gpu.load(path, "net", backend="numpy", skip=["bn9", "bn1*"])
    assert bn_count(list(net.outputs.values())) == 1
    # a single pattern may be given as a string
    report = bnfold_gpu.fold_nnp(path, tmp_path / "out.nnp", backend="numpy", skip="bn1/bn")
    assert [s["bn"] for n in report.networks for s in n.skipped] == ["bn1/bn"]
    import sys   # the names made to fail during the fold are gone again
    assert not [k for k in sys.modules if k.startswith(("nnabla.nnabla", "nnabla.nnabla_ext"))]


def test_a_file_fold_that_fails_midway_leaves_no_file_and_no_module_entries(tmp_path, monkeypatch):
    import sys
    from bnfold_gpu import nnp as N
    path = nnp_files.single(tmp_path / "m.nnp")
    before = set(sys.modules)

    def failing(*args, **kwargs):
        raise MemoryError("injected")
    monkeypatch.setattr(N, "rewrite_proto", failing)   # after planning and the parameters' fold
    with pytest.raises(MemoryError, match="injected"):
        bnfold_gpu.fold_nnp(path, tmp_path / "out.nnp", backend="numpy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.nnp"]
    assert not [k for k in set(sys.modules) - before if k.startswith("nnabla.nnabla")]
    assert None not in [sys.modules.get(k, 0) for k in ("nnabla.nnabla", "nnabla.nnabla_ext")]


def test_load_unknown_network_or_bad_file_sets_nothing(tmp_path):
    path = nnp_files.single(tmp_path / "m.nnp")
    with pytest.raises(bnfold_gpu.NnpError, match="no network named 'nope'.*net"):
        bnfold_gpu.load(path, "nope")
    bad = tmp_path / "bad.nnp"
    bad.write_bytes(b"not a zip")
    with pytest.raises(bnfold_gpu.NnpError):
        bnfold_gpu.load(bad)
    assert not nn.get_parameters(grad_only=False)


def test_saved_after_load_is_clean_and_the_same(tmp_path):
    path = nnp_files.single(tmp_path / "m.nnp")
    net = bnfold_gpu.load(path, "net", backend="numpy")
    out = tmp_path / "saved.nnp"
    save(str(out), {"networks": [{"name": "net", "batch_size": 2, "outputs": dict(net.outputs),
                                  "names": dict(net.inputs)}]})
    assert not [n for n in N.read(str(out)).params if n.startswith("bn")]
    nn.clear_parameters()
    for a, b in zip(reference(out, "net"), reference(path, "net")):
        assert rel_err(a, b) < 1e-5


# -- prune --------------------------------------------------------------------------------------
def _model(rng, x, name="", batch_stat=False):
    h = PF.convolution(x, 4, (3, 3), pad=(1, 1), name=name + "c1")
    h = F.relu(PF.batch_normalization(h, batch_stat=batch_stat, name=name + "bn1"))
    h = PF.convolution(h, 3, (1, 1), with_bias=False, name=name + "c2")
    h = PF.batch_normalization(h, batch_stat=batch_stat, name=name + "bn2")
    return PF.affine(F.relu(h), 5, name=name + "fc")


def _built(seed):
    """(rng, x, y): ``_model`` with every parameter randomized."""
    rng = np.random.RandomState(seed)
    x = nn.Variable((2, 3, 6, 6))
    y = _model(rng, x)
    randomize_all(rng)
    return rng, x, y


def _saved_parameters(path):
    return set(N.read(str(path)).params)


@pytest.mark.parametrize("inplace", [True, False])
def test_prune_then_save_writes_a_clean_model_with_the_same_output(inplace, tmp_path):
    rng, x, y = _built(7)
    feed(rng, x)
    y.forward(clear_buffer=False)
    expected = y.d.copy()
    bn_params = {n for n in nn.get_parameters(grad_only=False) if n.startswith("bn")}
    assert len(bn_params) == 8

    result = bnfold_gpu.fold(y, backend="numpy", inplace=inplace, prune=True)
    assert set(result.unused) == set()            # pruned: nothing unused is registered
    registered = set(nn.get_parameters(grad_only=False))
    assert not registered & bn_params
    if not inplace:   # the layers read folded copies: their sources are unread and unregistered
        assert "c1/conv/W" not in registered and "c2/conv/W" not in registered
    y2 = result.outputs
    out = tmp_path / "pruned.nnp"
    save(str(out), {"networks": [{"name": "net", "batch_size": 2, "outputs": {"y": y2},
                                  "names": {"x": x}}]})
    saved = _saved_parameters(out)
    assert not {n for n in saved if "bn" in n}, saved
    assert saved == registered
    nn.clear_parameters()
    with nn.parameter_scope("", {}):
        net = NnpLoader(str(out)).get_network("net")
        net.inputs["x"].d = x.d
        net.outputs["y"].forward()
        assert rel_err(net.outputs["y"].d, expected) < 1e-5


def test_unused_lists_what_nothing_reads_and_prune_removes_only_that(tmp_path):
    rng, x, y = _built(8)
    result = bnfold_gpu.fold(y, backend="numpy")
    expected = {f"bn{i}/bn/{p}" for i in (1, 2) for p in ("beta", "gamma", "mean", "var")}
    assert set(result.unused) == expected
    assert expected <= set(nn.get_parameters(grad_only=False))   # not pruned unless asked
    assert set(result.prune()) == expected
    assert result.unused == () and result.prune() == ()
    assert not expected & set(nn.get_parameters(grad_only=False))


def test_prune_leaves_an_entry_that_names_another_variable(tmp_path):
    rng, x, y = _built(9)
    result = bnfold_gpu.fold(y, backend="numpy")
    replacement = nn.Variable((4,))
    nn.parameter.set_parameter("bn1/bn/mean", replacement)    # the user reused the name
    pruned = result.prune()
    assert "bn1/bn/mean" not in pruned and len(pruned) == 7
    assert nn.get_parameters(grad_only=False)["bn1/bn/mean"] is replacement


def test_a_kept_bn_keeps_its_parameters(tmp_path):
    rng, x, y = _built(10)
    result = bnfold_gpu.fold(y, backend="numpy", skip=["bn2*"], prune=True)
    registered = set(nn.get_parameters(grad_only=False))
    assert {f"bn2/bn/{p}" for p in ("beta", "gamma", "mean", "var")} <= registered
    assert not {n for n in registered if n.startswith("bn1")}
    assert len(result.folded) == 1


def test_prune_keeps_parameters_the_training_graph_shares_until_asked(tmp_path):
    """A training graph sharing the parameters keeps working after a prune (it holds the
    variables); only the registry forgets them."""
    rng = np.random.RandomState(11)
    xt = nn.Variable((2, 3, 6, 6))
    yt = _model(rng, xt, batch_stat=True)
    x = nn.Variable((2, 3, 6, 6))
    y = _model(rng, x)
    randomize_all(rng)
    feed(rng, xt)
    bnfold_gpu.fold(y, backend="numpy", inplace=False, prune=True)
    yt.forward()                           # still runs, reading the unregistered variables
    assert np.isfinite(yt.d).all()


def test_save_without_prune_keeps_the_dead_bn_parameters(tmp_path):
    """What prune is for: NNabla saves every registered parameter."""
    rng, x, y = _built(12)
    result = bnfold_gpu.fold(y, backend="numpy")
    out = tmp_path / "unpruned.nnp"
    save(str(out), {"networks": [{"name": "net", "batch_size": 2, "outputs": {"y": result.outputs},
                                  "names": {"x": x}}]})
    assert {n for n in _saved_parameters(out) if n.startswith("bn")}
    with zipfile.ZipFile(out) as z:
        assert any(m.endswith(".h5") for m in z.namelist())


def test_file_folds_in_several_threads_take_turns_with_nnablas_one_scope(tmp_path):
    # reading a file makes a scope of bnfold's own current for a while (NNabla has one per
    # process): folds in other threads meanwhile must neither see it nor leave the caller's
    import threading
    a = nnp_files.single(tmp_path / "a.nnp", parameter_format=".h5", seed=1)
    b = nnp_files.single(tmp_path / "b.nnp", parameter_format=".protobuf", seed=2)
    nn.clear_parameters()
    x = nn.Variable((2, 3, 6, 6))
    y = PF.batch_normalization(PF.convolution(x, 4, (3, 3), name="mine"), batch_stat=False,
                               name="mine_bn")
    randomize_all(np.random.RandomState(0))
    feed(np.random.RandomState(0), x)
    y.forward()
    want = y.d.copy()
    errors = []

    def work(src, k):
        try:
            for i in range(4):
                bnfold_gpu.fold_nnp(str(src), str(tmp_path / f"o{k}-{i}.nnp"), verify=True)
                bnfold_gpu.load(str(src), "net")
        except Exception as e:   # raised in the test below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(src, k)) for k, src in enumerate((a, b))]
    for t in threads:
        t.start()
    res = bnfold_gpu.fold(y, backend="numpy")   # the caller's own fold, meanwhile
    for t in threads:
        t.join()
    assert errors == []
    assert res.plan.folded_bns == ("mine_bn/bn",)
    y.forward()
    assert rel_err(y.d, want) < 1e-5
    names = set(nn.get_parameters(grad_only=False))   # load() adds the file's, as NnpLoader does
    assert {"mine/conv/W", "mine/conv/b", "mine_bn/bn/gamma"} <= names, sorted(names)
