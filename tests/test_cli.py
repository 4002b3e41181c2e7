"""``bnfold inspect`` and ``bnfold fold`` on .nnp files: saved by NNabla, laid out as Neural Network
Console does, made by NNabla's ONNX importer, and broken in every way a user's file can be."""
import json
import os
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

nn = pytest.importorskip("nnabla", reason="nnabla is not installed (GPU machine)")
from nnabla.utils.nnp_graph import NnpLoader  # noqa: E402

from bnfold_gpu import cli, nnp as N  # noqa: E402
import nnp_files  # noqa: E402

DATA = Path(__file__).parent / "data"


def run(*argv):
    return cli.main([str(a) for a in argv])


def load_run(path, network, seed=0):
    """Outputs of ``network`` in ``path`` on seeded random inputs, plus its function types."""
    scope = {}
    with nn.parameter_scope("", scope):
        net = NnpLoader(str(path)).get_network(network)
        rng = np.random.RandomState(seed)
        for k in sorted(net.inputs):
            net.inputs[k].d = rng.standard_normal(net.inputs[k].shape)
        outs = {}
        for k, y in sorted(net.outputs.items()):
            y.forward()
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
    assert "network Main: 0 to fold, 3 to keep (training network)" in out
    assert "batch_stat=True" in out
    assert run("inspect", console_file, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    nets = info["networks"]
    assert {f["bn"] for f in nets["MainRuntime"]["folded"]} == {"bn1/bn", "bn2/bn", "bn3/bn"}
    assert all("batch_stat" in s["reason"] for s in nets["Main"]["skipped"])


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


# -- bad input ------------------------------------------------------------------------------------
def _bad(tmp_path, capsys, *argv):
    out = tmp_path / "out.nnp"
    out.write_bytes(b"previous output")
    rc = run(*argv, "-o", out) if argv[0] == "fold" else run(*argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) >= 1 and err[-1].startswith("bnfold: ") and "Traceback" not in "\n".join(err)
    assert out.read_bytes() == b"previous output"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out.nnp")]
    return err[-1]


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
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")
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
    assert msg.startswith(f"bnfold: {p}: NNabla cannot load it: ") and "NoSuchFunction" in msg


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


def test_bns_a_layer_takes_one_per_pass_all_fold(tmp_path, capsys):
    p = nnp_files.bn_chains(tmp_path / "chains.nnp")
    assert run("inspect", p) == 0
    text = capsys.readouterr().out
    assert "3 BN(s) would fold, 3 would stay; 3 of those fold on a later pass" in text
    assert text.count("on a later pass") == 4
    assert run("inspect", p, "--json") == 0
    skipped = json.loads(capsys.readouterr().out)["networks"]["n"]["skipped"]
    assert sorted(s["bn"] for s in skipped if s["next_pass"]) == ["bn2/bn", "bn3/bn", "bn5/bn"]
    out, report = tmp_path / "out.nnp", tmp_path / "r.json"
    assert run("fold", p, "-o", out, "--verify", "--report", report, "-q") == 0
    rep = json.loads(report.read_text())["networks"]["n"]
    assert sorted(r["bn"] for r in rep["folded"]) == [f"bn{i}/bn" for i in range(1, 7)]
    assert rep["skipped"] == []
    want, types0 = load_run(p, "n")
    got, types1 = load_run(out, "n")
    assert types0.count("BatchNormalization") == 6 and "BatchNormalization" not in types1
    assert np.abs(got["y"] - want["y"]).max() / np.abs(want["y"]).max() < 1e-5


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
    monkeypatch.setattr(N, "_settle_names", lambda spec, *args: spec)
    assert run("fold", p, "-o", out, "--verify") == 1
    assert "features" in capsys.readouterr().out and not out.exists()


@pytest.mark.parametrize("tolerance", ["-1", "nan", "inf", "x"])
def test_bad_tolerance_is_a_usage_error(tmp_path, capsys, tolerance):
    p = nnp_files.single(tmp_path / "m.nnp")
    with pytest.raises(SystemExit) as e:
        run("fold", p, "-o", tmp_path / "o.nnp", "--verify", "--tolerance", tolerance)
    assert e.value.code == 2 and "--tolerance" in capsys.readouterr().err
    assert not (tmp_path / "o.nnp").exists()


def test_report_that_cannot_be_written_stops_before_any_work(tmp_path, capsys):
    p = nnp_files.single(tmp_path / "m.nnp")
    assert "does not exist" in _bad(tmp_path, capsys, "fold", p, "--report", tmp_path / "no" / "r.json")
    assert "is a directory" in _bad(tmp_path, capsys, "fold", p, "--report", tmp_path)
    before = p.read_bytes()
    assert "would overwrite" in _bad(tmp_path, capsys, "fold", p, "--report", p)
    assert p.read_bytes() == before


def test_report_failing_late_leaves_no_output(tmp_path, capsys, monkeypatch):
    p = nnp_files.single(tmp_path / "m.nnp")

    def disk_full(path, value):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(cli, "_write_json", disk_full)
    assert "No space left" in _bad(tmp_path, capsys, "fold", p, "--report", tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


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
