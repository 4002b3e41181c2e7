"""Protobuf text format, read and written faster than ``google.protobuf.text_format`` where it can be.

protobuf's own reader is pure Python, token by token: about 140 ms for the 139 KB network definition
of a ResNet-50 ``.nnp``, in every read. :func:`merge` reads the plain form that NNabla (through
``text_format``) and Neural Network Console write: ``name: value`` and ``name { ... }``, comments,
strings with C escapes, numbers, enum names, booleans. Anything else (``<...>`` or ``[...]``
lists, extensions, ``Any``, adjacent strings, two members of a oneof, a name the message does not
have, a value text_format's own parsers refuse) sends the whole text to ``text_format.Merge``
instead, on a fresh message, so what it accepts and the errors it gives are protobuf's own. Both
build the same message (tested field for field).

:func:`to_string` writes what ``text_format.MessageToString(message)`` writes, character for
character, with the same value formatting (about 60 ms saved on that definition); messages with
extensions, maps, groups or ``Any`` go to ``text_format`` itself.
"""
import re

from google.protobuf import text_encoding, text_format
from google.protobuf.internal import type_checkers
from google.protobuf.descriptor import FieldDescriptor as _F

# a string, a comment, punctuation, a run of anything else (a name or a number), or a stray character
_TOKEN = re.compile(r"""(?:"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')|#[^\n]*|[{}:;,]|[^\s{}:;,"'#]+|\S""")
_QUOTES = "\"'"


class _Unsupported(Exception):
    """Not in the plain form :func:`merge` reads: ``text_format`` reads it."""


# texts past this go to text_format whole: the reader holds every token at once (about 8 bytes of
# Python objects per byte of text), text_format a line at a time, 3-4 times slower. The limit of
# the definitions bnfold reads (16 MiB) is this one: every definition it reads takes the fast way
FAST_LIMIT = 16 << 20


def merge(text: str, message) -> None:
    """Merge the text-format ``text`` into ``message``, as ``text_format.Merge`` does."""
    if len(text) > FAST_LIMIT:
        text_format.Merge(text, message)
        return
    target = message if message.ByteSize() == 0 else type(message)()
    try:
        tokens = [t for t in _TOKEN.findall(text) if t[0] != "#"]
        if _message(tokens, 0, target, top=True) != len(tokens):
            raise _Unsupported
    except (_Unsupported, KeyError, ValueError, TypeError, IndexError, AttributeError,
            UnicodeDecodeError, RecursionError):
        target.Clear()
        text_format.Merge(text, target)
    if target is not message:
        message.MergeFrom(target)


def _message(tokens, k: int, message, top: bool = False) -> int:
    """Read fields into ``message`` from ``tokens[k]`` up to its ``}`` (the end, at the top);
    returns the index after it."""
    fields = message.DESCRIPTOR.fields_by_name
    n = len(tokens)
    while k < n:
        token = tokens[k]
        if token == "}" and not top:
            return k + 1
        if token in (";", ","):   # separators text_format allows between fields
            k += 1
            continue
        field = fields[token]     # KeyError (an unknown field, or not a name): text_format says why
        if field.containing_oneof is not None and \
                message.WhichOneof(field.containing_oneof.name) not in (None, token):
            raise _Unsupported    # two members of a oneof: text_format's rules decide
        k += 1
        colon = tokens[k] == ":"
        if colon:
            k += 1
        if field.cpp_type == _F.CPPTYPE_MESSAGE:
            if tokens[k] != "{" or field.message_type.full_name == "google.protobuf.Any":
                raise _Unsupported
            if field.label == _F.LABEL_REPEATED:
                sub = getattr(message, token).add()
            else:
                sub = getattr(message, token)
                sub.SetInParent()
            k = _message(tokens, k + 1, sub)
            continue
        if not colon:
            raise _Unsupported
        value = _scalar(field, tokens[k])
        k += 1
        if k < n and tokens[k][0] in _QUOTES:
            raise _Unsupported   # adjacent strings, which text_format joins
        if field.label == _F.LABEL_REPEATED:
            getattr(message, token).append(value)
        else:
            setattr(message, token, value)
    if not top:
        raise _Unsupported   # the text ends inside a message
    return k


_INTEGERS = {_F.CPPTYPE_INT32: (True, False), _F.CPPTYPE_INT64: (True, True),
             _F.CPPTYPE_UINT32: (False, False), _F.CPPTYPE_UINT64: (False, True)}
_FLOATS = (_F.CPPTYPE_FLOAT, _F.CPPTYPE_DOUBLE)


def _scalar(field, text: str):
    """The value of ``text`` for ``field``, by text_format's own rules for each type (a ValueError
    where they refuse it)."""
    cpp = field.cpp_type
    if cpp in _INTEGERS:
        signed, long = _INTEGERS[cpp]
        return text_format.ParseInteger(text, is_signed=signed, is_long=long)
    if cpp in _FLOATS:
        return text_format.ParseFloat(text)
    if cpp == _F.CPPTYPE_BOOL:
        return text_format.ParseBool(text)
    if cpp == _F.CPPTYPE_STRING:
        if len(text) < 2 or text[0] not in _QUOTES or text[-1] != text[0]:
            raise _Unsupported
        data = text_encoding.CUnescape(text[1:-1])
        return data if field.type == _F.TYPE_BYTES else data.decode("utf-8")
    if cpp == _F.CPPTYPE_ENUM:
        return text_format.ParseEnum(field, text)
    raise _Unsupported


def to_string(message) -> str:
    """``text_format.MessageToString(message)``, with its default options."""
    out = []
    try:
        _print(message, "", out)
    except _Unsupported:
        return text_format.MessageToString(message)
    return "".join(out)


def _print(message, indent: str, out: list) -> None:
    if message.DESCRIPTOR.full_name == "google.protobuf.Any":
        raise _Unsupported   # text_format expands it by its type URL
    for field, value in message.ListFields():
        if field.is_extension or field.type == _F.TYPE_GROUP:
            raise _Unsupported
        name = field.name
        repeated = field.label == _F.LABEL_REPEATED
        if field.cpp_type == _F.CPPTYPE_MESSAGE:
            if field.message_type.has_options and field.message_type.GetOptions().map_entry:
                raise _Unsupported   # a map: text_format sorts its entries
            inner = indent + "  "
            for sub in (value if repeated else (value,)):
                out.append(f"{indent}{name} {{\n")
                _print(sub, inner, out)
                out.append(f"{indent}}}\n")
            continue
        text = _FORMATS.get(field.cpp_type, str)
        if field.cpp_type == _F.CPPTYPE_STRING and field.type == _F.TYPE_BYTES:
            text = _bytes
        elif field.cpp_type == _F.CPPTYPE_ENUM:
            text = _enum(field)
        for v in (value if repeated else (value,)):
            out.append(f"{indent}{name}: {text(v)}\n")


def _string(value: str) -> str:
    return '"' + text_encoding.CEscape(value.encode("utf-8"), False) + '"'


def _bytes(value: bytes) -> str:
    return '"' + text_encoding.CEscape(value, False) + '"'


def _float(value: float) -> str:
    return str(value) if value != value else str(type_checkers.ToShortestFloat(value))


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _enum(field):
    names = field.enum_type.values_by_number

    def text(value):
        known = names.get(value)
        return known.name if known is not None else str(value)
    return text


_FORMATS = {_F.CPPTYPE_STRING: _string, _F.CPPTYPE_FLOAT: _float, _F.CPPTYPE_BOOL: _bool}
