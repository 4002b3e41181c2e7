"""Hostile and damaged input files, refused on the reading side: special files, zip bombs, members and
HDF5 datasets declaring more than they hold or than memory holds, parameters that are not numbers,
duplicate zip entries, network definitions that NNabla's builder would loop on, stale scratch folders.
Each is refused in one line naming the file (exit status 2), in bounded time and memory, with nothing
created or changed."""
import errno
import io
import os
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

nn = pytest.importorskip("nnabla", reason="nnabla is not installed (GPU machine)")
import h5py  # noqa: E402
from google.protobuf import text_format  # noqa: E402
from nnabla.utils import nnabla_pb2  # noqa: E402

import bnfold_gpu  # noqa: E402
from bnfold_gpu import cli, nnp as N, protobuf_params as P  # noqa: E402
import nnp_files  # noqa: E402

MiB = 1 << 20


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """The system temporary folder for the test: empty, and checked to be left so."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _refused(tmp_path, capsys, path, command="fold"):
    """Runs ``command`` on ``path``: exit status 2, one line on stderr (with --quiet) naming the file,
    no traceback, the output and the temporary folder as they were. Returns the line."""
    outdir = tmp_path / "out"
    outdir.mkdir(exist_ok=True)
    out = outdir / "out.nnp"
    out.write_bytes(b"previous output")
    temp = Path(tempfile.gettempdir())
    temp_before = sorted(os.listdir(temp))
    argv = command.split() + [str(path), "--quiet", "-o", str(out)] if command.startswith("fold") \
        else [command, str(path)]
    rc = cli.main(argv)
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert rc == 2, captured.err
    assert "Traceback" not in captured.err
    if command.startswith("fold"):
        assert len(err) == 1, captured.err
    assert err[-1].startswith("bnfold: ") and str(path) in err[-1], captured.err
    assert out.read_bytes() == b"previous output"
    assert os.listdir(outdir) == ["out.nnp"]
    assert sorted(os.listdir(temp)) == temp_before
    return err[-1]


def _rezip(src, dst, replace=None, add=(), compression=zipfile.ZIP_STORED):
    """``src`` copied to ``dst``, members named in ``replace`` given new bytes, ``add``'s (name, bytes)
    appended."""
    replace = replace or {}
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w", compression) as z:
        for m in a.infolist():
            z.writestr(m.filename, replace.get(m.filename, a.read(m)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")    # zipfile warns of duplicate names, which some tests want
            for name, data in add:
                z.writestr(name, data)
    return dst


def _member(path, name):
    with zipfile.ZipFile(path) as z:
        return z.read(name)


# -- the input is not a regular file ----------------------------------------------------------------
@pytest.fixture
def no_special_file_read(monkeypatch):
    """A special file reaching the zip reader fails the test at once (instead of reading /dev/zero
    without end)."""
    real = zipfile.ZipFile.__init__

    def guarded(self, file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            mode = os.stat(file).st_mode
        else:
            mode = os.fstat(file.fileno()).st_mode
        assert stat.S_ISREG(mode), "a special file reached the zip reader"
        real(self, file, *args, **kwargs)
    monkeypatch.setattr(zipfile.ZipFile, "__init__", guarded)


@pytest.fixture
def fifo(tmp_path):
    """A FIFO, with a writer that opens it whenever a reader waits on it: a reader that should not
    have opened it gets end of file instead of blocking the test for ever."""
    path = tmp_path / "pipe.nnp"
    os.mkfifo(path)
    done = threading.Event()

    def unblock():
        while not done.is_set():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:          # no reader waiting
                done.wait(0.01)
                continue
            os.close(fd)
    writer = threading.Thread(target=unblock, daemon=True)
    writer.start()
    yield path
    done.set()
    writer.join()


def test_fifo_is_refused_without_being_opened(tmp_path, capsys, scratch, fifo, no_special_file_read):
    assert "is a FIFO (named pipe), not a regular file" in _refused(tmp_path, capsys, fifo)


def test_character_device_is_refused_without_being_read(tmp_path, capsys, scratch,
                                                         no_special_file_read):
    assert "is a character device, not a regular file" in _refused(tmp_path, capsys, "/dev/zero")


def test_directory_is_refused(tmp_path, capsys, scratch, no_special_file_read):
    folder = tmp_path / "model.nnp"
    folder.mkdir()
    assert "is a directory" in _refused(tmp_path, capsys, folder)


def test_symlink_loop_is_named_as_such(tmp_path, capsys, scratch):
    a, b = tmp_path / "a.nnp", tmp_path / "b.nnp"
    a.symlink_to(b)
    b.symlink_to(a)
    msg = _refused(tmp_path, capsys, a)
    assert "too many levels of symbolic links" in msg and "no such file" not in msg


def test_path_through_a_file_says_not_a_directory(tmp_path, capsys, scratch):
    good = nnp_files.single(tmp_path / "good.nnp")
    msg = _refused(tmp_path, capsys, good / "inner.nnp")
    assert "not a directory" in msg and "no such file" not in msg


def test_permission_denied_is_said_in_words(tmp_path, capsys, scratch, monkeypatch):
    # as an unsearchable folder makes it for a user other than root
    good = nnp_files.single(tmp_path / "good.nnp")
    real = os.stat

    def denied(path, *args, **kwargs):
        if os.fspath(path) == str(good):
            raise PermissionError(13, "Permission denied", str(good))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(os, "stat", denied)
    msg = _refused(tmp_path, capsys, good)
    assert "permission denied" in msg and "no such file" not in msg


# -- sizes ------------------------------------------------------------------------------------------
def _zip_bomb(src, dst, member, nbytes):
    """``src`` with ``member`` replaced by ``nbytes`` zeros, deflated (about 1000-fold)."""
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as z:
        for m in a.infolist():
            if m.filename != member:
                z.writestr(m.filename, a.read(m))
        with z.open(member, "w") as w:
            zeros = bytes(MiB)
            for _ in range(nbytes // MiB):
                w.write(zeros)
    return dst


@pytest.mark.parametrize("member, fmt", [("extra.bin", ".h5"), ("network.nntxt", ".h5"),
                                         ("parameter.h5", ".h5"),
                                         ("parameter.protobuf", ".protobuf")])
def test_zip_bomb_is_refused_before_it_is_read(tmp_path, capsys, scratch, monkeypatch, member, fmt):
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=fmt)
    bomb = _zip_bomb(good, tmp_path / "bomb.nnp", member, 64 * MiB)
    opened = []
    real_open = zipfile.ZipFile.open

    def spy(self, name, *args, **kwargs):
        opened.append(getattr(name, "filename", name))
        return real_open(self, name, *args, **kwargs)
    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    msg = _refused(tmp_path, capsys, bomb)
    assert f"{member} expands" in msg and "zip bomb" in msg
    assert member not in opened


def test_many_members_each_under_the_bomb_floor_are_refused_together(tmp_path, capsys, scratch,
                                                                     monkeypatch):
    # each member too small for the per-member ratio check, the archive as a whole a zip bomb
    good = nnp_files.single(tmp_path / "good.nnp")
    zeros = bytes(2 * MiB)
    with zipfile.ZipFile(good) as a, zipfile.ZipFile(tmp_path / "bomb.nnp", "w",
                                                     zipfile.ZIP_DEFLATED) as z:
        for m in a.infolist():
            z.writestr(m.filename, a.read(m))
        for k in range(40):
            z.writestr(f"extra/{k}.bin", zeros)
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *args, **kwargs: (
        opened.append(getattr(name, "filename", name)), real_open(self, name, *args, **kwargs))[1])
    msg = _refused(tmp_path, capsys, tmp_path / "bomb.nnp")
    assert "members expand" in msg and "zip bomb" in msg and opened == []


def _raw_zip(path, entries, extra_central=()):
    """A stored zip written byte by byte: ``entries`` [(name, data)], and central directory entries
    [(name, index of the entry whose local record it points at)] beside their own."""
    import zlib
    out, central, offsets = bytearray(), [], []

    def cd(name, data, off):
        n = name.encode()
        crc = zlib.crc32(data)
        return struct.pack("<IHHHHHHIIIHHHHHII", 0x02014b50, 20, 20, 0, 0, 0, 0x21, crc, len(data),
                           len(data), len(n), 0, 0, 0, 0, 0, off) + n
    for name, data in entries:
        n = name.encode()
        offsets.append(len(out))
        out += struct.pack("<IHHHHHIIIHH", 0x04034b50, 20, 0, 0, 0, 0x21, zlib.crc32(data),
                           len(data), len(data), len(n), 0) + n + data
        central.append(cd(name, data, offsets[-1]))
    for name, k in extra_central:
        central.append(cd(name, entries[k][1], offsets[k]))
    start, table = len(out), b"".join(central)
    out += table + struct.pack("<IHHHHIIH", 0x06054b50, 0, 0, len(central), len(central),
                               len(table), start, 0)
    path.write_bytes(bytes(out))
    return path


def test_entries_sharing_their_bytes_are_refused(tmp_path, capsys, scratch, monkeypatch):
    # the "overlapping entries" zip bomb reads one compressed stream as many members, each of
    # which, and their declared total, passes the expansion checks
    good = nnp_files.single(tmp_path / "good.nnp")
    with zipfile.ZipFile(good) as a:
        entries = [(m.filename, a.read(m)) for m in a.infolist()]
    last = len(entries) - 1
    bomb = _raw_zip(tmp_path / "bomb.nnp", entries, [("copy.protobuf", last)])
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *args, **kwargs: (
        opened.append(getattr(name, "filename", name)), real_open(self, name, *args, **kwargs))[1])
    msg = _refused(tmp_path, capsys, bomb)
    assert "overlaps entry" in msg and "zip bomb" in msg and opened == []
    plain = _raw_zip(tmp_path / "plain.nnp", entries)     # the same archive without the copy
    assert cli.main(["fold", str(plain), "-o", str(tmp_path / "o.nnp"), "-q"]) == 0


def test_running_out_of_memory_is_one_line(tmp_path, capsys, scratch, monkeypatch):
    good = nnp_files.single(tmp_path / "good.nnp")

    def no_memory(*args, **kwargs):
        raise MemoryError()
    monkeypatch.setattr(N, "plan_file", no_memory)
    msg = _refused(tmp_path, capsys, good)
    assert msg == f"bnfold: {good}: out of memory; nothing written"


def test_member_compressed_by_a_method_without_bounded_output_is_refused(tmp_path, capsys, scratch):
    good = nnp_files.single(tmp_path / "good.nnp")
    p = _rezip(good, tmp_path / "lzma.nnp", compression=zipfile.ZIP_LZMA)
    assert "compressed with LZMA" in _refused(tmp_path, capsys, p)


def _with_extra_dataset(good, dst, nbytes):
    """``good`` (HDF5 parameters) with one more parameter, unused, of ``nbytes`` stored bytes."""
    return _edit_h5(good, dst, lambda hd: hd.create_dataset(
        "extra/W", data=np.ones(nbytes // 4, np.float32)))


@pytest.mark.parametrize("fmt, available", [(".protobuf", 10_000), (".h5", 100_000)])
def test_more_than_the_available_memory_is_refused(tmp_path, capsys, scratch, monkeypatch, fmt,
                                                   available):
    # .protobuf: the members' declared sizes; .h5: the datasets' declared sizes, the member being
    # copied to disk first
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=fmt)
    if fmt == ".h5":
        good = _with_extra_dataset(good, tmp_path / "big.nnp", 256 << 10)
    monkeypatch.setattr(N, "_memory_available", lambda: available)
    msg = _refused(tmp_path, capsys, good)
    assert "of memory" in msg and "available" in msg
    assert ("parameter.h5" in msg) == (fmt == ".h5")


def test_network_definition_expanding_far_more_than_real_ones_is_refused(tmp_path, capsys, scratch):
    # a few kB of file, megabytes of text to parse: real definitions deflate about 20-fold
    good = nnp_files.single(tmp_path / "good.nnp")
    text = _member(good, "network.nntxt") + b"# padding\n" * (300 << 10)
    p = _rezip(good, tmp_path / "dense.nnp", {"network.nntxt": text}, compression=zipfile.ZIP_DEFLATED)
    msg = _refused(tmp_path, capsys, p)
    assert "network definition network.nntxt expands" in msg and "at most 64-fold" in msg


def test_network_definition_over_its_limit_is_refused(tmp_path, capsys, scratch, monkeypatch):
    good = nnp_files.single(tmp_path / "good.nnp")
    monkeypatch.setattr(N, "_DEFINITION_LIMIT", 1000)
    msg = _refused(tmp_path, capsys, good)
    assert "network.nntxt" in msg and "1000 bytes" in msg


# -- HDF5 parameters ----------------------------------------------------------------------------------
def _edit_h5(good, dst, edit):
    """``good`` (HDF5 parameters) with its parameter member edited by ``edit(h5py.File)``."""
    local = Path(dst).with_suffix(".h5")
    local.write_bytes(_member(good, "parameter.h5"))
    with h5py.File(local, "a") as hd:
        edit(hd)
    return _rezip(good, dst, {"parameter.h5": local.read_bytes()})


def _replace(name, **create):
    """An edit putting a new dataset ``name`` in place of the old, keeping its attributes."""
    def edit(hd):
        attrs = dict(hd[name].attrs)
        del hd[name]
        ds = hd.create_dataset(name, **create)
        for k, v in attrs.items():
            ds.attrs[k] = v
    return edit


@pytest.mark.parametrize("create, words", [
    # 4 TiB declared in a few kB, chunked, no chunk stored
    (dict(shape=(1 << 20, 1 << 20), dtype="f4", chunks=(1, 1024)), "stored"),
    # 64 MiB declared, contiguous, never written
    (dict(shape=(16 * MiB,), dtype="f4"), "more than the"),
    # 64 MiB of zeros compressed a thousandfold
    (dict(data=np.zeros(16 * MiB, np.float32), compression="gzip", chunks=(MiB,)), "stored"),
], ids=["chunked-empty", "contiguous-unwritten", "compressed-zeros"])
def test_dataset_declaring_more_than_it_stores_is_refused(tmp_path, capsys, scratch, create, words):
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")
    p = _edit_h5(good, tmp_path / "huge.nnp", _replace("bn2/bn/mean", **create))
    msg = _refused(tmp_path, capsys, p)
    assert "parameter.h5" in msg and "'bn2/bn/mean' declares" in msg and words in msg


@pytest.mark.parametrize("create, words", [
    (dict(shape=(4 * MiB,), dtype="f4", chunks=(MiB // 4,)), "stored in chunks declare"),
    (dict(data=np.zeros(4 * MiB, np.float32), compression="gzip", chunks=(MiB // 4,)),
     "stored in chunks declare"),
    (dict(shape=(4096,), dtype="f4"), "stored as declared, more than the"),
], ids=["chunked-empty", "compressed-zeros", "contiguous-unwritten"])
def test_many_datasets_each_passing_alone_are_refused_together(tmp_path, capsys, scratch, create,
                                                              words):
    # each under the size a dataset may expand freely (or the member's size), together gigabytes
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")

    def edit(hd):
        for k in range(40):
            ds = hd.create_dataset(f"unused/{k}", **create)
            ds.attrs["index"], ds.attrs["need_grad"] = 1000 + k, False
    p = _edit_h5(good, tmp_path / "many.nnp", edit)
    msg = _refused(tmp_path, capsys, p)
    assert "parameter.h5: its" in msg and words in msg


def test_dataset_in_chunks_far_larger_than_itself_is_refused(tmp_path, capsys, scratch):
    # a few values, in one chunk of 20 M elements: a read would decompress all of it
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")

    def edit(hd):
        values = hd["bn2/bn/mean"][...]
        _replace("bn2/bn/mean", data=values, maxshape=(None,) + values.shape[1:],
                 chunks=(20 * MiB // 4,) + values.shape[1:], compression="gzip")(hd)
    p = _edit_h5(good, tmp_path / "chunks.nnp", edit)
    msg = _refused(tmp_path, capsys, p)
    assert "parameter 'bn2/bn/mean'" in msg and "which a read decompresses to" in msg


def test_dataset_with_external_storage_is_refused(tmp_path, capsys, scratch):
    # its values would be read from a file of this machine, named by the input
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(6, dtype=np.float32).tobytes())
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")
    p = _edit_h5(good, tmp_path / "external.nnp", _replace(
        "bn2/bn/mean", shape=(1, 6, 1, 1), dtype="f4", external=[(str(secret), 0, 24)]))
    msg = _refused(tmp_path, capsys, p)
    assert "'bn2/bn/mean'" in msg and "outside the member" in msg


def test_virtual_dataset_is_refused(tmp_path, capsys, scratch):
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")
    source = tmp_path / "source.h5"
    with h5py.File(source, "w") as s:
        s["data"] = np.arange(6, dtype=np.float32).reshape(1, 6, 1, 1)

    def edit(hd):
        layout = h5py.VirtualLayout(shape=(1, 6, 1, 1), dtype="f4")
        layout[...] = h5py.VirtualSource(str(source), "data", shape=(1, 6, 1, 1))
        del hd["bn2/bn/mean"]
        hd.create_virtual_dataset("bn2/bn/mean", layout)
    msg = _refused(tmp_path, capsys, _edit_h5(good, tmp_path / "virtual.nnp", edit))
    assert "'bn2/bn/mean'" in msg and "outside the member" in msg


@pytest.mark.parametrize("data, words", [
    (np.array([b"abc"] * 6).reshape(1, 6, 1, 1), "strings"),
    (np.array(["abc"] * 6, dtype=object).reshape(1, 6, 1, 1), "strings"),
    (np.zeros((1, 6, 1, 1), [("a", "<f4"), ("b", "<i4")]), "records"),
    (np.zeros((1, 6, 1, 1), np.complex64), "complex numbers"),
    (np.zeros((1, 6, 1, 1), bool), "booleans"),
], ids=["bytes", "vlen-str", "compound", "complex", "bool"])
def test_parameter_that_is_not_numbers_is_refused(tmp_path, capsys, scratch, data, words):
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")
    dtype = h5py.string_dtype() if data.dtype == object else None
    p = _edit_h5(good, tmp_path / "bad.nnp", _replace("bn2/bn/mean", data=data, dtype=dtype))
    msg = _refused(tmp_path, capsys, p)
    assert "'bn2/bn/mean' holds " + words in msg and "dtype" in msg


@pytest.mark.parametrize("kind", ["vlen", "enum"])
def test_parameter_of_other_hdf5_types_is_refused(tmp_path, capsys, scratch, kind):
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")
    if kind == "vlen":
        create = dict(shape=(1, 6, 1, 1), dtype=h5py.vlen_dtype(np.float32))
    else:
        create = dict(data=np.zeros((1, 6, 1, 1), np.int8),
                      dtype=h5py.enum_dtype({"low": 0, "high": 1}, basetype="i1"))
    p = _edit_h5(good, tmp_path / "bad.nnp", _replace("bn2/bn/mean", **create))
    msg = _refused(tmp_path, capsys, p)
    assert "'bn2/bn/mean' holds " in msg and "not numbers" in msg


def test_parameter_without_shape_is_refused(tmp_path, capsys, scratch):
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")
    p = _edit_h5(good, tmp_path / "null.nnp", _replace("bn2/bn/mean", data=h5py.Empty("f4")))
    assert "'bn2/bn/mean' has no shape" in _refused(tmp_path, capsys, p)


def test_integer_parameters_are_read_as_integers(tmp_path, scratch):
    # the fold decides whether an integer array may fold; reading keeps its dtype
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")
    p = _edit_h5(good, tmp_path / "int.nnp", _replace(
        "bn2/bn/mean", data=np.arange(6, dtype=np.int32).reshape(1, 6, 1, 1)))
    f = N.read(str(p))
    assert f.params["bn2/bn/mean"].value.dtype == np.int32
    assert not os.listdir(scratch)


def test_big_endian_parameters_fold_as_their_values(tmp_path, scratch):
    # the same numbers in the other byte order: read into this machine's order, folded, verified
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")

    def edit(hd):
        names = []
        hd.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        for name in names:
            _replace(name, data=hd[name][...].astype(">f4"))(hd)
    p = _edit_h5(good, tmp_path / "be.nnp", edit)
    assert cli.main(["fold", str(p), "-o", str(tmp_path / "o.nnp"), "--verify", "-q"]) == 0
    assert all(v.value.dtype == np.float32 for v in N.read(str(p)).params.values())


def test_parameter_name_that_is_not_utf8_is_refused(tmp_path, capsys, scratch):
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")
    p = _edit_h5(good, tmp_path / "name.nnp", lambda hd: hd.create_dataset(
        b"\xff\xfebad", data=np.ones(3, np.float32)))
    msg = _refused(tmp_path, capsys, p)
    assert "a parameter's name is not UTF-8 text" in msg


def test_integer_weight_is_named_with_the_file(tmp_path, capsys, scratch):
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")
    p = _edit_h5(good, tmp_path / "int.nnp", _replace(
        "c1/conv/W", data=np.ones((6, 3, 3, 3), np.int32)))
    msg = _refused(tmp_path, capsys, p)
    assert "'c1/conv/W' is int32; a weight or bias of a fold must be" in msg


@pytest.mark.parametrize("attribute, value, words", [
    ("index", "abc", "index attribute is not an integer"),
    ("index", 1.5, "index attribute is not an integer"),
    ("index", np.array([1, 2]), "index attribute holds 2 values"),
    ("need_grad", "yes", "need_grad attribute is not a boolean"),
    ("need_grad", 2, "need_grad attribute is not a boolean"),
])
def test_bad_attribute_is_refused(tmp_path, capsys, scratch, attribute, value, words):
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")

    def edit(hd):
        hd["bn2/bn/mean"].attrs[attribute] = value
    p = _edit_h5(good, tmp_path / "attr.nnp", edit)
    msg = _refused(tmp_path, capsys, p)
    assert f"'bn2/bn/mean': {words}" in msg


def test_integer_need_grad_is_read_as_a_boolean(tmp_path, scratch):
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")

    def edit(hd):
        hd["c1/conv/W"].attrs["need_grad"] = np.int8(0)
        hd["bn2/bn/mean"].attrs["need_grad"] = 1
    f = N.read(str(_edit_h5(good, tmp_path / "attr.nnp", edit)))
    assert f.params["c1/conv/W"].need_grad is False and f.params["bn2/bn/mean"].need_grad is True


def test_missing_attributes_read_as_nnabla_reads_them(tmp_path, scratch):
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")
    want = N.read(str(good))

    def edit(hd):
        for key in ("index", "need_grad"):
            del hd["c1/conv/W"].attrs[key]
        hd["bn2/bn/mean"].attrs["need_grad"] = True
        hd["bn2/bn/mean"].attrs["index"] = np.uint16(1000)   # any integer type, sorted last
    f = N.read(str(_edit_h5(good, tmp_path / "attr.nnp", edit)))
    names = list(f.params)
    assert names[0] == "c1/conv/W" and names[-1] == "bn2/bn/mean"   # index 0 by default
    assert f.params["c1/conv/W"].need_grad is False and f.params["bn2/bn/mean"].need_grad is True
    assert set(names) == set(want.params)
    assert all(np.array_equal(f.params[n].value, want.params[n].value) for n in names)


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
def test_hdf5_read_failure_is_said_without_hdf5_internals(tmp_path, capsys, scratch, monkeypatch,
                                                          compression):
    """An I/O error while the values are read: by HDF5 from the scratch copy of a compressed member,
    by bnfold from the archive for a stored one (as NNabla saves them)."""
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")
    src = _rezip(good, tmp_path / "member.nnp", compression=compression)

    def failing(self, key):
        raise OSError("Can't synchronously read data (file read failed: time = Mon Jan  1 00:00:00 "
                      "2024, filename = '/tmp/bnfold-1/parameter.h5', file descriptor = 5, errno = 5, "
                      "error message = 'Input/output error', buf = 0x55d0c0ffee00, total read size = "
                      "648, bytes this sub-read = 648, bytes actually read = 18446744073709551615, "
                      "offset = 2048)")
    monkeypatch.setattr(h5py.Dataset, "__getitem__", failing)
    read_values = N._read_pieces

    def failing_values(*args):   # the archive fails once HDF5 has read the structure
        def failing_read(self, pos, view):
            raise OSError(errno.EIO, "Input/output error")
        monkeypatch.setattr(N._Window, "read_at", failing_read)
        return read_values(*args)
    monkeypatch.setattr(N, "_read_pieces", failing_values)
    threads = threading.active_count()
    msg = _refused(tmp_path, capsys, src)
    assert "parameter.h5" in msg and "input/output error" in msg
    assert "0x" not in msg and "filename" not in msg and "errno" not in msg
    assert threading.active_count() == threads   # the CRC's thread ended with the read


@pytest.mark.parametrize("where", ["values", "structure"])
def test_hdf5_member_not_matching_its_crc(tmp_path, capsys, scratch, where):
    """A stored parameter member damaged after it was written (its CRC-32 no longer matches) is
    refused as zipfile refuses it, whether the damage is in the values (read straight from the
    archive) or in the HDF5 structure (which then may not parse)."""
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")
    data = bytearray(_member(good, "parameter.h5"))
    with zipfile.ZipFile(good) as z:
        info = z.getinfo("parameter.h5")
        assert info.compress_type == zipfile.ZIP_STORED
    with h5py.File(io.BytesIO(bytes(data)), "r") as hd:
        offsets = sorted(hd[name].id.get_offset() for name in _h5_names(hd))
    at = offsets[-1] + 1 if where == "values" else 0
    data[at] ^= 0xFF
    blob = bytearray(good.read_bytes())
    start = blob.find(bytes(_member(good, "parameter.h5")))
    blob[start:start + len(data)] = data
    bad = tmp_path / "damaged.nnp"
    bad.write_bytes(bytes(blob))
    _refused_for_its_crc(tmp_path, capsys, bad, "parameter.h5")


@pytest.mark.parametrize("where", ["values", "last byte"])
@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_protobuf_member_not_matching_its_crc(tmp_path, capsys, where, compression):
    """A protobuf parameter member damaged after it was written is refused as zipfile refuses it:
    read in place with bnfold's CRC-32 where it is stored (as NNabla saves them), through zipfile
    where it is compressed."""
    good = _rezip(nnp_files.single(tmp_path / "good.nnp", parameter_format=".protobuf"),
                  tmp_path / "rezipped.nnp", compression=compression)
    data = bytearray(_member(good, "parameter.protobuf"))
    pb = nnabla_pb2.NNablaProtoBuf.FromString(bytes(data))
    values = np.asarray(pb.parameter[0].data, np.float32).tobytes()
    at = data.find(values) + 5 if where == "values" else len(data) - 1
    assert 0 < at < len(data)
    data[at] ^= 0x01   # a bit of a value (or of the last need_grad): the member still parses
    bad = _rezip(good, tmp_path / "damaged.nnp", replace={"parameter.protobuf": bytes(data)},
                 compression=compression)
    with zipfile.ZipFile(good) as z:   # the CRC-32 recorded for the member as it was
        _with_recorded_crc(bad, "parameter.protobuf", z.getinfo("parameter.protobuf").CRC)
    _refused_for_its_crc(tmp_path, capsys, bad, "parameter.protobuf")


def _with_recorded_crc(path, name: str, crc: int) -> None:
    """Set the CRC-32 the archive ``path`` records for member ``name`` (in its local header and in
    the central directory) to ``crc``."""
    blob = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        local = z.getinfo(name).header_offset
    for at in (local + 14, _central_entry(blob, name) + 16):
        blob[at:at + 4] = struct.pack("<I", crc)
    path.write_bytes(bytes(blob))


def _refused_for_its_crc(tmp_path, capsys, bad, name: str) -> None:
    """``bad`` is refused for member ``name``'s CRC-32, as zipfile refuses it."""
    with pytest.raises(zipfile.BadZipFile):
        with zipfile.ZipFile(bad) as z:
            z.read(name)
    msg = _refused(tmp_path, capsys, bad)
    assert f"Bad CRC-32 for file '{name}'" in msg


