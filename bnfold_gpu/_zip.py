"""Zip members' CRC-32 at the speed of memory.

zipfile checks every member it reads against its CRC-32 and computes the CRC-32 of every member it
writes, with zlib's ``crc32``: about 1 GB/s, several times slower than reading or writing the same
bytes from the page cache, and so most of the time a large ``.nnp`` takes to fold. ISA-L's
``crc32`` (the ``isal`` package, a dependency where its wheels install) gives the same values at
over 10 GB/s; without it, zlib's is used.
"""
import zipfile
import zlib
from typing import Callable, Optional

_crc32: Optional[Callable] = None


def crc32(data, value: int = 0) -> int:
    """zlib.crc32(data, value), computed by ISA-L where it is installed."""
    global _crc32
    if _crc32 is None:
        _crc32 = _fastest()
    return _crc32(data, value)


def _fastest() -> Callable:
    try:
        from isal import isal_zlib
    except ImportError:
        return zlib.crc32
    return isal_zlib.crc32


def using() -> str:
    """Which CRC-32 :func:`crc32` computes with: "isal" or "zlib"."""
    crc32(b"")
    return "zlib" if _crc32 is zlib.crc32 else "isal"


_WRITER = getattr(zipfile, "_ZipWriteFile", None)
# what zipfile's member writer keeps and :class:`_Writing` updates, as Python 3.6 to 3.13 name them
_WRITER_STATE = ("_file_size", "_compress_size", "_crc", "_compressor", "_fileobj", "closed")


if _WRITER is not None:
    class _Writing(_WRITER):
        """zipfile's member writer with :func:`crc32` for zlib's: its ``write`` is zipfile's own
        otherwise (the sizes counted, the data compressed where the member is, then written)."""

        def write(self, data):
            if self.closed:
                raise ValueError("I/O operation on closed file.")
            if isinstance(data, (bytes, bytearray)):
                nbytes = len(data)
            else:
                data = memoryview(data)
                nbytes = data.nbytes
            self._file_size += nbytes
            self._crc = crc32(data, self._crc)
            if self._compressor:
                data = self._compressor.compress(data)
                self._compress_size += len(data)
            self._fileobj.write(data)
            return nbytes
else:   # pragma: no cover (every Python bnfold_gpu installs on has it)
    _Writing = None


class ZipWriter(zipfile.ZipFile):
    """A zipfile.ZipFile whose members are written with :func:`crc32`: each member's writer is
    zipfile's own, given :class:`_Writing`'s ``write``, where this Python's zipfile writes members
    as expected (else zipfile's own ``write`` is used as it is)."""

    def _open_to_write(self, zinfo, force_zip64=False):
        dest = super()._open_to_write(zinfo, force_zip64)
        if _Writing is not None and type(dest) is _WRITER and \
                all(hasattr(dest, name) for name in _WRITER_STATE):
            dest.__class__ = _Writing
        return dest
