"""The ``parameter.protobuf`` member of an .nnp file, read and written a parameter at a time, with the
values as NumPy arrays.

The member is an ``NNablaProtoBuf`` holding ``parameter`` entries. Going through the protobuf library's
message would turn every weight into a Python float (seconds and gigabytes for a large model); here
only each parameter's small fields (name, shape, need_grad) go through the library, and its ``data``
(``repeated float``, packed in proto3) is read and written as little-endian float32 bytes. Field
numbers come from NNabla's own message descriptors.
"""
import io
import math
from typing import BinaryIO, Iterable, Iterator, List, Optional, Tuple

import numpy as np

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_F32 = np.dtype("<f4")
_PIECE = 16 << 20   # the most read at once where the stream's size is not known


class ProtobufError(ValueError):
    """The bytes are not a valid parameter message."""


def _schema():
    """(nnabla_pb2, field number of NNablaProtoBuf.parameter, field number of Parameter.data)."""
    from nnabla.utils import nnabla_pb2
    return (nnabla_pb2, nnabla_pb2.NNablaProtoBuf.DESCRIPTOR.fields_by_name["parameter"].number,
            nnabla_pb2.Parameter.DESCRIPTOR.fields_by_name["data"].number)


_TEXT_FIELDS = {}


def _text_fields(pb2) -> frozenset:
    """Field numbers of Parameter's text fields (its name), whose bytes must be UTF-8."""
    got = _TEXT_FIELDS.get(pb2)
    if got is None:
        fields = pb2.Parameter.DESCRIPTOR.fields
        got = _TEXT_FIELDS[pb2] = frozenset(f.number for f in fields if f.type == f.TYPE_STRING)
    return got


def _decode_error():
    from google.protobuf.message import DecodeError
    return DecodeError


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _read_varint(stream: BinaryIO, at_start=False):
    """The next varint of ``stream``; None at the end of the stream where ``at_start``."""
    value = shift = 0
    while True:
        b = stream.read(1)
        if not b:
            if at_start and shift == 0:
                return None
            raise ProtobufError("truncated varint")
        value |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ProtobufError("varint longer than 10 bytes")


_MAX_KEY = (1 << 32) - 1     # the protobuf library reads a field's tag as 32 bits
_MAX_LENGTH = 1 << 62        # past any file's size, and any index Python takes


def _read_key(stream: BinaryIO, at_start=False):
    """The next field's tag (a varint), refused past 32 bits, which the protobuf library would cut
    to 32 (reading another field than this module does); None at the end where ``at_start``."""
    key = _read_varint(stream, at_start)
    if key is not None and key > _MAX_KEY:
        raise ProtobufError("a field's tag is longer than 32 bits")
    return key


def _read_length(stream: BinaryIO) -> int:
    """A length-delimited field's length; one past any file is a truncated field."""
    n = _read_varint(stream)
    if n > _MAX_LENGTH:
        raise ProtobufError("truncated field")
    return n


def _skip(stream: BinaryIO, wire: int) -> None:
    if wire == _VARINT:
        _read_varint(stream)
        return
    if wire == _LEN:
        n = _read_length(stream)
    elif wire in (_I64, _I32):
        n = 8 if wire == _I64 else 4
    else:
        raise ProtobufError(f"unsupported wire type {wire}")
    if len(stream.read(n)) != n:
        raise ProtobufError("truncated field")


