"""``.nnp`` files: read, fold every network, write back. The file's own protobuf is edited (folded BNs
removed, layers pointed at folded parameters), so executors, other networks, untouched parameters'
names and need_grad flags stay exactly as they were.
"""
import contextlib
import copy
import errno
import io
import logging
import math
import os
import queue
import re
import socket
import stat
import struct
import tempfile
import threading
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import numpy as np

from . import _atomic, _textproto, _zip, protobuf_params
from ._scope_lock import holding_scope_lock
from .backends import get_backend
from .backends.common import FoldError, quiet_float_errors
from .graph import BN_TYPES, Graph
from .nnp_fold import _Silent   # the progress of a caller that shows none
from .plan import OUTPUT_SIDE, FoldSpec, Plan, Skip
from .planner import plan as make_plan


_COPY_CHUNK = 16 << 20   # bytes per piece when a member is copied or streamed


class _Counted:
    """A binary file object whose reads and writes advance ``progress`` by their bytes."""

    def __init__(self, f, progress):
        self.f, self.progress = f, progress

    def read(self, n=-1):
        data = self.f.read(n)
        self.progress.advance(len(data))
        return data

    def readinto(self, view) -> int:
        n = self.f.readinto(view)
        self.progress.advance(n or 0)
        return n

    def write(self, data):
        n = self.f.write(data)
        self.progress.advance(memoryview(data).nbytes)
        return n


class NnpError(ValueError):
    """A file that cannot be read, folded or written as asked; the message is one line."""


@dataclass
class Param:
    value: np.ndarray
    need_grad: bool


@dataclass
class NnpFile:
    path: str
    members: List[zipfile.ZipInfo]
    raw: Dict[str, bytes]              # members written back as read (not the network, parameters)
    network_member: str
    proto: object                      # nnabla_pb2.NNablaProtoBuf of the network definition
    param_member: Optional[str]        # 'parameter.h5' / 'parameter.protobuf', None if in the nntxt
    params: "OrderedDict[str, Param]"

    def network_names(self) -> List[str]:
        return [n.name for n in self.proto.network]


# -- reading --------------------------------------------------------------------------------------
# What a file may make bnfold allocate is checked against what it holds before it is read. Real
# weights compress about 1.1-fold; a zip bomb, or an HDF5 dataset declaring what it does not store,
# a thousandfold.
_RATIO_LIMIT = 200            # the most a zip member or chunked dataset may expand (size / stored)...
_RATIO_FREE = 16 << 20        # ...once it is larger than this
# the network definition, held as bytes, text and tokens (about 8 bytes a byte), parsed at about
# 3 MB/s, then built into NNabla's graph and planned: real ones are well under a few megabytes (a
# ResNet-50's: 139 KB); one of 13.5 MB (16,000 functions) folds in about 40 s and 1.5 GB
_DEFINITION_LIMIT = 16 << 20
# a definition expands at most this much once over _DEFINITION_RATIO_FREE (real ones about 20-fold:
# each function's text differs in its names); parsing costs time per byte of text
_DEFINITION_RATIO = 64
_DEFINITION_RATIO_FREE = 1 << 20

# zipfile bounds what a deflated member yields to what each read asks for; its bzip2 and LZMA
# readers decompress a whole block of input at once, however far it expands
_READABLE_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
_METHOD_NAMES = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "LZMA"}

# The input through which NNabla's loop functions take the previous iteration's value: it closes a
# loop on purpose, and NNabla unrolls it before building.
_LOOP_BACK = {"RepeatStart": 1, "Delay": 0}


def read(path: str, progress=None) -> NnpFile:
    """Parse ``path``; NnpError with a one-line reason if it is not a usable .nnp file. Sizes are
    checked before anything is allocated (see ``_check_members``, ``_check_dataset``), and the
    network definition before NNabla sees it (``_check_definition``).
    ``progress.advance`` counts the parameter bytes read (``expect``: their total)."""
    from google.protobuf import text_format
    from nnabla.utils import nnabla_pb2

    progress = progress or _Silent()
    with _open_regular(path) as fh:
        try:
            with zipfile.ZipFile(fh) as z:
                members = z.infolist()
                _check_members(path, members, getattr(z, "start_dir", None))
                raw = {m.filename: _read_member(z, m) for m in members if not _is_params(m.filename)}
                progress.expect(sum(m.file_size for m in members if _is_params(m.filename)))
                stored, count = {}, 0
                for m in members:
                    if not _is_params(m.filename):
                        continue
                    stored[m.filename] = _read_h5(path, z, m, progress, fh) \
                        if _is_h5_params(m.filename) else _read_protobuf(path, z, m, progress, fh)
                    count += len(stored[m.filename])   # each member alone is bounded too
                    if count > MAX_PARAMETERS:
                        raise _too_many_parameters(path, count)
        except _ZIP_ERRORS as e:
            raise _not_a_zip(path, e) from None
    nets = [m.filename for m in members if _is_definition(m.filename)]
    if not nets:
        raise NnpError(f"{path}: no network definition (.nntxt or .prototxt) in the archive")
    if len(nets) > 1:   # NNabla would merge them; the networks of all must be planned together
        raise NnpError(f"{path}: {len(nets)} network definitions ({', '.join(nets)}); bnfold reads "
                       f"files with one, as NNabla and Neural Network Console save them")
    proto = nnabla_pb2.NNablaProtoBuf()
    try:
        _textproto.merge(raw[nets[0]].decode("utf-8"), proto)   # text_format's parse, faster
    except (text_format.ParseError, UnicodeDecodeError) as e:
        raise NnpError(f"{path}: network definition {nets[0]} does not parse: {_one_line(e)}") from None
    if not proto.network:
        raise NnpError(f"{path}: the network definition holds no network")
    if count + len(proto.parameter) > MAX_PARAMETERS:   # parameters written in the definition too
        raise _too_many_parameters(path, count + len(proto.parameter))
    _check_definition(path, proto)
    params = _loaded_values(path, members, nets[0], proto, stored)
    param_member = None   # several parameter members are merged into the last one on output
    for name in stored:
        param_member = name
    if param_member is not None and _is_h5_params(param_member):
        try:   # said now, not once the work is done
            _check_h5_names(params)
        except NnpError as e:
            raise NnpError(f"{path}: {e}") from None
    del raw[nets[0]]      # rewritten on output: its bytes need not stay in memory
    nnp = NnpFile(path, members, raw, nets[0], proto, param_member, params)
    _check_parameters(nnp)
    return nnp


def _loaded_values(path, members, definition, proto, stored) -> "OrderedDict[str, Param]":
    """Each parameter's value as NNabla's loader leaves it, reading the members in archive order:
    an HDF5 member sets its parameters; the definition's inline parameters and each protobuf member
    are added to one list of entries, and each of them sets every entry of that list again (so an
    inline value read after an HDF5 member, or again by a later protobuf member, wins)."""
    params: "OrderedDict[str, Param]" = OrderedDict()
    entries: List[Tuple[str, Param]] = []
    inline = [(p.variable_name, Param(_proto_value(path, p), p.need_grad)) for p in proto.parameter]
    for m in members:
        if m.filename == definition:
            if not inline:
                continue
            entries += inline
        elif m.filename in stored and _is_h5_params(m.filename):
            params.update(stored[m.filename])
            continue
        elif m.filename in stored:
            entries += stored[m.filename]
        else:
            continue
        params.update(entries)
    return params


def _proto_value(path, p) -> np.ndarray:
    data = np.asarray(p.data, np.float32)
    shape = tuple(p.shape.dim)
    if any(d < 0 for d in shape) or data.size != math.prod(shape):
        raise NnpError(f"{path}: parameter '{p.variable_name}' holds {data.size} values for shape "
                       f"{shape}")
    return data.reshape(shape)


