"""``bnfold inspect`` and ``bnfold fold`` on .nnp files: saved by NNabla, laid out as Neural Network
Console does, made by NNabla's ONNX importer, and broken in every way a user's file can be."""
import io
import json
import os
import struct
import subprocess
import textwrap
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

nn = pytest.importorskip("nnabla", reason="nnabla is not installed (GPU machine)")
from nnabla.utils.nnp_graph import NnpLoader  # noqa: E402

from bnfold_gpu import _atomic, cli, nnp as N  # noqa: E402
import nnp_files  # noqa: E402

DATA = Path(__file__).parent / "data"


def run(*argv):
    return cli.main([str(a) for a in argv])


def load_run(path, network, seed=0, also=()):
    """Outputs of ``network`` in ``path`` on seeded random inputs (and the variables named in
    ``also``), plus its function types."""
    scope = {}
    with nn.parameter_scope("", scope):
        net = NnpLoader(str(path)).get_network(network)
        rng = np.random.RandomState(seed)
        for k in sorted(net.inputs):
            net.inputs[k].d = rng.standard_normal(net.inputs[k].shape)
        outs = {}
        for k, y in sorted(list(net.outputs.items()) + [(k, net.variables[k]) for k in also]):
            y.forward(clear_no_need_grad=False)
            outs[k] = y.d.copy()
        types = []
        for y in net.outputs.values():
            y.visit(lambda f: types.append(f.info.type_name))
    return outs, types


def members(path):
    with zipfile.ZipFile(path) as z:
        return {m: z.read(m) for m in z.namelist()}


@pytest.fixture
def console_file(tmp_path):
    return nnp_files.console_like(tmp_path / "model.nnp")


def test_inspect_table_and_json(console_file, capsys):
    assert run("inspect", console_file) == 0
    out = capsys.readouterr().out
    assert "network MainRuntime: 3 to fold, 0 to keep" in out
    assert "network Main: 0 to fold, 3 to keep (uses batch statistics)" in out
    assert "batch_stat=True" in out
    assert run("inspect", console_file, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    nets = info["networks"]
    assert {f["bn"] for f in nets["MainRuntime"]["folded"]} == {"bn1/bn", "bn2/bn", "bn3/bn"}
    assert all("batch_stat" in s["reason"] for s in nets["Main"]["skipped"])


def test_a_skip_pattern_that_names_no_bn_is_said(console_file, tmp_path, capsys):
    out = tmp_path / "folded.nnp"
    assert run("fold", console_file, "-o", out, "--quiet", "--skip", "bn1/*",
               "--skip", "bn9/*", "--skip", "bn9/*") == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "bnfold: note: --skip pattern 'bn9/*' matches no BN of the file (their names are like 'bn")
    assert run("inspect", console_file, "--skip", "bn1/bn", "--json") == 0
    captured = capsys.readouterr()
    assert captured.err == ""    # bn1/bn is a BN's name: nothing to say
    runtime = json.loads(captured.out)["networks"]["MainRuntime"]
    assert [s["bn"] for s in runtime["skipped"]] == ["bn1/bn"]


def test_fold_console_file_verified(console_file, tmp_path, capsys):
    out = tmp_path / "folded.nnp"
    report = tmp_path / "report.json"
    before_file = console_file.read_bytes()
    assert run("fold", console_file, "-o", out, "--verify", "--report", report) == 0
    text = capsys.readouterr().out
    assert "verify: network" in text and "MainRuntime" in text
    assert console_file.read_bytes() == before_file          # input untouched
    # runtime and validation networks: BN-free and equal to the original
    for name in ("MainRuntime", "MainValidation"):
        want, types0 = load_run(console_file, name)
        got, types1 = load_run(out, name)
        assert "BatchNormalization" in types0 and "BatchNormalization" not in types1
        assert "FusedBatchNormalization" not in types1 and "Add2" in types1
        for k in want:
            assert np.abs(got[k] - want[k]).max() / np.abs(want[k]).max() < 1e-5
    # the training network keeps its BNs and its original parameters
    f0, f1 = N.read(str(console_file)), N.read(str(out))
    main0 = next(n for n in f0.proto.network if n.name == "Main")
    main1 = next(n for n in f1.proto.network if n.name == "Main")
    assert [f.type for f in main0.function] == [f.type for f in main1.function]
    for f in main1.function:
        for name in f.input:
            if name in f0.params:
                assert np.array_equal(f1.params[name].value, f0.params[name].value), name
                assert f1.params[name].need_grad == f0.params[name].need_grad
    # executors kept; parameters of untouched layers keep their names
    assert [e.name for e in f1.proto.executor] == ["Runtime"]
    assert "fc/affine/W" in f1.params and f1.params["fc/affine/W"].need_grad
    rep = json.loads(report.read_text())
    assert rep["output"] == str(out) and rep["verify"]["outputs"]
    assert all(r["max_rel"] < 1e-4 for r in rep["verify"]["outputs"])
    assert len(rep["networks"]["MainRuntime"]["folded"]) == 3


def test_progress_names_each_stage_in_order(tmp_path, capsys):
    p = nnp_files.single(tmp_path / "m.nnp")
    assert run("fold", p, "-o", tmp_path / "o.nnp", "--verify") == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("bnfold: ")]
    assert lines == ["bnfold: " + x for x in (
        f"reading {p}", "planning net", "folding", "writing", "verify: loading the original file",
        "verify: running original net", "verify: loading the folded file",
        "verify: running folded net", "done")]


@pytest.mark.parametrize("fmt", [".h5", ".protobuf"])
def test_progress_counts_the_parameter_bytes(tmp_path, capsys, monkeypatch, fmt):
    monkeypatch.setattr(cli.Progress, "LINE_EVERY", 0.0)   # a line at every percent
    p = nnp_files.single(tmp_path / "m.nnp", parameter_format=fmt)
    assert run("fold", p, "-o", tmp_path / "o.nnp") == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("bnfold: ")]
    for stage in (f"reading {p}", "writing"):
        percents = [int(x.rsplit(" ", 1)[1].rstrip("%")) for x in lines
                    if x.startswith(f"bnfold: {stage}: ")]
        assert percents, (stage, lines)
        assert percents == sorted(percents) and percents[-1] >= 90 and percents[-1] <= 100
    stages = [x for x in lines if not x.endswith("%")]
    assert stages == ["bnfold: " + x for x in (f"reading {p}", "planning net", "folding", "writing",
                                               "done")]


def test_folded_runtime_shares_folded_parameters(console_file, tmp_path):
    out = tmp_path / "folded.nnp"
    assert run("fold", console_file, "-o", out, "-q") == 0
    f1 = N.read(str(out))
    nets = {n.name: n for n in f1.proto.network}
    w_run = [f.input[1] for f in nets["MainRuntime"].function if f.type == "Convolution"]
    w_val = [f.input[1] for f in nets["MainValidation"].function if f.type == "Convolution"]
    assert w_run == w_val and all(w.endswith("_folded") for w in w_run)   # computed once


@pytest.mark.parametrize("fmt", [".h5", ".protobuf"])
def test_fold_in_place_replaces_atomically(tmp_path, fmt, capsys):
    path = nnp_files.single(tmp_path / "m.nnp", parameter_format=fmt)
    want, _ = load_run(path, "net")
    os.chmod(path, 0o640)
    assert run("fold", path, "--in-place", "--verify", "-q") == 0
    assert capsys.readouterr().out == ""
    got, types = load_run(path, "net")
    assert "BatchNormalization" not in types
    assert np.abs(got["y"] - want["y"]).max() / np.abs(want["y"]).max() < 1e-5
    assert os.stat(path).st_mode & 0o777 == 0o640
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]   # no temporary left


def test_parameters_are_read_through_a_scratch_file_that_is_removed(tmp_path, monkeypatch):
    path = nnp_files.single(tmp_path / "m.nnp", parameter_format=".h5")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    f = N.read(str(path))
    assert f.params["c1/conv/W"].value.shape == (6, 3, 3, 3) and not list(scratch.iterdir())


def test_real_onnx_reference_file(tmp_path):
    out = tmp_path / "bn.nnp"
    assert run("fold", DATA / "sony_onnxref_batch_norm.nnp", "-o", out, "--verify", "-q") == 0
    got, _ = load_run(out, "batch_norm_net")
    np.testing.assert_allclose(got["out_data_1"],
                               np.load(DATA / "sony_onnxref_batch_norm.nnabla_output.npy"),
                               rtol=1e-6, atol=1e-6)