def _central_entry(blob, name: str) -> int:
    """Offset of ``name``'s central directory entry in the zip ``blob``."""
    at = 0
    while True:
        at = blob.find(b"PK\x01\x02", at)
        assert at >= 0, name
        n = struct.unpack("<H", blob[at + 28:at + 30])[0]
        if blob[at + 46:at + 46 + n].decode() == name:
            return at
        at += 4


def test_protobuf_member_read_failure_is_one_line(tmp_path, capsys, monkeypatch):
    """An I/O error while a stored protobuf member is read from the archive."""
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".protobuf")

    def failing_read(self, pos, view):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(N._Window, "read_at", failing_read)
    msg = _refused(tmp_path, capsys, good)
    assert "parameter.protobuf cannot be read (input/output error)" in msg


def _h5_names(hd):
    names = []
    hd.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


# -- protobuf parameters ------------------------------------------------------------------------------
def _protobuf_member(edit):
    pb = nnabla_pb2.NNablaProtoBuf()
    q = pb.parameter.add()
    q.variable_name = "extra/W"
    edit(q)
    return pb.SerializeToString()


def test_protobuf_parameter_declaring_more_than_the_member_holds(tmp_path, capsys, scratch):
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".protobuf")
    key = P._key(nnabla_pb2.NNablaProtoBuf.DESCRIPTOR.fields_by_name["parameter"].number, 2)
    lying = _member(good, "parameter.protobuf") + key + P._varint(1 << 40) + bytes(16)
    p = _rezip(good, tmp_path / "lying.nnp", {"parameter.protobuf": lying})
    msg = _refused(tmp_path, capsys, p)
    assert "parameter.protobuf does not parse" in msg and f"declares {1 << 40} bytes" in msg