def _open_regular(path: str):
    """``path`` opened for reading, refused unless it is a regular file: a FIFO would block the read
    for ever, a device (/dev/zero) be read without end. It is looked at before it is opened; one
    swapped in meanwhile is opened without blocking, and refused the same."""
    try:
        _check_regular(path, os.stat(path))
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise _unreadable(path, e) from None
    try:
        _check_regular(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


_SPECIAL_FILES = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                  (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                  (stat.S_ISSOCK, "a socket"))


def _check_regular(path, st):
    if stat.S_ISREG(st.st_mode):
        return
    what = next((words for test, words in _SPECIAL_FILES if test(st.st_mode)), "a special file")
    if what == "a directory":
        raise NnpError(f"{path}: is a directory, not an .nnp file")
    raise NnpError(f"{path}: is {what}, not a regular file")


def _unreadable(path, e: OSError) -> NnpError:
    if e.errno == errno.ENOENT:
        return NnpError(f"{path}: no such file")
    words = e.strerror or _one_line(e)
    return NnpError(f"{path}: cannot be read: {words[:1].lower()}{words[1:]}")


def _is_definition(name: str) -> bool:
    return name.endswith((".nntxt", ".prototxt"))


def _check_members(path, members: List[zipfile.ZipInfo], directory: Optional[int] = None):
    """Refuses, from the archive's directory alone, what reading the members could not survive or
    would get wrong: two entries of one name (which one a reader takes varies), entries overlapping
    one another (one compressed stream read as many: a zip bomb's trick) or the directory at
    ``directory``, encryption, methods whose output is not bounded, members expanding like a zip
    bomb, a definition over its limit, and members that memory cannot hold (an HDF5 member's
    datasets are checked as it is read)."""
    placed = sorted(members, key=lambda m: m.header_offset)
    for m, nxt in zip(placed, placed[1:] + [None]):
        end = m.header_offset + 30 + m.compress_size   # its local header and data, at the least
        limit = nxt.header_offset if nxt is not None else directory
        if limit is not None and end > limit:
            other = f"entry {nxt.filename}" if nxt is not None else "the archive's directory"
            raise NnpError(f"{path}: entry {m.filename} overlaps {other}, refused (a zip bomb "
                           f"reads one compressed stream as many entries)")
    seen = set()
    need, largest = 0, None
    for m in members:
        name = m.filename
        if name in seen:
            raise NnpError(f"{path}: the archive holds more than one entry named '{name}'")
        seen.add(name)
        _check_extension(path, m)
        if m.flag_bits & 0x41:
            raise NnpError(f"{path}: {name} is encrypted")
        if m.compress_type not in _READABLE_METHODS:
            method = _METHOD_NAMES.get(m.compress_type, f"method {m.compress_type}")
            raise NnpError(f"{path}: {name} is compressed with {method}; bnfold reads stored and "
                           f"deflated members, as NNabla writes them")
        if m.file_size > _RATIO_FREE and m.file_size > _RATIO_LIMIT * m.compress_size:
            raise NnpError(
                f"{path}: {name} expands {m.file_size / max(m.compress_size, 1):.0f}-fold "
                f"({_amount(m.compress_size)} to {_amount(m.file_size)}), refused as a likely zip bomb "
                f"(a member over {_amount(_RATIO_FREE)} may expand at most {_RATIO_LIMIT}-fold)")
        if _is_definition(name) and m.file_size > _DEFINITION_LIMIT:
            raise NnpError(f"{path}: network definition {name} is {_amount(m.file_size)}; bnfold "
                           f"reads definitions up to {_amount(_DEFINITION_LIMIT)}")
        if _is_definition(name) and m.file_size > _DEFINITION_RATIO_FREE and \
                m.file_size > _DEFINITION_RATIO * m.compress_size:
            raise NnpError(
                f"{path}: network definition {name} expands "
                f"{m.file_size / max(m.compress_size, 1):.0f}-fold ({_amount(m.compress_size)} to "
                f"{_amount(m.file_size)}), refused as text made to take long to parse (a definition "
                f"over {_amount(_DEFINITION_RATIO_FREE)} may expand at most {_DEFINITION_RATIO}-fold; "
                f"real ones about 20-fold)")
        if not _is_h5_params(name):
            held = m.file_size * (10 if _is_definition(name) else 1)   # a definition: see above
            need += held
            if largest is None or m.file_size > largest.file_size:
                largest = m
    expanded = sum(m.file_size for m in members)
    stored = sum(m.compress_size for m in members)
    if expanded > _RATIO_FREE and expanded > _RATIO_LIMIT * stored:   # many members, each small
        raise NnpError(
            f"{path}: its {len(members)} members expand {expanded / max(stored, 1):.0f}-fold "
            f"({_amount(stored)} to {_amount(expanded)}), refused as a likely zip bomb (an archive "
            f"over {_amount(_RATIO_FREE)} may expand at most {_RATIO_LIMIT}-fold)")
    available = _memory_available()
    if available is not None and need > available:
        raise NnpError(f"{path}: reading it needs {_amount(need)} of memory ({largest.filename}: "
                       f"{_amount(largest.file_size)}), {_amount(available)} is available")


# NNabla's loader picks a member's reader by ``ext in KINDS``, KINDS a string: any part of one
# ('.nnt', '.proto', '.h', no extension at all) is read as that kind
_NNABLA_KINDS = (("a network definition", ".nntxt,.prototxt"), ("parameters", ".protobuf,.h5"))
_OWN_EXTENSIONS = (".nntxt", ".prototxt", ".protobuf", ".h5")


def _check_extension(path, member: zipfile.ZipInfo) -> None:
    """Refuses a member NNabla would read as a definition or parameters by its loader's test of
    extensions (a part of '.nntxt,.prototxt' or '.protobuf,.h5') that bnfold would not: it would
    copy it as it is, and NNabla would then read it over the folded network or values."""
    ext = os.path.splitext(member.filename)[1]
    if ext in _OWN_EXTENSIONS or (not ext and member.file_size == 0):   # a folder, an empty file
        return
    kinds = [what for what, names in _NNABLA_KINDS if ext in names]
    if kinds:
        said = f"extension '{ext}'" if ext else "no extension"
        raise NnpError(f"{path}: member '{member.filename}' has {said}, which NNabla's loader reads "
                       f"as {' and as '.join(kinds)} (it takes any part of '.nntxt,.prototxt' or "
                       f"'.protobuf,.h5'); bnfold reads such members only named .nntxt, .prototxt, "
                       f".h5 or .protobuf")


def _read_member(z: zipfile.ZipFile, member: zipfile.ZipInfo) -> bytes:
    """A member's bytes, read a piece at a time: zipfile decompresses only as much as a read asks."""
    pieces = []
    with z.open(member) as stream:
        while True:
            piece = stream.read(_COPY_CHUNK)
            if not piece:
                return b"".join(pieces)
            pieces.append(piece)


def _memory_available() -> Optional[int]:
    """Bytes that can still be allocated without swapping, as the system says: Linux's MemAvailable
    (at most a container's limit, which it does not show), else the free physical memory, else all
    of it; None where the system says nothing (the other limits still apply)."""
    found = None
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    found = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        if found is not None:
            break
        try:
            found = os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            pass
    try:
        with open("/sys/fs/cgroup/memory.max", "rb") as f:
            limit = f.read().strip()
        if limit.isdigit():
            found = int(limit) if found is None else min(found, int(limit))
    except OSError:
        pass
    return found


def _amount(nbytes: int) -> str:
    for unit, shift in (("EiB", 60), ("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20),
                        ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):.1f} {unit}"
    return f"{nbytes} bytes"


def _check_definition(path, proto):
    """Refuses what NNabla's builder would loop on for ever or fail on with its internals: two
    networks or two functions of a network with one name, a function using a variable its network
    does not declare, a variable written by two functions, a cycle. Linear in the definition's size."""
    networks = set()
    for net in proto.network:
        if net.name in networks:
            raise NnpError(f"{path}: two networks are named '{net.name}'")
        networks.add(net.name)
        where = f"{path}: network '{net.name}'"
        _check_sizes(where, net)
        _check_repeats(where, net)
        declared = {}
        for v in net.variable:
            if declared.get(v.name, v.type) != v.type:   # NNabla takes the last for the variable
                raise NnpError(f"{where}: variable '{v.name}' is declared twice, as "
                               f"{declared[v.name]} and as {v.type}")
            declared[v.name] = v.type
        producer: Dict[str, int] = {}
        names = set()
        for i, f in enumerate(net.function):
            if f.name in names:   # NNabla finds functions by name: the later one would stand for both
                raise NnpError(f"{where}: two functions are named '{f.name}'")
            names.add(f.name)
            for verb, variables in (("reads", f.input), ("writes", f.output)):
                for v in variables:
                    kind = declared.get(v)
                    if kind is None:
                        raise NnpError(f"{where}: function '{f.name}' {verb} '{v}', which the "
                                       f"network does not declare")
                    if kind not in ("Buffer", "Parameter"):   # NNabla keeps these two kinds only
                        raise NnpError(f"{where}: function '{f.name}' {verb} '{v}', which the "
                                       f"network declares as '{kind}', neither Buffer nor Parameter")
            _check_arguments(where, f)
            for v in f.output:
                if v in producer:
                    raise NnpError(f"{where}: variable '{v}' is the output of both "
                                   f"'{net.function[producer[v]].name}' and '{f.name}'")
                producer[v] = i
        cycle, depth = _cycle(net.function, producer)
        if cycle:
            shown = cycle if len(cycle) <= 6 else cycle[:4] + ["..."] + cycle[-1:]
            raise NnpError(f"{where}: function '{cycle[0]}' depends on its own output "
                           f"({' -> '.join(shown)}); NNabla cannot build it")
        if depth > MAX_DEPTH:
            raise NnpError(f"{where}: a chain of {depth} functions, each reading the one before; "
                           f"bnfold reads networks up to {MAX_DEPTH} deep (NNabla walks a graph "
                           f"recursively, a level of the process's stack a function, and crashes "
                           f"past about 40,000)")


# the longest chain of functions a network may hold (see _check_definition)
MAX_DEPTH = 20_000
# the variables a network's repeated blocks may unroll to (NNabla's builder makes every copy)
MAX_UNROLLED_VARIABLES = 100_000


def _check_repeats(where, net) -> None:
    """Refuses repeated blocks (``repeat_info``) that NNabla's builder would unroll past what a
    network may hold: each function or variable is copied once per combination of its repeats'
    ``times``, before bnfold sees the network (whose repeats it keeps as they are). Unrolled
    functions count against MAX_DEPTH: a repeated block is typically one chain."""
    times = {}
    for r in net.repeat_info:
        if r.times < 1:
            raise NnpError(f"{where}: repeat '{r.id}' is to run {r.times} times")
        times[r.id] = r.times
    if not times:
        return

    def unrolled(items) -> int:
        return sum(math.prod(times.get(i, 1) for i in item.repeat_id) for item in items)
    functions, variables = unrolled(net.function), unrolled(net.variable)
    if functions > MAX_DEPTH or variables > MAX_UNROLLED_VARIABLES:
        raise NnpError(f"{where}: its repeated blocks unroll to {functions} functions and "
                       f"{variables} variables; bnfold reads such networks up to {MAX_DEPTH} "
                       f"functions and {MAX_UNROLLED_VARIABLES} variables (NNabla's builder makes "
                       f"every copy, and walks a graph a level of the stack a function)")


# arguments NNabla's builder divides by (a 0 there ends the process with SIGFPE): each value >= 1
_POSITIVE = frozenset(("group", "stride", "dilation", "kernel", "output_size", "multiplier",
                       "divisor", "num_groups", "deformable_group"))
# (function type, argument) that NNabla's builder indexes with, unchecked: a negative value there
# corrupts its memory and ends the process (a Transpose's axes)
_NONNEGATIVE = frozenset((("Transpose", "axes"),))
# elements of a variable NNabla's builder can count without overflowing its 64-bit sizes
_MAX_ELEMENTS = 1 << 48
MAX_BATCH = (1 << 31) - 1


def _check_arguments(where, f):
    """The arguments of function ``f`` that NNabla divides by are at least 1; those it indexes with
    unchecked are at least 0."""
    which = f.WhichOneof("parameter")
    if which is None:
        return
    param = getattr(f, which)
    for field in param.DESCRIPTOR.fields:
        if (f.type, field.name) in _NONNEGATIVE and field.label == field.LABEL_REPEATED and \
                field.type in (field.TYPE_INT32, field.TYPE_INT64):
            values = list(getattr(param, field.name))
            if any(v < 0 for v in values):
                raise NnpError(f"{where}: function '{f.name}' ({f.type}) has {field.name} {values}; "
                               f"NNabla indexes with them unchecked, so none may be negative")
    for field in param.DESCRIPTOR.fields:   # unset ones too: they read 0, and NNabla takes that 0
        if field.name not in _POSITIVE or field.type not in (field.TYPE_INT32, field.TYPE_INT64,
                                                             field.TYPE_MESSAGE):
            continue
        value = getattr(param, field.name)
        if field.type == field.TYPE_MESSAGE:   # a Shape
            if field.label == field.LABEL_REPEATED or not hasattr(value, "dim"):
                continue
            values = list(value.dim)
        else:
            values = list(value) if field.label == field.LABEL_REPEATED else [value]
        if any(v < 1 for v in values):
            shown = values if field.type == field.TYPE_MESSAGE or len(values) > 1 else values[0]
            raise NnpError(f"{where}: function '{f.name}' ({f.type}) has {field.name} {shown}; "
                           f"NNabla divides by it, so it must be at least 1")


def _check_sizes(where, net):
    """The network's batch size and each declared variable's element count (its -1 dimensions
    being the batch) stay where NNabla's builder counts them without overflowing."""
    batch = net.batch_size
    if batch > MAX_BATCH:
        raise NnpError(f"{where}: batch_size {batch} is too large (at most {MAX_BATCH})")
    for v in net.variable:
        n = 1
        for d in v.shape.dim:
            n *= max(batch, 1) if d == -1 else abs(d)
            if n > _MAX_ELEMENTS:
                raise NnpError(f"{where}: variable '{v.name}' of shape {list(v.shape.dim)} would "
                               f"hold more than 2^48 elements")


def _cycle(functions, producer) -> Tuple[Optional[List[str]], int]:
    """(the names of the functions on one cycle, in data-flow order from the first in the file and
    back to it, or None if there is none; the longest chain of functions outside cycles). Kahn's
    order removes every function not on or after a cycle; walking back from one that remains,
    through predecessors that remain, must come round."""
    n = len(functions)
    preds: List[List[int]] = [[] for _ in range(n)]
    succs: List[List[int]] = [[] for _ in range(n)]
    for i, f in enumerate(functions):
        back = _LOOP_BACK.get(f.type)
        for k, v in enumerate(f.input):
            p = producer.get(v)
            if p is not None and k != back:
                preds[i].append(p)
                succs[p].append(i)
    waiting = [len(p) for p in preds]
    ready = [i for i in range(n) if not waiting[i]]
    level = [1] * n
    while ready:
        i = ready.pop()
        for j in succs[i]:
            level[j] = max(level[j], level[i] + 1)
            waiting[j] -= 1
            if not waiting[j]:
                ready.append(j)
    depth = max(level, default=0)
    left = next((i for i in range(n) if waiting[i]), None)
    if left is None:
        return None, depth
    position: Dict[int, int] = {}
    walk = []
    while left not in position:
        position[left] = len(walk)
        walk.append(left)
        left = next(p for p in preds[left] if waiting[p])
    loop = walk[position[left]:][::-1]            # walked against the data: reversed, it flows
    first = loop.index(min(loop))
    loop = loop[first:] + loop[:first]
    return [functions[i].name for i in loop + loop[:1]], depth


def _no_scratch(path, folder, why) -> NnpError:
    reason = why if isinstance(why, str) else (why.strerror or _one_line(why))
    return NnpError(f"{path}: cannot copy the parameters to a scratch file in {folder} "
                    f"({reason}); set TMPDIR to a folder with room")


def _check_room(path, folder, nbytes: int):
    """Refuses before copying ``nbytes`` into ``folder`` where it has no room for them: a disk
    filled on the way is slower to find and leaves less for everyone."""
    free = _atomic.free_bytes(folder)
    if free is not None and nbytes + _atomic.ROOM_MARGIN > free:
        raise _no_scratch(path, folder, f"it needs {_amount(nbytes)}, {_amount(free)} is free")


# NNabla's loader reads every .h5 and .protobuf member of an .nnp as parameters, whatever its name
# (later members overriding earlier ones), so this does too: one left in the output unread could
# override the folded values.
def _is_h5_params(name: str) -> bool:
    return name.endswith(".h5")


def _is_params(name: str) -> bool:
    return name.endswith((".h5", ".protobuf"))


_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, zlib.error)


