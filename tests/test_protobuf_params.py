"""``protobuf_params``: parameter.protobuf members read and written without the protobuf library's
per-value conversion, checked against that library both ways."""
import io

import numpy as np
import pytest

pytest.importorskip("nnabla", reason="nnabla is not installed (GPU machine)")
from nnabla.utils import nnabla_pb2  # noqa: E402

from bnfold_gpu import protobuf_params as P  # noqa: E402


def _params(rng):
    special = np.array([np.inf, -np.inf, np.nan, 1e-45, -0.0, 3.4e38], np.float32)
    return [
        ("conv/W", rng.standard_normal((4, 3, 3, 3)).astype(np.float32), True),
        ("bn/mean", np.concatenate([special, rng.standard_normal(10).astype(np.float32)]), False),
        ("half/W", rng.standard_normal((5, 2)).astype(np.float16), True),
        ("scalar", np.array(2.5, np.float32), False),
        ("empty", np.zeros((0, 3), np.float32), False),
        ("naïve/ä", rng.standard_normal(7).astype(np.float32), True),
    ]


def _library_message(params):
    pb = nnabla_pb2.NNablaProtoBuf()
    for name, values, need_grad in params:
        q = pb.parameter.add()
        q.variable_name, q.need_grad = name, need_grad
        q.shape.dim.extend(values.shape)
        q.data.extend(np.asarray(values, np.float32).reshape(-1).tolist())
    return pb


def _same(got, want):
    assert [(n, v.shape, g) for n, v, g in got] == [(n, v.shape, g) for n, v, g in want]
    for (_, a, _), (_, b, _) in zip(got, want):
        assert a.dtype == np.float32
        assert np.array_equal(a.view(np.uint32), np.asarray(b, np.float32).view(np.uint32))


def _read(data: bytes):
    """``P.read`` of ``data`` both ways, which must agree: as a member is read (its size known: each
    parameter's values read straight into their array) and as a stream of unknown size. Where
    both refuse it, the first's error is raised."""
    outcomes = []
    for size in (len(data), None):
        try:
            outcomes.append(list(P.read(io.BytesIO(data), size)))
        except P.ProtobufError as e:
            outcomes.append(e)
    sized, unsized = outcomes
    if isinstance(unsized, Exception):   # refused both ways (the size known, sooner)
        assert isinstance(sized, Exception)
        raise sized
    assert not isinstance(sized, Exception), sized
    _same(sized, unsized)
    return sized


def test_written_bytes_parse_with_the_protobuf_library(rng):
    params = _params(rng)
    out = io.BytesIO()
    P.write(out, params)
    assert len(out.getvalue()) == P.size(params)
    pb = nnabla_pb2.NNablaProtoBuf.FromString(out.getvalue())
    got = [(q.variable_name, np.array(q.data, np.float32).reshape(tuple(q.shape.dim)), q.need_grad)
           for q in pb.parameter]
    _same(got, params)


def test_reads_what_the_protobuf_library_writes(rng):
    params = _params(rng)
    data = _library_message(params).SerializeToString()
    got = _read(data)
    _same(got, params)
    assert all(v.flags.writeable and v.flags.aligned and v.flags.c_contiguous for _, v, _ in got)


def test_reads_unpacked_and_split_values():
    values = np.array([1.5, -2.25, 3.0, 7.0], np.float32)
    p = nnabla_pb2.Parameter(variable_name="w", need_grad=True)
    p.shape.dim.extend([2, 2])
    body = p.SerializeToString()
    body += b"".join(P._key(100, 5) + v.tobytes() for v in values[:2])            # unpacked
    body += P._key(100, 2) + P._varint(8) + values[2:].tobytes()                    # packed
    msg = P._key(200, 2) + P._varint(len(body)) + body
    (name, got, need_grad), = _read(msg)
    assert name == "w" and need_grad and np.array_equal(got, values.reshape(2, 2))