@pytest.mark.parametrize("dims, values", [([1 << 32, 1 << 32], []), ([-1, -1], [1.0]),
                                          ([0] + [1] * 32, []), ([0, 1 << 62, 1 << 62], [])])
def test_protobuf_parameter_of_impossible_shape(tmp_path, capsys, scratch, dims, values):
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".protobuf")

    def edit(q):
        q.shape.dim.extend(dims)
        q.data.extend(values)
    extra = _protobuf_member(edit)
    p = _rezip(good, tmp_path / "shape.nnp",
               {"parameter.protobuf": _member(good, "parameter.protobuf") + extra})
    msg = _refused(tmp_path, capsys, p)
    assert "'extra/W'" in msg and "shape" in msg


def test_protobuf_read_allocates_as_bytes_arrive():
    # a stream of unknown size: a length claiming a terabyte reads what is there, then stops
    key = P._key(nnabla_pb2.NNablaProtoBuf.DESCRIPTOR.fields_by_name["parameter"].number, 2)

    class Stream:
        def __init__(self, data):
            self.data, self.largest = data, 0

        def read(self, n=-1):
            self.largest = max(self.largest, n)
            out, self.data = (self.data, b"") if n < 0 else (self.data[:n], self.data[n:])
            return out
    s = Stream(key + P._varint(1 << 40) + bytes(100))
    with pytest.raises(P.ProtobufError, match="truncated"):
        list(P.read(s))
    assert s.largest <= 64 * MiB