# errors of the system, not of the file: said as such
_SYSTEM_ERRNOS = frozenset(getattr(errno, n) for n in (
    "EMFILE", "ENFILE", "ENOMEM", "ENOBUFS", "EIO", "EACCES", "EPERM", "EAGAIN", "EINTR", "ENOSPC",
    "EDQUOT", "EFBIG", "ESTALE", "ETIMEDOUT") if hasattr(errno, n))


def _not_a_zip(path, e) -> NnpError:
    if isinstance(e, OSError) and e.errno in _SYSTEM_ERRNOS:
        return NnpError(f"{path}: cannot read it: {e.strerror or _one_line(e)}; nothing written")
    reason = e.strerror if isinstance(e, OSError) and e.strerror else _one_line(e)
    return NnpError(f"{path}: not an .nnp file (not a readable zip archive: {reason})")


def _read_protobuf(path, z: zipfile.ZipFile, member: zipfile.ZipInfo, progress, archive):
    """[(name, Param)] of a protobuf parameter member, read a parameter at a time: a member stored
    uncompressed (as NNabla saves them) straight from ``archive``, the open file of ``z``
    (:class:`_StoredMember`), a compressed one through zipfile."""
    start = _stored_data_start(z, member, archive)
    try:
        with contextlib.ExitStack() as stack:
            if start is None:
                stream = stack.enter_context(z.open(member))
            else:
                stream = io.BufferedReader(_StoredMember(path, member, archive, start), _READ_AHEAD)
            out = []
            for name, value, need_grad in protobuf_params.read(_Counted(stream, progress),
                                                               member.file_size):
                if len(out) == MAX_PARAMETERS:
                    raise _too_many_parameters(f"{path}: {member.filename}", len(out) + 1)
                out.append((name, Param(value, need_grad)))
            return out
    except protobuf_params.ProtobufError as e:
        raise NnpError(f"{path}: {member.filename} does not parse: {e}") from None


_READ_AHEAD = 1 << 16   # bytes read at once for the small fields between a member's values


class _StoredMember(io.RawIOBase):
    """The bytes of a stored ``member`` at ``start`` in the open file ``archive``, read in order,
    with their CRC-32 (:func:`_zip.crc32`) checked once the last is read, as zipfile checks it."""

    def __init__(self, path, member: zipfile.ZipInfo, archive, start: int):
        super().__init__()
        self.path, self.member = path, member
        self.window = _Window(archive, start, member.file_size)
        self.pos = self.crc = 0

    def readable(self):
        return True

    def readinto(self, b):
        view = memoryview(b).cast("B")
        n = min(len(view), self.member.file_size - self.pos)
        if n <= 0:
            if self.member.file_size == 0 and self.member.CRC != 0:   # nothing read, none checked
                raise _bad_crc(self.path, self.member)
            return 0
        try:
            got = self.window.read_at(self.pos, view[:n])
        except OSError as e:   # the archive itself failed to read (an I/O error)
            raise _member_unreadable(self.path, self.member, e) from None
        if got != n:
            raise _not_a_zip(self.path, EOFError("the member is cut short"))
        self.crc = _zip.crc32(view[:n], self.crc)
        self.pos += n
        if self.pos == self.member.file_size and self.crc != self.member.CRC:
            raise _bad_crc(self.path, self.member)
        return n


# what h5py reports an HDF5 file's damage with, besides OSError
_H5_ERRORS = (OSError, KeyError, RuntimeError, ValueError, TypeError)


def _read_h5(path, z: zipfile.ZipFile, member: zipfile.ZipInfo, progress, archive):
    """[(name, Param)] of an HDF5 parameter member. HDF5 reads at random places: a member stored
    uncompressed (as NNabla saves them) is read where it lies in ``archive``, the open file of ``z``
    (:func:`_read_h5_in_place`); a compressed one is copied to a scratch file first: disk, not a
    second copy of the weights in memory. The scratch folder is named for this process, so that a
    later run can remove it if this one is killed."""
    start = _stored_data_start(z, member, archive)
    if start is not None:
        return _read_h5_in_place(path, member, archive, start, progress)
    folder = tempfile.gettempdir()
    _atomic.remove_stale(folder, keep=[path])
    _check_room(path, folder, member.file_size)
    try:
        scratch = _atomic.scratch_dir(folder, "parameters")
    except OSError as e:
        raise _no_scratch(path, folder, e) from None
    try:
        local = os.path.join(scratch, "parameter.h5")
        with z.open(member) as stream, open(local, "wb") as dst:
            src = _Counted(stream, progress)
            while True:
                try:
                    chunk = src.read(_COPY_CHUNK)
                except _ZIP_ERRORS as e:
                    raise _not_a_zip(path, e) from None
                if not chunk:
                    break
                try:
                    dst.write(chunk)
                except OSError as e:
                    raise _no_scratch(path, folder, e) from None
        return _parse_h5(f"{path}: {member.filename}", local, member.file_size)
    finally:
        _atomic.remove(scratch)


def _stored_data_start(z: zipfile.ZipFile, member: zipfile.ZipInfo, archive) -> Optional[int]:
    """Where the bytes of ``member`` start in the file ``archive``, where it is stored uncompressed
    and lies whole inside the file; else None (it is read through zipfile). Its local header is
    checked by zipfile first, as any read of it would."""
    if member.compress_type != zipfile.ZIP_STORED or member.compress_size != member.file_size:
        return None
    z.open(member).close()   # zipfile's checks of the local header (its signature, its name)
    archive.seek(member.header_offset)
    header = archive.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        return None
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    start = member.header_offset + 30 + name_length + extra_length
    if start + member.file_size > os.fstat(archive.fileno()).st_size:
        return None   # cut short: zipfile says so in its words
    return start


class _Positioned(io.RawIOBase):
    """A file object of ``size`` bytes read (and written) at ``pos``, which HDF5 moves about."""
    pos = size = 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self.pos = base + offset
        return self.pos

    def tell(self):
        return self.pos


class _Window(_Positioned):
    """The bytes ``[start, start + size)`` of the open binary file ``f``, as a read-only file of
    their own: HDF5 reads a stored member in place through it. HDF5 does not look at how much a read
    returned: ``readinto`` fills the whole buffer, with zeros past the member's end (as HDF5's own
    driver reads past the end of a file), so that nothing it parses is left unset."""

    def __init__(self, f, start: int, size: int):
        super().__init__()
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def readinto(self, b):
        view = memoryview(b).cast("B")
        got = self.read_at(self.pos, view)
        view[got:] = bytes(len(view) - got)
        self.pos += len(view)
        return len(view)

    def readall(self):   # what is left of the member (readinto never says that it has ended)
        rest = bytearray(max(0, self.size - self.pos))
        got = self.read_at(self.pos, memoryview(rest))
        self.pos += got
        return bytes(rest[:got])

    def read_at(self, pos: int, view) -> int:
        """Read the member's bytes from ``pos`` into ``view`` until it is full or the member (or
        the file) ends; returns how many."""
        n = max(0, min(len(view), self.size - pos))
        got = 0
        while got < n:   # one call reads at most about 2 GiB on Linux
            if _PREADV is not None:   # the file's own position untouched
                k = _PREADV(self.f.fileno(), [view[got:n]], self.start + pos + got)
            else:
                self.f.seek(self.start + pos + got)
                k = self.f.readinto(view[got:n]) or 0
            if not k:
                break
            got += k
        return got


_PREADV = getattr(os, "preadv", None)


def _read_h5_in_place(path, member: zipfile.ZipInfo, archive, start: int, progress):
    """[(name, Param)] of the stored HDF5 member at ``start`` in ``archive``: HDF5 reads its
    structure in place (a few kB); then one pass in order over the member reads every value stored
    whole straight into its array and checks the member's CRC-32 as zipfile would, before any
    value is used. No scratch file, no copy of the bytes in between."""
    window = _Window(archive, start, member.file_size)
    try:
        return _parse_h5(f"{path}: {member.filename}", window, member.file_size,
                         lambda places: _read_in_order(path, member, window, places, progress))
    except _BadCrc:
        raise
    except NnpError as e:
        try:
            damaged = _read_in_order(path, member, window, [], None, check=False) != member.CRC
        except NnpError:
            raise e from None
        if damaged:   # said as reading it whole would
            raise _bad_crc(path, member) from None
        raise


def _parse_h5(where, source, size, read_in_order=None):
    """:func:`_h5_parameters` of the HDF5 file ``source`` (a path or a file object); a file HDF5
    cannot parse is an NnpError that says why."""
    import h5py
    try:
        with h5py.File(source, "r") as hd:
            return _h5_parameters(where, hd, size, read_in_order)
    except NnpError:
        raise
    except _H5_ERRORS as e:
        raise NnpError(f"{where} does not parse: {_h5_reason(e)}") from None


class _BadCrc(NnpError):
    pass


def _bad_crc(path, member) -> NnpError:
    return _BadCrc(str(_not_a_zip(path, zipfile.BadZipFile(f"Bad CRC-32 for file "
                                                           f"{member.filename!r}"))))


def _member_unreadable(path, member, e: OSError) -> NnpError:
    words = e.strerror or _one_line(e)
    return NnpError(f"{path}: {member.filename} cannot be read ({words[:1].lower()}{words[1:]})")