def read(stream: BinaryIO, size: Optional[int] = None) -> Iterator[Tuple[str, np.ndarray, bool]]:
    """(name, float32 values in the parameter's shape, need_grad) for each parameter of the
    ``NNablaProtoBuf`` in ``stream``, in order. Any other field (a network, an executor) is a
    ProtobufError: NNabla writes parameter members with nothing else, and one rewritten from these
    parameters alone would lose it. ``size``, the bytes in ``stream`` where known: a parameter
    declaring more than remain is refused before its bytes are read; where it is not known, they
    are read a piece at a time, so that a length field claiming terabytes allocates only what
    arrives."""
    schema = _schema()
    top = schema[1]
    stream = _Remaining(stream, size)
    while True:
        key = _read_key(stream, at_start=True)
        if key is None:
            return
        if key >> 3 != top or key & 7 != _LEN:
            field = schema[0].NNablaProtoBuf.DESCRIPTOR.fields_by_number.get(key >> 3)
            label = field.name if field is not None else f"field {key >> 3}"
            raise ProtobufError(f"it holds {label!r} entries besides parameters")
        n = _read_length(stream)
        if stream.left is not None and n > stream.left:
            raise ProtobufError(f"a parameter declares {n} bytes, only {stream.left} remain")
        if stream.left is not None:
            yield _streamed(stream, n, schema)
            continue
        body = _read_pieces(stream, n)
        if len(body) != n:
            raise ProtobufError("truncated parameter")
        yield _parameter(body, schema)


class _Remaining:
    """``stream``, counting the bytes left in it where its size is known (``left``; else None)."""

    def __init__(self, stream: BinaryIO, size: Optional[int]):
        self.stream, self.left = stream, size

    def read(self, n: int) -> bytes:
        data = self.stream.read(n)
        if self.left is not None:
            self.left -= len(data)
        return data

    def readinto(self, view) -> int:
        """Fill ``view`` (bytes) from the stream; returns how many arrived (fewer at its end)."""
        got = 0
        while got < len(view):
            k = self.stream.readinto(view[got:])
            if not k:
                break
            got += k
        if self.left is not None:
            self.left -= got
        return got