# -- files made by NNabla's ONNX importer -----------------------------------------------------------
def test_the_kept_nnabla_cli_writes_the_files_the_command_writes(tmp_path):
    """The tests convert with ``nnabla_cli`` kept running (tests/nnabla_cli_server.py): after other
    conversions in that process, it writes what the command writes in a process of its own, byte for
    byte, both ways (ONNX to .nnp, .nnp back to ONNX)."""
    pytest.importorskip("onnx", reason="the 'onnx' test extra is not installed")
    for variant in ("deconv", "gemm"):    # conversions before: the counters move
        model = nnp_files.onnx_model(tmp_path / f"{variant}.onnx", variant)
        nnp_files.nnabla_cli("convert", model, tmp_path / f"{variant}.nnp")
    nnp_files.nnabla_cli("convert", tmp_path / "deconv.nnp", tmp_path / "deconv-back.onnx")
    model = nnp_files.onnx_linear_models(tmp_path / "m.onnx", "residual_flatten")
    kept, back = tmp_path / "kept.nnp", tmp_path / "kept.onnx"
    nnp_files.nnabla_cli("convert", model, kept)
    nnp_files.nnabla_cli("convert", kept, back)
    exe = str(Path(sys.executable).with_name("nnabla_cli"))
    # the two commands at once: each spends its seconds importing
    commands = [subprocess.Popen([exe, "convert", str(src), str(dst)], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
                for src, dst in ((model, tmp_path / "own.nnp"), (kept, tmp_path / "own.onnx"))]
    for c in commands:
        out, _ = c.communicate(timeout=300)
        assert c.returncode == 0, out[-2000:]
    with zipfile.ZipFile(kept) as a, zipfile.ZipFile(tmp_path / "own.nnp") as b:
        assert [i.filename for i in a.infolist()] == [i.filename for i in b.infolist()]
        for i in a.infolist():
            assert a.read(i.filename) == b.read(i.filename), i.filename
    assert back.read_bytes() == (tmp_path / "own.onnx").read_bytes()


@pytest.mark.parametrize("variant", ["deconv", "gemm"])
def test_onnx_imported_files_fold_and_convert_back(tmp_path, variant):
    pytest.importorskip("onnx", reason="the 'onnx' test extra is not installed")
    model = nnp_files.onnx_model(tmp_path / "m.onnx", variant)
    nnp_path = tmp_path / "m.nnp"
    nnp_files.nnabla_cli("convert", model, nnp_path)
    names = N.read(str(nnp_path)).network_names()
    out = tmp_path / "folded.nnp"
    assert run("fold", nnp_path, "-o", out, "--verify", "-q") == 0
    for name in names:
        want, types0 = load_run(nnp_path, name)
        got, types1 = load_run(out, name)
        assert types0.count("BatchNormalization") >= 1 and "BatchNormalization" not in types1
        for k in want:
            assert np.abs(got[k] - want[k]).max() / np.abs(want[k]).max() < 1e-5
    f1 = N.read(str(out))
    assert "unused_W" in f1.params                     # unused parameters are kept as they were
    back = tmp_path / "back.onnx"
    nnp_files.nnabla_cli("convert", out, back)
    import onnx
    ops = [n.op_type for n in onnx.load(str(back)).graph.node]
    assert "BatchNormalization" not in ops and ("Conv" in ops)


@pytest.mark.parametrize("fmt", [".h5", ".protobuf"])
def test_bns_that_move_through_functions_fold_in_a_file(tmp_path, fmt):
    p = nnp_files.moves(tmp_path / "m.nnp", parameter_format=fmt)
    out, report = tmp_path / "o.nnp", tmp_path / "r.json"
    assert run("fold", p, "-o", out, "--verify", "--report", report, "-q") == 0
    rep = json.loads(report.read_text())["networks"]["g"]
    assert rep["skipped"] == [] and rep["folded_count"] == 5
    assert sorted(m for r in rep["folded"] for m in r["maps"] if "(" in m) == \
        ["Add2(fold3/shift)", "Mul2(fold3/scale)"]
    want, types0 = load_run(p, "g", also=["feature"])
    got, types1 = load_run(out, "g", also=["feature"])
    assert types0.count("BatchNormalization") == 5 and "BatchNormalization" not in types1
    assert "Mul2" not in types1 and types1.count("Add2") == 1    # the add of two convolutions
    for k in ("y", "feature"):
        assert np.abs(got[k] - want[k]).max() / np.abs(want[k]).max() < 1e-5
    f1 = N.read(str(out))
    assert [v.variable_name for v in f1.proto.executor[0].output_variable] == ["y", "feature"]
    assert not [n for n in f1.params if "_folding" in n or "composed" in n]


@pytest.mark.parametrize("alpha, beta", [(0.5, 1.0), (1.0, 2.0)])
def test_onnx_gemm_with_alpha_or_beta_then_batchnorm(tmp_path, alpha, beta):
    """NNabla's importer scales a Gemm's input by MulScalar(alpha) (a map: the BNs around the
    product fold) and its bias by MulScalar(beta) (the bias is a stored value times beta: each BN's
    shift goes into the stored value divided by beta, the MulScalar stays)."""
    pytest.importorskip("onnx", reason="the 'onnx' test extra is not installed")
    from onnx import helper, numpy_helper
    rng = np.random.RandomState(4)

    def init(name, arr):
        return numpy_helper.from_array(arr.astype(np.float32), name)
    inits = [init("fc_W", rng.randn(6, 8)), init("fc_b", rng.randn(6)),
             init("bn_scale", -rng.rand(6) - 0.5), init("bn_bias", rng.randn(6)),
             init("bn_mean", rng.randn(6)), init("bn_var", rng.rand(6) + 0.5),
             init("fc2_W", rng.randn(6, 3)),
             init("bn0_scale", rng.rand(8) + 0.5), init("bn0_bias", rng.randn(8)),
             init("bn0_mean", rng.randn(8)), init("bn0_var", rng.rand(8) + 0.5)]
    nodes = [helper.make_node("BatchNormalization", ["x"] + [f"bn0_{k}" for k in
                                                             ("scale", "bias", "mean", "var")], ["n"]),
             helper.make_node("Gemm", ["n", "fc_W", "fc_b"], ["g"], transB=1, alpha=alpha, beta=beta),
             helper.make_node("BatchNormalization", ["g"] + [f"bn_{k}" for k in
                                                             ("scale", "bias", "mean", "var")], ["b"]),
             helper.make_node("Relu", ["b"], ["r"]),
             helper.make_node("Gemm", ["r", "fc2_W"], ["y"])]
    model = nnp_files._save_onnx(tmp_path / "m.onnx", nodes, inits, [2, 8], [2, 3])
    nnp_path, out = tmp_path / "m.nnp", tmp_path / "folded.nnp"
    nnp_files.nnabla_cli("convert", model, nnp_path)
    report = tmp_path / "r.json"
    assert run("fold", nnp_path, "-o", out, "--verify", "-q", "--report", report) == 0
    rep = json.loads(report.read_text())["networks"]
    folded = [b for n in rep.values() for r in n["folded"] for b in r["bns"]]
    kept = [s["reason"] for n in rep.values() for s in n["skipped"]]
    assert len(folded) == 2 and not kept
    name = N.read(str(nnp_path)).network_names()[0]
    want, types0 = load_run(nnp_path, name)
    got, types1 = load_run(out, name)
    assert "BatchNormalization" in types0 and "BatchNormalization" not in types1
    assert types1.count("MulScalar") == types0.count("MulScalar") - (alpha != 1.0)
    assert np.abs(got["y"] - want["y"]).max() / np.abs(want["y"]).max() < 1e-5


def test_onnx_split_then_a_batchnorm_per_part(tmp_path):
    """Conv -> BN -> Split(3, 2, 3) -> BatchNormalization on two parts -> Concat: NNabla's importer
    makes the Split a Slice per part. Each part's BN folds back into the convolution over its
    channels, after the BN on the whole output (without it: tests/test_patterns.py). (Converting
    folded files back to ONNX: the tests above and below.)"""
    pytest.importorskip("onnx", reason="the 'onnx' test extra is not installed")
    from onnx import helper, numpy_helper
    rng = np.random.RandomState(5)

    def init(name, arr):
        return numpy_helper.from_array(arr.astype(np.float32), name)

    def bn(name, c, x, y):
        inits = [init(f"{name}_scale", rng.randn(c)), init(f"{name}_bias", rng.randn(c)),
                 init(f"{name}_mean", rng.randn(c)), init(f"{name}_var", rng.rand(c) + 0.5)]
        return inits, helper.make_node("BatchNormalization", [x] + [f"{name}_{k}" for k in
                                       ("scale", "bias", "mean", "var")], [y])
    inits = [init("c_W", rng.randn(8, 3, 3, 3)), init("c_b", rng.randn(8))]
    nodes = [helper.make_node("Conv", ["x", "c_W", "c_b"], ["c"], pads=[1, 1, 1, 1])]
    more, node = bn("bn", 8, "c", "n")
    inits, nodes = inits + more, nodes + [node]
    nodes.append(helper.make_node("Split", ["n"], ["p0", "p1", "p2"],
                                  axis=1, split=[3, 2, 3]))
    for k, c in ((0, 3), (1, 2)):
        more, node = bn(f"bn{k}", c, f"p{k}", f"b{k}")
        inits, nodes = inits + more, nodes + [node]
    nodes += [helper.make_node("Relu", ["p2"], ["b2"]),
              helper.make_node("Concat", ["b0", "b1", "b2"], ["j"], axis=1),
              helper.make_node("Relu", ["j"], ["y"])]
    model = nnp_files._save_onnx(tmp_path / "m.onnx", nodes, inits, [2, 3, 6, 6], [2, 8, 6, 6])
    nnp_path, out, report = tmp_path / "m.nnp", tmp_path / "folded.nnp", tmp_path / "r.json"
    nnp_files.nnabla_cli("convert", model, nnp_path)
    assert run("fold", nnp_path, "-o", out, "--verify", "-q", "--report", report) == 0
    rep = json.loads(report.read_text())["networks"]
    assert [s for n in rep.values() for s in n["skipped"]] == []
    assert len([b for n in rep.values() for r in n["folded"] for b in r["bns"]]) == 3
    name = N.read(str(nnp_path)).network_names()[0]
    want, types0 = load_run(nnp_path, name)
    got, types1 = load_run(out, name)
    assert types0.count("BatchNormalization") == 3 and types0.count("Slice") == 3
    assert "BatchNormalization" not in types1
    assert np.abs(got["y"] - want["y"]).max() / np.abs(want["y"]).max() < 1e-5


@pytest.mark.parametrize("variant", ["linear_bn", "linear_nobias_bn", "bn_linear_nobias_bn",
                                     "residual_flatten"])
def test_onnx_linear_and_batchnorm1d_fold_and_convert_back(tmp_path, capsys, variant):
    """NNabla's importer turns Gemm into Reshape -> BatchMatmul -> Reshape -> Add2 (the bias): a
    BN after it folds into the stored matrix and the add's bias; a BN flattened into it folds into
    the matrix's rows, its shift into the bias; after a Linear without bias, the BN becomes the add
    of a new bias (a BN before it too: that add's bias holds both shifts). The folded file converts
    back to ONNX."""
    pytest.importorskip("onnx", reason="the 'onnx' test extra is not installed")
    model = nnp_files.onnx_linear_models(tmp_path / "m.onnx", variant)
    nnp_path, out = tmp_path / "m.nnp", tmp_path / "folded.nnp"
    nnp_files.nnabla_cli("convert", model, nnp_path)
    report = tmp_path / "r.json"
    assert run("fold", nnp_path, "-o", out, "--verify", "-q", "--report", report) == 0
    rep = json.loads(report.read_text())["networks"]
    folds = [r for n in rep.values() for r in n["folded"]]
    assert [b for r in folds for b in r["bns"]] and not [s for n in rep.values() for s in n["skipped"]]
    assert {r["into"] for r in folds} <= {"BatchMatmul", "Add2"}
    name = N.read(str(nnp_path)).network_names()[0]
    want, types0 = load_run(nnp_path, name)
    got, types1 = load_run(out, name)
    assert "BatchNormalization" in types0 and "BatchNormalization" not in types1
    # the bias add stays, with the shift in it; without one, the BN becomes one
    assert types1.count("Add2") == types0.count("Add2") + ("nobias" in variant)
    assert np.abs(got["y"] - want["y"]).max() / np.abs(want["y"]).max() < 1e-5
    back = tmp_path / "back.onnx"
    nnp_files.nnabla_cli("convert", out, back)
    import onnx
    ops = [n.op_type for n in onnx.load(str(back)).graph.node]
    assert "BatchNormalization" not in ops and ("Gemm" in ops or "MatMul" in ops)


# -- bad input ------------------------------------------------------------------------------------
def _bad(tmp_path, capsys, *argv, status=2):
    """Runs the command as given and again with --quiet: exit ``status``, the message last on stderr
    (with --quiet, stderr is that one line), no traceback, nothing created or changed."""
    out = tmp_path / "out.nnp"
    messages = []
    for quiet in ((), ("--quiet",)):
        out.write_bytes(b"previous output")
        before = sorted(os.listdir(tmp_path))
        rc = run(*argv, *quiet, "-o", out) if argv[0] == "fold" else run(*argv, *quiet)
        captured = capsys.readouterr()
        err = captured.err.splitlines()
        assert rc == status, captured.err
        assert len(err) >= 1 and err[-1].startswith("bnfold: ") and "Traceback" not in captured.err
        if quiet:
            assert len(err) == 1 and captured.out == "", captured.err
        assert out.read_bytes() == b"previous output"
        assert sorted(os.listdir(tmp_path)) == before
        messages.append(err[-1])
    assert messages[0] == messages[1]
    return messages[-1]


def test_missing_file(tmp_path, capsys):
    assert "no such file" in _bad(tmp_path, capsys, "fold", tmp_path / "nope.nnp")


def test_not_a_zip(tmp_path, capsys):
    p = tmp_path / "text.nnp"
    p.write_text("this is not a model\n")
    assert "not an .nnp file" in _bad(tmp_path, capsys, "fold", p)


def test_truncated_zip(tmp_path, capsys):
    good = nnp_files.single(tmp_path / "good.nnp")
    p = tmp_path / "cut.nnp"
    p.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "not an .nnp file" in _bad(tmp_path, capsys, "fold", p)


def test_two_parameter_members_fold_into_one(tmp_path):
    # NNabla loads every parameter member; left in the output, a stale one could override the fold
    h5 = nnp_files.single(tmp_path / "h5.nnp", parameter_format=".h5")
    pb = nnp_files.single(tmp_path / "pb.nnp", parameter_format=".protobuf")
    both = tmp_path / "both.nnp"
    with zipfile.ZipFile(h5) as a, zipfile.ZipFile(pb) as b, zipfile.ZipFile(both, "w") as z:
        for m in a.infolist():
            z.writestr(m, a.read(m))
        z.writestr("parameter.protobuf", b.read("parameter.protobuf"))
    want, _ = load_run(h5, "net")
    out = tmp_path / "out.nnp"
    assert run("fold", both, "-o", out, "--verify", "-q") == 0
    assert [m for m in members(out) if m.startswith("parameter")] == ["parameter.protobuf"]
    got, types = load_run(out, "net")
    assert "BatchNormalization" not in types
    assert np.abs(got["y"] - want["y"]).max() / np.abs(want["y"]).max() < 1e-5


@pytest.mark.parametrize("order", [("nntxt", "pb"), ("pb", "nntxt"), ("h5", "nntxt"),
                                   ("nntxt", "h5"), ("nntxt", "h5", "pb without W")])
def test_a_parameter_both_inline_and_in_a_member_takes_the_value_nnabla_loads(tmp_path, order):
    # NNabla's loader reads the members in archive order: an HDF5 member sets its parameters; the
    # definition's inline parameters and each protobuf member join one list, set again whole by
    # each (an inline value read after a member, or again by a later protobuf member, wins)
    from google.protobuf import text_format
    from nnabla.utils import nnabla_pb2
    h5 = nnp_files.single(tmp_path / "h5.nnp", parameter_format=".h5")
    pb = nnp_files.single(tmp_path / "pb.nnp", parameter_format=".protobuf", seed=5)
    with zipfile.ZipFile(h5) as a, zipfile.ZipFile(pb) as b:
        proto = nnabla_pb2.NNablaProtoBuf()
        text_format.Merge(a.read("network.nntxt").decode(), proto)
        q = proto.parameter.add()
        q.variable_name = "c1/conv/W"
        q.shape.dim.extend([6, 3, 3, 3])
        q.data.extend(np.random.RandomState(7).normal(size=162).tolist())
        rest = nnabla_pb2.NNablaProtoBuf()
        rest.MergeFromString(b.read("parameter.protobuf"))
        kept = [p for p in rest.parameter if p.variable_name != "c1/conv/W"]
        del rest.parameter[:]
        rest.parameter.extend(kept)
        data = {"nntxt": ("network.nntxt", text_format.MessageToString(proto)),
                "pb": ("parameter.protobuf", b.read("parameter.protobuf")),
                "h5": ("parameter.h5", a.read("parameter.h5")),
                "pb without W": ("more.protobuf", rest.SerializeToString())}
        p = tmp_path / "both.nnp"
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("nnp_version.txt", a.read("nnp_version.txt"))
            for key in order:
                z.writestr(*data[key])
    want, _ = load_run(p, "net")
    out = tmp_path / "out.nnp"
    assert run("fold", p, "-o", out, "--verify", "-q") == 0
    got, types = load_run(out, "net")
    assert "BatchNormalization" not in types
    assert np.abs(got["y"] - want["y"]).max() / np.abs(want["y"]).max() < 1e-5


@pytest.mark.parametrize("fmt", [".h5", ".protobuf"])
def test_parameter_member_of_any_name(tmp_path, fmt):
    # NNabla's loader takes every .h5 / .protobuf member for parameters, whatever its name
    src = nnp_files.single(tmp_path / "src.nnp", parameter_format=fmt)
    p = tmp_path / "renamed.nnp"
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(p, "w") as z:
        for m in a.infolist():
            z.writestr("weights" + fmt if m.filename.startswith("parameter") else m.filename,
                       a.read(m))
    want, _ = load_run(p, "net")
    out = tmp_path / "out.nnp"
    assert run("fold", p, "-o", out, "--verify", "-q") == 0
    assert sorted(members(out)) == ["network.nntxt", "nnp_version.txt", "weights" + fmt]
    got, types = load_run(out, "net")
    assert "BatchNormalization" not in types
    assert np.abs(got["y"] - want["y"]).max() / np.abs(want["y"]).max() < 1e-5


def test_two_network_definitions_are_refused(tmp_path, capsys):
    # NNabla merges them; planning one and copying the other would fold weights it still reads raw
    src = nnp_files.single(tmp_path / "src.nnp")
    p = tmp_path / "two.nnp"
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(p, "w") as z:
        for m in a.infolist():
            z.writestr(m, a.read(m))
        z.writestr("extra.nntxt", a.read("network.nntxt"))
    msg = _bad(tmp_path, capsys, "fold", p)
    assert "2 network definitions (network.nntxt, extra.nntxt)" in msg


def test_parameter_member_holding_a_network_is_refused(tmp_path, capsys):
    from nnabla.utils import nnabla_pb2
    src = nnp_files.single(tmp_path / "src.nnp", parameter_format=".protobuf")
    p = tmp_path / "mixed.nnp"
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(p, "w") as z:
        for m in a.infolist():
            data = a.read(m)
            if m.filename == "parameter.protobuf":
                extra = nnabla_pb2.NNablaProtoBuf()
                extra.network.add().name = "hidden"
                data += extra.SerializeToString()   # concatenated messages merge
            z.writestr(m, data)
    msg = _bad(tmp_path, capsys, "fold", p)
    assert "parameter.protobuf does not parse: it holds 'network' entries besides parameters" in msg


def test_members_are_written_without_the_zip64_sizes_they_were_read_with():
    timestamp = struct.pack("<HHBI", 0x5455, 5, 1, 1700000000)
    zip64 = struct.pack("<HHQQ", 0x0001, 16, 5 << 30, 5 << 30)
    m = zipfile.ZipInfo("parameter.h5")
    m.extra = zip64 + timestamp
    assert N._new_entry(m).extra == timestamp and m.extra == zip64 + timestamp


def test_parameters_inside_the_network_definition(tmp_path):
    good = nnp_files.single(tmp_path / "good.nnp")
    f = N.read(str(good))
    f.members = [m for m in f.members if not m.filename.startswith("parameter")]
    f.param_member = None        # serialize() writes them into network.nntxt
    p = tmp_path / "inline.nnp"
    with open(p, "wb") as fh:
        N.serialize(f, fh)
    assert list(members(p)) == ["nnp_version.txt", "network.nntxt"]
    want, _ = load_run(p, "net")
    out = tmp_path / "out.nnp"
    assert run("fold", p, "-o", out, "--verify", "-q") == 0
    assert list(members(out)) == ["nnp_version.txt", "network.nntxt"]
    got, types = load_run(out, "net")
    assert "BatchNormalization" not in types
    assert np.abs(got["y"] - want["y"]).max() / np.abs(want["y"]).max() < 1e-5


def test_corrupt_compressed_parameters(tmp_path, capsys):
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")
    p = tmp_path / "corrupt.nnp"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as dst:
        for m in src.infolist():
            dst.writestr(m.filename, src.read(m))
    data = bytearray(p.read_bytes())
    with zipfile.ZipFile(p) as z:
        m = z.getinfo("parameter.h5")
        start = m.header_offset + 30 + len(m.filename.encode()) + len(m.extra)
    for k in range(start + 100, start + m.compress_size - 100, 97):
        data[k] ^= 0x5A
    p.write_bytes(bytes(data))
    assert "not a readable zip archive" in _bad(tmp_path, capsys, "fold", p)


@pytest.mark.parametrize("fmt", [".h5", ".protobuf"])
def test_parameter_member_that_does_not_parse(tmp_path, capsys, fmt):
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=fmt)
    p = tmp_path / "garbage.nnp"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(p, "w") as dst:
        for m in src.infolist():
            data = src.read(m)
            dst.writestr(m, data[:len(data) // 2] if m.filename.startswith("parameter") else data)
    assert f"parameter{fmt} does not parse" in _bad(tmp_path, capsys, "fold", p)
    assert f"parameter{fmt} does not parse" in _bad(tmp_path, capsys, "inspect", p)


@pytest.mark.parametrize("error", [KeyError, RuntimeError, ValueError])
def test_damaged_hdf5_member(tmp_path, capsys, monkeypatch, error):
    # h5py reports damage inside an HDF5 file with these, not only OSError
    import h5py
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")

    def damaged(*args, **kwargs):
        raise error("Unable to synchronously open object (invalid dataset size)")
    monkeypatch.setattr(h5py, "File", damaged)
    msg = _bad(tmp_path, capsys, "fold", good)
    assert msg.startswith(f"bnfold: {good}: parameter.h5 does not parse: ") and "dataset size" in msg


def test_no_room_for_the_scratch_file(tmp_path, capsys, monkeypatch):
    stored = nnp_files.single(tmp_path / "stored.nnp", parameter_format=".h5")
    good = tmp_path / "good.nnp"   # a compressed HDF5 member is read from a scratch copy
    with zipfile.ZipFile(stored) as a, zipfile.ZipFile(good, "w", zipfile.ZIP_DEFLATED) as z:
        for m in a.infolist():
            z.writestr(m.filename, a.read(m))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    msg = _bad(tmp_path, capsys, "fold", good)
    assert "scratch file" in msg and "TMPDIR" in msg


def test_zip_without_network(tmp_path, capsys):
    p = tmp_path / "empty.nnp"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("nnp_version.txt", "0.1\n")
    assert "no network definition" in _bad(tmp_path, capsys, "fold", p)


def _edit_params(src, dst, edit):
    f = N.read(str(src))
    edit(f.params)
    with open(dst, "wb") as fh:
        N.serialize(f, fh)
    return dst


def test_missing_parameter(tmp_path, capsys):
    good = nnp_files.single(tmp_path / "good.nnp")
    p = _edit_params(good, tmp_path / "p.nnp", lambda ps: ps.pop("c1/conv/W"))
    assert "'c1/conv/W'" in _bad(tmp_path, capsys, "fold", p)


def test_declared_parameter_without_value_that_no_function_uses(tmp_path):
    # no value in the file for a parameter nothing reads: the file still folds and verifies
    good = nnp_files.single(tmp_path / "good.nnp")
    f = N.read(str(good))
    v = f.proto.network[0].variable.add()
    v.name, v.type = "spare/W", "Parameter"
    v.shape.dim.extend([3, 4])
    p = tmp_path / "spare.nnp"
    with open(p, "wb") as fh:
        N.serialize(f, fh)
    assert run("fold", p, "-o", tmp_path / "out.nnp", "--verify", "-q") == 0


def test_network_that_nnabla_cannot_build(tmp_path, capsys):
    good = nnp_files.single(tmp_path / "good.nnp")
    f = N.read(str(good))
    f.proto.network[0].function[0].type = "NoSuchFunction"
    p = tmp_path / "unknown.nnp"
    with open(p, "wb") as fh:
        N.serialize(f, fh)
    msg = _bad(tmp_path, capsys, "fold", p)
    assert msg.startswith(f"bnfold: {p}: network 'net': NNabla cannot load it: ")
    assert "NoSuchFunction" in msg


def test_parameter_of_wrong_shape(tmp_path, capsys):
    good = nnp_files.single(tmp_path / "good.nnp")

    def edit(ps):
        ps["d1/deconv/W"].value = ps["d1/deconv/W"].value[:2].copy()
    p = _edit_params(good, tmp_path / "p.nnp", edit)
    assert "shape" in _bad(tmp_path, capsys, "fold", p)


def test_float16_parameters_fold_as_float16(tmp_path):
    # planning reads dtypes from the file, not from NNabla's (data-less) parameters
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")

    def edit(ps):
        for p in ps.values():
            p.value = p.value.astype(np.float16)
    p = _edit_params(good, tmp_path / "half.nnp", edit)
    out = tmp_path / "out.nnp"
    assert run("fold", p, "-o", out, "--verify", "--tolerance", "1e-2", "-q") == 0
    folded = N.read(str(out))
    assert {v.value.dtype for v in folded.params.values()} == {np.dtype(np.float16)}
    assert "d1/deconv/b" in folded.params and "bn2/bn/mean" not in _used_parameters(folded)


def _used_parameters(f):
    return {name for net in f.proto.network for fn in net.function for name in fn.input}


@pytest.mark.parametrize("bad, word", [(-1.0, "negative"), (np.nan, "non-finite"),
                                       (np.inf, "non-finite")])
def test_bad_variance(tmp_path, capsys, bad, word):
    good = nnp_files.single(tmp_path / "good.nnp")

    def edit(ps):
        ps["bn2/bn/var"].value = ps["bn2/bn/var"].value.copy()
        ps["bn2/bn/var"].value.flat[1] = bad
    p = _edit_params(good, tmp_path / "p.nnp", edit)
    assert f"bn2/bn: variance has {word}" in _bad(tmp_path, capsys, "fold", p)


def test_output_equal_to_input_needs_in_place(tmp_path, capsys):
    p = nnp_files.single(tmp_path / "m.nnp")
    before = p.read_bytes()
    assert run("fold", p, "-o", p) == 2
    assert "--in-place" in capsys.readouterr().err
    assert p.read_bytes() == before


def test_output_and_in_place_together_are_refused(tmp_path, capsys):
    p = nnp_files.single(tmp_path / "m.nnp")
    before = p.read_bytes()
    assert "not both" in _bad(tmp_path, capsys, "fold", p, "--in-place")
    assert p.read_bytes() == before


@pytest.mark.parametrize("given", [("--tolerance", "0.5"), ("--atol", "1"), ("--seed", "3"),
                                   ("--atol", "1", "--seed", "3")])
def test_verify_options_without_verify_are_refused(tmp_path, capsys, given):
    # they would change nothing: a user who meant to verify would believe they had
    p = nnp_files.single(tmp_path / "m.nnp")
    err = _bad(tmp_path, capsys, "fold", p, *given)
    assert "give --verify too" in err and all(g in err for g in given[::2])


@pytest.mark.parametrize("argv", [("inspect",), ("fold",), ("fold", "--report", "-", "-q")])
def test_closed_stdout_is_refused_before_any_work(tmp_path, argv):
    p = nnp_files.single(tmp_path / "m.nnp")
    out = tmp_path / "o.nnp"
    args = [argv[0], p] + (["-o", out] if argv[0] == "fold" else []) + list(argv[1:])
    r = _cli_subprocess(*args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                        preexec_fn=lambda: os.close(1))
    assert r.returncode == 2 and r.stderr.splitlines()[-1].startswith(
        "bnfold: standard output is closed"), r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
    # fold -q prints nothing there: it runs
    r = _cli_subprocess("fold", p, "-o", out, "-q", stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(1))
    assert r.returncode == 0 and r.stderr == "" and out.exists()


def test_the_systems_read_errors_are_not_blamed_on_the_file(tmp_path, capsys, monkeypatch):
    import errno
    import zipfile
    p = nnp_files.single(tmp_path / "m.nnp")

    def no_files(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")
    monkeypatch.setattr(zipfile, "ZipFile", no_files)
    err = _bad(tmp_path, capsys, "fold", p)
    assert "cannot read it: Too many open files" in err and "not an .nnp file" not in err


def test_only_the_systems_errors_are_said_as_such():
    import errno
    from bnfold_gpu import nnp as N
    assert "cannot read it: Too many open files" in str(
        N._not_a_zip("m.nnp", OSError(errno.EMFILE, "Too many open files")))
    # a seek to a corrupt offset fails with EINVAL: the file's fault
    assert "not an .nnp file" in str(N._not_a_zip("m.nnp", OSError(errno.EINVAL, "Invalid argument")))


def test_nnabla_failing_to_import_is_one_line(tmp_path):
    p = nnp_files.single(tmp_path / "m.nnp")
    hook = _when_nnabla_is_imported("raise OSError(24, 'Too many open files')")
    r = subprocess.run([sys.executable, "-c", hook + _SUBPROCESS_MAIN, "fold", str(p), "-o",
                        str(tmp_path / "o.nnp")], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr == "bnfold: NNabla cannot be imported: Too many open files; nothing written\n"
    assert not (tmp_path / "o.nnp").exists()


def test_unusable_backend_is_a_clear_error(tmp_path, capsys, monkeypatch):
    from bnfold_gpu.backends import cupy_backend
    monkeypatch.setattr(cupy_backend, "unavailable_reason", lambda: "no CUDA device found")
    p = nnp_files.single(tmp_path / "m.nnp")
    out = tmp_path / "out.nnp"
    assert run("fold", p, "-o", out, "--backend", "cupy") == 2
    err = capsys.readouterr().err
    assert "no CUDA device found" in err and "reading" not in err   # said before the file is read
    assert "no CUDA device found" in _bad(tmp_path, capsys, "fold", p, "--backend", "cupy")


def test_verify_failure_writes_nothing(tmp_path, capsys, monkeypatch):
    from bnfold_gpu import nnp
    p = nnp_files.single(tmp_path / "m.nnp")
    out = tmp_path / "o.nnp"
    report = tmp_path / "r.json"
    assert run("fold", p, "-o", out, "--verify", "--tolerance", "0") in (0, 1)
    out.unlink(missing_ok=True)
    real = nnp.verify

    def off_by_much(*args, **kwargs):   # the real comparison, its errors made large
        return [{**r, "max_rel": r["max_rel"] + 1.0} for r in real(*args, **kwargs)]

    monkeypatch.setattr(nnp, "verify", off_by_much)
    rc = run("fold", p, "-o", out, "--verify", "--report", report)
    assert rc == 1 and "verification failed" in capsys.readouterr().err
    assert not out.exists() and not [x for x in os.listdir(tmp_path) if x.startswith(".o.nnp")]
    assert json.loads(report.read_text())["output"] is None


def test_weights_tied_by_name_in_a_file(tmp_path):
    # one parameter read by two convolutions of a network (saved from PF calls under one name):
    # the conv before the BN folds into a copy, the other keeps reading the original
    nn.clear_parameters()
    import nnabla.functions as F
    import nnabla.parametric_functions as PF
    from nnabla.utils.save import save
    x = nn.Variable((2, 3, 8, 8))
    h = PF.batch_normalization(PF.convolution(x, 3, (3, 3), pad=(1, 1), name="tied"),
                               batch_stat=False, name="bn")
    y = PF.convolution(F.relu(h), 3, (3, 3), pad=(1, 1), name="tied")
    nnp_files.randomize_all(np.random.RandomState(0))
    p, out = tmp_path / "tied.nnp", tmp_path / "out.nnp"
    save(str(p), {"networks": [{"name": "n", "batch_size": 2, "outputs": {"y": y}, "names": {"x": x}}]})
    nn.clear_parameters()
    assert run("fold", p, "-o", out, "--verify", "-q") == 0
    f0, f1 = N.read(str(p)), N.read(str(out))
    assert np.array_equal(f1.params["tied/conv/W"].value, f0.params["tied/conv/W"].value)
    assert "tied/conv/W_folded" in f1.params


def test_bn_chains_fold_in_one_pass(tmp_path, capsys):
    # conv -> bn1 -> bn2, relu -> bn3 -> bn4 -> conv, relu -> bn5 -> affine -> bn6: each pair of BNs
    # is one map, the affine takes one on each side; one plan folds them all
    p = nnp_files.bn_chains(tmp_path / "chains.nnp")
    assert run("inspect", p) == 0
    assert "6 BN(s) would fold, 0 would stay" in capsys.readouterr().out
    out, report = tmp_path / "out.nnp", tmp_path / "r.json"
    assert run("fold", p, "-o", out, "--verify", "--report", report, "-q") == 0
    rep = json.loads(report.read_text())["networks"]["n"]
    assert sorted(b for r in rep["folded"] for b in r["bns"]) == [f"bn{i}/bn" for i in range(1, 7)]
    assert rep["skipped"] == [] and rep["folded_count"] == 6
    assert sorted(r["bn"] for r in rep["folded"]) == ["bn1/bn+bn2/bn", "bn3/bn+bn4/bn", "bn5/bn",
                                                     "bn6/bn"]
    want, types0 = load_run(p, "n")
    got, types1 = load_run(out, "n")
    assert types0.count("BatchNormalization") == 6 and "BatchNormalization" not in types1
    assert np.abs(got["y"] - want["y"]).max() / np.abs(want["y"]).max() < 1e-5
    f1 = N.read(str(out))       # nothing of the fold's own (the affine between its two folds) kept
    assert not [n for n in f1.params if "_folding" in n or "composed" in n]


def test_verify_runs_the_networks_that_fold_nothing(tmp_path, capsys, monkeypatch):
    # "features" folds nothing but reads the conv weight that "classifier" folds: it must get a
    # folded copy, and --verify must run it too, since it is where a wrong in-place fold would show
    p = nnp_files.shared_backbone(tmp_path / "m.nnp")
    out, report = tmp_path / "o.nnp", tmp_path / "r.json"
    assert run("fold", p, "-o", out, "--verify", "--report", report) == 0
    rep = json.loads(report.read_text())
    assert rep["networks"]["features"]["folded"] == [] and rep["networks"]["classifier"]["folded"]
    assert {r["network"] for r in rep["verify"]["outputs"]} == {"classifier", "features"}
    for name in ("classifier", "features"):
        want, _ = load_run(p, name)
        got, _ = load_run(out, name)
        for k in want:
            assert np.abs(got[k] - want[k]).max() / np.abs(want[k]).max() < 1e-5
    out.unlink()
    # the same file with the shared weight rescaled in place: --verify says so, nothing is written
    real = N._settle
    monkeypatch.setattr(N, "_settle", lambda p, network, uses, *args: real(p, network, {}, *args))
    assert run("fold", p, "-o", out, "--verify") == 1
    assert "features" in capsys.readouterr().out and not out.exists()


@pytest.mark.parametrize("option, value", [("--tolerance", "-1"), ("--tolerance", "nan"),
                                           ("--tolerance", "inf"), ("--tolerance", "x"),
                                           ("--atol", "-1"), ("--atol", "abc"), ("--seed", "-5"),
                                           ("--seed", str(2 ** 32)), ("--seed", "1.5"),
                                           ("--seed", "x")])
def test_bad_tolerance_or_seed_is_a_usage_error(tmp_path, capsys, option, value):
    # a seed NNabla's random generator refuses was said as "cannot verify" (exit 3)
    p = nnp_files.single(tmp_path / "m.nnp")
    with pytest.raises(SystemExit) as e:
        run("fold", p, "-o", tmp_path / "o.nnp", "--verify", option, value)
    err = capsys.readouterr().err
    assert e.value.code == 2 and option in err and f"{value}: a " in err
    assert "_tolerance" not in err and "_seed" not in err   # no name of bnfold's own functions
    assert not (tmp_path / "o.nnp").exists()


def test_report_that_cannot_be_written_stops_before_any_work(tmp_path, capsys):
    p = nnp_files.single(tmp_path / "m.nnp")
    assert "does not exist" in _bad(tmp_path, capsys, "fold", p, "--report", tmp_path / "no" / "r.json")
    assert "is a directory" in _bad(tmp_path, capsys, "fold", p, "--report", tmp_path)
    before = p.read_bytes()
    assert "would overwrite" in _bad(tmp_path, capsys, "fold", p, "--report", p)
    assert p.read_bytes() == before


def test_console_script_exit_status_and_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bnfold_gpu.cli", "fold", str(tmp_path / "x.nnp"),
                        "-o", str(tmp_path / "y.nnp")], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "no such file" in r.stderr
    p = nnp_files.single(tmp_path / "m.nnp")
    r = subprocess.run([sys.executable, "-m", "bnfold_gpu.cli", "inspect", str(p)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "3 BN(s) would fold" in r.stdout
    assert "INFO" not in r.stderr and "bnfold: reading" in r.stderr   # NNabla's import-time lines not
    assert not (tmp_path / "y.nnp").exists()


def test_demo_saves_a_file_that_folds_without_nnabla_info_lines(tmp_path):
    p = tmp_path / "r.nnp"
    r = subprocess.run([sys.executable, "-m", "bnfold_gpu.demo", "--save", str(p), "--width", "8",
                        "--size", "16"], capture_output=True, text=True)
    assert r.returncode == 0 and "saved ResNet-50 (width 8" in r.stdout
    assert "INFO" not in r.stdout + r.stderr
    assert run("fold", p, "-o", tmp_path / "f.nnp", "--verify", "-q") == 0


def test_fold_with_the_gpu_backend_emulated(tmp_path, host, monkeypatch):
    """--backend cupy on host-resident parameters: the staged path, device emulated on the host."""
    import fake_cupy
    from bnfold_gpu.backends import cupy_backend
    monkeypatch.setattr(cupy_backend, "cupy", fake_cupy.make(host))
    monkeypatch.setattr(cupy_backend, "_MODULES", {})
    monkeypatch.setattr(cupy_backend, "STAGING_BYTES", 32 << 10)   # several chunks
    src = nnp_files.console_like(tmp_path / "m.nnp")
    ref, out = tmp_path / "ref.nnp", tmp_path / "gpu.nnp"
    report = tmp_path / "r.json"
    assert run("fold", src, "-o", ref, "--backend", "numpy", "-q") == 0
    assert run("fold", src, "-o", out, "--backend", "cupy", "--verify", "-q", "--report", report) == 0
    assert json.loads(report.read_text())["backend"] == "cupy"
    a, b = N.read(str(ref)), N.read(str(out))
    assert list(a.params) == list(b.params)
    for name in a.params:
        assert np.array_equal(a.params[name].value, b.params[name].value), name


def test_in_memory_fold_of_an_onnx_imported_graph(tmp_path):
    """bnfold_gpu.fold on the graph NnpLoader builds from an ONNX-imported file: unscoped names,
    a deconvolution without bias, an unused parameter registered as None."""
    pytest.importorskip("onnx", reason="the 'onnx' test extra is not installed")
    import bnfold_gpu
    model = nnp_files.onnx_model(tmp_path / "m.onnx", "deconv")
    path = tmp_path / "m.nnp"
    nnp_files.nnabla_cli("convert", model, path)
    nn.clear_parameters()
    net = NnpLoader(str(path)).get_network("g")
    x, y = net.inputs["x"], net.outputs["y"]
    x.d = np.random.RandomState(0).standard_normal(x.shape)
    y.forward()
    want = y.d.copy()
    res = bnfold_gpu.fold(net.outputs)             # the network's dict of outputs, as given
    assert sorted(r.bn for r in res.folded) == ["bn1_mean", "bn2_mean"] and not res.skipped
    assert set(res.parameters) == {"conv1_b", "deconv_b"}     # biases created, unscoped like the rest
    assert list(res.outputs) == ["y"] and res.outputs["y"] is y
    y.forward()
    assert np.abs(y.d - want).max() / np.abs(want).max() < 1e-5


def test_output_folder_missing(tmp_path, capsys):
    p = nnp_files.single(tmp_path / "m.nnp")
    assert run("fold", p, "-o", tmp_path / "no" / "such" / "dir" / "o.nnp") == 2
    err = capsys.readouterr().err
    assert err.startswith("bnfold: ") and "does not exist" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1       # refused before any work


def test_version(capsys):
    import bnfold_gpu
    with pytest.raises(SystemExit) as e:
        run("--version")
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"bnfold {bnfold_gpu.__version__}"


# -- files made here for the cases below ----------------------------------------------------------
def _save(path, networks, executors=()):
    from nnabla.utils.save import save
    save(str(path), {"networks": networks, "executors": list(executors)})
    nn.clear_parameters()
    return path


def _no_bn_file(path):
    import nnabla.parametric_functions as PF
    nn.clear_parameters()
    x = nn.Variable((2, 3, 4, 4))
    y = PF.affine(x, 2, name="fc")
    nnp_files.randomize_all(np.random.RandomState(0))
    return _save(path, [{"name": "plain", "batch_size": 2, "outputs": {"y": y}, "names": {"x": x}}])


def _channel_last_file(path):
    """A convolution NNabla's CPU context builds but cannot run (channel-last), then its BN."""
    import nnabla.parametric_functions as PF
    nn.clear_parameters()
    x = nn.Variable((2, 6, 6, 3))
    h = PF.convolution(x, 4, (3, 3), pad=(1, 1), channel_last=True, name="c")
    y = PF.batch_normalization(h, axes=[3], batch_stat=False, name="bn")
    nnp_files.randomize_all(np.random.RandomState(0))
    return _save(path, [{"name": "cl", "batch_size": 2, "outputs": {"y": y}, "names": {"x": x}}])


def _intermediate_output_file(path):
    """conv -> BN -> h -> h * 0 = y: the executor declares h as an output as well as y, as DCGAN's
    files declare the generator's ``fake`` that the discriminator reads."""
    import nnabla.functions as F
    import nnabla.parametric_functions as PF
    nn.clear_parameters()
    x = nn.Variable((2, 3, 6, 6))
    h = PF.batch_normalization(PF.convolution(x, 4, (3, 3), pad=(1, 1), name="c"),
                               batch_stat=False, name="bn")
    y = F.mul_scalar(h, 0.0)
    nnp_files.randomize_all(np.random.RandomState(0))
    _save(path, [{"name": "gen", "batch_size": 2, "outputs": {"y": y}, "names": {"x": x}}],
          [{"name": "run", "network": "gen", "data": ["x"], "output": ["y"]}])
    f = N.read(str(path))
    bn = next(fn for fn in f.proto.network[0].function if fn.type == "BatchNormalization")
    f.proto.executor[0].output_variable.add().variable_name = bn.output[0]
    with open(path, "wb") as fh:
        N.serialize(f, fh)
    return path, bn.output[0]


def _listing(folder):
    return sorted(os.listdir(folder))


# -- outputs that are not regular files -----------------------------------------------------------
def _never_replace_devices(monkeypatch):
    """Tests run as root may be able to replace /dev/null: a call that tries fails the test."""
    real = os.replace

    def guarded(src, dst, *args, **kwargs):
        assert not str(os.path.realpath(dst)).startswith("/dev/"), f"replaced {dst}"
        return real(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, "replace", guarded)


def test_output_that_is_a_fifo_is_refused(tmp_path, capsys):
    p = nnp_files.single(tmp_path / "m.nnp")
    fifo = tmp_path / "fifo.nnp"
    os.mkfifo(fifo)
    assert run("fold", p, "-o", fifo, "-q") == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "not a regular file" in err[0] and str(fifo) in err[0]
    assert stat_kind(fifo) == "fifo"
    report_fifo = tmp_path / "r.json"
    os.mkfifo(report_fifo)
    assert "not a regular file" in _bad(tmp_path, capsys, "fold", p, "--report", report_fifo)
    assert stat_kind(report_fifo) == "fifo"


def stat_kind(path):
    import stat
    mode = os.lstat(path).st_mode
    return "fifo" if stat.S_ISFIFO(mode) else "char" if stat.S_ISCHR(mode) else \
        "link" if stat.S_ISLNK(mode) else "file" if stat.S_ISREG(mode) else "other"


def test_output_that_is_a_device_is_refused(tmp_path, capsys, monkeypatch):
    _never_replace_devices(monkeypatch)
    p = nnp_files.single(tmp_path / "m.nnp")
    link = tmp_path / "null.nnp"          # an .nnp name that leads to a device
    link.symlink_to("/dev/null")
    assert "not a regular file" in _bad(tmp_path, capsys, "fold", p, "--report", "/dev/null")
    assert run("fold", p, "-o", link, "-q") == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "not a regular file" in err[0]
    assert run("fold", p, "-o", "/dev/null", "-q") == 2
    assert len(capsys.readouterr().err.splitlines()) == 1
    assert stat_kind("/dev/null") == "char" and stat_kind(link) == "link"


def test_output_suffix_other_than_nnp_is_refused(tmp_path, capsys):
    p = nnp_files.single(tmp_path / "m.nnp")
    assert run("fold", p, "-o", tmp_path / "model.onnx", "-q") == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "model.onnx" in err[0] and ".nnp" in err[0]
    assert not (tmp_path / "model.onnx").exists()


# -- temporary files ------------------------------------------------------------------------------
def test_planted_symlinks_cannot_redirect_a_write(tmp_path, capsys):
    p = nnp_files.single(tmp_path / "m.nnp")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out, report = tmp_path / "o.nnp", tmp_path / "r.json"
    pid = os.getpid()
    mine = _atomic.prefix()
    guesses = [f"r.json.{pid}.tmp", f".o.nnp.{pid}.tmp", f".bnfold-{pid}-r.json.tmp",
               f"{mine}r.json.tmp", f"{mine}o.nnp.tmp", f"{mine}o.nnp.tmp.nnp"]
    for name in guesses:
        (tmp_path / name).symlink_to(victim)
    assert run("fold", p, "-o", out, "--report", report, "-q") == 0
    assert victim.read_text() == "precious"
    assert stat_kind(report) == "file" and json.loads(report.read_text())["output"] == str(out)
    assert stat_kind(out) == "file"
    assert all(stat_kind(tmp_path / name) == "link" for name in guesses)   # not ours: left alone


def test_temp_files_are_named_for_the_process_beside_the_target(tmp_path, monkeypatch):
    p = nnp_files.single(tmp_path / "m.nnp", parameter_format=".h5")
    out = tmp_path / "out" / "o.nnp"
    out.parent.mkdir()
    seen = []
    real = N._write_h5_member

    def spy(*args, **kwargs):
        seen.extend(os.listdir(out.parent))
        return real(*args, **kwargs)
    monkeypatch.setattr(N, "_write_h5_member", spy)
    assert run("fold", p, "-o", out, "-q") == 0
    assert seen and all(x.startswith(_atomic.prefix()) and ".tmp" in x for x in seen)
    assert _listing(out.parent) == ["o.nnp"]


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path):
    p = nnp_files.single(tmp_path / "m.nnp")
    out = tmp_path / "out"
    out.mkdir()
    dead, alive = _atomic.prefix(_dead_pid()), _atomic.prefix(os.getppid())
    elsewhere = dead.replace("@", "@another.host.")      # a shared folder: that pid is not ours
    stale = [f"{dead}x1y2-o.nnp.tmp.nnp", f"{dead}abcd-r.json.tmp", f"{dead}scratch.tmp"]
    kept = [f"{alive}x1y2-o.nnp.tmp.nnp", f"{elsewhere}x1y2-o.nnp.tmp.nnp", ".bnfold-notes.txt",
            "keep.tmp", f"{dead[1:]}x.tmp", f"{dead}x.nnp"]
    for name in stale[:2] + kept:
        (out / name).write_text("left over")
    (out / stale[2]).mkdir()
    (out / stale[2] / "parameter.h5").write_text("left over")
    (out / f"{dead}link.tmp").symlink_to(p)   # a link is never ours: left alone
    assert run("fold", p, "-o", out / "o.nnp", "-q") == 0
    assert _listing(out) == sorted(kept + ["o.nnp", f"{dead}link.tmp"])
    assert p.exists()


# -- the report -----------------------------------------------------------------------------------
def test_report_is_written_after_the_output_and_tells_the_truth(tmp_path, monkeypatch):
    p = nnp_files.single(tmp_path / "m.nnp")
    out, report = tmp_path / "o.nnp", tmp_path / "r.json"
    order = []
    real = os.replace

    def spy(src, dst, *args, **kwargs):
        order.append(os.path.basename(dst))
        return real(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, "replace", spy)
    assert run("fold", p, "-o", out, "--report", report, "-q") == 0
    assert order == ["o.nnp", "r.json"]
    rep = json.loads(report.read_text())
    assert rep["output"] == str(out) and rep["not_written"] is None


def test_report_failing_after_the_output_says_the_output_was_written(tmp_path, capsys, monkeypatch):
    p = nnp_files.single(tmp_path / "m.nnp")
    out, report = tmp_path / "o.nnp", tmp_path / "r.json"
    real = os.replace

    def disk_full(src, dst, *args, **kwargs):
        if str(dst).endswith("r.json"):
            raise OSError(28, "No space left on device", str(dst))
        return real(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, "replace", disk_full)
    for quiet in ((), ("-q",)):
        rc = run("fold", p, "-o", out, "--report", report, *quiet)
        err = capsys.readouterr().err.splitlines()
        assert rc == 4 and "Traceback" not in "\n".join(err)
        assert f"{out} was written" in err[-1] and "No space left on device" in err[-1]
        assert str(report) in err[-1]
        if quiet:
            assert len(err) == 1
        assert load_run(out, "net")[1].count("BatchNormalization") == 0
        assert _listing(tmp_path) == ["m.nnp", "o.nnp"]


def test_report_naming_the_output_through_a_link_is_refused(tmp_path, capsys):
    p = nnp_files.single(tmp_path / "m.nnp")
    out = tmp_path / "out.nnp"       # the name _bad writes
    sym = tmp_path / "sym.json"
    sym.symlink_to(out)
    hard = tmp_path / "hard.json"
    out.write_bytes(b"previous output")
    os.link(out, hard)
    assert "would overwrite" in _bad(tmp_path, capsys, "fold", p, "--report", sym)
    assert "would overwrite" in _bad(tmp_path, capsys, "fold", p, "--report", hard)
    assert "would overwrite" in _bad(tmp_path, capsys, "fold", p, "--report", tmp_path / "out.nnp")
    in_link = tmp_path / "in.json"
    os.link(p, in_link)
    assert "would overwrite" in _bad(tmp_path, capsys, "fold", p, "--report", in_link)


def test_report_to_stdout(tmp_path, capsys):
    p = nnp_files.single(tmp_path / "m.nnp")
    out = tmp_path / "o.nnp"
    assert run("fold", p, "-o", out, "--report", "-", "--verify") == 0
    captured = capsys.readouterr()
    rep = json.loads(captured.out)      # stdout holds the report alone
    assert rep["output"] == str(out) and rep["verify"]["outputs"]
    assert "wrote" in captured.err      # the summary goes to stderr
    assert not (tmp_path / "-").exists() and not Path("-").exists()


def test_report_schema(tmp_path):
    import bnfold_gpu
    p = nnp_files.console_like(tmp_path / "m.nnp")
    out, report = tmp_path / "o.nnp", tmp_path / "r.json"
    assert run("fold", p, "-o", out, "--report", report, "-q") == 0
    rep = json.loads(report.read_text())
    assert rep["schema_version"] == 1 and rep["tool"] == "bnfold"
    assert rep["version"] == bnfold_gpu.__version__
    assert rep["input"] == str(p) and rep["output"] == str(out) and rep["backend"] in ("numpy", "cupy")
    assert rep["bytes_rescaled"] > 0
    nets = rep["networks"]
    assert nets["MainRuntime"]["folded_count"] == 3 and nets["MainRuntime"]["kept_count"] == 0
    assert nets["Main"]["kept_count"] == 3 and nets["Main"]["uses_batch_statistics"]
    assert all(s["reason"] for s in nets["Main"]["skipped"])
    assert {"read", "plan", "fold", "write"} <= set(rep["seconds"]) and "verify" not in rep["seconds"]
    assert 0 < rep["seconds"]["write_sync"] < rep["seconds"]["write"]
    assert rep["verify"] is None
    assert run("fold", p, "-o", out, "--report", report, "-q", "--verify") == 0
    assert "verify" in json.loads(report.read_text())["seconds"]


# -- stdout that cannot be written ----------------------------------------------------------------
def _cli_subprocess(*argv, **kwargs):
    return subprocess.run([sys.executable, "-m", "bnfold_gpu.cli", *map(str, argv)], **kwargs)


def test_closed_stdout_after_the_output_is_written(tmp_path):
    p = nnp_files.single(tmp_path / "m.nnp")
    out = tmp_path / "o.nnp"
    read_end, write_end = os.pipe()
    os.close(read_end)                 # nobody reads: every write to stdout fails (EPIPE)
    try:
        r = _cli_subprocess("fold", p, "-o", out, stdout=write_end, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    err = r.stderr.splitlines()
    assert r.returncode == 4, r.stderr
    assert err and f"{out} was written" in err[-1] and "Exception ignored" not in r.stderr
    assert "Traceback" not in r.stderr and out.exists()


def test_full_disk_on_stdout_after_the_output_is_written(tmp_path):
    p = nnp_files.single(tmp_path / "m.nnp")
    out = tmp_path / "o.nnp"
    with open("/dev/full", "w") as full:
        r = _cli_subprocess("fold", p, "-o", out, "--report", "-", "-q", stdout=full,
                            stderr=subprocess.PIPE, text=True)
    assert r.returncode == 4, r.stderr
    assert r.stderr.count("\n") == 1 and f"{out} was written" in r.stderr
    assert "No space left on device" in r.stderr and out.exists()


def test_stdout_failing_in_process(tmp_path, capsys, monkeypatch):
    p = nnp_files.single(tmp_path / "m.nnp")
    out = tmp_path / "o.nnp"

    class Closed:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

        def isatty(self):
            return False
    monkeypatch.setattr(sys, "stdout", Closed())
    assert run("fold", p, "-o", out) == 4
    err = capsys.readouterr().err.splitlines()
    assert f"{out} was written" in err[-1] and out.exists()


# -- disk full ------------------------------------------------------------------------------------
def _statvfs_with(free_bytes, folder):
    """os.statvfs, saying that only ``free_bytes`` are free in ``folder``."""
    real = os.statvfs

    def fake(path):
        st = real(path)
        if os.path.realpath(path) != os.path.realpath(folder):
            return st
        values = list(st)
        values[4] = values[3] = free_bytes // st.f_frsize   # f_bavail, f_bfree
        return os.statvfs_result(values)
    return fake


@pytest.mark.parametrize("fmt", [".h5", ".protobuf"])
def test_too_little_free_space_is_refused_before_writing(tmp_path, capsys, monkeypatch, fmt):
    p = nnp_files.single(tmp_path / "m.nnp", parameter_format=fmt)
    writes = []
    monkeypatch.setattr(N, "serialize", lambda *a, **k: writes.append(a))
    monkeypatch.setattr(os, "statvfs", _statvfs_with(8192, tmp_path))
    msg = _bad(tmp_path, capsys, "fold", p)
    assert "free" in msg and "out.nnp" in msg and not writes


def test_hdf5_member_written_as_nnabla_writes_it(tmp_path):
    """Each parameter a dataset of its dtype and values, with a boolean need_grad and an int64
    index in the order of the parameters, as h5py's create_dataset and attrs write them (NNabla's
    save); NNabla's loader reads the same values back."""
    import h5py
    src = nnp_files.single(tmp_path / "m.nnp", parameter_format=".h5")
    f = N.read(str(src))
    rng = np.random.default_rng(7)
    dtypes = [np.float32, np.float16, np.float64, np.int32]
    for k, p in enumerate(f.params.values()):
        p.value = rng.normal(size=p.value.shape).astype(dtypes[k % len(dtypes)]) * 3
        p.need_grad = bool(k % 2)
    out = tmp_path / "out.nnp"
    with open(out, "wb") as fh:
        N.serialize(f, fh)
    reference = io.BytesIO()
    with h5py.File(reference, "w") as hd:
        for i, (name, p) in enumerate(f.params.items()):
            ds = hd.create_dataset(name, data=p.value)
            ds.attrs["need_grad"] = p.need_grad
            ds.attrs["index"] = i
    with zipfile.ZipFile(out) as z, h5py.File(io.BytesIO(z.read("parameter.h5")), "r") as got, \
            h5py.File(reference, "r") as want:
        names = []
        got.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        assert sorted(names) == sorted(f.params)
        for name, p in f.params.items():
            a, b = got[name], want[name]
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a[...], p.value)
            for key in ("need_grad", "index"):
                assert a.attrs[key] == b.attrs[key]
                assert a.attrs[key].dtype == b.attrs[key].dtype
                assert a.id.get_type().get_class() == b.id.get_type().get_class()
    written = N.read(str(out)).params
    for name, p in f.params.items():
        assert written[name].need_grad == p.need_grad
        np.testing.assert_array_equal(written[name].value, p.value)
    h5, h5_reference = tmp_path / "parameter.h5", tmp_path / "reference.h5"
    with zipfile.ZipFile(out) as z:
        h5.write_bytes(z.read("parameter.h5"))
    h5_reference.write_bytes(reference.getvalue())
    loads = []
    for path in (h5, h5_reference):   # NNabla's own reader of the member
        nn.clear_parameters()
        nn.load_parameters(str(path))
        loads.append({n: (v.d.copy(), v.need_grad) for n, v in
                      nn.get_parameters(grad_only=False).items()})
    nn.clear_parameters()
    assert list(loads[0]) == list(loads[1]) and sorted(loads[0]) == sorted(f.params)
    for name, (value, need_grad) in loads[0].items():
        np.testing.assert_array_equal(value, loads[1][name][0])
        assert need_grad == loads[1][name][1] == f.params[name].need_grad


def test_hdf5_structure_held_in_memory_is_small_beside_the_values(tmp_path, monkeypatch):
    """Many parameters of medium size: the file's structure that HDF5 writes beside each one is kept
    in memory, not a copy of the values around it."""
    f = N.read(str(nnp_files.single(tmp_path / "m.nnp", parameter_format=".h5")))
    for k in range(1000):
        f.params[f"extra/{k}/W"] = N.Param(np.full(15 * 1024, k, np.float32), False)
    made = []
    real = N._SparseFile
    monkeypatch.setattr(N, "_SparseFile", lambda: made.append(real()) or made[-1])
    out = tmp_path / "out.nnp"
    with open(out, "wb") as fh:
        N.serialize(f, fh)
    nbytes = sum(p.value.nbytes for p in f.params.values())
    held = len(made[0].pages) * made[0].PAGE
    assert held < nbytes / 20, (held, nbytes)
    back = N.read(str(out)).params
    for name, p in f.params.items():
        np.testing.assert_array_equal(back[name].value, p.value)


def test_parameter_names_hdf5_cannot_hold_together_are_refused(tmp_path):
    f = N.read(str(nnp_files.single(tmp_path / "m.nnp", parameter_format=".h5")))
    name = next(iter(f.params))
    f.params[name + "/inner"] = N.Param(np.ones(3, np.float32), False)
    with open(tmp_path / "out.nnp", "wb") as fh, pytest.raises(N.NnpError) as e:
        N.serialize(f, fh)
    assert f"'{name}' and '{name}/inner'" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("fmt", [".h5", ".protobuf"])
def test_free_space_needed_covers_the_output_and_no_second_copy(tmp_path, fmt):
    # the parameters are written once, straight into the output (HDF5: no scratch file)
    from bnfold_gpu import nnp_fold
    src = nnp_files.single(tmp_path / "m.nnp", parameter_format=fmt)
    f = N.read(str(src))
    for p in f.params.values():   # parameters that dominate the file, as in real models
        p.value = np.full(1 << 18, 0.5, np.float32)
    out = tmp_path / "out.nnp"
    with open(out, "wb") as fh:
        N.serialize(f, fh)
    nbytes = sum(p.value.nbytes for p in f.params.values())
    assert out.stat().st_size <= nnp_fold._space_needed(f) < out.stat().st_size + nbytes // 10


def _h5_write_error():
    return OSError("Can't write data (file write failed: time = Thu Nov 26 10:00:00 2026, filename "
                   "= 'parameter.h5', file descriptor = 5, errno = 28, error message = 'No space "
                   "left on device', buf = 0x55d0c0ffee00, total write size = 4096, bytes this "
                   "sub-write = 4096, bytes actually written = 18446744073709551615, offset = 0)")


@pytest.mark.parametrize("where", ["zip", "fsync", "h5py-oserror", "h5py-runtimeerror", "quota",
                                   "h5-stream"])
def test_write_failures_are_one_line_and_leave_nothing(tmp_path, capsys, monkeypatch, where):
    import h5py
    import threading
    fmt = ".h5" if where.startswith("h5") else ".protobuf"
    p = nnp_files.single(tmp_path / "m.nnp", parameter_format=fmt)
    threads = threading.active_count()
    if where == "h5-stream":   # the disk fills while the HDF5 member streams, values written before
        real = N._SparseFile.read_range
        calls = []

        def fail_later(self, start, end):   # past the first value
            calls.append(start)
            if start > 0:
                raise OSError(28, os.strerror(28))
            return real(self, start, end)
        monkeypatch.setattr(N._SparseFile, "read_range", fail_later)
    elif where in ("zip", "quota"):
        code = 28 if where == "zip" else 122

        def fail(*args, **kwargs):
            raise OSError(code, os.strerror(code))
        monkeypatch.setattr(N.protobuf_params, "write", fail)
    elif where == "fsync":
        def fail(fd):
            raise OSError(5, "Input/output error")
        monkeypatch.setattr(os, "fsync", fail)
    else:
        error = _h5_write_error() if where == "h5py-oserror" else \
            RuntimeError("Can't decrement id ref count (unable to flush file's cached information)")

        class Failing(h5py.File):   # HDF5 failing as it makes the output's structure
            def __init__(self, name, mode="r", *args, **kwargs):
                if mode == "w":
                    raise error
                super().__init__(name, mode, *args, **kwargs)
        monkeypatch.setattr(h5py, "File", Failing)
    msg = _bad(tmp_path, capsys, "fold", p)
    assert "0x" not in msg and "errno" not in msg and "nothing written" in msg
    if where in ("zip", "h5py-oserror", "h5-stream"):
        assert "No space left on device" in msg
    assert "out.nnp" in msg
    assert threading.active_count() == threads
    if where == "h5-stream":
        assert any(calls)


@pytest.mark.parametrize("fmt", [".protobuf", ".h5"])
def test_a_real_write_failure_past_the_file_size_limit(tmp_path, fmt):
    # the kernel refuses the writes (EFBIG), as a full disk would, with no injection in bnfold
    p = nnp_files.single(tmp_path / "m.nnp", parameter_format=fmt)
    out = tmp_path / "out"
    out.mkdir()
    limit = p.stat().st_size // 2
    script = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
              "from bnfold_gpu.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", script, "fold", str(p), "-o", str(out / "o.nnp"), "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "too large" in r.stderr.lower()
    assert "nothing written" in r.stderr
    assert os.listdir(out) == []


# -- Ctrl-C ---------------------------------------------------------------------------------------
def _interrupting(real):
    import signal

    def stage(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)
    return stage


def _run_interrupted(*argv):
    import signal
    before = signal.getsignal(signal.SIGINT)
    try:
        rc = run(*argv)
    except KeyboardInterrupt:
        rc = "KeyboardInterrupt escaped main"
    assert signal.getsignal(signal.SIGINT) is before     # main leaves the handler as it was
    return rc


@pytest.mark.parametrize("stage", ["read", "plan_file", "fold_parameters", "rewrite_proto",
                                   "serialize", "verify"])
def test_ctrl_c_at_each_stage_writes_nothing(tmp_path, capsys, monkeypatch, stage):
    p = nnp_files.single(tmp_path / "m.nnp", parameter_format=".h5")
    out = tmp_path / "o.nnp"
    out.write_bytes(b"previous output")
    monkeypatch.setattr(N, stage, _interrupting(getattr(N, stage)))
    assert _run_interrupted("fold", p, "-o", out, "--verify", "-q") == 130
    assert capsys.readouterr().err == "bnfold: interrupted; nothing written\n"
    assert out.read_bytes() == b"previous output" and _listing(tmp_path) == ["m.nnp", "o.nnp"]


@pytest.mark.parametrize("verify", [False, True])
def test_ctrl_c_as_the_output_is_flushed_leaves_no_file(tmp_path, capsys, monkeypatch, verify):
    # the Ctrl-C lands during the last flush of the temporary file: it is acted on as the write
    # stage ends, and the temporary file goes
    import signal
    real = N.write_temp

    def write_then_interrupt(*args, **kwargs):
        pending = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return pending
    p = nnp_files.single(tmp_path / "m.nnp", parameter_format=".h5")
    out = tmp_path / "o.nnp"
    monkeypatch.setattr(N, "write_temp", write_then_interrupt)
    assert _run_interrupted("fold", p, "-o", out, "-q", *(["--verify"] if verify else [])) == 130
    assert capsys.readouterr().err == "bnfold: interrupted; nothing written\n"
    assert _listing(tmp_path) == ["m.nnp"]


def test_sigterm_while_writing_leaves_nothing_and_exits_143(tmp_path):
    # what `timeout` and service managers send: taken as a Ctrl-C, in a process of its own
    p = nnp_files.single(tmp_path / "m.nnp", parameter_format=".h5")
    out = tmp_path / "o.nnp"
    code = ("import os, signal, sys\n"
            "from bnfold_gpu import cli, nnp as N\n"
            "real = N.serialize\n"
            "def serialize(*args, **kwargs):\n"
            "    real(*args, **kwargs)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "N.serialize = serialize\n"
            f"sys.exit(cli.main(['fold', {str(p)!r}, '-o', {str(out)!r}, '-q']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 143, r.stderr
    assert r.stderr.splitlines()[-1] == "bnfold: interrupted; nothing written"
    assert _listing(tmp_path) == ["m.nnp"]


def test_ctrl_c_while_nnabla_runs_is_acted_on_back_in_bnfold(tmp_path, capsys, monkeypatch):
    # a KeyboardInterrupt raised inside code NNabla runs (its C++ calling back into Python, or a
    # forward) can leave NNabla's state broken (segfaults were seen): Ctrl-C waits for bnfold's code
    p = nnp_files.single(tmp_path / "m.nnp")
    completed = []
    real = N.build_networks

    def like_nnabla(*args, **kwargs):
        os.kill(os.getpid(), __import__("signal").SIGINT)
        total = sum(range(10000))            # Python code running under NNabla
        result = real(*args, **kwargs)
        completed.append(total)
        return result
    monkeypatch.setattr(N, "build_networks", like_nnabla)
    assert _run_interrupted("fold", p, "-o", tmp_path / "o.nnp", "-q") == 130
    assert completed and capsys.readouterr().err == "bnfold: interrupted; nothing written\n"
    assert _listing(tmp_path) == ["m.nnp"]


def test_ctrl_c_while_parsing_the_command_line(tmp_path, capsys, monkeypatch):
    p = nnp_files.single(tmp_path / "m.nnp")
    monkeypatch.setattr(cli, "parser", _interrupting(cli.parser))
    assert _run_interrupted("fold", p, "-o", tmp_path / "o.nnp") == 130
    assert capsys.readouterr().err == "bnfold: interrupted; nothing written\n"
    assert _listing(tmp_path) == ["m.nnp"]


def test_ctrl_c_after_the_output_is_in_place_says_it_was_written(tmp_path, capsys, monkeypatch):
    import signal
    p = nnp_files.single(tmp_path / "m.nnp")
    out, report = tmp_path / "o.nnp", tmp_path / "r.json"
    real = os.replace

    def replace_then_interrupt(src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        if str(dst).endswith(".nnp"):
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    assert _run_interrupted("fold", p, "-o", out, "--report", report) == 130
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("bnfold: interrupted") and f"{out} was written" in err[-1]
    assert f"{report} was not" in err[-1]
    assert load_run(out, "net")[1].count("BatchNormalization") == 0
    assert _listing(tmp_path) == ["m.nnp", "o.nnp"]


_SUBPROCESS_MAIN = "from bnfold_gpu.cli import main; sys.exit(main(sys.argv[1:]))"


def _when_nnabla_is_imported(statement: str) -> str:
    """Python code that runs ``statement`` as the process first imports nnabla (an import hook)."""
    return ("import os, signal, sys\n"
            "class Hook:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'nnabla':\n"
            f"            {statement}\n"
            "sys.meta_path.insert(0, Hook())\n")


def test_ctrl_c_while_nnabla_is_imported(tmp_path):
    p = nnp_files.single(tmp_path / "m.nnp")
    out = tmp_path / "out"
    out.mkdir()
    hook = _when_nnabla_is_imported("os.kill(os.getpid(), signal.SIGINT)")
    r = subprocess.run([sys.executable, "-c", hook + _SUBPROCESS_MAIN, "fold", str(p), "-o",
                        str(out / "o.nnp")], capture_output=True, text=True)
    assert r.returncode == 130 and r.stderr == "bnfold: interrupted; nothing written\n", r.stderr
    assert r.stdout == "" and os.listdir(out) == []


def test_sigterm_stops_a_command_started_in_the_background(tmp_path):
    # `bnfold fold ... &` in a shell script runs with SIGINT ignored: SIGTERM still stops it at a
    # safe point, with its line and status, and no temporary file stays
    import signal
    p = nnp_files.single(tmp_path / "m.nnp", parameter_format=".h5")
    out = tmp_path / "out"
    out.mkdir()
    script = ("import os, signal, sys\n"
              "from bnfold_gpu import nnp as N\n"
              "real = N._write_h5_member\n"
              "def write(*args, **kwargs):\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    return real(*args, **kwargs)\n"
              "N._write_h5_member = write\n"
              "from bnfold_gpu.cli import command; sys.exit(command())\n")
    r = subprocess.run([sys.executable, "-c", script, "fold", str(p), "-o", str(out / "o.nnp")],
                       capture_output=True, text=True,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert r.returncode == 143, r.stderr
    assert r.stderr.splitlines()[-1] == "bnfold: interrupted; nothing written"
    assert "Traceback" not in r.stderr and os.listdir(out) == []


def test_ctrl_c_once_the_command_is_done_is_no_traceback(tmp_path):
    # the executable keeps its Ctrl-C handling to the end: a Ctrl-C after its work (here just
    # as the interpreter shuts down) leaves the status and output as they were
    p = nnp_files.single(tmp_path / "m.nnp")
    out = tmp_path / "o.nnp"
    script = ("import atexit, os, signal, sys, time\n"
              "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.1)))\n"
              "from bnfold_gpu.cli import command\n"
              "sys.exit(command())\n")
    r = subprocess.run([sys.executable, "-c", script, "fold", str(p), "-o", str(out), "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert load_run(out, "net")[1].count("BatchNormalization") == 0


def test_second_ctrl_c_while_nnabla_computes_exits_at_once(tmp_path):
    # the first Ctrl-C waits for a safe point; the second removes the temporary files and exits,
    # even while NNabla is still computing (here a forward far longer than the test) with the
    # file descriptor of stderr held, as --verify holds it
    p = nnp_files.single(tmp_path / "m.nnp", parameter_format=".h5")
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "forward-returned"
    script = (
        "import os, signal, sys, threading, time\n"
        "import nnabla as nn, nnabla.parametric_functions as PF\n"
        "from bnfold_gpu import nnp as N\n"
        "real = N._write_h5_member\n"
        "def slow_write(*args, **kwargs):\n"
        "    x = nn.Variable((32, 64, 64, 64)); h = x\n"
        "    for i in range(40): h = PF.convolution(h, 64, (3, 3), pad=(1, 1), name=f'c{i}')\n"
        "    started = threading.Event()\n"
        "    def ctrl_c_twice():\n"
        "        started.wait(); time.sleep(0.3)\n"
        "        os.kill(os.getpid(), signal.SIGINT); time.sleep(0.3)\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    threading.Thread(target=ctrl_c_twice, daemon=True).start()\n"
        "    started.set()\n"
        "    with N._nnabla_stderr_held():\n"         # as --verify runs NNabla: stderr held
        "        h.forward(clear_buffer=True)\n"
        f"    open({str(marker)!r}, 'w').close()\n"
        "    return real(*args, **kwargs)\n"
        "N._write_h5_member = slow_write\n" + _SUBPROCESS_MAIN)
    r = subprocess.run([sys.executable, "-c", script, "fold", str(p), "-o", str(out / "o.nnp")],
                       capture_output=True, text=True)
    assert r.returncode == 130, r.stderr
    assert r.stderr.splitlines()[-1] == "bnfold: interrupted; nothing written"
    assert "Traceback" not in r.stderr and not marker.exists() and os.listdir(out) == []


# -- --in-place and existing outputs --------------------------------------------------------------
def _foreign_owner():
    if os.geteuid() == 0:
        return 1234, 5678
    return os.getuid(), (set(os.getgroups()) - {os.getgid()} or {os.getgid()}).pop()


@pytest.mark.parametrize("how", ["in-place", "existing output"])
def test_owner_group_and_mode_are_kept(tmp_path, how):
    p = nnp_files.single(tmp_path / "m.nnp")
    target = p if how == "in-place" else tmp_path / "o.nnp"
    if how != "in-place":
        target.write_bytes(b"previous output")
    uid, gid = _foreign_owner()
    os.chown(target, uid, gid)
    os.chmod(target, 0o640)
    argv = ("--in-place",) if how == "in-place" else ("-o", target)
    assert run("fold", p, *argv, "-q") == 0
    st = os.stat(target)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (uid, gid, 0o640)
    assert load_run(target, "net")[1].count("BatchNormalization") == 0


@pytest.mark.parametrize("how", ["in-place", "existing output"])
def test_a_symlink_is_folded_through_into_its_target(tmp_path, how):
    store = tmp_path / "store"
    store.mkdir()
    p = nnp_files.single(tmp_path / "m.nnp")
    real = store / "model.nnp"
    real.write_bytes(p.read_bytes() if how == "in-place" else b"previous output")
    link = tmp_path / "link.nnp"
    link.symlink_to(real)
    argv = (link, "--in-place") if how == "in-place" else (p, "-o", link)
    assert run("fold", *argv, "-q") == 0
    assert stat_kind(link) == "link" and os.readlink(link) == str(real)
    assert load_run(real, "net")[1].count("BatchNormalization") == 0
    assert _listing(store) == ["model.nnp"]


def test_in_place_replaces_the_name_not_other_hard_links(tmp_path):
    # documented: the folded file is a new file under the name given; other links keep the original
    p = nnp_files.single(tmp_path / "m.nnp")
    other = tmp_path / "other.nnp"
    os.link(p, other)
    before = other.read_bytes()
    assert run("fold", p, "--in-place", "-q") == 0
    assert other.read_bytes() == before and not os.path.samefile(p, other)
    assert load_run(p, "net")[1].count("BatchNormalization") == 0


# -- --verify -------------------------------------------------------------------------------------
def test_verify_compares_every_executor_output(tmp_path, capsys, monkeypatch):
    p, h = _intermediate_output_file(tmp_path / "gen.nnp")
    out, report = tmp_path / "o.nnp", tmp_path / "r.json"
    assert run("fold", p, "-o", out, "--verify", "--report", report, "-q") == 0
    compared = {r["output"] for r in json.loads(report.read_text())["verify"]["outputs"]}
    assert h in compared and len(compared) == 2
    out.unlink()
    real = N.fold_parameters

    def wrong_bias(nnp, fp, *args, **kwargs):   # a fold that is wrong where only h shows it
        result = real(nnp, fp, *args, **kwargs)
        for spec in fp.unique:
            nnp.params[spec.folded_bias].value = nnp.params[spec.folded_bias].value + 1
        return result
    monkeypatch.setattr(N, "fold_parameters", wrong_bias)
    assert run("fold", p, "-o", out, "--verify", "-q") == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "verification failed" in err[0] and h in err[0]
    assert not out.exists()


@pytest.mark.parametrize("parameter_format", [".h5", ".protobuf"])
@pytest.mark.parametrize("main", ["training", "plain", "shorter"])
@pytest.mark.parametrize("kind", ["both_sides", "hard_swish"])
def test_a_layer_folded_on_both_sides_leaves_the_other_network_alone(tmp_path, kind, main,
                                                                      parameter_format):
    # the layer's weight is also read by the other network: the fold writes a copy (it was folded
    # in place, changing the other network, or failed with a KeyError on a copy never made)
    src = nnp_files.shared_layer(tmp_path / "m.nnp", kind, main, parameter_format)
    out = tmp_path / "o.nnp"
    assert run("fold", src, "-o", out, "--verify", "--quiet") == 0
    f0, f1 = N.read(str(src)), N.read(str(out))
    nets = {n.name: n for n in f1.proto.network}
    run1 = [f.type for f in nets["MainRuntime"].function]
    assert "BatchNormalization" not in run1 and "MulScalar" not in run1
    main0 = next(n for n in f0.proto.network if n.name == "Main")
    main1 = nets["Main"]
    if main == "training":   # the training network keeps its functions and its parameters
        assert [f.type for f in main0.function] == [f.type for f in main1.function]
        for f in main1.function:
            for name in f.input:
                if name in f0.params:
                    assert np.array_equal(f1.params[name].value, f0.params[name].value), name
    for name in ("Main", "MainRuntime"):
        want, _ = load_run(src, name)
        got, _ = load_run(out, name)
        for k in want:
            assert np.abs(got[k] - want[k]).max() / np.abs(want[k]).max() < 1e-5, (name, k)


def test_networks_using_batch_statistics_are_verified(console_file, tmp_path, capsys):
    out, report = tmp_path / "o.nnp", tmp_path / "r.json"
    assert run("fold", console_file, "-o", out, "--verify", "--report", report) == 0
    text = capsys.readouterr().out
    assert "training" not in text and "uses batch statistics" in text
    rep = json.loads(report.read_text())
    # Main runs first with batch_stat=True; had it updated the running statistics the other
    # networks read, their comparison would fail
    assert {r["network"] for r in rep["verify"]["outputs"]} == {"Main", "MainValidation",
                                                                "MainRuntime"}
    assert all(r["max_rel"] < 1e-5 for r in rep["verify"]["outputs"])
    assert rep["networks"]["Main"]["uses_batch_statistics"]
    f0 = N.read(str(console_file))
    assert np.array_equal(N.read(str(out)).params["bn1/bn/mean"].value, f0.params["bn1/bn/mean"].value)


def test_verify_impossible_on_this_backend(tmp_path, capfd):
    p = _channel_last_file(tmp_path / "cl.nnp")
    capfd.readouterr()
    out, report = tmp_path / "o.nnp", tmp_path / "r.json"
    for quiet in ((), ("-q",)):
        assert run("fold", p, "-o", out, "--verify", "--report", report, *quiet) == 3
        err = capfd.readouterr().err.splitlines()
        assert "cannot verify" in err[-1] and "channel_last" in err[-1] and str(p) in err[-1]
        assert "Traceback" not in "\n".join(err) and "<-- ERROR" not in "\n".join(err)
        assert "/" not in err[-1].split("cannot verify", 1)[1].replace(str(out), "")   # no source paths
        if quiet:
            assert len(err) == 1
        assert not out.exists()
        rep = json.loads(report.read_text())
        assert rep["output"] is None and "cannot verify" in rep["not_written"]
    assert run("fold", p, "-o", out, "-q") == 0           # folding itself needs no forward


def test_float16_files_verify_with_a_default_tolerance_that_suits_them(tmp_path, capsys):
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")

    def edit(ps):
        for p in ps.values():
            p.value = p.value.astype(np.float16)
    half = _edit_params(good, tmp_path / "half.nnp", edit)
    out, report = tmp_path / "o.nnp", tmp_path / "r.json"
    assert run("fold", half, "-o", out, "--verify", "--report", report, "-q") == 0
    assert json.loads(report.read_text())["verify"]["tolerance"] == 5e-3
    assert run("fold", good, "-o", out, "--verify", "--report", report, "-q") == 0
    assert json.loads(report.read_text())["verify"]["tolerance"] == 1e-4
    out.unlink()
    assert run("fold", half, "-o", out, "--verify", "--tolerance", "1e-6", "-q") == 1   # given wins
    assert not out.exists()


def test_verify_with_real_inputs(tmp_path, capsys):
    p = nnp_files.single(tmp_path / "m.nnp")
    data = tmp_path / "x.npy"
    np.save(data, np.random.RandomState(5).standard_normal((2, 3, 8, 8)).astype(np.float32))
    out, report = tmp_path / "o.nnp", tmp_path / "r.json"

    def errors(*argv):
        assert run("fold", p, "-o", out, "--verify", "--report", report, "-q", *argv) == 0
        rep = json.loads(report.read_text())["verify"]
        return rep, [r["max_abs"] for r in rep["outputs"]]
    given1, a = errors("--input", f"x={data}", "--seed", "1")
    _, b = errors("--input", f"x={data}", "--seed", "2")
    _, c = errors("--seed", "1")
    _, d = errors("--seed", "2")
    assert a == b and c != d                   # given data, not the seed's, went in
    assert given1["inputs"] == {"x": str(data)}
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 3), np.float32))
    assert "(2, 3)" in _bad(tmp_path, capsys, "fold", p, "--verify", "--input", f"x={bad}")
    assert "'nope'" in _bad(tmp_path, capsys, "fold", p, "--verify", "--input", f"nope={data}")
    assert "no such file" in _bad(tmp_path, capsys, "fold", p, "--verify", "--input",
                                  f"x={tmp_path / 'missing.npy'}")


def test_absolute_tolerance(tmp_path, capsys, monkeypatch):
    p = nnp_files.single(tmp_path / "m.nnp")
    out = tmp_path / "o.nnp"
    real = N.verify

    def tiny_but_relative(*args, **kwargs):   # outputs near zero: relative error large
        return [{**r, "max_abs": 1e-7, "max_rel": 0.5} for r in real(*args, **kwargs)]
    monkeypatch.setattr(N, "verify", tiny_but_relative)
    assert run("fold", p, "-o", out, "--verify", "-q") == 1 and not out.exists()
    capsys.readouterr()
    assert run("fold", p, "-o", out, "--verify", "--atol", "1e-6", "-q") == 0 and out.exists()


def test_quiet_prints_nothing_but_errors(tmp_path, capsys, monkeypatch):
    p = nnp_files.single(tmp_path / "m.nnp")
    assert run("fold", p, "-o", tmp_path / "o.nnp", "--verify", "-q") == 0
    assert capsys.readouterr() == ("", "")
    assert run("inspect", p, "-q") == 0
    assert capsys.readouterr().err == ""
    real = N.verify
    monkeypatch.setattr(N, "verify", lambda *a, **k: [{**r, "max_rel": 1.0} for r in real(*a, **k)])
    assert run("fold", p, "-o", tmp_path / "p.nnp", "--verify", "-q") == 1
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1


def test_a_network_without_batch_normalization(tmp_path, capsys):
    p = _no_bn_file(tmp_path / "plain.nnp")
    assert run("inspect", p) == 0
    text = capsys.readouterr().out
    assert "no BatchNormalization in this network" in text and "BN kept" not in text
    assert run("fold", p, "-o", tmp_path / "o.nnp") == 0
    assert "no BatchNormalization in this network" in capsys.readouterr().out


# -- the command line's conventions ---------------------------------------------------------------
def test_every_option_has_help_and_the_exit_statuses_are_listed(capsys):
    import argparse
    ap = cli.parser()
    subs = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        for action in sub._actions:
            assert action.help, (name, action.dest)
    with pytest.raises(SystemExit):
        run("fold", "--help")
    text = " ".join(capsys.readouterr().out.split())
    for status in ("0", "1", "2", "3", "4", "130"):
        assert f"{status}:" in text or f"{status} " in text
    assert "exit status" in text.lower() and "was written" in text


def test_progress_bar_ends_full(tmp_path, capsys, monkeypatch):
    p = nnp_files.single(tmp_path / "m.nnp")
    drawn = []
    monkeypatch.setattr(cli.Progress, "_draw", lambda self, label: drawn.append(
        (self.done, self.total, label)))
    assert run("fold", p, "-o", tmp_path / "o.nnp", "--verify") == 0
    assert drawn[-1][2] == "done" and drawn[-1][0] == drawn[-1][1]
    assert [d for d, _, _ in drawn] == sorted(d for d, _, _ in drawn)
    assert all(d < t for d, t, label in drawn[:-1])


# -- the Python API -------------------------------------------------------------------------------
def test_fold_nnp_api(tmp_path):
    import bnfold_gpu
    p = nnp_files.console_like(tmp_path / "m.nnp")
    out = tmp_path / "o.nnp"
    report = bnfold_gpu.fold_nnp(p, out, verify=True, backend="numpy")
    assert isinstance(report, bnfold_gpu.Report)
    assert report.output == str(out) and report.backend == "numpy" and report.n_folded == 6
    assert report.verify.passed and "verify" in report.seconds
    assert report.to_json()["networks"]["MainRuntime"]["folded_count"] == 3
    assert load_run(out, "MainRuntime")[1].count("BatchNormalization") == 0
    with pytest.raises(bnfold_gpu.NnpError):
        bnfold_gpu.fold_nnp(tmp_path / "missing.nnp", tmp_path / "x.nnp")
    assert not (tmp_path / "x.nnp").exists()


def test_package_imports_without_nnabla():
    code = ("import sys; sys.modules['nnabla'] = None\n"
            "import bnfold_gpu\n"
            "assert callable(bnfold_gpu.fold_nnp) and bnfold_gpu.Report\n"
            "import bnfold_gpu.cli\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr


def test_network_messages_name_the_network_in_words(tmp_path, capsys):
    good = nnp_files.single(tmp_path / "good.nnp")
    f = N.read(str(good))
    f.proto.network[0].function[0].input[0] = "nonexistent_var"
    p = tmp_path / "badvar.nnp"
    with open(p, "wb") as fh:
        N.serialize(f, fh)
    msg = _bad(tmp_path, capsys, "fold", p)
    assert "network 'net'" in msg and "'nonexistent_var'" in msg and "declare" in msg


_FULL_DISK_SWEEP = r'''
import contextlib, io, json, os, sys
from bnfold_gpu import _atomic, cli
mnt, sources = sys.argv[1], sys.argv[2:]
filler = os.path.join(mnt, "filler")


def fold_with_free(src, free):
    st = os.statvfs(mnt)
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - free))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(["fold", src, "-o", os.path.join(mnt, "o.nnp"), "-q"])
    os.unlink(filler)
    left = sorted(os.listdir(mnt))
    for name in left:
        os.unlink(os.path.join(mnt, name))
    return {"src": src, "free": free, "rc": rc, "err": err.getvalue(), "left": left}


results = [fold_with_free(sources[0], 8192)]      # refused by the free-space check
_atomic.check_room = lambda *args, **kwargs: None   # as if the disk filled after the check
for src in sources:
    results += [fold_with_free(src, free) for free in range(0, 96 << 10, 4 << 10)]
print(json.dumps(results))
'''


def test_a_real_full_file_system(tmp_path):
    # a small tmpfs, mounted in a user namespace (no privileges needed where the kernel allows
    # them), filled to every level the writes can meet: each fold is written whole or fails in one
    # line with nothing left, and HDF5 neither crashes nor prints its internals
    import shutil
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "--user", "--map-root-user", "--mount", "true"],
                                         capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs unshare and unprivileged user namespaces")
    h5 = nnp_files.console_like(tmp_path / "h5.nnp", parameter_format=".h5")
    pb = nnp_files.console_like(tmp_path / "pb.nnp", parameter_format=".protobuf")
    script, mnt = tmp_path / "sweep.py", tmp_path / "mnt"
    script.write_text(_FULL_DISK_SWEEP)
    mnt.mkdir()
    r = subprocess.run([unshare, "--user", "--map-root-user", "--mount", "sh", "-c",
                        'mount -t tmpfs -o size=1m tmpfs "$0" && exec "$1" "$2" "$0" "$3" "$4"',
                        str(mnt), sys.executable, str(script), str(h5), str(pb)],
                       capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr[-3000:]          # no crash, not even at exit
    results = json.loads(r.stdout.splitlines()[-1])
    assert results[0]["rc"] == 2 and "not enough free space" in results[0]["err"]
    for res in results:
        lines = res["err"].splitlines()
        if res["rc"] == 0:
            assert res["left"] == ["o.nnp"] and lines == [], res
        else:
            assert res["rc"] == 2 and res["left"] == [] and len(lines) == 1, res
            assert "0x" not in lines[0] and "nothing written" in lines[0], res
    for src in (str(h5), str(pb)):
        codes = {res["rc"] for res in results[1:] if res["src"] == src}
        assert codes == {0, 2}, (src, codes)          # the sweep reached both ends


def test_main_leaves_the_process_as_it_was(tmp_path):
    import logging
    import signal
    import threading
    p = nnp_files.single(tmp_path / "m.nnp")
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)

    def state():
        fd = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(fd)
        log = logging.getLogger("nnabla")
        return (signal.getsignal(signal.SIGINT), fd, log.level, list(log.handlers), np.geterr(),
                threading.active_count(), os.umask(os.umask(0o022)),
                str(nn.get_current_context()), sorted(nn.get_parameters(grad_only=False)))
    # a file NNabla's own loader refuses: --verify silences its log while it tries, then says why
    bad = tmp_path / "readme.nnp"
    with zipfile.ZipFile(p) as a, zipfile.ZipFile(bad, "w") as z:
        for m in a.infolist():
            z.writestr(m, a.read(m))
        z.writestr("README", b"hello\n")
    # HDF5 parameters read in place (a CRC checked on a thread) and written straight into the
    # output; a damaged member refused after that thread ran
    h5 = nnp_files.single(tmp_path / "h.nnp", parameter_format=".h5")
    damaged = tmp_path / "damaged.nnp"
    blob = bytearray(h5.read_bytes())
    with zipfile.ZipFile(h5) as z:
        member = z.read("parameter.h5")
    at = blob.find(member) + len(member) - 1
    blob[at] ^= 0xFF
    damaged.write_bytes(bytes(blob))
    before = state()
    assert run("fold", p, "-o", tmp_path / "o.nnp", "--verify", "-q") == 0
    assert run("inspect", p, "-q") == 0
    assert run("fold", bad, "-o", tmp_path / "o2.nnp", "--verify", "-q") == 2
    assert run("fold", h5, "-o", tmp_path / "o3.nnp", "--verify", "-q") == 0
    assert run("fold", damaged, "-o", tmp_path / "o4.nnp", "-q") == 2
    assert state() == before


@pytest.mark.parametrize("call", ["fold_nnp", "load", "cli", "missing"])
def test_the_first_call_that_imports_nnabla_leaves_logging_and_warnings_as_they_were(tmp_path, call):
    # importing nnabla configures the root logger (INFO, a handler on stderr), adds warning filters
    # and logs a line: in a process that had not imported it, the first call puts all that back
    p = nnp_files.single(tmp_path / "m.nnp", parameter_format=".h5")
    script = textwrap.dedent(f"""
        import logging, sys, warnings
        import numpy   # its own filters, added as any program importing it gets them
        root = logging.getLogger()
        def state():
            return (root.level, list(root.handlers), logging.getLogger("nnabla").level,
                    list(warnings.filters))
        before = state()
        import bnfold_gpu
        assert "nnabla" not in sys.modules
        call = {call!r}
        if call == "fold_nnp":
            bnfold_gpu.fold_nnp({str(p)!r}, {str(tmp_path / "o.nnp")!r}, verify=True)
        elif call == "load":
            bnfold_gpu.load({str(p)!r})
        elif call == "cli":
            from bnfold_gpu.cli import main
            assert main(["fold", {str(p)!r}, "-o", {str(tmp_path / "o2.nnp")!r}, "-q"]) == 0
        else:
            try:
                bnfold_gpu.fold_nnp({str(tmp_path / "missing.nnp")!r}, {str(tmp_path / "o3.nnp")!r})
            except bnfold_gpu.NnpError:
                pass
        assert "nnabla" in sys.modules
        assert state() == before, (before, state())
        logging.getLogger("app").info("the application's own INFO line, not shown")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and r.stdout == ""


def test_a_log_file_the_users_nnabla_conf_asks_for_is_kept(tmp_path):
    # nnabla's import adds a FileHandler for [LOG] log_file_name: the user's, not basicConfig's
    log = tmp_path / "nbla.log"
    (tmp_path / "nnabla.conf").write_text(f"[LOG]\nlog_file_name = {log}\n")
    script = ("import logging, bnfold_gpu; bnfold_gpu.import_nnabla(); "
              "print([type(h).__name__ for h in logging.getLogger().handlers])")
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['FileHandler']" and r.stderr == ""


def test_differences_count_nan_and_infinity_where_the_original_has_them():
    a = np.array([1.0, np.nan, np.inf, -2.0])
    assert N._difference(a, a.copy()) == (0.0, 0.0)
    assert N._difference(a, a + np.array([0.0, 0.0, 0.0, 0.5])) == (0.5, 0.25)
    assert N._difference(a, np.array([1.0, 0.0, np.inf, -2.0]))[1] == float("inf")
    assert N._difference(a, np.array([1.0, np.nan, -np.inf, -2.0]))[1] == float("inf")
    assert N._difference(a, a[:2]) == (float("inf"), float("inf"))


def test_doctor_into_a_pipe_closed_early_is_quiet():
    # `bnfold doctor | head -1`: the reader closes the pipe after the first line
    r = subprocess.run(f"{sys.executable} -m bnfold_gpu doctor | head -1", shell=True,
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.startswith("bnfold_gpu: ") and r.stdout.count("\n") == 1
    assert r.stderr == "", r.stderr