def _read_in_order(path, member, window: "_Window", places, progress, check=True):
    """Read the member from start to end: the bytes at each of ``places`` ((offset, array), in
    offset order, not overlapping, inside the member) into its array, the rest in pieces; returns
    the CRC-32 of all, checked against the member's unless ``check`` is False."""
    try:
        crc = _read_pieces(path, member, window, places, progress)
    except OSError as e:   # the archive itself failed to read (an I/O error)
        raise _member_unreadable(path, member, e) from None
    if check and crc != member.CRC:
        raise _bad_crc(path, member)
    return crc


def _read_pieces(path, member, window: "_Window", places, progress) -> int:
    crc = _Crc()
    try:
        pos = 0
        for offset, array in places + [(member.file_size, None)]:
            while pos < offset:   # what lies between the values: read in pieces of its own
                view = memoryview(bytearray(min(_COPY_CHUNK, offset - pos)))
                pos += _read_exactly(path, window, pos, view)
                crc.add(view)
                if progress is not None:
                    progress.advance(len(view))
            if array is None:
                break
            view = memoryview(array.reshape(-1).view(np.uint8))
            pos += _read_exactly(path, window, pos, view)
            crc.add(view)
            if progress is not None:
                progress.advance(len(view))
    finally:
        value = crc.close()
    return value


def _read_exactly(path, window: "_Window", pos: int, view) -> int:
    if window.read_at(pos, view) != len(view):
        raise _not_a_zip(path, EOFError("the member is cut short"))
    return len(view)


class _Crc:
    """The CRC-32 of the pieces added, in order, computed on a thread beside the reads (zlib lets go
    of the interpreter lock), or here where no thread can start. ``close()`` returns it."""

    def __init__(self):
        self.value = 0
        self._error = None
        self._queue = queue.Queue(maxsize=4)   # pieces read ahead of the CRC (views, no copies)
        self._thread = threading.Thread(target=self._run, name="bnfold-crc", daemon=True)
        try:
            self._thread.start()
        except RuntimeError:   # no more threads
            self._thread = None

    def _run(self):
        while True:   # drains the queue whatever happens, so that no put waits for ever
            piece = self._queue.get()
            if piece is None:
                return
            if self._error is None:
                try:
                    self.value = _zip.crc32(piece, self.value)
                except BaseException as e:   # raised by close()
                    self._error = e

    def add(self, piece) -> None:
        if self._thread is None:
            self.value = _zip.crc32(piece, self.value)
        else:
            self._queue.put(piece)

    def close(self) -> int:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error
        return self.value


def _place(ds, declared: int) -> Optional[int]:
    """Where the values of a dataset stored whole lie in the file, or None where HDF5 is to read it:
    storage never allocated (read as the fill value; HDF5 then gives an undefined address, offset by
    a user block), or an address HDF5 itself refuses."""
    try:
        if ds.id.get_storage_size() != declared:
            return None
        return ds.id.get_offset()
    except _H5_ERRORS:
        return None


def _h5_parameters(where, hd, member_size: int, read_in_order=None):
    """[(name, Param)] of the open HDF5 file ``hd``, in the order of their ``index``. Every dataset
    is checked before any is read; ``where`` names the file and member in messages.
    ``read_in_order(places)``, where given, reads the values of the datasets stored whole in one
    place of the file, [(offset, array to fill)] in offset order, not overlapping (HDF5 reads the
    rest)."""
    datasets = _datasets(where, hd)
    entries, need, in_place, chunked, stored = [], 0, 0, 0, 0
    for name, ds in datasets:
        if isinstance(name, bytes):   # NNabla names parameters in text
            raise NnpError(f"{where}: a parameter's name is not UTF-8 text ({name!r})")
        declared, chunks = _check_dataset(where, name, ds, member_size)
        need += declared
        if chunks is None:
            in_place += declared
        else:
            chunked, stored = chunked + declared, stored + chunks
        entries.append((_attribute(where, name, ds, "index"), name, ds,
                        _attribute(where, name, ds, "need_grad"), declared, chunks is None))
    # each dataset passed alone; together, many small ones could still declare gigabytes
    if in_place > member_size:
        raise NnpError(f"{where}: its {len(datasets)} parameters declare {_amount(in_place)} stored "
                       f"as declared, more than the {_amount(member_size)} the member holds")
    if chunked > _RATIO_FREE and chunked > _RATIO_LIMIT * stored:
        raise NnpError(f"{where}: its parameters stored in chunks declare {_amount(chunked)} from "
                       f"{_amount(stored)} stored (together they may expand at most "
                       f"{_RATIO_LIMIT}-fold once over {_amount(_RATIO_FREE)})")
    available = _memory_available()
    if available is not None and need > available:
        raise NnpError(f"{where}: its parameters need {_amount(need)} of memory, "
                       f"{_amount(available)} is available")
    entries.sort(key=lambda e: (e[0], e[1]))
    values = {}
    if read_in_order is not None:
        import h5py
        places, memory_types = [], {}
        for k, (_, name, ds, _, declared, whole) in enumerate(entries):
            offset = _place(ds, declared) if whole and declared else None
            if offset is None or not (0 <= offset and offset + declared <= member_size):
                continue
            dtype = ds.dtype
            if dtype not in memory_types:
                memory_types[dtype] = h5py.h5t.py_create(dtype)
            # stored as NumPy holds it (HDF5 converts other number formats as it reads them)
            if ds.type.equal(memory_types[dtype]):
                places.append((offset, declared, k))
        places.sort()
        taken, end = [], 0
        for offset, declared, k in places:
            if offset >= end:   # overlapping another dataset's bytes: HDF5 reads it
                values[k] = np.empty(entries[k][2].shape, entries[k][2].dtype)
                taken.append((offset, values[k]))
                end = offset + declared
        read_in_order(taken)
    out = []
    for k, (_, name, ds, need_grad, _, _) in enumerate(entries):
        value = values.get(k)
        if value is None:
            try:
                value = ds[...]
            except _H5_ERRORS as e:
                raise NnpError(f"{where}: parameter '{name}' cannot be read ({_h5_reason(e)})") \
                    from None
        if not value.dtype.isnative:   # stored big-endian: the same values, this machine's order
            value = value.astype(value.dtype.newbyteorder("="))
        out.append((name, Param(value, need_grad)))
    return out


def _datasets(where, hd):
    """[(name, Dataset)] of every dataset of the open HDF5 file, as ``visititems`` finds them (each
    object once, through hard links, in name order), without opening the other objects."""
    import h5py
    names = []

    def visit(name, info):
        if info.type == h5py.h5o.TYPE_DATASET:
            names.append(name)

    h5py.h5o.visit(hd.id, visit, info=True)
    if len(names) > MAX_PARAMETERS:
        raise _too_many_parameters(where, len(names))
    return [(_decoded(name), _Dataset(h5py.h5d.open(hd.id, name))) for name in names]


# the most parameters a file may hold, in all its members (a model's are a few thousand)
MAX_PARAMETERS = 50_000


def _too_many_parameters(where, count: int) -> NnpError:
    return NnpError(f"{where}: holds {count} parameters or more; bnfold reads at most "
                    f"{MAX_PARAMETERS} parameters (each costs time and memory, whatever its size)")


class _Dataset:
    """What the reader asks of an HDF5 dataset (h5py's low-level one, ``id``), each asked of h5py
    once: its shape (None: an empty dataspace), type, dtype (TypeError where NumPy has none);
    ``ds[...]`` reads it as h5py's ``Dataset`` does."""
    __slots__ = ("id", "shape", "_type", "_dtype")

    def __init__(self, dsid):
        self.id = dsid
        self.shape = dsid.shape
        self._type = self._dtype = None

    @property
    def type(self):
        if self._type is None:
            self._type = self.id.get_type()
        return self._type

    @property
    def dtype(self) -> np.dtype:
        if self._dtype is None:
            self._dtype = self.id.dtype
        return self._dtype

    def __getitem__(self, key):
        import h5py
        return h5py.Dataset(self.id)[key]


def _decoded(name: bytes):
    """A name as h5py gives it: text where it is UTF-8, else the bytes."""
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        return name


def _h5_type_words(ds) -> Optional[str]:
    """What the dataset holds, in words, where it is not integers or floats (None where it is). The
    HDF5 class decides: h5py shows enums as their integer type, complex numbers as compounds."""
    import h5py
    t = h5py.h5t
    cls = ds.type.get_class()
    if cls in (t.INTEGER, t.FLOAT):
        return None
    if cls == t.ENUM and ds.dtype.kind == "b":
        return "booleans"
    if cls in (t.COMPOUND, getattr(t, "COMPLEX", t.COMPOUND)) and ds.dtype.kind == "c":
        return "complex numbers"
    return {t.STRING: "strings", t.COMPOUND: "records of several fields", t.ENUM: "enumerated values",
            t.VLEN: "variable-length sequences", t.OPAQUE: "opaque bytes", t.REFERENCE: "references",
            t.ARRAY: "an array in each element", t.BITFIELD: "bit fields",
            t.TIME: "time values"}.get(cls, f"values of HDF5 type class {cls}")