@pytest.mark.parametrize("layout", ["unpacked", "many packed pieces", "both"])
def test_values_in_many_fields_are_read_bit_for_bit(rng, layout):
    # one field per value, or many packed pieces: parsed by the protobuf library, repacked, not
    # stepped through in Python; every bit kept (NaN payloads, -0.0, subnormals, infinities)
    bits = rng.randint(0, 2 ** 32, 3000, dtype=np.uint64).astype(np.uint32)
    bits[:6] = [0x7FA00001, 0xFFC00123, 0x80000000, 0x00000001, 0x7F800000, 0xFF800000]
    values = bits.view(np.float32)
    p = nnabla_pb2.Parameter(variable_name="w", need_grad=False)
    p.shape.dim.extend([3, 1000])
    body = p.SerializeToString()
    for k in range(0, values.size, 10):
        piece = values[k:k + 10]
        if layout == "unpacked" or (layout == "both" and k % 20):
            body += b"".join(P._key(100, 5) + v.tobytes() for v in piece)
        else:
            body += P._key(100, 2) + P._varint(piece.nbytes) + piece.tobytes()
    msg = P._key(200, 2) + P._varint(len(body)) + body
    (name, got, need_grad), = _read(msg)
    assert name == "w" and not need_grad and got.shape == (3, 1000)
    assert np.array_equal(got.reshape(-1).view(np.uint32), bits)


@pytest.mark.parametrize("cut", [1, 7, -5, -1])
def test_truncated_message(rng, cut):
    data = _library_message(_params(rng)[:1]).SerializeToString()
    with pytest.raises(P.ProtobufError):
        _read(data[:cut])


def test_values_that_do_not_fill_the_shape():
    p = nnabla_pb2.NNablaProtoBuf()
    q = p.parameter.add()
    q.variable_name = "w"
    q.shape.dim.extend([2, 3])
    q.data.extend([1.0, 2.0])
    with pytest.raises(P.ProtobufError, match="holds 2 values for shape"):
        _read(p.SerializeToString())


def test_fields_besides_parameters_are_refused(rng):
    # a member rewritten from its parameters alone would lose them
    p = nnabla_pb2.NNablaProtoBuf()
    q = p.parameter.add()
    q.variable_name = "w"
    q.shape.dim.extend([2])
    q.data.extend(rng.standard_normal(2).tolist())
    p.network.add().name = "net"
    with pytest.raises(P.ProtobufError, match="'network' entries besides parameters"):
        _read(p.SerializeToString())


def test_name_that_is_not_utf8(capfd):
    body = P._key(1, 2) + P._varint(2) + b"\xff\xfe"           # variable_name: invalid UTF-8
    msg = P._key(200, 2) + P._varint(len(body)) + body
    with pytest.raises(P.ProtobufError, match="a parameter's name is not UTF-8 text"):
        _read(msg)
    assert capfd.readouterr().err == ""   # said once: not also in the protobuf library's log


@pytest.mark.parametrize("tail, words", [
    (b"\x00\x05", "a field numbered 0"),                                 # tag 0 after the shape
    (P._key(20, 2) + P._varint(1) + P._key(3, 4), "unsupported wire type 4"),   # a group's end
    (P._key(20, 2) + P._varint(1) + P._key(3, 3), "unsupported wire type 3"),   # in the shape
])
def test_a_group_or_field_0_is_refused_without_a_warning(tail, words):
    # the compiled protobuf parser takes these for the end of a group: it warns (a RuntimeWarning
    # line on stderr), stops there and keeps what it read
    import warnings
    body = P._key(1, 2) + P._varint(1) + b"w" + P._key(20, 2) + P._varint(2) + P._key(1, 0) + \
        P._varint(1) + tail
    msg = P._key(200, 2) + P._varint(len(body)) + body
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(P.ProtobufError, match=words):
            _read(msg)


def test_fields_around_the_values_in_any_order_are_kept():
    # read as a member is (the values straight into their array), the fields before and after
    # them are the parameter's own: name, shape and need_grad after the values, unknown fields
    values = np.arange(6, dtype=np.float32) - 2.5
    p = nnabla_pb2.Parameter(variable_name="w")
    p.shape.dim.extend([2, 3])
    head = p.SerializeToString()
    unknown = b"".join(P._key(50, 0) + P._varint(k) for k in range(300))   # many small fields
    body = unknown[:90] + P._key(100, 2) + P._varint(values.nbytes) + values.tobytes() + head + \
        unknown[90:] + P._key(101, 0) + P._varint(1)   # need_grad last
    msg = P._key(200, 2) + P._varint(len(body)) + body
    (name, got, need_grad), = _read(msg)
    assert name == "w" and need_grad and np.array_equal(got, values.reshape(2, 3))


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_parameter_of_very_many_fields_is_refused_at_once(where, monkeypatch):
    # stepped through in Python, field by field: a hostile member of millions would take minutes;
    # refused once past the limit, not after reading them all
    values = np.ones(3, np.float32)
    p = nnabla_pb2.Parameter(variable_name="w")
    p.shape.dim.extend([3])
    data = P._key(100, 2) + P._varint(values.nbytes) + values.tobytes()
    unknown = (P._key(50, 0) + b"\x01") * 200_000
    body = p.SerializeToString() + (unknown + data if where == "before" else data + unknown)
    msg = P._key(200, 2) + P._varint(len(body)) + body
    steps = []
    real = P._read_varint

    def counted(stream, at_start=False):
        steps.append(1)
        return real(stream, at_start)
    monkeypatch.setattr(P, "_read_varint", counted)
    with pytest.raises(P.ProtobufError, match="more than 1000 fields besides its values"):
        _read(msg)
    assert len(steps) < 10_000   # both ways together; not 200,000 fields each