# -- the zip archive ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["network.nntxt", "parameter.h5", "nnp_version.txt"])
def test_duplicate_zip_entries_are_refused(tmp_path, capsys, scratch, name):
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")
    p = _rezip(good, tmp_path / "dup.nnp", add=[(name, _member(good, name))])
    assert f"more than one entry named '{name}'" in _refused(tmp_path, capsys, p)


def test_encrypted_member_is_refused(tmp_path, capsys, scratch):
    good = nnp_files.single(tmp_path / "good.nnp")
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as z:     # the "encrypted" flag, in the local header and the directory
        m = z.getinfo("nnp_version.txt")
        central = z.start_dir
    while data[central + 46:central + 46 + len(m.filename)] != m.filename.encode():
        central += 46 + sum(struct.unpack("<HHH", data[central + 28:central + 34]))
    for at in (m.header_offset + 6, central + 8):
        data[at] |= 1
    p = tmp_path / "encrypted.nnp"
    p.write_bytes(bytes(data))
    assert "nnp_version.txt is encrypted" in _refused(tmp_path, capsys, p)


# -- network definitions NNabla's builder loops on ---------------------------------------------------
@pytest.fixture
def nnabla_never_builds(monkeypatch):
    """A definition that reaches NNabla's builder fails the test at once (instead of looping)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the definition reached NNabla's builder")
    monkeypatch.setattr(N, "build_networks", refuse)


def _edit_definition(good, dst, edit):
    proto = nnabla_pb2.NNablaProtoBuf()
    text_format.Merge(_member(good, "network.nntxt").decode(), proto)
    edit(proto)
    return _rezip(good, dst, {"network.nntxt": text_format.MessageToString(proto).encode()})


def _cycle(proto):      # ReLU reads the deconvolution's output, the deconvolution the ReLU's
    fs = proto.network[0].function
    fs[2].input[0] = fs[3].output[0]


def _self_loop(proto):
    fs = proto.network[0].function
    fs[2].input[0] = fs[2].output[0]


def _same_name(proto):
    fs = proto.network[0].function
    fs[3].name = fs[2].name


def _two_producers(proto):
    fs = proto.network[0].function
    fs[3].output[0] = fs[2].output[0]


def _undeclared(proto):
    proto.network[0].function[3].input[0] = "nowhere"


def _neither_buffer_nor_parameter(proto):
    next(v for v in proto.network[0].variable if v.name == "@net/ReLU_out").type = "Scratch"


def _same_network_name(proto):
    proto.network.add().CopyFrom(proto.network[0])


def _param_of(proto, kind):
    return next(getattr(f, f.WhichOneof("parameter")) for f in proto.network[0].function
                if f.type == kind)


def _group_0(proto):
    _param_of(proto, "Convolution").group = 0


def _group_missing(proto):   # an unset field reads 0, as NNabla takes it
    _param_of(proto, "Convolution").ClearField("group")


def _stride_0(proto):
    _param_of(proto, "Deconvolution").stride.dim[:] = [1, 0]


def _dilation_0(proto):
    _param_of(proto, "Convolution").dilation.dim[:] = [0, 0]


def _transpose_negative(proto):   # the ReLU made a Transpose with a negative axis
    f = next(f for f in proto.network[0].function if f.type == "ReLU")
    f.type = "Transpose"
    f.transpose_param.axes[:] = [0, 1, 3, -1]


def _huge_batch(proto):
    proto.network[0].batch_size = 1 << 62


def _huge_variable(proto):
    proto.network[0].variable[0].shape.dim[:] = [-1, 3, 1 << 30, 1 << 30]


@pytest.mark.parametrize("edit, words", [
    (_cycle, "function '@net/ReLU' depends on its own output (@net/ReLU -> @net/Deconvolution -> "
             "@net/ReLU)"),
    (_self_loop, "function '@net/ReLU' depends on its own output (@net/ReLU -> @net/ReLU)"),
    (_same_name, "two functions are named '@net/ReLU'"),
    (_two_producers, "variable '@net/ReLU_out' is the output of both '@net/ReLU' and "
                     "'@net/Deconvolution'"),
    (_undeclared, "function '@net/Deconvolution' reads 'nowhere', which the network does not "
                  "declare"),
    (_neither_buffer_nor_parameter, "function '@net/ReLU' writes '@net/ReLU_out', which the network "
                                    "declares as 'Scratch', neither Buffer nor Parameter"),
    (_same_network_name, "two networks are named 'net'"),
    # NNabla's builder ends the process (SIGFPE) on these
    (_group_0, "network 'net': function '@net/Convolution' (Convolution) has group 0; NNabla "
               "divides by it, so it must be at least 1"),
    (_group_missing, "network 'net': function '@net/Convolution' (Convolution) has group 0"),
    (_stride_0, "network 'net': function '@net/Deconvolution' (Deconvolution) has stride [1, 0]"),
    (_dilation_0, "network 'net': function '@net/Convolution' (Convolution) has dilation [0, 0]"),
    # and ends it with a corrupted heap (SIGABRT) on this one
    (_transpose_negative, "network 'net': function '@net/ReLU' (Transpose) has axes [0, 1, 3, -1]; "
                          "NNabla indexes with them unchecked, so none may be negative"),
    (_huge_batch, f"network 'net': batch_size {1 << 62} is too large (at most 2147483647)"),
    (_huge_variable, "network 'net': variable 'x' of shape [-1, 3, 1073741824, 1073741824] would "
                     "hold more than 2^48 elements"),
], ids=["cycle", "self-loop", "same-function-name", "two-producers", "undeclared", "undeclared-kind",
        "same-network", "group-0", "group-missing", "stride-0", "dilation-0", "transpose-negative",
        "huge-batch",
        "huge-variable"])
@pytest.mark.parametrize("command", ["fold", "inspect"])
def test_definition_nnabla_cannot_build_is_refused_before_it_reaches_nnabla(
        tmp_path, capsys, scratch, nnabla_never_builds, edit, words, command):
    good = nnp_files.single(tmp_path / "good.nnp")
    p = _edit_definition(good, tmp_path / "bad.nnp", edit)
    msg = _refused(tmp_path, capsys, p, command)
    assert "'net'" in msg and words in msg


@pytest.mark.parametrize("param, folds", [("bn1/bn/mean", False), ("c2/conv/b", True)])
def test_a_signalling_nan_is_said_once(tmp_path, capsys, scratch, param, folds):
    # NumPy warns as it merely casts a signalling NaN: a BN statistic holding one is refused in
    # one line; a bias holding one folds (a NaN stays a NaN), saying nothing with --quiet
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")

    def edit(hd):
        v = hd[param][...]
        v.reshape(-1).view(np.uint32)[0] = 0x7FA00000
        hd[param][...] = v
    p = _edit_h5(good, tmp_path / "snan.nnp", edit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a warning would fail the command, not only be printed
        if not folds:
            assert "bn1/bn: mean has non-finite values" in _refused(tmp_path, capsys, p)
            return
        assert cli.main(["fold", str(p), "-o", str(tmp_path / "o.nnp"), "-q"]) == 0
    assert capsys.readouterr().err == ""


_REPEATED = {   # Neural Network Console's repeated blocks, which NNabla unrolls as it builds
    "RecurrentInput": ("""
  repeat_info { id: "T" times: 3 }
  variable { name: "x" type: "Buffer" shape { dim: -1 dim: 3 dim: 4 } }
  variable { name: "xi" type: "Buffer" repeat_id: "T" shape { dim: -1 dim: 4 } }
  variable { name: "a" type: "Buffer" repeat_id: "T" shape { dim: -1 dim: 5 } }
  variable { name: "b" type: "Buffer" repeat_id: "T" shape { dim: -1 dim: 5 } }
  variable { name: "y" type: "Buffer" shape { dim: -1 dim: 3 dim: 5 } }
  variable { name: "fc/W" type: "Parameter" shape { dim: 4 dim: 5 } }
  variable { name: "fc/b" type: "Parameter" shape { dim: 5 } }
  variable { name: "bn/beta" type: "Parameter" shape { dim: 1 dim: 5 } }
  variable { name: "bn/gamma" type: "Parameter" shape { dim: 1 dim: 5 } }
  variable { name: "bn/mean" type: "Parameter" shape { dim: 1 dim: 5 } }
  variable { name: "bn/var" type: "Parameter" shape { dim: 1 dim: 5 } }
  function { name: "RIn" type: "RecurrentInput" repeat_id: "T" input: "x" output: "xi"
    recurrent_param { repeat_id: "T" length: 3 axis: 1 } }
  function { name: "Affine" type: "Affine" repeat_id: "T" input: "xi" input: "fc/W" input: "fc/b"
    output: "a" affine_param { base_axis: 1 } }
  function { name: "BN" type: "BatchNormalization" repeat_id: "T" input: "a" input: "bn/beta"
    input: "bn/gamma" input: "bn/mean" input: "bn/var" output: "b"
    batch_normalization_param { axes: 1 decay_rate: 0.9 eps: 1e-05 } }
  function { name: "ROut" type: "RecurrentOutput" input: "b" output: "y"
    recurrent_param { repeat_id: "T" length: 3 axis: 1 } }""",
                       {"fc/W": (4, 5), "fc/b": (5,), "bn/beta": (1, 5), "bn/gamma": (1, 5),
                        "bn/mean": (1, 5), "bn/var": (1, 5)}),
    "RepeatStart": ("""
  repeat_info { id: "R" times: 3 }
  variable { name: "x" type: "Buffer" shape { dim: -1 dim: 4 dim: 6 dim: 6 } }
  variable { name: "rs" type: "Buffer" repeat_id: "R" shape { dim: -1 dim: 4 dim: 6 dim: 6 } }
  variable { name: "c" type: "Buffer" repeat_id: "R" shape { dim: -1 dim: 4 dim: 6 dim: 6 } }
  variable { name: "b" type: "Buffer" repeat_id: "R" shape { dim: -1 dim: 4 dim: 6 dim: 6 } }
  variable { name: "r" type: "Buffer" repeat_id: "R" shape { dim: -1 dim: 4 dim: 6 dim: 6 } }
  variable { name: "y" type: "Buffer" shape { dim: -1 dim: 4 dim: 6 dim: 6 } }
  variable { name: "conv/W" type: "Parameter" repeat_id: "R" shape { dim: 4 dim: 4 dim: 3 dim: 3 } }
  variable { name: "bn/beta" type: "Parameter" repeat_id: "R" shape { dim: 1 dim: 4 dim: 1 dim: 1 } }
  variable { name: "bn/gamma" type: "Parameter" repeat_id: "R" shape { dim: 1 dim: 4 dim: 1 dim: 1 } }
  variable { name: "bn/mean" type: "Parameter" repeat_id: "R" shape { dim: 1 dim: 4 dim: 1 dim: 1 } }
  variable { name: "bn/var" type: "Parameter" repeat_id: "R" shape { dim: 1 dim: 4 dim: 1 dim: 1 } }
  function { name: "RepeatStart" type: "RepeatStart" repeat_id: "R" input: "x" input: "r"
    output: "rs" repeat_param { repeat_id: "R" times: 3 } }
  function { name: "Conv" type: "Convolution" repeat_id: "R" input: "rs" input: "conv/W" output: "c"
    convolution_param { base_axis: 1 pad { dim: 1 dim: 1 } stride { dim: 1 dim: 1 }
                        dilation { dim: 1 dim: 1 } group: 1 } }
  function { name: "BN" type: "BatchNormalization" repeat_id: "R" input: "c" input: "bn/beta"
    input: "bn/gamma" input: "bn/mean" input: "bn/var" output: "b"
    batch_normalization_param { axes: 1 decay_rate: 0.9 eps: 1e-05 } }
  function { name: "ReLU" type: "ReLU" repeat_id: "R" input: "b" output: "r" }
  function { name: "RepeatEnd" type: "RepeatEnd" input: "r" output: "y"
    repeat_param { repeat_id: "R" times: 3 } }""",
                    {f"{n}_R[{k}]": shape for k in range(3) for n, shape in (
                        ("conv/W", (4, 4, 3, 3)), ("bn/beta", (1, 4, 1, 1)),
                        ("bn/gamma", (1, 4, 1, 1)), ("bn/mean", (1, 4, 1, 1)),
                        ("bn/var", (1, 4, 1, 1)))}),
}


@pytest.mark.parametrize("kind", sorted(_REPEATED))
def test_a_repeated_block_keeps_its_bns_saying_why(tmp_path, capsys, scratch, kind):
    # the BNs of a block NNabla unrolls as it builds stay (a fold could not be written back to the
    # file's one copy of them), each said; the file is written unchanged in values and verifies
    import json
    body, params = _REPEATED[kind]
    rng = np.random.RandomState(0)
    values = nnabla_pb2.NNablaProtoBuf()
    for name, shape in params.items():
        p = values.parameter.add(variable_name=name, need_grad=True)
        p.shape.dim.extend(shape)
        data = rng.uniform(0.5, 1.5, shape) if name.startswith("bn/var") else rng.randn(*shape)
        p.data.extend(data.astype(np.float32).reshape(-1).tolist())
    definition = f'network {{\n  name: "net"\n  batch_size: 2{body}\n}}\n' \
        'executor { name: "runtime" network_name: "net" data_variable { variable_name: "x" ' \
        'data_name: "x" } output_variable { variable_name: "y" data_name: "y" } }\n'
    path = tmp_path / "repeated.nnp"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("nnp_version.txt", "0.1")
        z.writestr("network.nntxt", definition)
        z.writestr("parameter.protobuf", values.SerializeToString())
    out, report = tmp_path / "o.nnp", tmp_path / "r.json"
    assert cli.main(["fold", str(path), "-o", str(out), "--verify", "--report", str(report),
                     "-q"]) == 0, capsys.readouterr().err
    net = json.loads(report.read_text())["networks"]["net"]
    assert net["folded"] == [] and len(net["skipped"]) == 3
    assert all(s["reason"].startswith("its network repeats a block (repeat_info), which NNabla "
                                      "unrolls as it builds") for s in net["skipped"])
    after = N.read(str(out))
    assert sorted(after.params) == sorted(params)


def test_a_folded_bn_statistic_an_executor_outputs_is_kept(tmp_path, scratch):
    # the executor names bn1's mean as an output: the BN folds, the mean stays in the file, declared,
    # with its values and among the executor's parameters
    good = nnp_files.single(tmp_path / "good.nnp")

    def edit(proto):
        proto.executor[0].output_variable.add(variable_name="bn1/bn/mean", data_name="m")
        proto.executor[0].parameter_variable.add(variable_name="bn1/bn/mean")
    p = _edit_definition(good, tmp_path / "mean-out.nnp", edit)
    out = tmp_path / "o.nnp"
    assert cli.main(["fold", str(p), "-o", str(out), "-q"]) == 0
    before, after = N.read(str(p)), N.read(str(out))
    assert "bn1/bn/beta" not in after.params     # folded
    assert np.array_equal(after.params["bn1/bn/mean"].value, before.params["bn1/bn/mean"].value)
    assert "bn1/bn/mean" in {v.name for v in after.proto.network[0].variable}
    assert "bn1/bn/mean" in {v.variable_name for v in after.proto.executor[0].parameter_variable}


@pytest.mark.parametrize("kind", ["Convolution", "Deconvolution"])
def test_a_layer_with_an_input_past_its_bias_keeps_its_bns(tmp_path, scratch, capsys, kind):
    # NNabla's layers add a bias only as the third of three inputs: with a fourth (its bias again)
    # they add none, so a BN's shift written into the third would be lost
    import json
    good = nnp_files.single(tmp_path / "good.nnp")

    def edit(proto):
        f = next(f for f in proto.network[0].function if f.type == kind and len(f.input) == 3)
        f.input.append(f.input[2])
    p = _edit_definition(good, tmp_path / "four.nnp", edit)
    out, report = tmp_path / "o.nnp", tmp_path / "r.json"
    assert cli.main(["fold", str(p), "-o", str(out), "--verify", "--report", str(report),
                     "-q"]) == 0, capsys.readouterr().err
    kept = [s for s in json.loads(report.read_text())["networks"]["net"]["skipped"]
            if f"the {kind} it reaches has 4 inputs: NNabla adds a bias only as the third of " \
               "three" in s["reason"]]
    assert kept, report.read_text()


@pytest.mark.parametrize("batch", [None, 0, -1])
def test_network_without_a_batch_size_folds_and_verifies(tmp_path, scratch, batch):
    # as NNabla's ONNX converter writes a dynamic batch: built with 1 for its -1 dimensions
    # (NNabla's builder, given none, divides by 0 in a convolution and ends the process)
    good = nnp_files.single(tmp_path / "good.nnp")

    def edit(proto):
        if batch is None:
            proto.network[0].ClearField("batch_size")
        else:
            proto.network[0].batch_size = batch
    p = _edit_definition(good, tmp_path / "nobatch.nnp", edit)
    # in processes of their own: were it to reach NNabla with no batch size, SIGFPE would end them
    r = subprocess.run([sys.executable, "-m", "bnfold_gpu", "fold", str(p), "-o",
                        str(tmp_path / "o.nnp"), "--verify", "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-c", f"import bnfold_gpu; "
                        f"print(len(bnfold_gpu.load({str(p)!r}, 'net').outputs))"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split()[-1] == "1", r.stderr


def test_load_refuses_a_batch_size_nnabla_cannot_count(tmp_path):
    good = nnp_files.single(tmp_path / "good.nnp")
    for bad in (0, 1 << 40):
        with pytest.raises(ValueError, match="batch_size must be from 1 to 2147483647"):
            bnfold_gpu.load(good, batch_size=bad)


def _loop_network(back):
    """x -> RepeatStart or Delay (its other input: y, from the end of the loop) -> Affine -> y."""
    proto = nnabla_pb2.NNablaProtoBuf()
    net = proto.network.add()
    net.name = "loop"
    for name, kind in (("x", "Buffer"), ("s", "Buffer"), ("y", "Buffer"), ("W", "Parameter")):
        v = net.variable.add()
        v.name, v.type = name, kind
    start = net.function.add()
    start.name, start.type = back, back
    start.input.extend(["x", "y"] if back == "RepeatStart" else ["y", "x"])
    start.output.append("s")
    layer = net.function.add()
    layer.name, layer.type = "affine", "Affine"
    layer.input.extend(["s", "W"])
    layer.output.append("y")
    return proto


@pytest.mark.parametrize("back", ["RepeatStart", "Delay"])
def test_loops_nnabla_unrolls_are_not_cycles(back):
    N._check_definition("loop.nnp", _loop_network(back))


def test_cycle_through_the_other_input_of_a_loop_function_is_one():
    proto = _loop_network("RepeatStart")
    start = proto.network[0].function[0]
    start.input[0], start.input[1] = start.input[1], start.input[0]
    with pytest.raises(N.NnpError, match="depends on its own output"):
        N._check_definition("loop.nnp", proto)


def test_long_cycle_is_found_in_time_linear_in_the_definition():
    proto = nnabla_pb2.NNablaProtoBuf()
    net = proto.network.add()
    net.name = "chain"
    n = 20000
    for i in range(n):
        v = net.variable.add()
        v.name, v.type = f"v{i}", "Buffer"
    for i in range(n):
        f = net.function.add()
        f.name, f.type = f"f{i}", "ReLU"
        f.input.append(f"v{i - 1}" if i else f"v{n - 1}")
        f.output.append(f"v{i}")
    with pytest.raises(N.NnpError, match=r"depends on its own output \(f\d+ -> f\d+ -> .* -> f\d+\)"):
        N._check_definition("chain.nnp", proto)


# -- the scratch folder of HDF5 parameters -----------------------------------------------------------
def _deflated_h5(tmp_path):
    """An .nnp whose HDF5 member is compressed: HDF5 reads it from a scratch copy (a stored one is
    read in place, in the archive)."""
    good = nnp_files.single(tmp_path / "stored.nnp", parameter_format=".h5")
    return _rezip(good, tmp_path / "good.nnp", compression=zipfile.ZIP_DEFLATED)


def test_stored_hdf5_member_is_read_without_a_scratch_file(tmp_path, scratch, monkeypatch):
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")
    made = []
    real = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    stored = N.read(str(good)).params
    assert not made and not os.listdir(scratch)
    other = tmp_path / "deflated"
    other.mkdir()
    deflated = N.read(str(_deflated_h5(other))).params
    assert list(stored) == list(deflated)
    for name, p in stored.items():
        q = deflated[name]
        assert p.need_grad == q.need_grad and p.value.dtype == q.value.dtype
        np.testing.assert_array_equal(p.value, q.value)


@pytest.mark.parametrize("userblock", [0, 512])
def test_stored_hdf5_values_read_as_hdf5_converts_them(tmp_path, scratch, userblock):
    """Values HDF5 converts as it reads them (a float format of its own, big-endian numbers), values
    never written, and a member with a dataset stored in chunks: read in place, each as HDF5
    reads it (with a user block before the HDF5 data too: HDF5 then gives a never-written dataset
    an address that looks like one)."""
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")
    values = N.read(str(good)).params
    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    expected = {}
    with h5py.File(buf, "w", userblock_size=userblock) as hd:
        for i, (name, p) in enumerate(values.items()):
            v = rng.normal(size=p.value.shape).astype(np.float32)
            if i % 4 == 0:      # a float format of HDF5's own: read as float64
                t = h5py.h5t.IEEE_F32LE.copy()
                t.set_ebias(120)
                space = h5py.h5s.create_simple(v.shape or (1,))
                parent, _, leaf = name.rpartition("/")
                group = hd.require_group(parent) if parent else hd
                raw = h5py.h5d.create(group.id, leaf.encode(), t, space)
                raw.write(h5py.h5s.ALL, h5py.h5s.ALL, v.reshape(v.shape or (1,)))
                ds = hd[name]
            elif i % 4 == 1:    # big-endian
                ds = hd.create_dataset(name, data=v.astype(">f4"))
            elif i % 4 == 2:    # chunked
                ds = hd.create_dataset(name, data=v, chunks=True) if v.ndim else \
                    hd.create_dataset(name, data=v)
            else:               # never written: its fill value
                ds = hd.create_dataset(name, shape=v.shape, dtype=np.float32, fillvalue=0.5)
            ds.attrs["need_grad"] = p.need_grad
            ds.attrs["index"] = i
        hd.flush()
        for name in values:
            expected[name] = hd[name][...]
    p = _rezip(good, tmp_path / "formats.nnp", {"parameter.h5": buf.getvalue()})
    got = N.read(str(p)).params
    assert list(got) == list(values)
    for name, want in expected.items():
        v = got[name].value
        assert v.dtype == want.dtype.newbyteorder("=") and v.dtype.isnative
        np.testing.assert_array_equal(v, want)
    assert not os.listdir(scratch)


def _patched_addresses(tmp_path, where):
    """A stored member of three datasets (a, b, c) whose b's data address is moved ``where``."""
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")
    params = N.read(str(good)).params
    buf = io.BytesIO()
    with h5py.File(buf, "w") as hd:
        for i, (name, p) in enumerate(params.items()):
            hd.create_dataset(name, data=p.value).attrs.update({"index": i, "need_grad": False})
        for i, key in enumerate("abc"):
            ds = hd.create_dataset("d" + key, data=np.arange(64, dtype=np.float32) + 100 * i)
            ds.attrs.update({"index": 50 + i, "need_grad": False})
        hd.flush()
        at = {key: hd["d" + key].id.get_offset() for key in "abc"}
    data = bytearray(buf.getvalue())
    # b's layout message: version 3, contiguous, its address, its size (64 float32)
    old = b"\x03\x01" + struct.pack("<QQ", at["b"], 256)
    assert data.count(old) == 1
    new = {"a": at["a"], "inside a": at["a"] + 40, "zero": 0, "past the end": len(data) - 100,
           "undefined": (1 << 64) - 1, "far": 1 << 40}[where]
    k = data.index(old) + 2
    data[k:k + 8] = struct.pack("<Q", new)
    return _rezip(good, tmp_path / "patched.nnp", {"parameter.h5": bytes(data)})