def _check_dataset(where, name, ds, member_size: int) -> Tuple[int, Optional[int]]:
    """Refuses a dataset that is not an array of numbers, keeps its values outside the member, or
    declares more bytes than it stores; returns the bytes it declares, and those it stores where it
    is stored in chunks (None where it is stored as declared). Compared before any value is
    read: a few kB of file can declare a dataset of terabytes."""
    import h5py
    what = _h5_type_words(ds)
    if what is not None:
        try:
            dtype = str(ds.dtype)[:60]
        except TypeError:   # no NumPy equivalent
            dtype = "none in NumPy"
        raise NnpError(f"{where}: parameter '{name}' holds {what} (dtype {dtype}), not numbers")
    if ds.shape is None:
        raise NnpError(f"{where}: parameter '{name}' has no shape (an empty dataspace), not an array")
    plist = ds.id.get_create_plist()
    layout = plist.get_layout()
    if layout == h5py.h5d.VIRTUAL or plist.get_external_count():
        files = "other HDF5 files" if layout == h5py.h5d.VIRTUAL else "external files"
        raise NnpError(f"{where}: parameter '{name}' keeps its values outside the member (in {files})")
    declared = math.prod(ds.shape) * ds.dtype.itemsize

    def what():
        return f"{_amount(declared)} ({'x'.join(map(str, ds.shape)) or 'a scalar'} {ds.dtype})"
    stored = None
    if layout == h5py.h5d.CHUNKED:   # compressed, or chunks never written
        stored = ds.id.get_storage_size()
        chunk = plist.get_chunk()
        # a read decompresses every chunk it touches whole: chunks far larger than the dataset
        # would make a few bytes of file inflate to gigabytes
        inflated = math.prod(-(-n // c) for n, c in zip(ds.shape, chunk)) * \
            math.prod(chunk) * ds.dtype.itemsize
        if inflated > max(2 * declared, _RATIO_FREE):
            raise NnpError(f"{where}: parameter '{name}' of {what()} is stored in chunks of "
                           f"{'x'.join(map(str, chunk))}, which a read decompresses to "
                           f"{_amount(inflated)}")
        if declared > _RATIO_FREE and declared > _RATIO_LIMIT * stored:
            raise NnpError(f"{where}: parameter '{name}' declares {what()} from {_amount(stored)} "
                           f"stored (a dataset over {_amount(_RATIO_FREE)} may expand at most "
                           f"{_RATIO_LIMIT}-fold)")
    elif declared > member_size:     # contiguous or compact: stored as declared, or never written
        raise NnpError(f"{where}: parameter '{name}' declares {what()}, more than the "
                       f"{_amount(member_size)} the member holds")
    return declared, stored


def _attribute(where, name, ds, key: str):
    """The dataset's ``index`` (an integer, default 0) or ``need_grad`` (a boolean or the integer 0
    or 1, default False), refused in words where it is anything else. NNabla writes one scalar; its
    shape and type are checked before it is read."""
    import h5py
    if not h5py.h5a.exists(ds.id, key.encode()):
        return 0 if key == "index" else False
    attr = h5py.h5a.open(ds.id, key.encode())   # opened once, read in place: h5py's own way is slow
    shape = attr.shape
    count = math.prod(shape) if shape is not None else 0
    if count != 1:
        raise NnpError(f"{where}: parameter '{name}': {key} attribute holds {count} values, not one")
    attr_type = attr.get_type()
    cls = attr_type.get_class()
    t = h5py.h5t
    dtype = attr_type.dtype if cls in (t.INTEGER, t.ENUM) else None   # each h5py call: ~5-30 us
    boolean = cls == t.ENUM and dtype.kind == "b"
    value = None
    if cls == t.INTEGER or boolean:
        value = np.empty(shape, dtype)
        attr.read(value)
        value = value.reshape(-1)[0]
    if key == "index" and cls == t.INTEGER:
        return int(value)
    if key == "need_grad" and (boolean or value in (0, 1)):
        return bool(value)
    what = {t.STRING: "a string", t.FLOAT: "a float", t.ENUM: "an enumerated value",
            t.COMPOUND: "a record"}.get(cls, f"HDF5 type class {cls}")
    if key == "index":
        raise NnpError(f"{where}: parameter '{name}': index attribute is not an integer ({what})")
    what = f"the integer {value}" if cls == t.INTEGER else what
    raise NnpError(f"{where}: parameter '{name}': need_grad attribute is not a boolean ({what})")


def _h5_reason(e) -> str:
    """h5py's message without HDF5's call details (addresses, the scratch file's path): an OS error
    reported through HDF5 comes out as that error's words."""
    text = _one_line(e.args[0] if isinstance(e, KeyError) and e.args else e)   # not the key's repr
    os_error = re.search(r"error message = '([^']*)'", text)
    if os_error:
        words = os_error.group(1)
        return words[:1].lower() + words[1:]
    return re.sub(r",?\s*\w+ = 0x[0-9a-fA-F]+", "", text)


def _check_parameters(nnp: NnpFile):
    """Every parameter a function uses has data of the declared size; no two names of parameters
    (stored, or variables of the networks) are one parameter to NNabla."""
    _check_aliases(nnp)
    for net in nnp.proto.network:
        declared = {v.name: v for v in net.variable}
        for f in net.function:
            for name in f.input:
                v = declared.get(name)
                if v is None or v.type != "Parameter" or v.repeat_id:
                    continue   # one of a repeated block: stored under names NNabla expands
                if name not in nnp.params:
                    raise NnpError(f"{nnp.path}: network '{net.name}': parameter '{name}' "
                                   f"(input of {f.name}) has no data in the file")
                want = [d for d in v.shape.dim]
                got = nnp.params[name].value.shape
                if math.prod(got) != math.prod(want) or any(d < 0 for d in want):
                    raise NnpError(f"{nnp.path}: network '{net.name}': parameter '{name}' has shape "
                                   f"{tuple(got)}, the network declares {tuple(want)}")


def _check_aliases(nnp: NnpFile) -> None:
    """NNabla stores and finds a parameter by the parts of its name between slashes, leaving out
    empty ones: 'fc/W', '/fc/W' and 'fc//W' are one array to it. bnfold goes by the names as
    written, so it would fold one of them as if the others were other arrays: such a file is
    refused."""
    first: Dict[str, str] = {}
    names = list(nnp.params)
    names += [v.name for net in nnp.proto.network for v in net.variable if v.type == "Parameter"]
    for name in names:
        key = "/".join(part for part in name.split("/") if part)
        other = first.setdefault(key, name)
        if other != name:
            raise NnpError(f"{nnp.path}: '{other}' and '{name}' are one parameter to NNabla (it "
                           f"leaves out the empty parts of a name between slashes); bnfold "
                           f"refuses files that name a parameter two ways")


def _one_line(e) -> str:
    return " ".join(str(e).split())[:300]


# -- planning -------------------------------------------------------------------------------------
@dataclass
class NetworkPlan:
    name: str
    plan: Optional[Plan]
    training: bool                     # has a BN with batch_stat=True (verified on copies of its
                                       # running statistics)
    error: Optional[str] = None
    # the proto function of each function of the planned graph (by position), where it has one
    functions: List[Optional[str]] = field(default_factory=list)


@dataclass
class FilePlan:
    networks: List[NetworkPlan]
    folds: Dict[str, List[FoldSpec]] = field(default_factory=dict)   # per network, final names
    unique: List[FoldSpec] = field(default_factory=list)             # the folds to compute
    sources: Dict[str, str] = field(default_factory=dict)
    arrays: Dict[str, tuple] = field(default_factory=dict)           # shape, dtype of each
    derived: List = field(default_factory=list)                      # the derived maps to compute
    intermediates: set = field(default_factory=set)
    edits: Dict[str, "object"] = field(default_factory=dict)         # per network, final names

    @property
    def n_folded(self):
        """BNs folded, over all networks."""
        return sum(len(n.plan.folded_bns) for n in self.networks if n.plan)

    @property
    def skipped(self):
        return [(n.name, s) for n in self.networks if n.plan for s in n.plan.skipped]

    def compute_plan(self) -> Plan:
        """The folds to compute, as one plan over every network's arrays."""
        return Plan(tuple(self.unique), (), dict(self.arrays), dict(self.sources),
                    tuple(self.derived), frozenset(self.intermediates))


def _uses(net) -> Dict[str, int]:
    count: Dict[str, int] = {}
    for f in net.function:
        for name in f.input:
            count[name] = count.get(name, 0) + 1
    return count


def _is_training(net) -> bool:
    for f in net.function:
        if f.type in BN_TYPES:
            param = f.batch_normalization_param if f.type == "BatchNormalization" \
                else f.fused_batch_normalization_param
            if param.batch_stat:
                return True
    return False


def structure(proto):
    """A copy of the network definition without parameter values: networks, executors and the rest,
    every field but ``parameter``. Small, whatever the model's size."""
    from nnabla.utils import nnabla_pb2
    out = nnabla_pb2.NNablaProtoBuf()
    for fd, value in proto.ListFields():
        if fd.name == "parameter":
            continue
        if fd.label == fd.LABEL_REPEATED:
            getattr(out, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(out, fd.name).CopyFrom(value)
        else:
            setattr(out, fd.name, value)
    return out


@holding_scope_lock
def build_networks(path: str, proto, names=None, parsed=False, values=None, batch_size=None):
    """(loader scope) -> {network name: (graph outputs, NnpNetwork)} built by NNabla in a private
    parameter scope, for the networks of ``proto`` (its network definition; every network, or those
    in ``names``), which name each network's outputs. NNabla loads the file ``path``; with ``parsed``
    it builds from ``proto`` itself (``path`` then only names the file in errors), with the parameter
    values of ``values`` ({name: Param}, each taken out of it once copied into NNabla) or none.
    NnpError names the file, the network and the problem in words."""
    import nnabla as nn
    from nnabla.core.graph_def import ProtoGraph
    from nnabla.utils.nnp_graph import NnpLoader, NnpNetwork
    _check_declared(path, proto, names)
    declared_batch = {net.name: net.batch_size for net in proto.network}

    def _batch(name):
        # a network without a batch size (0, -1, or none written, as NNabla's ONNX converter leaves
        # a dynamic one) is built with 1 for its -1 dimensions: NNabla's builder would divide by 0
        if batch_size is not None or declared_batch.get(name, 1) >= 1:
            return batch_size
        return 1
    nets = {}
    scope = OrderedDict()
    with nn.parameter_scope("", scope):
        try:
            if parsed:   # what NnpLoader does after parsing the file
                for name in list(values or ()):
                    p = values.pop(name)   # one copy of each array at a time
                    var = nn.parameter.get_parameter_or_create(name, p.value.shape,
                                                               need_grad=p.need_grad)
                    var.data.cast(p.value.dtype)[...] = p.value
                graph = ProtoGraph.from_proto(structure(proto), param_scope=scope,
                                              rng=np.random.RandomState(1223))

                def get_network(name):
                    return NnpNetwork(graph.networks[name], batch_size=_batch(name),
                                      callback=None)
            else:
                with _nnabla_logs_silenced():   # its failure is said once, below, in words
                    loader = NnpLoader(path)

                def get_network(name):
                    return loader.get_network(name, batch_size=_batch(name))
        except MemoryError:
            raise
        except Exception as e:  # NNabla's own loader, on a file our checks passed
            where = _failing_network(proto, names)
            raise NnpError(f"{path}: {where}NNabla cannot load it: {nnabla_words(e)}") from None
        for net in proto.network:
            if names is not None and net.name not in names:
                continue
            try:
                built = get_network(net.name)
            except Exception as e:
                raise NnpError(f"{path}: network '{net.name}' does not build: {nnabla_words(e)}") \
                    from None
            outputs = list(built.outputs.values())
            for ex in proto.executor:
                if ex.network_name == net.name:
                    for ov in ex.output_variable:
                        v = built.variables.get(ov.variable_name)
                        if v is not None and v not in outputs:
                            outputs.append(v)
            nets[net.name] = (outputs, built)
    return scope, nets


@contextlib.contextmanager
def _nnabla_logs_silenced():
    """NNabla's logger says nothing meanwhile (its loader logs CRITICAL lines before it raises);
    its level is put back after."""
    log = logging.getLogger("nnabla")
    level = log.level
    log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        log.setLevel(level)


def _check_declared(path, proto, names):
    """NNabla looks every function's inputs and outputs up among the network's declared variables
    and fails with the bare name (a KeyError) when one is missing: said here in words instead."""
    for net in proto.network:
        if names is not None and net.name not in names:
            continue
        declared = {v.name for v in net.variable}
        for f in net.function:
            for verb, vnames in (("reads", f.input), ("writes", f.output)):
                for name in vnames:
                    if name not in declared:
                        raise NnpError(f"{path}: network '{net.name}': function '{f.name}' {verb} "
                                       f"'{name}', which the network does not declare")


def _failing_network(proto, names) -> str:
    """"network 'NAME': " for the first network NNabla cannot build alone, "" if none (the error then
    lies between networks). Only on the error path: each network is built again, without values."""
    import nnabla as nn
    from nnabla.core.graph_def import ProtoGraph
    from nnabla.utils import nnabla_pb2
    for net in proto.network:
        if names is not None and net.name not in names:
            continue
        alone = nnabla_pb2.NNablaProtoBuf()
        alone.network.add().CopyFrom(net)
        try:
            with nn.parameter_scope("", OrderedDict()):
                ProtoGraph.from_proto(alone, param_scope=OrderedDict(),
                                      rng=np.random.RandomState(1223))
        except Exception:
            return f"network '{net.name}': "
    return ""


_SOURCE_LINE = re.compile(r"^\S*[/\\]\S+:\d+$")            # a C++ source location
_ERROR_HEADER = re.compile(r"^\w+ error in \w+$")            # "value error in setup_impl"
_FAILED_CHECK = re.compile(r"^Failed `[^`]*`:\s*")            # the C++ condition that failed


_HDF5_MESSAGE = re.compile(r"Unable to .+\(.+\)$", re.S)


def nnabla_words(e: BaseException) -> str:
    """An error NNabla raised, as one line of words: without the C++ source locations and check
    expressions it carries, and a bare KeyError said as what it means."""
    if isinstance(e, KeyError) and len(e.args) == 1:
        what = str(e.args[0])
        if _HDF5_MESSAGE.match(what):   # h5py's: a message about the parameters file, not a name
            return f"its parameters: {what[:1].lower()}{what[1:]}"
        return f"it refers to '{what}', which is not declared"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    kept = [_FAILED_CHECK.sub("", line) for line in lines
            if not _SOURCE_LINE.match(line) and not _ERROR_HEADER.match(line)]
    text = " ".join(kept or lines)
    return _one_line(text) if text else f"{type(e).__name__} with no message"


@quiet_float_errors
@holding_scope_lock
def plan_file(nnp: NnpFile, progress=None, skip=()) -> FilePlan:
    """Plan every network of the file and settle the folded parameters' names across networks: a
    fold that several networks share (the same arrays, the same map) is computed once; an array
    that another network reads is never folded in place."""
    import nnabla as nn
    taken = set(nnp.params)
    for net in nnp.proto.network:
        taken.update(v.name for v in net.variable)
    uses = {net.name: _uses(net) for net in nnp.proto.network}
    dtypes = {name: p.value.dtype for name, p in nnp.params.items()}

    def values(var, name):
        return nnp.params[name].value

    # planning needs shapes (and the dtypes read() found), and values only where a move's exactness
    # depends on them: NNabla neither parses every weight a second time nor holds a copy of them
    scope, built = build_networks(nnp.path, nnp.proto, parsed=True)
    fp = FilePlan([])
    seen: Dict[tuple, FoldSpec] = {}
    with nn.parameter_scope("", scope):
        for net in nnp.proto.network:
            if progress:
                progress.step(f"planning {net.name}")
            outputs, network = built[net.name]
            training = _is_training(net)
            written = {o for f in net.function for o in f.output}
            fed = {network.variables[v.name]: v.name for v in net.variable
                   if v.type != "Parameter" and v.name not in written
                   and v.name in network.variables}
            if not outputs:
                fp.networks.append(NetworkPlan(net.name, None, training, "no outputs"))
                continue
            graph = Graph(outputs)
            # a network that trains (a BN on batch statistics) keeps its parametrization: only
            # BNs on running statistics fold there, not the multiplies and adds of its own
            # NNabla unrolls a repeated block as it builds the network: the functions it folds
            # would be copies of the file's, which a fold cannot be written back to
            repeats = bool(net.repeat_info) or any(f.repeat_id for f in net.function)
            p = make_plan(graph, inplace=True, reserved=taken, dtypes=dtypes, values=values,
                          skip=skip, constants=not training, fed=fed,
                          keep="its network repeats a block (repeat_info), which NNabla unrolls "
                               "as it builds: a fold cannot be written back to the file"
                          if repeats else None)
            taken.update(p.arrays)
            producer = {o: f.name for f in net.function for o in f.output}
            functions = [producer.get(f.outputs[0].name) for f in graph.functions]
            fp.networks.append(NetworkPlan(net.name, p, training, functions=functions))
            fp.arrays.update(p.arrays)
            fp.folds[net.name], fp.edits[net.name] = _settle(p, net.name, uses, taken, seen, fp)
    return fp


def _settle(p: Plan, network: str, uses, taken, seen, fp: FilePlan):
    """(the network's folds with the names the file uses, its graph edit renamed alike). Arrays
    folded in place must not be seen by another network: folded into new names there. A fold
    computing what another network's fold computes takes that fold's arrays instead."""
    def elsewhere(name):
        return any(name in u for n, u in uses.items() if n != network)

    def new(base):
        name, k = base, 2
        while name in taken:
            name = f"{base}_{k}"
            k += 1
        taken.add(name)
        return name

    rename: Dict[str, str] = {}
    keys: Dict[str, tuple] = {}      # an array this plan writes -> how it is computed
    origin: Dict[str, str] = {}      # an array between two folds of a layer -> the array it came from
    derived = {d.scale: d for d in p.derived}
    derived.update({d.shift: d for d in p.derived if d.shift})
    final = []
    for spec in p.folds:
        key = _fold_key(spec, keys, derived, p.intermediates)
        # an array between two folds of a layer is this plan's own: never shared with another's
        between = spec.folded_weight in p.intermediates or spec.folded_bias in p.intermediates
        if key in seen and not between:
            prev = seen[key]
            for mine, theirs in ((spec.folded_weight, prev.folded_weight),
                                 (spec.folded_bias, prev.folded_bias)):
                if mine is not None:
                    rename[mine] = theirs
                    keys[mine] = key
            final.append(replace(spec, weight=rename.get(spec.weight, spec.weight),
                                 bias=rename.get(spec.bias, spec.bias),
                                 folded_weight=prev.folded_weight, folded_bias=prev.folded_bias))
            continue
        changes = {"weight": rename.get(spec.weight, spec.weight),
                   "bias": rename.get(spec.bias, spec.bias)}
        for field_name, source in (("folded_weight", spec.weight), ("folded_bias", spec.bias)):
            name = getattr(spec, field_name)
            if name is None:
                continue
            keys[name] = key
            source = origin.get(source, source)   # a layer folded on both sides: where it started
            if name in p.intermediates:
                origin[name] = source
                continue
            if name == source and elsewhere(name):
                changes[field_name] = rename[name] = new(name + "_folded")
                fp.sources[rename[name]] = name
                fp.arrays[rename[name]] = p.arrays[name]
            elif name in p.sources:
                fp.sources[name] = p.sources[name]
        spec = replace(spec, **changes)
        if not between:
            seen[key] = spec
        fp.unique.append(spec)
        final.append(spec)
        for d in p.derived:
            if d.scale in (spec.gamma, spec.beta) and d not in fp.derived:
                fp.derived.append(d)
    fp.intermediates.update(p.intermediates)
    edit = replace(p.edit, inputs=tuple((f, k, rename.get(n, n)) for f, k, n in p.edit.inputs),
                   adds=tuple((f, rename.get(n, n)) for f, n in p.edit.adds),
                   appends=tuple((f, rename.get(n, n)) for f, n in p.edit.appends))
    return final, edit


def _fold_key(spec: FoldSpec, keys, derived, intermediates) -> tuple:
    """What a fold computes, independent of the names its plan gave the arrays it writes: the same
    key in two networks is the same result."""
    def source(name):
        return keys.get(name, name) if name in intermediates else name

    d = derived.get(spec.gamma)
    the_map = ("derived", d.n, d.terms, d.shift is not None) if d is not None else \
        (spec.gamma, spec.beta, spec.mean, spec.var, spec.eps)
    return (spec.kind, spec.side, spec.weight_layout, spec.bias_layout, spec.bias_reduce_axes,
            source(spec.weight), source(spec.bias), spec.folded_bias is None, the_map)


# -- folding --------------------------------------------------------------------------------------
@quiet_float_errors
def fold_parameters(nnp: NnpFile, fp: FilePlan, backend: str = "auto"):
    """Compute every folded parameter into ``nnp.params`` (new ones added). Returns (backend name,
    bytes rescaled)."""
    from .backends.compose import compute_derived
    be = get_backend(backend, on_device=False)   # a file's arrays are in host memory
    plan = fp.compute_plan()
    arrays = {}
    derived = {n for d in plan.derived for n in (d.scale, d.shift) if n}
    for spec in plan.folds:
        reads = [spec.weight, spec.bias, spec.mean, spec.var, spec.gamma, spec.beta]
        reads += [a for d in plan.derived if d.scale == spec.gamma for t, _, _ in d.terms
                  for a in t.arrays()]
        for name in reads:
            if name is None or name in arrays or name in plan.intermediates:
                continue
            value = np.ascontiguousarray(nnp.params[name].value)
            if not value.flags.writeable:
                value = value.copy()
            nnp.params[name].value = value
            arrays[name] = value
    for spec in plan.folds:   # new arrays take the dtype the plan gives them
        for name in (spec.folded_weight, spec.folded_bias):
            if name is not None and name not in arrays and name not in derived:
                shape, dtype = plan.arrays[name]
                arrays[name] = np.empty(shape, dtype)
    arrays.update(compute_derived(plan, arrays, np))
    be.fold(plan, arrays)   # FoldError: nothing written yet
    for name in plan.new_arrays:
        src = plan.sources.get(name)
        nnp.params[name] = Param(arrays[name], nnp.params[src].need_grad
                                 if src in nnp.params else False)
    nbytes = sum(arrays[s.folded_weight].nbytes for s in plan.folds
                 if s.folded_weight is not None and s.folded_weight not in plan.intermediates)
    return be.name, nbytes


def _references(net):
    names = set()
    for f in net.function:
        names.update(f.input)
        names.update(f.output)
    return names


def rewrite_proto(nnp: NnpFile, fp: FilePlan):
    """Edit each network as its plan says (maps taken out, layers pointed at their folded
    parameters, a FusedBatchNormalization's add and ReLU kept); drop the declarations and
    parameters the folds left unused (and only those)."""
    used_before = set().union(*(set(_uses(n)) for n in nnp.proto.network))
    plans = {n.name: n for n in fp.networks}
    for net in nnp.proto.network:
        edit = fp.edits.get(net.name)
        if edit is None or not edit.region:
            continue
        refs_before = _references(net)
        declared = {v.name: v for v in net.variable}
        _edit_network(net, edit, plans[net.name].functions, nnp, declared)
        refs = _references(net)
        for name in sorted(refs):
            if name in nnp.params and name not in declared:
                v = net.variable.add()
                v.name, v.type = name, "Parameter"
                v.shape.dim.extend(nnp.params[name].value.shape)
                declared[name] = v
        io_names = {v.variable_name for ex in nnp.proto.executor if ex.network_name == net.name
                    for v in list(ex.data_variable) + list(ex.output_variable)}
        keep = [v for v in net.variable
                if v.name in refs or v.name in io_names or v.name not in refs_before]
        del net.variable[:]
        net.variable.extend(keep)
    used_after = set().union(*(set(_uses(n)) for n in nnp.proto.network))
    # a parameter an executor names as its data or output (a folded BN's statistic, say) is read
    # by whoever runs it: kept, with its declaration (above)
    named = {v.variable_name for ex in nnp.proto.executor
             for v in list(ex.data_variable) + list(ex.output_variable)}
    for name in list(nnp.params):
        if name in used_before and name not in used_after and name not in named:
            del nnp.params[name]
    for ex in nnp.proto.executor:
        net = next((n for n in nnp.proto.network if n.name == ex.network_name), None)
        if not ex.parameter_variable or net is None or not fp.folds.get(net.name):
            continue
        own = [v.variable_name for v in list(ex.data_variable) + list(ex.output_variable)]
        params_used = list(dict.fromkeys(n for n in list(_uses(net)) + own if n in nnp.params))
        del ex.parameter_variable[:]
        for name in params_used:
            ex.parameter_variable.add().variable_name = name


def _edit_network(net, edit, functions, nnp, declared):
    """Apply a plan's graph edit to the network's protobuf. The planned graph's functions are found
    by the variables they write; a map taken out hands its output's name to the function computing
    its input (where that variable is read only by the map) or its consumers read its input."""
    by_name = {f.name: f for f in net.function}

    def proto(index):
        name = functions[index] if index < len(functions) else None
        f = by_name.get(name)
        if f is None:
            raise NnpError(f"{nnp.path}: network '{net.name}': cannot find the function the fold "
                           f"changes in the file")
        return f

    for index, position, array in edit.inputs:
        f = proto(index)
        if position < len(f.input):
            f.input[position] = array
        else:
            f.input.append(array)
    io_names = {v.variable_name for ex in nnp.proto.executor if ex.network_name == net.name
                for v in list(ex.data_variable) + list(ex.output_variable)}
    gone = set()
    replacements = {}
    # who reads and who writes each variable, kept up to date as maps are taken out: linear in the
    # network's size, however many BNs fold
    readers_of: Dict[str, List] = {}
    producer_of: Dict[str, object] = {}

    def add(g):
        for v in set(g.input):
            readers_of.setdefault(v, []).append(g)
        for v in g.output:
            producer_of[v] = g

    def drop(g):
        for v in set(g.input):
            readers_of[v] = [r for r in readers_of.get(v, ()) if r is not g]
        for v in g.output:
            if producer_of.get(v) is g:
                del producer_of[v]

    def take_out_feeding(operands):
        """What computed only a removed map's operands (a constant's or statistics' reshapes)."""
        feeding = [producer_of.get(v) for v in operands]
        while feeding:
            g = feeding.pop()
            if g is None or g.name in gone or any(readers_of.get(v) or v in io_names
                                                  for v in g.output):
                continue
            gone.add(g.name)
            drop(g)
            feeding += [producer_of.get(v) for v in g.input]

    for g in net.function:
        add(g)
    taken = {g.name for g in net.function}
    for index, array in edit.appends:   # a product given the add of a new bias
        f = proto(index)
        drop(f)
        y = f.output[0]
        product = _fresh(declared, y + "_product", declared.get(y), net)
        f.output[0] = product
        new = _new_function(net, "Add2", f.name + "_bias", [product, array], [y], taken)
        replacements[f.name] = [f, new]
        add(f)
        add(new)
    for index, array in edit.adds:   # a BN become the add of a new bias
        f = proto(index)
        drop(f)
        replacements[f.name] = [_new_function(net, "Add2", f.name + "_bias",
                                              [f.input[0], array], [f.output[0]], taken)]
        add(replacements[f.name][0])
        take_out_feeding(list(f.input[1:]))
    for index, data in sorted(edit.removed + tuple((i, 0) for i in edit.fused)):
        f = proto(index)
        x, y = f.input[data], f.output[0]
        if index in edit.fused:   # its add and ReLU take its place
            drop(f)
            replacements[f.name] = _fused_rest(net, f, x, y, declared, taken)
            for g in replacements[f.name]:
                add(g)
            take_out_feeding([v for k, v in enumerate(f.input) if 0 < k < 5])
            continue
        gone.add(f.name)
        drop(f)
        take_out_feeding([v for k, v in enumerate(f.input) if k != data])
        producer = producer_of.get(x)
        if producer is not None and not readers_of.get(x) and x not in io_names:
            producer.output[list(producer.output).index(x)] = y   # the producer writes y itself
            del producer_of[x]
            producer_of[y] = producer
        else:
            for g in readers_of.pop(y, []):
                for k, name in enumerate(g.input):
                    if name == y:
                        g.input[k] = x
                readers_of.setdefault(x, []).append(g)
            if y in io_names:
                raise NnpError(f"network '{net.name}': {f.name}'s output {y} is an executor's "
                               f"variable and cannot be taken out")
    rebuilt = []
    for f in net.function:
        if f.name in gone:
            continue
        rebuilt.extend(replacements.get(f.name, [f]))
    del net.function[:]
    net.function.extend(rebuilt)


def _fused_rest(net, bn, x, out, declared, taken=None):
    """The add and ReLU of a FusedBatchNormalization whose BN part is folded, writing its output."""
    last = x
    functions = []
    if len(bn.input) > 5:
        summed = _fresh(declared, out + "_sum", declared.get(out), net)
        functions.append(_new_function(net, "Add2", bn.name + "_add", [x, bn.input[5]], [summed],
                                       taken))
        last = summed
    functions.append(_new_function(net, "ReLU", bn.name + "_relu", [last], [out], taken))
    return functions


def _fresh(declared, base, like, net):
    name, k = base, 2
    while name in declared:
        name = f"{base}_{k}"
        k += 1
    v = net.variable.add()
    v.name, v.type = name, "Buffer"
    if like is not None:
        v.shape.CopyFrom(like.shape)
    declared[name] = v
    return name


def _new_function(net, type_name, name, inputs, outputs, taken=None):
    """A function proto named ``name`` (made unique within ``net``, and among ``taken``, the names
    used so far, which it extends), not yet placed in it."""
    from nnabla.utils import nnabla_pb2
    if taken is None:
        taken = {g.name for g in net.function}
    unique, k = name, 2
    while unique in taken:
        unique = f"{name}_{k}"
        k += 1
    taken.add(unique)
    f = nnabla_pb2.Function()
    f.name, f.type = unique, type_name
    f.input.extend(inputs)
    f.output.extend(outputs)
    return f


# -- writing --------------------------------------------------------------------------------------
def serialize(nnp: NnpFile, out, progress=None) -> None:
    """Write the file to the binary file object ``out``: every member as read, the network definition
    and parameters replaced, each parameter's values written once, straight from its array.
    ``progress.advance`` counts the parameter bytes written."""
    progress = progress or _Silent()
    from nnabla.utils import nnabla_pb2
    proto = nnabla_pb2.NNablaProtoBuf()
    proto.CopyFrom(nnp.proto)
    del proto.parameter[:]
    if nnp.param_member is None:
        _params_to_proto(nnp.params, proto)
    with _zip.ZipWriter(out, "w", zipfile.ZIP_DEFLATED) as z:
        for m in map(_new_entry, nnp.members):
            name = m.filename
            if name == nnp.network_member:
                z.writestr(m, _textproto.to_string(proto))   # text_format's own text, faster
            elif name == nnp.param_member and _is_h5_params(name):
                _write_h5_member(nnp.params, z, m, progress)
            elif name == nnp.param_member:
                entries = [(n, p.value, p.need_grad) for n, p in nnp.params.items()]
                m.file_size = protobuf_params.size(entries)   # sizes the header (zip64 or not)
                progress.expect(m.file_size)
                with z.open(m, "w") as dst:
                    protobuf_params.write(_Counted(dst, progress), entries)
            elif _is_params(name):
                continue   # its parameters are in param_member, which holds them all
            else:
                z.writestr(m, nnp.raw[name])


def _params_to_proto(params, proto):
    for name, p in params.items():
        q = proto.parameter.add()
        q.variable_name = name
        q.shape.dim.extend(p.value.shape)
        q.data.extend(np.asarray(p.value, np.float32).reshape(-1).tolist())
        q.need_grad = p.need_grad


_ZIP64_EXTRA = 0x0001   # the extra field holding a zip entry's 64-bit sizes


def _new_entry(member: zipfile.ZipInfo) -> zipfile.ZipInfo:
    """A copy of ``member`` to write anew: its name, date, compression and other extra fields, without
    the zip64 sizes of the file it was read from (the writer adds its own where the new size needs them,
    and two in one header confuse other zip tools)."""
    info = copy.copy(member)
    extra, kept = member.extra, b""
    while len(extra) >= 4:
        tag, size = struct.unpack("<HH", extra[:4])
        if tag != _ZIP64_EXTRA:
            kept += extra[:4 + size]
        extra = extra[4 + size:]
    info.extra = kept
    return info


def _write_h5_member(params, z: zipfile.ZipFile, member: zipfile.ZipInfo, progress):
    """The parameters as the HDF5 ``member`` (an entry of ``_new_entry``) of ``z``, written once,
    in order, into the archive; ``progress`` counts the bytes written.

    HDF5 writes the file's structure only, into memory (:class:`_SparseFile`): each dataset's
    storage is allocated as it is created and never filled, so its place is known and HDF5 writes
    nothing there. The member is then the structure's bytes with each parameter's values in its
    place, streamed into the archive: no scratch file, no second copy of the weights. The datasets
    and their attributes are those of ``h5py``'s ``create_dataset(name, data=value)`` and
    ``attrs[...] =`` (as NNabla saves them), the dtype of each value stored as it is."""
    import h5py
    h5d, h5p, h5s, h5t, h5a = h5py.h5d, h5py.h5p, h5py.h5s, h5py.h5t, h5py.h5a
    dcpl = h5p.create(h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5d.FILL_TIME_NEVER)
    dcpl.set_obj_track_times(False)
    lcpl = h5p.create(h5p.LINK_CREATE)
    lcpl.set_create_intermediate_group(True)
    lcpl.set_char_encoding(h5t.CSET_UTF8)
    scalar = h5s.create(h5s.SCALAR)
    types = {}

    def h5type(dtype):
        if dtype not in types:
            types[dtype] = h5t.py_create(dtype, logical=True)
        return types[dtype]

    def attribute(ds, key: bytes, value: np.ndarray):
        attr = h5a.create(ds, key, h5type(value.dtype), scalar)
        attr.write(value)

    _check_h5_names(params)
    structure = _SparseFile()
    places = []
    with h5py.File(structure, "w") as hd:
        for i, (name, p) in enumerate(params.items()):   # as NNabla writes them
            value = p.value
            space = h5s.create_simple(value.shape) if value.ndim else scalar
            ds = h5d.create(hd.id, name.encode("utf-8"), h5type(value.dtype), space, dcpl=dcpl,
                            lcpl=lcpl)
            attribute(ds, b"need_grad", np.array(bool(p.need_grad)))
            attribute(ds, b"index", np.array(i, np.int64))
            if value.nbytes:
                places.append((ds.get_offset(), value))
    size = structure.size
    places.sort(key=lambda place: place[0])
    end = 0
    for offset, value in places:
        if offset is None or offset < end or offset + value.nbytes > size:
            raise RuntimeError("HDF5 placed a dataset where the file holds something else")
        end = offset + value.nbytes
    member.file_size = size   # sizes the member's header
    progress.expect(size)
    with z.open(member, "w") as dst:
        out = _Counted(dst, progress)
        pos = 0
        for offset, value in places + [(size, None)]:
            while pos < offset:   # the structure between values (HDF5's free space: zeros)
                piece = structure.read_range(pos, min(offset, pos + _COPY_CHUNK))
                out.write(piece)
                pos += len(piece)
            if value is None:
                break
            out.write(memoryview(np.ascontiguousarray(value).reshape(-1)).cast("B"))
            pos = offset + value.nbytes


def _check_h5_names(params) -> None:
    """NnpError where a parameter's name is not one HDF5 can hold as a dataset's (empty, '.' or '..'
    parts, a NUL character), or where one parameter's name is a group of another's ('a' and 'a/b'):
    HDF5 cannot hold both (parameters of protobuf members merged into an HDF5 one can be named so)."""
    for name in params:
        parts = name.strip("/").split("/")
        if "\0" in name or any(part in ("", ".", "..") for part in parts):
            raise NnpError(f"parameter {name!r} cannot be written to parameter.h5: HDF5 names "
                           f"datasets by parts between slashes, none of them empty, '.' or '..', "
                           f"and no NUL character")
    names = {n.strip("/") for n in params}
    for name in names:
        parts = name.split("/")
        for k in range(1, len(parts)):
            group = "/".join(parts[:k])
            if group in names:
                raise NnpError(f"parameters '{group}' and '{name}' cannot both be written to "
                               f"parameter.h5: HDF5 would need '{group}' to be a group holding "
                               f"the other")


class _SparseFile(_Positioned):
    """A file in memory holding only what was written to it, in pages, zeros elsewhere: HDF5 writes
    the structure of a file whose values are not written through it. The pages are small: HDF5
    writes a few hundred bytes beside each dataset, and a page held for each of thousands of
    datasets must not add up to a copy of the values."""
    PAGE = 512

    def __init__(self):
        super().__init__()
        self.pages: Dict[int, bytearray] = {}
        self.pos = self.size = 0

    def writable(self):
        return True

    def truncate(self, size=None):
        size = self.pos if size is None else size
        self.size = size
        for k in [k for k in self.pages if k * self.PAGE >= size]:
            del self.pages[k]
        tail = self.pages.get(size // self.PAGE)
        if tail is not None:
            tail[size % self.PAGE:] = bytes(self.PAGE - size % self.PAGE)
        return size

    def write(self, b):
        view = memoryview(b).cast("B")
        done = 0
        while done < len(view):
            k, at = divmod(self.pos + done, self.PAGE)
            n = min(self.PAGE - at, len(view) - done)
            page = self.pages.get(k)
            if page is None:
                page = self.pages[k] = bytearray(self.PAGE)
            page[at:at + n] = view[done:done + n]
            done += n
        self.pos += done
        self.size = max(self.size, self.pos)
        return done

    def readinto(self, b):
        view = memoryview(b).cast("B")
        n = self._copy(self.pos, view)
        self.pos += n
        return n

    def _copy(self, pos: int, view) -> int:
        n = max(0, min(len(view), self.size - pos))
        done = 0
        while done < n:
            k, at = divmod(pos + done, self.PAGE)
            m = min(self.PAGE - at, n - done)
            page = self.pages.get(k)
            view[done:done + m] = page[at:at + m] if page is not None else bytes(m)
            done += m
        return n

    def read_range(self, start: int, end: int) -> bytearray:
        out = bytearray(end - start)
        self._copy(start, memoryview(out))
        return out


def write_temp(nnp: NnpFile, target: str, progress=None):
    """Write ``nnp`` to a new temporary file beside ``target`` (a symlink's target), flushed to disk,
    with the owner, group and mode of the file it will replace. Returns the ``_atomic.AtomicFile``:
    ``commit()`` it once it is known good, else ``discard()`` it. A write that fails (a full disk, a
    quota, an I/O error, HDF5's errors about them) is an NnpError in words, with nothing left."""
    try:
        pending = _atomic.AtomicFile(target, suffix=".nnp")   # NNabla opens it by its extension
    except OSError as e:
        raise _write_failure(target, e) from None
    try:
        try:
            serialize(nnp, pending.file, progress=progress)
            pending.finish()
        except NnpError:
            raise
        except (OSError, RuntimeError, ValueError, zipfile.LargeZipFile) as e:
            raise _write_failure(target, e) from None
    except BaseException:
        pending.discard()
        raise
    return pending


_H5_ERRNO = re.compile(r"errno = (\d+)")


def _write_failure(target, e) -> NnpError:
    """HDF5 reports a failed write with its internals (addresses, offsets); the errno in it, or the
    OSError's own, says what happened."""
    code = getattr(e, "errno", None)
    if not code:
        m = _H5_ERRNO.search(str(e))
        code = int(m.group(1)) if m else None
    if code:
        words = os.strerror(code)
    elif isinstance(e, zipfile.LargeZipFile):
        words = "the archive would need zip64 extensions"
    else:
        words = "the HDF5 library could not write the parameters (a full disk or an I/O error)"
    return NnpError(f"{target}: cannot write: {words}; nothing written")


# -- verifying ------------------------------------------------------------------------------------
class VerifyImpossible(Exception):
    """NNabla cannot run a network of the original file in this context, so there is nothing to
    compare the folded one with; the message is one line."""


# Inputs that NNabla reads as indices (labels, token ids): random values there would index out of
# range, so they are fed zeros.
_INDEX_INPUTS = {"SoftmaxCrossEntropy": (1,), "CategoricalCrossEntropy": (1,), "TopNError": (1,),
                 "Embed": (0,), "OneHot": (0,), "Gather": (1,), "GatherNd": (1,), "ScatterNd": (1,)}
_BN_STATISTICS = (3, 4)   # mean and variance among a (Fused)BatchNormalization's inputs


def check_verify_memory(path, proto):
    """NnpError where running a network of ``proto`` (as ``verify`` does: every variable of it held
    at once, as float32) would need more memory than is available: a few bytes of definition can
    declare inputs of gigabytes."""
    available = _memory_available()
    if available is None:
        return
    for net in proto.network:
        batch = net.batch_size if net.batch_size >= 1 else 1
        need = sum(math.prod(batch if d < 0 else d for d in v.shape.dim)
                   for v in net.variable if v.type != "Parameter") * 4
        if need > available:
            raise NnpError(f"{path}: --verify would hold {_amount(need)} of values running network "
                           f"'{net.name}' (batch size {batch}), {_amount(available)} is available")


@holding_scope_lock
def verify(original, folded, networks, seed: int = 0, progress=None, inputs=None):
    """Run each network of ``networks`` from both files on the same inputs (``inputs``: {input name:
    array}, seeded random values for the rest); one record per output the network has or its
    executors declare, with max abs / max relative error. ``original`` and ``folded``: (path, network
    definition, as ``structure`` gives it). A network with batch_stat=True BNs updates their running
    statistics as it runs: they are restored after each run, so the next network reads the file's.
    Raises VerifyImpossible when NNabla cannot run an original network here; a folded network that
    does not run gets records with infinite errors and its ``error``. ``progress.step(label)`` is
    called as each file is loaded and each network run."""
    import nnabla as nn
    runs = []
    for which, (path, proto) in (("original", original), ("folded", folded)):
        if progress:
            progress.step(f"verify: loading the {which} file")
        scope, built = build_networks(path, proto, set(networks))
        results = {}
        with nn.parameter_scope("", scope):
            for name in networks:
                if progress:
                    progress.step(f"verify: running {which} {name}")
                net_def = next(n for n in proto.network if n.name == name)
                try:
                    results[name] = _run_network(name, net_def, proto, built[name][1], seed,
                                                 inputs or {})
                except NnpError:
                    raise
                except Exception as e:
                    if which == "original":
                        where = ", ".join(nn.get_current_context().backend) or "its context"
                        raise VerifyImpossible(f"NNabla cannot run network '{name}' on {where}: "
                                               f"{nnabla_words(e).rstrip('.')}") from None
                    results[name] = nnabla_words(e)
        del scope, built   # the original's weights go before the folded file's are loaded
        runs.append(results)
    records = []
    for name in networks:
        got = runs[1][name]
        for key, a in runs[0][name].items():
            if isinstance(got, str):
                records.append({"network": name, "output": key, "max_abs": float("inf"),
                                "max_rel": float("inf"), "error": got})
                continue
            b = got.get(key)
            max_abs, max_rel = _difference(a, b)
            records.append({"network": name, "output": key, "max_abs": max_abs, "max_rel": max_rel})
    return records


def _run_network(name, net_def, proto, net, seed, given):
    """{output name: values} of one NnpNetwork run once; its BN running statistics as they were."""
    import nnabla as nn
    rng = np.random.RandomState(seed)
    index_inputs = {f.input[i] for f in net_def.function for i in _INDEX_INPUTS.get(f.type, ())
                    if i < len(f.input)}
    for key in sorted(net.inputs):
        x = net.inputs[key]
        if key in given:
            value = np.asarray(given[key])
            if value.shape != tuple(x.shape):
                raise NnpError(f"input '{key}' of network '{name}' has shape {tuple(x.shape)}; the "
                               f"data given for it has shape {value.shape}")
            x.d = value
        elif key in index_inputs:
            x.d = np.zeros(x.shape, np.float32)
        else:
            x.d = rng.standard_normal(x.shape).astype(np.float32)
    named = dict(net.outputs)
    for ex in proto.executor:
        if ex.network_name == name:
            for ov in ex.output_variable:
                v = net.variables.get(ov.variable_name)
                if v is not None:
                    named.setdefault(ov.variable_name, v)
    statistics = {}
    for f in net_def.function:
        if f.type in BN_TYPES and _bn_param(f).batch_stat:
            for i in _BN_STATISTICS:
                v = net.variables.get(f.input[i]) if i < len(f.input) else None
                if v is not None and f.input[i] not in statistics:
                    statistics[f.input[i]] = (v, v.d.copy())
    try:
        for v in named.values():
            v.persistent = True       # an executor's output may be an intermediate variable
        with _nnabla_stderr_held():
            nn.forward_all(list(named.values()), clear_buffer=True)
        return {key: v.d.copy() for key, v in sorted(named.items())}
    finally:
        for v, value in statistics.values():
            v.d = value


def _bn_param(f):
    return f.batch_normalization_param if f.type == "BatchNormalization" \
        else f.fused_batch_normalization_param


def _difference(a, b):
    """(max abs, max relative) error of ``b`` against ``a``; NaN or infinity where ``a`` has the same
    is no error, anywhere else an infinite one."""
    inf = float("inf")
    if b is None or a.shape != b.shape:
        return inf, inf
    if not a.size:
        return 0.0, 0.0
    a, b = a.astype(np.float64), b.astype(np.float64)
    with np.errstate(all="ignore"):
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        if same.all():
            return 0.0, 0.0
        finite = np.isfinite(a) & np.isfinite(b)
        if not finite[~same].all():
            return inf, inf
        diff = float(np.abs(a - b)[~same].max())
        magnitudes = np.abs(a[np.isfinite(a)])
        scale = float(magnitudes.max()) if magnitudes.size else 0.0
    return diff, (diff / scale if scale > 0 else diff)


class _nnabla_stderr_held:
    """NNabla's C++ prints a trace of a failing forward straight to file descriptor 2 ("Error during
    forward propagation: ... <-- ERROR"), besides raising: it is held while NNabla runs, and shown
    only if NNabla returns normally (the error itself is reported in one line)."""

    def __enter__(self):
        import sys
        self.saved = self.held = None
        try:
            sys.stderr.flush()
            self.saved = os.dup(2)
        except (OSError, AttributeError, ValueError):
            return self
        try:
            self.held = tempfile.TemporaryFile()
        except OSError:
            self.held = open(os.devnull, "w+b")
        os.dup2(self.held.fileno(), 2)
        return self

    def __exit__(self, kind, value, tb):
        if self.saved is None:
            return False
        os.dup2(self.saved, 2)
        os.close(self.saved)
        if kind is None:
            self.held.seek(0)
            text = self.held.read()
            if text:
                os.write(2, text)
        self.held.close()
        return False


__all__ = ["NnpError", "NnpFile", "read", "plan_file", "fold_parameters",
           "rewrite_proto", "serialize", "structure", "write_temp", "verify", "VerifyImpossible",
           "FoldError", "Skip"]