@pytest.mark.parametrize("data", [
    # lengths of 2^63: of the shape, of the name, after two empty packed pieces, of an unknown field
    b'\xc2\x0c\x0c\xa2\x01\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01',
    b'\xc2\x0c\x0b\n\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01',
    b'\xc2\x0c\x12\xa2\x06\x00\xa2\x06\x00\xa2\x01\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01',
    b'\xc2\x0c\r:\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01\x08\x01',
    # a shape of (0, 2^31, 2^31): no values, but more than NumPy's sizes can count
    b'\xc2\x0c\x11\xa2\x01\x0e\x08\x00\x08\x80\x80\x80\x80\x08\x08\x80\x80\x80\x80\x08',
    # tags past 32 bits, which the protobuf library cuts to 32 (an end-group tag; the values' field)
    b'\xc2\x0c\x12\xa2\x06\x04\x00\x00\x80?\x80\x80\x80\x80\x10\x00\xa2\x01\x02\x08\x01',
    b'\xc2\x0c\x11\xa2\x06\x04#\xa7g\xb7\xa2\x86\x80\x80\x10\x04#\xa7g\xb7',
    b'\xc2\x0c\x13\xa2\x01\x02\x08\x01\xa2\x06\x04\x00\x00\x80?\x8a\x80\x80\x80\x10\x01\xff',
    # a name that is not UTF-8 after unpacked values (which the protobuf library repacks)
    b'\xc2\x0c\x0e\xa2\x01\x02\x08\x01\xa5\x06\x00\x00\x80?\n\x01\xff',
])
def test_malformed_parameters_are_refused_both_ways_in_words(data, capfd):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(P.ProtobufError):
            _read(data)
    assert capfd.readouterr() == ("", "")   # nothing in the protobuf library's log


def test_the_field_limit_counts_the_same_both_ways():
    # exactly 1000 fields besides the values: read both ways; 1001: refused both ways
    for extra, ok in ((999, True), (1000, False)):
        body = b'\xa2\x01\x02\x08\x01' + b'\x90\x03\x01' * extra + b'\xa2\x06\x04\x00\x00\x80?'
        msg = P._key(200, 2) + P._varint(len(body)) + body
        if ok:
            (_, got, _), = _read(msg)
            assert got.tolist() == [1.0]
        else:
            with pytest.raises(P.ProtobufError, match="more than 1000 fields"):
                _read(msg)


def test_unpacked_values_are_checked_a_block_at_a_time(monkeypatch):
    # one field per value: the check for groups skips the run at once, not field by field in Python
    values = np.random.default_rng(3).standard_normal(50_000).astype(np.float32)
    p = nnabla_pb2.Parameter(variable_name="w", need_grad=True)
    p.shape.dim.extend([values.size])
    key = P._key(100, 5)
    fields = np.zeros(values.size, [("key", np.uint8, (len(key),)), ("value", "<f4")])
    fields["key"], fields["value"] = np.frombuffer(key, np.uint8), values
    body = p.SerializeToString() + fields.tobytes()
    msg = P._key(200, 2) + P._varint(len(body)) + body
    keys = []
    real = P._read_key
    monkeypatch.setattr(P, "_read_key", lambda *a, **k: keys.append(1) or real(*a, **k))
    (name, got, need_grad), = _read(msg)
    assert name == "w" and need_grad
    assert np.array_equal(got.view(np.uint32), values.view(np.uint32))
    assert len(keys) < 100   # both ways together