@pytest.mark.parametrize("where", ["a", "inside a", "zero", "past the end", "undefined", "far"])
def test_stored_hdf5_values_at_odd_addresses_read_as_hdf5_reads_them(tmp_path, scratch, where):
    """A dataset whose data address is another's, inside another's, 0, past the end or undefined
    is read in place as HDF5 reads it from a scratch copy (the same values, or the same refusal),
    and no two parameters share memory (folding one in place must not change another)."""
    stored = _patched_addresses(tmp_path, where)
    other = tmp_path / "deflated"
    other.mkdir()
    deflated = _rezip(stored, other / "patched.nnp", compression=zipfile.ZIP_DEFLATED)
    results = []
    for path in (stored, deflated):
        try:
            results.append(N.read(str(path)).params)
        except N.NnpError as e:
            results.append(str(e).replace(str(path), "FILE"))
    got, want = results
    if isinstance(want, str):
        assert got == want
        return
    assert list(got) == list(want)
    for name, p in got.items():
        np.testing.assert_array_equal(p.value, want[name].value)
    arrays = [p.value for p in got.values()]
    for i, a in enumerate(arrays):
        assert not any(np.shares_memory(a, b) for b in arrays[i + 1:])


def test_window_fills_every_read(tmp_path, monkeypatch):
    """HDF5 ignores how much a read returned: the window on a stored member fills the whole buffer,
    reading again where the system returns less than asked (Linux: about 2 GiB at most a call), and
    with zeros past the member's end; and says where the member ends to a reader that asks."""
    blob = bytes(range(256)) * 4
    path = tmp_path / "blob"
    path.write_bytes(blob)
    real = N._PREADV
    if real is not None:
        monkeypatch.setattr(N, "_PREADV", lambda fd, views, offset: real(fd, [views[0][:7]], offset))
    with open(path, "rb") as f:
        window = N._Window(f, 100, 600)
        window.seek(10)
        buf = bytearray(b"\xff" * 1000)
        assert window.readinto(buf) == 1000
        assert bytes(buf[:590]) == blob[110:700] and bytes(buf[590:]) == bytes(410)
        window.seek(0)
        assert window.read() == blob[100:700]
        assert window.read() == b""


