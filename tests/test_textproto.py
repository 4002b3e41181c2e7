"""The fast text-format reader builds, field for field, the message protobuf's ``text_format`` builds,
and hands everything outside its plain form to ``text_format`` (same message, same errors)."""
import zipfile

import pytest
from google.protobuf import descriptor_pb2, text_format

nnabla_pb2 = pytest.importorskip("nnabla.utils.nnabla_pb2",
                                 reason="nnabla is not installed (GPU machine)")

import nnp_files  # noqa: E402
from bnfold_gpu import _textproto  # noqa: E402


def both(text, kind=None, start=None):
    """(fast, text_format) messages of ``kind`` merged from ``text``, each into a copy of ``start``."""
    kind = kind or nnabla_pb2.NNablaProtoBuf
    fast, slow = kind(), kind()
    if start is not None:
        fast.CopyFrom(start)
        slow.CopyFrom(start)
    _textproto.merge(text, fast)
    text_format.Merge(text, slow)
    return fast, slow


def same(a, b) -> bool:
    return a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


def definitions(tmp_path):
    files = [nnp_files.single(tmp_path / "a.nnp"), nnp_files.moves(tmp_path / "b.nnp"),
             nnp_files.single(tmp_path / "c.nnp", parameter_format=".h5")]
    for f in files:
        with zipfile.ZipFile(f) as z:
            yield from (z.read(n).decode() for n in z.namelist() if n.endswith(".nntxt"))


def test_the_network_definitions_of_nnp_files(tmp_path):
    texts = list(definitions(tmp_path))
    assert texts
    for text in texts:
        fast, slow = both(text)
        assert same(fast, slow) and fast.network


PLAIN = '''
# a comment, then fields in every form the reader takes
version: "0.1"   # a trailing comment
global_config { default_context { backends: "cpu:float" backends: 'cudnn:half' array_class: "A" } }
training_config: { max_epoch: 100; iter_per_epoch: 0, save_best: t }
network {
  name: "n\\303\\251t \\"q\\" \\n \\\\ \\x41"
  batch_size: -1
  variable { name: "x" type: "Buffer" shape { dim: -1 dim: +3 dim: 0 }
             initializer { type: "Normal" multiplier: 1.5e-3 } }
  variable { name: "y" initializer { multiplier: -inf } }
  variable { name: "z" initializer { multiplier: 2f } }
  variable { name: "w" initializer { multiplier: .25 } }
  variable { name: "v" initializer { multiplier: 7. } }
  function { name: "f" type: "ELU" input: "x" output: "y" elu_param { alpha: 1e-300 } }
  function { name: "g" type: "FusedConvolution"
             fused_convolution_param { nonlinearity_args: 0.1 nonlinearity_args: nan } }
}
training_config { save_best: False }
'''


def test_every_plain_form_gives_text_formats_message():
    fast, slow = both(PLAIN)
    assert same(fast, slow)
    assert fast.network[0].name == 'nét "q" \n \\ A' and not fast.training_config.save_best


def test_enums_bytes_and_unsigned_integers():
    text = '''name: "m.proto" message_type { name: "M" field { name: "a" number: 1 label: LABEL_REPEATED
              type: TYPE_INT64 } }
              options { uninterpreted_option { string_value: "\\000\\377b"
              positive_int_value: 18446744073709551615 negative_int_value: -9223372036854775808
              double_value: -0.0 identifier_value: "x" } }'''
    fast, slow = both(text, descriptor_pb2.FileDescriptorProto)
    assert same(fast, slow)
    assert fast.options.uninterpreted_option[0].string_value == b"\x00\xffb"


@pytest.mark.parametrize("text", [
    "network { variable { shape { dim: [1, 2] } } }",          # a list
    "network < name: \"a\" >",                                  # angle brackets
    "training_config { max_epoch: 0x10 }",                     # hexadecimal
    "training_config { max_epoch: 010 }",                      # C's octal
    "network { variable { initializer { multiplier: 1_0 } } }",  # Python's digit separator
    "version: \"a\" \"b\"",                                     # adjacent strings
    "network { name: \"a\" } network { name: 'b' }",
    "network { function { affine_param { base_axis: 1 } convolution_param { base_axis: 2 } } }",
])
def test_other_forms_give_the_same_message(text):
    fast, slow = both(text)
    assert same(fast, slow)


@pytest.mark.parametrize("text", [
    "nothing_like_this: 1",                 # an unknown field
    "training_config { max_epoch: 1.5 }",   # a float for an integer
    "network { variable { initializer { multiplier: 2F } } }",   # text_format takes 2f only
    "network { name: \"a\" ",               # the text ends inside a message
    "network { name: \"\\303\" }",          # not UTF-8
    "version: \"unterminated",
    "training_config { save_best: maybe }",
    "training_config { max_epoch: 99999999999999999999999 }",
])
def test_errors_are_text_formats_own(text):
    with pytest.raises(text_format.ParseError) as want:
        text_format.Merge(text, nnabla_pb2.NNablaProtoBuf())
    with pytest.raises(text_format.ParseError) as got:
        _textproto.merge(text, nnabla_pb2.NNablaProtoBuf())
    assert str(got.value) == str(want.value)