def _streamed(stream: "_Remaining", n: int, schema):
    """:func:`_parameter` of the next ``n`` bytes of ``stream``, with the values (one packed field,
    as NNabla writes them) read straight into their own array: no copy of them in between. The
    fields around them are read one at a time, each within the ``n`` bytes, into one buffer;
    anything else (values in several fields or unpacked, a field of an unknown wire type) reads the
    rest and leaves it to :func:`_parameter`, with the bytes read so far in front."""
    _, _, data_field = schema
    rec = _Recorded(stream, n)   # every byte of the parameter read so far, but the values'
    values = data = None         # the values; where their key and size lie in rec.buf
    fields = 0
    while rec.left > 0:
        start = len(rec.buf)
        key = _read_key(rec)
        field, wire = key >> 3, key & 7
        if field == data_field and wire == _LEN and values is None:
            size = _read_length(rec)
            if size % 4 or size > rec.left:
                break
            values = np.empty(size // 4, _F32)
            if stream.readinto(memoryview(values).cast("B")) != size:
                raise ProtobufError("truncated parameter")
            rec.left -= size
            data = (start, len(rec.buf))
            continue
        if field == data_field or wire not in (_VARINT, _LEN, _I32, _I64):
            break
        fields += 1   # counted as _parameter counts them
        if fields > _MAX_FIELDS:
            raise _too_many_fields()
        _skip(rec, wire)
    else:
        rest = rec.buf if data is None else rec.buf[:data[0]] + rec.buf[data[1]:]
        return _parameter(bytes(rest), schema,
                          values=np.zeros(0, _F32) if values is None else values)
    body = bytes(rec.buf) if data is None else \
        bytes(rec.buf[:data[1]]) + values.tobytes() + bytes(rec.buf[data[1]:])
    body += _read_pieces(stream, rec.left)
    if len(body) != n:
        raise ProtobufError("truncated parameter")
    return _parameter(body, schema)


class _Recorded:
    """Reads from ``stream``, at most ``limit`` bytes in all (``left``), keeping what it read in
    one buffer (``buf``)."""

    def __init__(self, stream, limit: int):
        self.stream, self.left = stream, limit
        self.buf = bytearray()

    def read(self, k: int) -> bytes:
        data = self.stream.read(min(k, self.left))
        self.buf += data
        self.left -= len(data)
        return data


def _read_pieces(stream, n: int) -> bytes:
    """Up to ``n`` bytes of ``stream``, asked for a piece at a time (a plain file's ``read(n)``
    allocates ``n`` bytes first)."""
    if n <= _PIECE:
        return stream.read(n)
    pieces = []
    while n > 0:
        piece = stream.read(min(n, _PIECE))
        if not piece:
            break
        pieces.append(piece)
        n -= len(piece)
    return b"".join(pieces)


def _parameter(body: bytes, schema, repacked=False, values=None):
    """(name, values in the parameter's shape, need_grad) of the parameter message ``body``;
    ``values``, where given, are its values read apart (``body`` then holds its other fields)."""
    pb2, _, data_field = schema
    view = memoryview(body)
    stream = io.BytesIO(body)
    pieces: List[np.ndarray] = []
    rest = bytearray()   # every field but the values, for the protobuf library to parse
    fields = 0
    while stream.tell() < len(body):
        start = stream.tell()
        key = _read_key(stream)
        field, wire = key >> 3, key & 7
        if field == data_field and wire == _LEN:     # packed, as proto3 writes it
            n = _read_length(stream)
            at = stream.tell()
            if n % 4 or at + n > len(body):
                raise ProtobufError("packed float data of a bad length")
            pieces.append(np.frombuffer(view[at:at + n], _F32))
            stream.seek(at + n)
            if len(pieces) > _MAX_PIECES and not repacked:
                return _parameter(_repacked(body, pb2), schema, True)
        elif field == data_field and wire == _I32 and not repacked:   # unpacked, as parsers accept
            return _parameter(_repacked(body, pb2), schema, True)
        elif fields >= _MAX_FIELDS:   # the values' own fields are bounded above
            raise _too_many_fields()
        elif wire == _LEN and field in _text_fields(pb2):   # said here, not in protobuf's log
            fields += 1
            n = _read_length(stream)
            at = stream.tell()
            if at + n > len(body):
                raise ProtobufError("truncated field")
            try:
                str(view[at:at + n], "utf-8")
            except UnicodeDecodeError:
                raise ProtobufError("a parameter's name is not UTF-8 text") from None
            stream.seek(at + n)
            rest += view[start:at + n]
        else:
            fields += 1
            _skip(stream, wire)
            rest += view[start:stream.tell()]
    p = _message(pb2, bytes(rest))
    if values is not None and not pieces:   # read apart, into an array of their own
        values = values.astype(np.float32, copy=False)
    elif not pieces:
        values = np.zeros(0, np.float32)
    else:   # own memory (aligned, writable, not a view of the message), native byte order
        values = np.concatenate(pieces) if len(pieces) > 1 else pieces[0].copy()
        values = values.astype(np.float32, copy=False)
    return _checked(p, values)


# pieces of packed values past which the protobuf library parses the parameter instead
_MAX_PIECES = 64
# fields of one parameter stepped through in Python (NNabla writes 4: name, shape, values,
# need_grad; values unpacked, one field each, go to the protobuf library at the first)
_MAX_FIELDS = 1000
_MAX_DIM = 1 << 48


def _too_many_fields() -> ProtobufError:
    return ProtobufError(f"a parameter holds more than {_MAX_FIELDS} fields besides its values "
                         f"(NNabla writes 4)")


def _repacked(body: bytes, pb2) -> bytes:
    """A parameter whose values are unpacked (one field per value) or packed in many pieces, written
    again by the protobuf library with its values in one packed piece: one step per value in its
    compiled parser, not in Python, and the values' bits as they were (never Python floats)."""
    return _message(pb2, body).SerializeToString()


def _message(pb2, data: bytes):
    try:
        _no_groups(data, pb2.Parameter.DESCRIPTOR)
        return pb2.Parameter.FromString(data)
    except (_decode_error(), ProtobufError) as e:
        raise ProtobufError(f"a parameter's name, shape or need_grad does not parse ({e})") from None


def _no_groups(data: bytes, descriptor) -> None:
    """ProtobufError where ``data``, a message of ``descriptor``, or a message field of it holds a
    field numbered 0 or a wire type NNabla's messages have none of (a group's start or end): the
    compiled parser takes those for the end of a group, only warns (a RuntimeWarning line), stops
    there and keeps what it read."""
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        start = stream.tell()
        key = _read_key(stream)
        field, wire = key >> 3, key & 7
        if field == 0:    # which the compiled parser takes for the end of a group
            raise ProtobufError("a field numbered 0")
        if wire in (_I32, _I64):   # values unpacked, one field each: the run skipped at once
            stream.seek(_fixed_run_end(data, start, stream.tell() - start,
                                       4 if wire == _I32 else 8))
            continue
        if wire != _LEN:
            _skip(stream, wire)   # refuses a group's wire types
            continue
        n = _read_length(stream)
        at = stream.tell()
        if at + n > len(data):
            raise ProtobufError("truncated field")
        inner = descriptor.fields_by_number.get(field)
        if inner is not None and inner.message_type is not None:
            _no_groups(data[at:at + n], inner.message_type)
        elif inner is not None and inner.type == inner.TYPE_STRING:   # said here, not in its log
            try:
                str(data[at:at + n], "utf-8")
            except UnicodeDecodeError:
                raise ProtobufError("a parameter's name is not UTF-8 text") from None
        stream.seek(at + n)


def _fixed_run_end(data: bytes, start: int, key_len: int, value_len: int) -> int:
    """Where the run of fields with one key and fixed-size values (unpacked floats, say) that
    begins at ``start`` in ``data`` ends: each field is the same key bytes and ``value_len`` bytes,
    compared with NumPy a block of fields at a time, not stepped through one by one."""
    size = key_len + value_len
    key = np.frombuffer(data, np.uint8, key_len, start)
    at = start
    while True:
        count = min((len(data) - at) // size, _RUN_BLOCK)
        if count == 0:
            if at == start:   # the first value is cut short
                raise ProtobufError("truncated field")
            return at
        records = np.frombuffer(data, np.uint8, count * size, at).reshape(count, size)
        same = (records[:, :key_len] == key).all(axis=1)
        if not same.all():
            return at + size * int(np.argmin(same))
        at += count * size


_RUN_BLOCK = 1 << 16   # fields compared at once


def _checked(p, values: np.ndarray):
    shape = tuple(p.shape.dim)
    if any(d < 0 for d in shape):
        raise ProtobufError(f"parameter '{p.variable_name}' has a negative dimension in its shape "
                            f"{shape}")
    if len(shape) > 32 or any(d > _MAX_DIM for d in shape) or \
            4 * math.prod(d for d in shape if d) >= 1 << 63:   # NumPy's limits, even with no values
        raise ProtobufError(f"parameter '{p.variable_name}' has a shape of {len(shape)} dimensions "
                            f"up to {max(shape)}; an array has at most 32, each up to 2^48, and "
                            f"fewer than 2^61 elements besides those of size 0")
    if values.size != math.prod(shape):
        raise ProtobufError(f"parameter '{p.variable_name}' holds {values.size} values for shape "
                            f"{shape}")
    return p.variable_name, values.reshape(shape), p.need_grad


def _head(name: str, values: np.ndarray, need_grad: bool, schema) -> bytes:
    """A parameter's bytes up to its values (which follow as little-endian float32)."""
    pb2, top, data_field = schema
    p = pb2.Parameter(variable_name=name, need_grad=need_grad)
    p.shape.dim.extend(values.shape)
    small = p.SerializeToString()
    nbytes = 4 * values.size
    data = _key(data_field, _LEN) + _varint(nbytes) if nbytes else b""
    return _key(top, _LEN) + _varint(len(small) + len(data) + nbytes) + small + data


def size(params: Iterable[Tuple[str, np.ndarray, bool]]) -> int:
    """The bytes :func:`write` writes for ``params``."""
    schema = _schema()
    return sum(len(_head(n, v, g, schema)) + 4 * v.size for n, v, g in params)


def write(out: BinaryIO, params: Iterable[Tuple[str, np.ndarray, bool]]) -> None:
    """Write ``params`` (name, values, need_grad) to ``out`` as an ``NNablaProtoBuf`` that NNabla and
    :func:`read` load, values as float32; one parameter's values are converted at a time."""
    schema = _schema()
    for name, values, need_grad in params:
        out.write(_head(name, values, need_grad, schema))
        if values.size:
            out.write(memoryview(np.ascontiguousarray(values, _F32).reshape(-1)).cast("B"))