def test_scratch_folder_is_named_for_the_process(tmp_path, scratch, monkeypatch):
    from bnfold_gpu import _atomic
    good = _deflated_h5(tmp_path)
    seen = []
    real = h5py.File

    def spy(name, *args, **kwargs):
        seen.append(Path(name).parent.name)
        return real(name, *args, **kwargs)
    monkeypatch.setattr(h5py, "File", spy)
    N.read(str(good))
    assert len(seen) == 1 and seen[0].startswith(_atomic.prefix(os.getpid()))
    assert not os.listdir(scratch)


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_scratch_folders_of_dead_processes_are_removed(tmp_path, scratch, monkeypatch):
    from bnfold_gpu import _atomic
    good = _deflated_h5(tmp_path)
    dead = scratch / (_atomic.prefix(_dead_pid()) + "a1b2c3d4-parameters.tmp")
    dead.mkdir()
    (dead / "parameter.h5").write_bytes(bytes(1000))
    with monkeypatch.context() as m:
        m.setattr(_atomic, "host", lambda: "elsewhere")
        elsewhere = _atomic.prefix(_dead_pid())
    kept = [scratch / (_atomic.prefix(os.getpid()) + "e5f6g7h8-parameters.tmp"),   # alive: this one
            scratch / (_atomic.prefix(os.getppid()) + "i9j0k1l2-parameters.tmp"),  # alive: its parent
            scratch / (elsewhere + "m3n4o5p6-parameters.tmp"),                      # another host's
            scratch / ".bnfold-not-a-pid.tmp",
            scratch / "unrelated"]
    for folder in kept:
        folder.mkdir()
    N.read(str(good))
    assert not dead.exists()
    assert sorted(os.listdir(scratch)) == sorted(p.name for p in kept)


