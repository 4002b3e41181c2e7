"""The zip members' CRC-32: bnfold's (ISA-L where installed) gives zlib's values, the writer uses it
for every member, and a file written with it is the file written with zlib's."""
import io
import zipfile
import zlib

import numpy as np
import pytest

from bnfold_gpu import _zip


@pytest.mark.parametrize("size", [0, 1, 7, 64, 4099, 5 << 20])
def test_crc32_gives_zlibs_values(size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    assert _zip.crc32(data) == zlib.crc32(data)
    for start in (0, 1, 0xFFFFFFFF, 0x12345678):   # continued from a CRC of earlier pieces
        assert _zip.crc32(data, start) == zlib.crc32(data, start)
    half = size // 2
    assert _zip.crc32(data[half:], _zip.crc32(data[:half])) == zlib.crc32(data)


def test_crc32_of_an_arrays_memory():
    a = np.random.default_rng(1).standard_normal((3, 1001)).astype(np.float32)
    assert _zip.crc32(memoryview(a)) == zlib.crc32(a.tobytes())
    assert _zip.crc32(memoryview(a.reshape(-1)).cast("B")) == zlib.crc32(a.tobytes())


def test_the_fast_crc_is_installed_here():
    # the platforms the tests run on have ISA-L's wheels: the install must have brought it
    assert _zip.using() == "isal"


def _archive(members) -> bytes:
    out = io.BytesIO()
    with _zip.ZipWriter(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data, method in members:
            info = zipfile.ZipInfo(name, (2026, 1, 2, 3, 4, 6))
            info.compress_type = method
            if name.endswith(".bin"):
                with z.open(info, "w") as dst:   # written a piece at a time, from arrays
                    for k in range(0, len(data), 1000):
                        dst.write(np.frombuffer(data[k:k + 1000], np.uint8))
            else:
                z.writestr(info, data)
    return out.getvalue()


def test_every_member_is_written_with_it_and_checks_with_zlib(monkeypatch):
    rng = np.random.default_rng(2)
    members = [("net.nntxt", b"network { name: 'n' }\n" * 300, zipfile.ZIP_DEFLATED),
               ("parameter.bin", rng.integers(0, 256, 100_003, dtype=np.uint8).tobytes(),
                zipfile.ZIP_STORED),
               ("empty", b"", zipfile.ZIP_STORED)]
    seen = []
    real = _zip.crc32

    def counting(data, value=0):
        seen.append(memoryview(data).nbytes)
        return real(data, value)
    monkeypatch.setattr(_zip, "crc32", counting)
    blob = _archive(members)
    assert sum(seen) == sum(len(d) for _, d, _ in members)   # every byte, through bnfold's CRC
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        assert z.testzip() is None   # zipfile's own check (zlib) of every member
        for name, data, method in members:
            assert z.read(name) == data and z.getinfo(name).CRC == zlib.crc32(data)
            assert z.getinfo(name).compress_type == method
    monkeypatch.setattr(_zip, "crc32", zlib.crc32)
    assert _archive(members) == blob   # byte for byte the archive zlib's CRC makes


def test_zipfile_without_the_expected_writer_writes_as_zipfile_does(monkeypatch):
    # a zipfile whose member writer is not the one this module knows: its own write is used
    monkeypatch.setattr(_zip, "_WRITER_STATE", ("_a_field_no_zipfile_has",))
    used = []
    monkeypatch.setattr(_zip, "crc32", lambda data, value=0: used.append(1) or zlib.crc32(data, value))
    blob = _archive([("a.bin", bytes(range(256)) * 50, zipfile.ZIP_STORED)])
    assert not used
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        assert z.testzip() is None and z.read("a.bin") == bytes(range(256)) * 50


def test_without_isal_zlibs_crc_is_used(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_isal(name, *args, **kwargs):
        if name == "isal" or name.startswith("isal."):
            raise ImportError("No module named 'isal'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_isal)
    monkeypatch.setattr(_zip, "_crc32", None)
    assert _zip.using() == "zlib" and _zip.crc32(b"abc") == zlib.crc32(b"abc")