def test_merging_into_a_message_that_holds_fields():
    start = nnabla_pb2.NNablaProtoBuf()
    text_format.Merge('version: "1" network { name: "first" batch_size: 2 }', start)
    fast, slow = both('network { name: "second" } training_config { max_epoch: 3 }', start=start)
    assert same(fast, slow) and [n.name for n in fast.network] == ["first", "second"]
    fast, slow = both("network { variable { shape { dim: [1] } } }", start=start)   # fallback too
    assert same(fast, slow)


def test_deep_nesting_fails_as_text_format_fails():
    text = "network { " * 5000 + "}" * 5000
    with pytest.raises(Exception) as want:
        text_format.Merge(text, nnabla_pb2.NNablaProtoBuf())
    with pytest.raises(type(want.value)):
        _textproto.merge(text, nnabla_pb2.NNablaProtoBuf())


def printed_both(message):
    return _textproto.to_string(message), text_format.MessageToString(message)


def test_written_text_is_text_formats_character_for_character(tmp_path):
    for text in list(definitions(tmp_path)) + [PLAIN]:
        message = nnabla_pb2.NNablaProtoBuf()
        text_format.Merge(text, message)
        fast, slow = printed_both(message)
        assert fast == slow
    message = nnabla_pb2.NNablaProtoBuf()
    variable = message.network.add().variable.add()
    for value in (0.1, -0.0, 1e-45, 3.4028234663852886e38, float("inf"), float("-inf"),
                  float("nan"), 16777217.0, 1 / 3):
        variable.initializer.multiplier = value   # float32: printed at its shortest
        fast, slow = printed_both(message)
        assert fast == slow, value
    message.network[0].function.add().elu_param.alpha = 1 / 3   # a double: printed by repr
    message.network[0].name = 'ünïcode "quoted" \\ \n\t\x01'
    message.global_config.SetInParent()                         # present and empty
    fast, slow = printed_both(message)
    assert fast == slow and "global_config {\n}\n" in fast


def test_written_enums_bytes_and_the_forms_left_to_text_format():
    message = descriptor_pb2.FileDescriptorProto()
    text_format.Merge('''name: "m" message_type { name: "M" field { name: "a" number: 1
                         label: LABEL_REPEATED type: TYPE_INT64 } }
                         options { uninterpreted_option { string_value: "\\000\\377\\"b" } }''', message)
    fast, slow = printed_both(message)
    assert fast == slow and "type: TYPE_INT64" in fast
    from google.protobuf import any_pb2, struct_pb2
    for number in (0, 7):   # an open enum: a number it does not name is printed as the number
        value = struct_pb2.Value(null_value=number)
        assert printed_both(value)[0] == printed_both(value)[1]
    wrapped = any_pb2.Any()
    wrapped.Pack(descriptor_pb2.FileDescriptorProto(name="x"))
    assert printed_both(wrapped)[0] == printed_both(wrapped)[1]          # Any
    mapped = struct_pb2.Struct()
    mapped.fields["b"].number_value = 1
    mapped.fields["a"].string_value = "s"
    assert printed_both(mapped)[0] == printed_both(mapped)[1]            # a map, sorted by key


def _outcome(merge, text):
    message = nnabla_pb2.NNablaProtoBuf()
    try:
        merge(text, message)
    except text_format.ParseError as e:
        return "refused", str(e)
    return "read", message.SerializeToString(deterministic=True)


def test_damaged_definitions_are_read_or_refused_as_text_format_does(tmp_path):
    """Random edits of a real definition (characters and tokens inserted, deleted, copied): the
    same message, or the same ParseError, as text_format."""
    import random
    base = next(definitions(tmp_path))[:5000]
    pieces = list('{}:;,[]<>"\'\\#-+.eE0123456789 \nabfntxF_') + [
        "inf", "nan", "true", "0x1", "1e999", "\\303", '"a" "b"', "name", "dim", "network",
        "function", "affine_param", "base_axis"]
    rng = random.Random(0)
    for _ in range(400):
        text = base
        for _ in range(rng.randint(1, 4)):
            k, op = rng.randrange(len(text)), rng.random()
            if op < 0.4:
                text = text[:k] + rng.choice(pieces) + text[k:]
            elif op < 0.7:
                text = text[:k] + text[k + rng.randint(1, 5):]
            else:
                j = rng.randrange(len(text))
                text = text[:k] + text[j:j + 10] + text[k:]
        assert _outcome(_textproto.merge, text) == _outcome(text_format.Merge, text), text


def test_a_long_text_goes_to_text_format_whole(monkeypatch):
    def no(*args):
        raise AssertionError("the fast reader ran")
    monkeypatch.setattr(_textproto, "FAST_LIMIT", len(PLAIN) - 1)
    monkeypatch.setattr(_textproto, "_message", no)
    fast, slow = both(PLAIN)
    assert same(fast, slow)