def test_scratch_folder_without_room_is_refused_before_copying(tmp_path, capsys, scratch,
                                                              monkeypatch):
    good = _deflated_h5(tmp_path)
    real = os.statvfs

    def full(path):
        st = real(path)
        if os.path.realpath(path) != os.path.realpath(scratch):
            return st
        return os.statvfs_result((st.f_bsize, 4096, st.f_blocks, 1, 1) + tuple(st)[5:])
    monkeypatch.setattr(os, "statvfs", full)
    msg = _refused(tmp_path, capsys, good)
    assert f"scratch file in {scratch}" in msg and "free" in msg and "set TMPDIR" in msg


def test_parameter_inline_of_wrong_size_names_the_file(tmp_path, capsys, scratch):
    good = nnp_files.single(tmp_path / "good.nnp")

    def edit(proto):
        q = proto.parameter.add()
        q.variable_name = "extra/W"
        q.shape.dim.extend([-1, -1])
        q.data.append(1.0)
    msg = _refused(tmp_path, capsys, _edit_definition(good, tmp_path / "inline.nnp", edit))
    assert "'extra/W'" in msg


def test_a_file_nnabla_cannot_load_is_said_once_when_verifying(tmp_path):
    # NNabla's loader needs each HDF5 parameter's need_grad attribute (bnfold takes False where it
    # is missing) and logs CRITICAL lines before it raises h5py's KeyError: the verify says it
    # once, in words (a process of its own: NNabla's log handler writes to the stderr it found at
    # import)
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")
    data = io.BytesIO(_member(good, "parameter.h5"))
    with h5py.File(data, "r+") as hd:
        del hd[_h5_names(hd)[0]].attrs["need_grad"]
    p = _rezip(good, tmp_path / "no_need_grad.nnp", replace={"parameter.h5": data.getvalue()})
    out = tmp_path / "out.nnp"
    done = subprocess.run([sys.executable, "-m", "bnfold_gpu", "fold", str(p), "-o", str(out),
                           "--verify", "-q"], capture_output=True, text=True, timeout=300)
    err = done.stderr.splitlines()
    assert done.returncode == 2 and len(err) == 1 and "NNabla cannot load it" in err[0], err
    assert "its parameters: unable to" in err[0] and "need_grad" in err[0], err
    assert "not declared" not in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("name", ["override.nntx", "override.nnt", "extra.prototx", "extra.protot",
                                  "schema.proto", "weights.h", "README"])
def test_a_member_nnabla_reads_as_a_definition_or_parameters_is_refused(tmp_path, capsys, name):
    # NNabla picks a member's reader by `ext in '.nntxt,.prototxt'` (a part of the string counts):
    # such a member would be copied as it is, then read by NNabla over the folded network
    good = nnp_files.single(tmp_path / "good.nnp")
    text = b'parameter { variable_name: "c1/conv/W" shape { dim: 1 } data: 1.0 }\n'
    p = _rezip(good, tmp_path / "member.nnp", add=[(name, text), ("folder/", b""),
                                                    ("nnp_version.txt", b"0.1\n")])
    msg = _refused(tmp_path, capsys, p)
    assert f"member '{name}'" in msg and "NNabla's loader reads" in msg


def test_a_network_deeper_than_nnabla_can_walk_is_refused(tmp_path, capsys, monkeypatch):
    # NNabla walks a graph recursively: a long enough chain overflows the stack (SIGSEGV)
    good = nnp_files.single(tmp_path / "good.nnp")
    monkeypatch.setattr(N, "MAX_DEPTH", 5)
    msg = _refused(tmp_path, capsys, good)
    assert "a chain of" in msg and "up to 5 deep" in msg


def test_two_names_of_one_parameter_are_refused(tmp_path, capsys):
    # NNabla leaves out empty parts of a name: a network reading '/c1/conv/W' reads c1/conv/W,
    # which bnfold would fold as if it were another array
    good = nnp_files.single(tmp_path / "good.nnp")

    def edit(proto):
        net = proto.network.add()
        net.CopyFrom(proto.network[0])
        net.name = "other"
        for v in net.variable:
            if v.name == "c1/conv/W":
                v.name = "/c1/conv/W"
        for f in net.function:
            f.input[:] = ["/c1/conv/W" if i == "c1/conv/W" else i for i in f.input]
    p = _edit_definition(good, tmp_path / "alias.nnp", edit)
    msg = _refused(tmp_path, capsys, p)
    assert "'c1/conv/W' and '/c1/conv/W' are one parameter to NNabla" in msg


def test_a_variable_declared_twice_as_two_kinds_is_refused(tmp_path, capsys):
    good = nnp_files.single(tmp_path / "good.nnp")

    def edit(proto):
        v = proto.network[0].variable.add()
        v.CopyFrom(next(v for v in proto.network[0].variable if v.name == "bn1/bn/mean"))
        v.type = "Buffer"
    msg = _refused(tmp_path, capsys, _edit_definition(good, tmp_path / "twice.nnp", edit))
    assert "variable 'bn1/bn/mean' is declared twice, as Parameter and as Buffer" in msg


@pytest.mark.parametrize("bad", ["", ".", "c1//conv/W2", "a\0b", "x/../y"])
def test_names_hdf5_cannot_hold_are_refused_before_any_work(tmp_path, capsys, bad):
    # a protobuf member's parameter merged into the HDF5 member written
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")
    extra = _protobuf_member(lambda q: (q.shape.dim.extend([1]), q.data.extend([1.0]),
                                        setattr(q, "variable_name", bad)))
    p = _rezip(good, tmp_path / "names.nnp", add=[("extra.protobuf", extra)])
    with zipfile.ZipFile(p) as z:   # the HDF5 member last: the one written
        members = [(m.filename, z.read(m)) for m in z.infolist()]
    members.sort(key=lambda m: m[0] == "parameter.h5")
    with zipfile.ZipFile(p, "w") as z:
        for name, data in members:
            z.writestr(name, data)
    msg = _refused(tmp_path, capsys, p)
    assert "cannot be written to parameter.h5" in msg and "full disk" not in msg


def test_parameters_are_counted_over_every_member_and_the_definition(tmp_path, capsys,
                                                                      monkeypatch):
    # each member within the limit, together past it: refused (members can be added at will)
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")
    with zipfile.ZipFile(good) as z, h5py.File(io.BytesIO(z.read("parameter.h5")), "r") as hd:
        stored = len(_h5_names(hd))
    extra = _protobuf_member(lambda q: (q.shape.dim.extend([1]), q.data.extend([1.0])))
    p = _rezip(good, tmp_path / "two.nnp", add=[("extra.protobuf", extra)])
    monkeypatch.setattr(N, "MAX_PARAMETERS", stored)
    msg = _refused(tmp_path, capsys, p)
    assert f"holds {stored + 1} parameters or more" in msg

    def inline(proto):   # and one written in the definition
        q = proto.parameter.add()
        q.variable_name, q.need_grad = "inline/W", False
        q.shape.dim.extend([1])
        q.data.extend([1.0])
    p = _edit_definition(good, tmp_path / "inline.nnp", inline)
    msg = _refused(tmp_path, capsys, p)
    assert f"holds {stored + 1} parameters or more" in msg


def test_an_empty_stored_member_with_a_crc_is_refused(tmp_path, capsys):
    # nothing to read, so nothing checked as it is read: its CRC-32 (not 0) is checked all the same
    good = nnp_files.single(tmp_path / "good.nnp", parameter_format=".h5")
    p = _rezip(good, tmp_path / "empty.nnp", add=[("extra.protobuf", b"")])
    _with_recorded_crc(p, "extra.protobuf", 0xDEADBEEF)
    _refused_for_its_crc(tmp_path, capsys, p, "extra.protobuf")


@pytest.mark.parametrize("times, copies, words", [
    (0, 1, "is to run 0 times"),
    (1_000_000, 1, "unroll to"),      # one variable a million times
    (1000, 3, "unroll to"),           # a variable in three nested repeats: a billion
])
def test_repeated_blocks_that_unroll_past_the_limits_are_refused(tmp_path, capsys, times, copies,
                                                                words):
    # NNabla's builder copies each repeated function and variable before bnfold sees the network
    good = nnp_files.single(tmp_path / "good.nnp")

    def edit(proto):
        net = proto.network[0]
        r = net.repeat_info.add()
        r.id, r.times = "r", times
        v = net.variable.add()
        v.name, v.type = "unused", "Buffer"
        v.shape.dim.extend([1])
        v.repeat_id.extend(["r"] * copies)
    msg = _refused(tmp_path, capsys, _edit_definition(good, tmp_path / "repeat.nnp", edit))
    assert words in msg


def test_too_many_parameters_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(N, "MAX_PARAMETERS", 3)
    for fmt in (".h5", ".protobuf"):
        good = nnp_files.single(tmp_path / f"good{fmt}.nnp", parameter_format=fmt)
        msg = _refused(tmp_path, capsys, good)
        assert "bnfold reads at most 3 parameters" in msg


@pytest.mark.parametrize("declared", ["bn1/bn/mean", "c1/conv/W"])
def test_a_statistic_or_weight_declared_as_an_input_is_not_folded(tmp_path, declared):
    # a variable the definition declares a Buffer that no function writes is fed as the network
    # runs (NNabla gives it no stored value): never a BN's statistics or a layer's weight to fold
    import json
    good = nnp_files.single(tmp_path / "good.nnp")

    def edit(proto):
        for v in proto.network[0].variable:
            if v.name == declared:
                v.type = "Buffer"
    p = _edit_definition(good, tmp_path / "fed.nnp", edit)
    report = tmp_path / "r.json"
    assert cli.main(["fold", str(p), "-o", str(tmp_path / "o.nnp"), "--verify", "--report",
                     str(report), "-q"]) == 0
    kept = json.loads(report.read_text())["networks"]["net"]["skipped"]
    assert any(f"is '{declared}', an input of the network fed as it runs" in s["reason"]
               for s in kept), kept


def test_verify_that_memory_cannot_hold_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    # a few bytes of definition can declare inputs of gigabytes: --verify would run the network
    # with every variable held; said before the fold, with nothing written
    good = nnp_files.single(tmp_path / "good.nnp")

    def edit(proto):
        for v in proto.network[0].variable:
            if v.name == "x":
                v.shape.dim[2:] = [1 << 20, 1 << 20]   # 26 TB of float32
    p = _edit_definition(good, tmp_path / "big.nnp", edit)
    planned = []
    monkeypatch.setattr(N, "plan_file", lambda *a, **k: planned.append(1))
    msg = _refused(tmp_path, capsys, p, command="fold --verify")
    assert "--verify would hold" in msg and "of values running network 'net'" in msg
    assert planned == []


def test_crc_thread_failing_neither_hangs_nor_passes(monkeypatch):
    """The CRC computed beside the reads: where it fails, the pieces still drain (the reads never
    wait for ever) and the failure is raised."""
    def failing(data, value=0):
        raise MemoryError("no memory for the CRC")
    monkeypatch.setattr(N._zip, "crc32", failing)
    crc = N._Crc()
    for _ in range(10):   # more than the queue holds
        crc.add(b"piece")
    with pytest.raises(MemoryError):
        crc.close()
