"""The GPU backend: the plan applied by the CUDA kernels in ``kernels/`` through CuPy.

- ``prepare(plan, arrays)`` checks everything and computes everything up to the writes;
  ``commit()`` then writes. ``fold(plan, arrays)`` does both. With CuPy arrays it rescales
  device-resident parameters in place, in a fixed number of launches whatever the number of layers
  (``segments`` packs the plan into tables).
- ``fold(plan, arrays)`` with NumPy arrays streams the weights through the device in bounded chunks,
  uploads overlapped with compute and downloads on two streams, so a model larger than GPU memory
  still folds.
- ``from_nnabla(var, writable)`` reaches a parameter that lives in NNabla's CUDA context without a
  copy, through DLPack.

Results equal the NumPy backend bit for bit, except for BN -> layer biases, whose sums are reduced in
another order (within float64 rounding).
"""
import dataclasses
import importlib
import operator
import os
import sys
import warnings
from math import prod
from pathlib import Path
from typing import Mapping, NamedTuple, Optional

import numpy as np

from . import numpy_backend, segments
from .common import (_STATISTIC_KINDS, FoldError, check_plan_arrays, check_statistics_exact,
                     cuda_context, fold_own_arrays, split_stages)
from .. import _interrupts, _nvrtc
from ..plan import OUTPUT_SIDE, Plan

name = "cupy"

_IMPORT_ERROR = "No module named 'cupy'"


def _import_cupy():
    """CuPy, imported leaving the process's warning filters and ``sys.excepthook`` as they were
    (what it imports may add filters, and on Python 3.10 the ``exceptiongroup`` backport, where
    installed, replaces the hook)."""
    hook = sys.excepthook
    try:
        with warnings.catch_warnings():
            import cupy
    finally:
        if sys.excepthook is not hook:
            sys.excepthook = hook
    return cupy


try:
    cupy = _import_cupy()
except ImportError as _e:  # the module imports without CuPy; unavailable_reason() says why
    cupy = None
    _IMPORT_ERROR = str(_e)

KERNEL_NAMES = ("bnfold_channels", "bnfold_weight_check", "bnfold_biases", "bnfold_input_biases",
                "bnfold_copy", "bnfold_weights")
# Host-resident folds stage at most this many bytes of weights on the device per chunk (two chunks
# in flight); BNFOLD_STAGING_BYTES overrides it.
STAGING_BYTES = int(os.environ.get("BNFOLD_STAGING_BYTES", 256 << 20))
# They page-lock the host weights for the time of the fold, so that copies run asynchronously;
# BNFOLD_PIN_HOST=0 leaves them pageable (no page-locking cost, copies wait for the host).
PIN_HOST = os.environ.get("BNFOLD_PIN_HOST", "1") != "0"
# Only weights of at least this many bytes are page-locked: locking has a fixed cost per call (a
# system call, page-table work), which a small weight's copy does not earn back.
PIN_MIN_BYTES = 1 << 20


def unavailable_reason():
    """None when CuPy imports and a CUDA device answers, else why not."""
    if cupy is None:
        return f"CuPy is not installed ({_IMPORT_ERROR}); pip install 'bnfold_gpu[cuda]'"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError without a driver, among others
        return f"no usable CUDA device ({type(e).__name__}: {e})"
    if n == 0:
        return "no CUDA device found"
    return _nvrtc_missing()


def _nvrtc_missing():
    """None when NVRTC, which builds the kernels, is there (the wheel's, the loader's, or where
    CuPy itself finds one), else why not: without it the first fold would fail to compile."""
    try:
        _nvrtc.load()
        return None
    except OSError as e:
        first = e
    try:
        nvrtc = getattr(cupy.cuda, "nvrtc", None)
        if nvrtc is None:
            nvrtc = importlib.import_module("cupy.cuda.nvrtc")
        nvrtc.getVersion()
        return None
    except Exception as e:   # CuPy's own loader found none either
        return (f"NVRTC, which compiles the kernels, is not found ({_nvrtc.SONAME}: {first}; "
                f"CuPy: {type(e).__name__}: {e}); pip install 'bnfold_gpu[cuda]'")


def kernel_dir() -> Path:
    """``kernels/`` beside the package (source tree), or ``bnfold_gpu/_kernels/``, where ``setup.py``
    installs it."""
    here = Path(__file__).resolve().parents[1]
    for cand in (here.parent / "kernels", here / "_kernels"):
        if (cand / "bnfold.cu").exists():
            return cand
    raise FileNotFoundError("bnfold_gpu's CUDA sources (kernels/bnfold.cu) are not installed")


def kernel_source() -> str:
    """``kernels/bnfold.cu`` with ``bnfold_math.cuh`` pasted in place of its ``#include``: CuPy keys
    its on-disk kernel cache by the source text alone, so a header changed on its own would
    otherwise load a stale kernel."""
    d = kernel_dir()
    header = "".join(line for line in (d / "bnfold_math.cuh").read_text().splitlines(True)
                     if line.strip() != "#pragma once")
    source = (d / "bnfold.cu").read_text()
    include = '#include "bnfold_math.cuh"'
    assert include in source, "kernels/bnfold.cu no longer includes bnfold_math.cuh"
    return source.replace(include, header)


_MODULES = {}


def _kernels(defines=()):
    """The compiled kernels for the current device (compiled once per device, cached by CuPy);
    ``defines`` (``("BNFOLD_UNROLL=8",)``) build a variant, as the GPU benchmark does."""
    key = (cupy.cuda.runtime.getDevice(), tuple(defines))
    if key not in _MODULES:
        try:
            _nvrtc.load()   # CuPy 13 alone misses the NVRTC of the nvidia-cuda-nvrtc wheel
        except OSError:
            pass            # CuPy then says what is missing
        module = cupy.RawModule(code=kernel_source(),
                                options=("--std=c++14",) + tuple("-D" + x for x in defines))
        _MODULES[key] = {k: module.get_function(k) for k in KERNEL_NAMES}
    return _MODULES[key]


def on_device(ctx) -> bool:
    """Whether NNabla's context ``ctx`` keeps arrays on a CUDA device."""
    return cuda_context(ctx)


def from_nnabla(var, writable: bool):
    """A zero-copy CuPy view of an NNabla parameter in a CUDA context; a NumPy view otherwise (the
    host-staged path then folds it)."""
    import nnabla as nn
    ctx = nn.get_current_context()
    if on_device(ctx):
        from nnabla.utils.dlpack import to_dlpack
        return cupy.from_dlpack(to_dlpack(var.data, ctx=ctx))
    return var.data.get_data("rw" if writable else "r")


def _ptr(a) -> int:
    return a.data.ptr


def _upload(table: np.ndarray):
    return cupy.asarray(table.view(np.uint8)) if table.size else cupy.zeros(1, cupy.uint8)


def _grid(n, block=segments.BLOCK):
    return (max(1, -(-int(n) // block)),)


class _Channels:
    """Per-channel scale/offset of every BN of the plan, on the device. Every table of the plan is
    uploaded first, so that an allocation that fails does so before anything is written; the launch
    computes the maps, and ``status`` (one int per fold, then room for the overflow flags of the
    weights, the output-side biases and the BN -> layer biases) says what it found."""

    def __init__(self, plan: Plan, t: segments.Tables, kernels):
        n = max(1, t.total_channels)
        self.tables, self.kernels = t, kernels
        self.scale_d = cupy.empty(n, cupy.float64)
        self.scale_f = cupy.empty(n, cupy.float32)
        self.offset = cupy.empty(n, cupy.float64)
        self.mean_d = cupy.empty(n, cupy.float64)
        self.beta_d = cupy.empty(n, cupy.float64)
        folds = len(plan.folds)
        self.status = cupy.zeros(max(1, folds) + len(t.weights) + len(t.biases) + len(t.inputs) + 1,
                                 cupy.int32)
        at = max(1, folds)
        self.weight_flags = self.status[at:]
        self.bias_flags = self.status[at + len(t.weights):]
        self.input_flags = self.status[at + len(t.weights) + len(t.biases):]
        self._seg = _upload(t.channels)
        self._biases = _upload(t.biases) if t.total_bias else None
        self._inputs = _upload(t.inputs) if t.total_input_blocks else None
        self._weights = _upload(t.weights) if t.total_blocks else None

    def channels(self):
        t = self.tables
        if t.total_channels:
            self.kernels["bnfold_channels"](
                _grid(t.total_channels), (segments.BLOCK,),
                (self._seg, np.int32(len(t.channels)), np.int64(t.total_channels), self.scale_d,
                 self.scale_f, self.offset, self.mean_d, self.beta_d, self.status))

    def biases(self, table=None):
        """Output-side biases (of ``table``, the plan's with other destinations, if given)."""
        t = self.tables
        if self._biases is not None:
            self.kernels["bnfold_biases"](_grid(t.total_bias), (segments.BLOCK,),
                                          (self._biases if table is None else table,
                                           np.int32(len(t.biases)), np.int64(t.total_bias),
                                           self.scale_d, self.mean_d, self.beta_d, self.bias_flags))

    def input_biases(self, table=None):
        """BN -> layer biases; before the weights are rescaled, as they read them."""
        t = self.tables
        if self._inputs is not None:
            self.kernels["bnfold_input_biases"]((int(t.total_input_blocks),), (segments.BLOCK,),
                                                (self._inputs if table is None else table,
                                                 np.int32(len(t.inputs)), self.offset,
                                                 self.input_flags))

    def check_weights(self):
        """The read-only overflow check of the plan's weights."""
        t = self.tables
        if t.total_blocks:
            self.kernels["bnfold_weight_check"](
                (int(t.total_blocks),), (segments.BLOCK,),
                (self._weights, np.int32(len(t.weights)), self.scale_d, self.scale_f,
                 self.weight_flags))

    def weights(self, seg=None, n_segs=None, blocks=None, kernels=None):
        """The plan's weights, or those of another table (uploaded; its rows and blocks): a staged
        batch, or the GPU benchmark's builds (``kernels``)."""
        if seg is None:
            seg, n_segs, blocks = self._weights, len(self.tables.weights), self.tables.total_blocks
        if blocks:
            (kernels or self.kernels)["bnfold_weights"](
                (int(blocks),), (segments.BLOCK,), (seg, np.int32(n_segs), self.scale_d, self.scale_f))


def _check_eps(plan: Plan):
    for spec in plan.folds:
        if not np.isfinite(spec.eps):
            raise FoldError(f"{spec.bn}: eps is not finite")


def prepare(plan: Plan, arrays: Mapping[str, object]):
    """Check ``plan`` against ``arrays`` and do everything up to the writes (tables, device buffers,
    per-channel maps, the overflow checks, every new bias); the result's ``commit()`` writes. CuPy
    arrays are folded where they are; NumPy arrays are streamed through the device. Raises
    (FoldError naming the BN, or CuPy's OutOfMemoryError) having changed nothing."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"backend 'cupy' is not usable: {reason}")
    columns = _columns(plan)
    whole = plan
    if columns.first is not None:   # writes only arrays of the fold's own: nothing the caller sees
        prepare(columns.first, arrays).commit()
    plan = columns.rest or plan
    facts = _read(columns, arrays)
    if facts is None or not (columns.plan_ok and _fits(columns, facts)):
        return _prepare_per_layer(plan, arrays, whole)
    if facts.wide_integer[columns.statistic].any():   # rare: the values themselves are read
        check_statistics_exact(plan, arrays)
    if len(facts.devices) > 1:
        raise FoldError(f"the arrays live on several GPUs "
                        f"({', '.join(map(str, sorted(facts.devices)))}); a plan folds on one")
    return _DeviceFold(plan, columns, arrays, facts, next(iter(facts.devices), None))


def fold(plan: Plan, arrays: Mapping[str, object]) -> None:
    """Apply ``plan`` to ``arrays``: :func:`prepare`, then commit."""
    prepare(plan, arrays).commit()


def _prepare_per_layer(plan, arrays, whole):
    """The checks one layer at a time: the path of host arrays, and of device arrays that the checks
    over all layers at once (:func:`_fits`) refused, to name the BN in the error."""
    facts, pointers, devices = _facts(arrays)
    check_plan_arrays(plan, arrays, facts)
    check_statistics_exact(plan, arrays)
    _check_eps(plan)
    if 0 < len(pointers) < len(arrays):
        on_host = next(n for n in arrays if n not in pointers)
        raise FoldError(f"the arrays are partly on the GPU ('{next(iter(pointers))}') and partly on "
                        f"the host ('{on_host}'); give all of them as CuPy arrays, or all as NumPy")
    if len(pointers) == len(arrays):
        raise RuntimeError("bnfold_gpu: the checks over all layers at once refused arrays that the "
                           "checks one layer at a time accept; please report this")
    return _HostFold(plan, arrays, fold_own_arrays(whole))   # of the whole plan (see there)


def _facts(arrays):
    """(``common.array_facts``, device pointers, device ids) in one pass over the arrays."""
    facts, pointers, devices = {}, {}, set()
    ndarray = cupy.ndarray
    for n, a in arrays.items():
        if isinstance(a, ndarray):
            memory = a.data
            pointers[n] = memory.ptr
            devices.add(memory.device_id)
            try:
                contiguous = a._c_contiguous   # CuPy's own flag: a.flags builds an object per call
            except AttributeError:
                contiguous = a.flags.c_contiguous
            facts[n] = (a.size, contiguous, a.dtype)
        else:
            facts[n] = (a.size, a.flags.c_contiguous, a.dtype)
    return facts, pointers, devices


def _columns(plan) -> "_Columns":
    return segments.per_plan(plan, "cupy_backend", _Columns)


class _Columns:
    """What ``plan`` asks of its arrays, as columns over every array it names (``names``, once each,
    in the order of ``plan.arrays``), so that a call checks all layers at once; built once per plan.
    ``first``/``rest``: the stages of ``common.split_stages`` (``rest`` None: the plan itself, which
    this must not hold, being cached while the plan lives)."""

    def __init__(self, plan):
        self.first, rest = split_stages(plan) if plan.intermediates else (None, plan)
        self.rest = None if rest is plan else rest
        c = segments.fold_columns(rest)
        self.names = names = c["names"]
        self.get = (operator.itemgetter(*names) if len(names) > 1 else
                    lambda arrays, names=names: tuple(arrays[n] for n in names))
        # what common.check_plan_arrays asks of each array, by its roles
        at = c["at"]
        b_size, w_size = (np.fromiter(map(prod, c[field]), np.int64, len(c[field]))
                          for field in ("bias_shape", "weight_shape"))
        roles = [(at[field][at[field] >= 0], size[at[field] >= 0]) for field, size in
                 zip(segments.NAMES, [c["n_channels"]] * 4 + [b_size] * 2 + [w_size] * 2)]
        sizes = np.zeros(len(names), np.int64)
        for a, size in roles:
            sizes[a] = size
        conflict = any((sizes[a] != size).any() for a, size in roles)
        self.sizes = None if conflict else sizes.tolist()   # None: no array fits every role it has
        self.statistic, self.tensor = np.zeros((2, len(names)), bool)   # tensor: a weight or bias
        self.statistic[np.concatenate([a for a, _ in roles[:4]])] = True
        self.tensor[np.concatenate([a for a, _ in roles[4:]])] = True
        with_weight = c["with_weight"]
        self.pairs = np.array([at["weight"][with_weight], at["folded_weight"][with_weight]])
        self.plan_ok = (bool(np.isfinite(np.array(c["eps"], float)).all()) and
                        not (self.pairs < 0).any() and   # a weight without a folded weight
                        _layouts_cover(segments.take(c["weight_layout"], with_weight),
                                       w_size[with_weight]))
        # the dtypes the plan expects: a call whose arrays have them skips working them out
        self.dtypes = self.dtype_columns = None
        if all(map(rest.arrays.__contains__, names)):
            described = (rest.arrays.values() if len(names) == len(rest.arrays) else
                         map(rest.arrays.__getitem__, names))   # the same, in the same order
            self.dtypes = list(map(operator.itemgetter(1), described))
            try:
                self.dtype_columns = _dtype_columns(self.dtypes)
            except TypeError:   # not dtypes: each call works its arrays' dtypes out
                self.dtypes = None
        self.template = segments.template(rest)   # over the same names


def _layouts_cover(layouts, sizes) -> bool:
    """Whether each of ``layouts`` covers as many elements as ``sizes`` says."""
    try:
        return np.array_equal(segments.layout_sizes(layouts), sizes)
    except AttributeError:   # no layout: the per-layer checks raise as they always did
        return False


# Attribute reads over every array of a call, each one ``map`` (the loop runs in C): on thousands of
# arrays they are most of what a call costs in Python.
_DATA, _PTR, _DEVICE_ID, _SIZE, _DTYPE = map(operator.attrgetter,
                                             ("data", "ptr", "device_id", "size", "dtype"))
_C_CONTIGUOUS = operator.attrgetter("_c_contiguous")   # CuPy's own flag: a.flags builds an object
_FLAGS_C_CONTIGUOUS = operator.attrgetter("flags.c_contiguous")


class _Facts(NamedTuple):
    """What a call's arrays are, by position in ``_Columns.names``."""
    pointer: np.ndarray                 # device addresses (uint64)
    sizes: list
    contiguous: Optional[np.ndarray]    # None: all are C-contiguous
    dtypes: list
    code: np.ndarray                    # segments.dtype_code; -1 where there is none
    statistic_ok: np.ndarray            # a dtype a statistic may have
    to_float: np.ndarray                # not floating point: read as float64
    wide_integer: np.ndarray            # a 64-bit integer: float64 may not hold it exactly
    devices: set                        # of every array of the call


def _read(columns, arrays) -> Optional[_Facts]:
    """The facts of the arrays ``columns`` names, one attribute at a time over all of them; None
    where not every array is a CuPy array, or a name is missing (the per-layer checks say why)."""
    values = arrays.values()
    types = set(map(type, values))
    if not all(issubclass(t, cupy.ndarray) for t in types):
        return None
    if len(arrays) == len(columns.names) and tuple(arrays) == columns.names:
        named = tuple(values)   # in the plan's order: no lookups
    else:
        try:
            named = columns.get(arrays)
        except KeyError:
            return None
    memory = list(map(_DATA, named))
    pointer = np.fromiter(map(_PTR, memory), np.uint64, len(memory))
    # every array is named where there are as many (names are distinct)
    devices = set(map(_DEVICE_ID, memory if len(named) == len(arrays) else map(_DATA, values)))
    contiguous = list(map(_C_CONTIGUOUS if all(hasattr(t, "_c_contiguous") for t in types)
                          else _FLAGS_C_CONTIGUOUS, named))
    dtypes = list(map(_DTYPE, named))
    dtype_columns = (columns.dtype_columns if dtypes == columns.dtypes else   # identity first
                     _dtype_columns(dtypes))
    return _Facts(pointer, list(map(_SIZE, named)),
                  None if all(contiguous) else np.array(contiguous, bool), dtypes,
                  *dtype_columns, devices)


def _dtype_columns(dtypes):
    """(dtype code or -1, a statistic's dtype, not floating point, a 64-bit integer) of each of
    ``dtypes``, worked out once per distinct dtype. (The dtypes with a code are
    ``common.FLOAT_DTYPES``: those a weight or bias may have.)"""
    n = len(dtypes)
    if n and dtypes.count(dtypes[0]) == n:   # one dtype (list.count compares by identity first)
        distinct, inverse = dtypes[:1], np.zeros(n, np.intp)
    else:
        ids = np.fromiter(map(id, dtypes), np.intp, n)
        _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        distinct = [dtypes[i] for i in first]
    table = np.array([(segments.DTYPE_CODES.get(d, -1),
                       d.kind in _STATISTIC_KINDS and d.itemsize <= 8,
                       d.kind != "f",
                       d.kind in "iu" and d.itemsize == 8) for d in map(np.dtype, distinct)],
                     np.int64).reshape(-1, 4)[inverse.reshape(-1)]
    return table[:, 0], table[:, 1].astype(bool), table[:, 2].astype(bool), table[:, 3].astype(bool)


def _fits(columns, facts) -> bool:
    """Whether the arrays pass ``common.check_plan_arrays``, checked over all layers at once: every
    array of its planned size; weights and biases C-contiguous and float16, float32 or float64, a
    folded weight of its source's dtype; statistics of a real number type."""
    if columns.sizes is None or facts.sizes != columns.sizes:
        return False
    if facts.contiguous is not None and not facts.contiguous[columns.tensor].all():
        return False
    weight, folded = columns.pairs
    return bool((facts.code[columns.tensor] >= 0).all() and
                facts.statistic_ok[columns.statistic].all() and
                (facts.code[weight] == facts.code[folded]).all())


class _DeviceFold:
    """A fold of device-resident arrays, checked and computed up to its writes: the maps, the
    overflow check of the weights, and every new bias computed into scratch memory. ``commit`` copies
    the biases into place and rescales the weights: two launches."""

    def __init__(self, plan, columns, arrays, facts, device):
        self.device = device
        with cupy.cuda.Device(device):
            k = _kernels()
            pointer, code, arrays = _float_statistics(columns, arrays, facts)
            _check_dtypes(columns, arrays, facts, code)
            t = columns.template.fill(pointer, code)
            scratch_bytes, bias_at, input_at = segments.bias_scratch(t)
            self.scratch = cupy.empty(max(1, scratch_bytes), cupy.uint8)
            base = _ptr(self.scratch)
            # the new biases are computed into scratch memory; commit copies them into place
            copies, self.total_copy = segments.copy_rows(t, base + bias_at, base + input_at)
            self.copy_table, self.n_copies = _upload(copies), len(copies)
            ch = _Channels(plan, dataclasses.replace(
                t, biases=segments.with_destinations(t.biases, base + bias_at),
                inputs=segments.with_destinations(t.inputs, base + input_at)), k)
            self.kernels, self.channel_maps = k, ch
            ch.channels()
            ch.check_weights()
            ch.biases()
            ch.input_biases()
            status = ch.status.get()   # waits for the launches above
            _raise_for_status(plan, status, t, arrays)

    def commit(self) -> None:
        """The writes: Ctrl-C waits until they are done."""
        with _interrupts.held(), cupy.cuda.Device(self.device):
            if self.n_copies:
                self.kernels["bnfold_copy"](_grid(self.total_copy), (segments.BLOCK,),
                                            (self.copy_table, np.int32(self.n_copies),
                                             np.int64(self.total_copy)))
            self.channel_maps.weights()
            cupy.cuda.get_current_stream().synchronize()


def _float_statistics(columns, arrays, facts):
    """Contiguous floating-point copies of the statistics the kernels cannot read by address as they
    are: strided views, and integers (read as float64). They are only read, so the caller's arrays
    are unaffected. Returns the pointers, dtype codes and arrays, updated."""
    convert = columns.statistic & facts.to_float
    if facts.contiguous is not None:
        convert |= columns.statistic & ~facts.contiguous
    if not convert.any():
        return facts.pointer, facts.code, arrays
    pointer, code, copies = facts.pointer.copy(), facts.code.copy(), {}
    for i in np.flatnonzero(convert):
        key = columns.names[i]
        a = arrays[key]
        copies[key] = copy = cupy.ascontiguousarray(a) if a.dtype.kind == "f" else \
            cupy.asarray(a, dtype=cupy.float64)
        pointer[i], code[i] = _ptr(copy), segments.DTYPE_CODES.get(copy.dtype, -1)
    return pointer, code, {**arrays, **copies}


def _check_dtypes(columns, arrays, facts, code):
    """TypeError for a dtype the kernels do not read (a statistic in a floating-point type other
    than float16, float32 or float64), or that any other array of the call has."""
    for i in np.flatnonzero(code < 0)[:1]:
        segments.dtype_code(facts.dtypes[i])
    if len(arrays) > len(columns.names):
        for d in {arrays[n].dtype for n in arrays.keys() - set(columns.names)}:
            segments.dtype_code(d)


def _raise_for_status(plan, status, t, arrays):
    """FoldError for the first fold whose statistics, weights or new biases failed a check. The
    device flags overflow candidates; each is confirmed, and named, by the NumPy backend's own checks
    on a copy of that fold's arrays (only ever on the way to an error)."""
    folds = len(plan.folds)
    message = segments.status_message(plan, status[:folds])
    if message:
        raise FoldError(message)
    at = max(1, folds)
    weight_flags = status[at:at + len(t.weights)]
    bias_flags = status[at + len(t.weights):at + len(t.weights) + len(t.biases)]
    input_flags = status[at + len(t.weights) + len(t.biases):-1]
    candidates = sorted({int(t.weight_folds[r]) for r in np.flatnonzero(weight_flags)} |
                        {int(t.bias_folds[r]) for r in np.flatnonzero(bias_flags)} |
                        {int(t.input_folds[r]) for r in np.flatnonzero(input_flags)})
    for j in candidates:
        _confirm(plan.folds[j], lambda name: np.asarray(arrays[name].get()))


def _confirm(spec, host_copy) -> None:
    """Raise the NumPy backend's FoldError for ``spec`` if it has one: it checks the fold on host
    copies of its arrays (``host_copy(name)``) without writing."""
    names = {n for n in (spec.weight, spec.bias, spec.gamma, spec.beta, spec.mean, spec.var) if n}
    host = {n: host_copy(n) for n in names}
    for name, like, shape in ((spec.folded_weight, spec.weight, spec.weight_shape),
                              (spec.folded_bias, spec.bias or spec.weight, spec.bias_shape)):
        if name is not None and name not in host:
            host[name] = np.empty(shape, host[like].dtype)
    numpy_backend.prepare(Plan((spec,), (), {}), host)


class _HostFold:
    """A fold of host arrays, checked and computed up to its writes: statistics and biases (small)
    are uploaded whole and the new biases computed; the weights are checked for overflow on the
    host, and streamed through two device buffers of ``STAGING_BYTES`` on two streams by
    ``commit``, so one chunk's upload overlaps the previous chunk's kernel and download. Every device
    allocation and every new bias is made before the first host array is written."""

    def __init__(self, plan, host, own):
        k = _kernels()
        small = {}
        for spec in plan.folds:
            for key in (spec.gamma, spec.beta, spec.mean, spec.var, spec.bias, spec.folded_bias):
                if key is not None and key not in small:
                    a = np.ascontiguousarray(host[key])
                    small[key] = cupy.asarray(a if a.dtype.kind == "f" else a.astype(np.float64))
        tables = segments.build(plan, {n: _ptr(a) for n, a in small.items()},
                                {n: a.dtype for n, a in small.items()}, weights=False)
        ch = _Channels(plan, tables, k)          # raises before anything is written
        bounds = tables.channel_bounds
        self.staging = _Staging(plan, host, bounds)
        ch.channels()
        ch.biases()                              # into the device copies: nothing of the caller's
        status = ch.status.get()
        message = segments.status_message(plan, status[:len(plan.folds)])
        if message:
            raise FoldError(message)
        offset, scale = ch.offset.get(), ch.scale_d.get()
        self.biases = []                         # before the weights are rescaled: BN -> layer reads them
        self._saved = []                         # the caller's: restored if the writes fail
        for j, spec in enumerate(plan.folds):
            w = None if spec.weight is None else host[spec.weight]
            if spec.folded_bias is not None:
                b = host[spec.bias] if spec.bias else None
                dst = host[spec.folded_bias]
                if spec.side == OUTPUT_SIDE:
                    values = small[spec.folded_bias].get().astype(np.float64)
                else:
                    values = numpy_backend.folded_input_bias(b, w, offset[bounds[j]:bounds[j + 1]],
                                                             spec)
                try:
                    checked = numpy_backend.check_bias(spec, values, dst.dtype, b, w)
                except FoldError:   # named as the NumPy backend names it (these are stored values)
                    _confirm(spec, lambda name: np.asarray(host[name]))
                    raise
                self.biases.append((dst, checked.reshape(dst.shape)))
                if spec.folded_bias not in own:
                    self._saved.append((dst, dst.copy()))
            if w is not None:
                numpy_backend.check_weight_overflow(spec, w, scale[bounds[j]:bounds[j + 1]])
        self.channel_maps = ch
        self.host = host
        self.weights = [host[n] for s in plan.folds for n in (s.weight, s.folded_weight)
                        if n is not None]

    def commit(self) -> None:
        """The writes: Ctrl-C waits until they are done."""
        with _interrupts.held():
            pinned = _register(self.weights) if PIN_HOST else []
            try:
                numpy_backend.write_biases(self.biases, self._saved)   # the first writes
                try:
                    self.staging.run(self.host, self.channel_maps)
                except BaseException:   # before the first download, this leaves all as it was
                    numpy_backend.restore(self._saved)
                    raise
            finally:
                _unregister(pinned)


_ALIGN = 256   # device offsets of staged pieces


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def staging_batches(plan, itemsize, bounds, budget):
    """The weights cut into pieces (``segments.pieces``) and packed into batches that fit one staging
    buffer of ``budget`` bytes: [[(spec, first element, count, layout, global channel offset)]]."""
    batches, cur, used = [], [], 0
    for j, spec in enumerate(plan.folds):
        if spec.weight is None:
            continue
        item = itemsize[spec.weight]
        for first, count, layout, c0 in segments.pieces(spec.weight_layout, (budget - _ALIGN) // item):
            size = _aligned(count * item)
            if cur and used + size > budget:
                batches.append(cur)
                cur, used = [], 0
            cur.append((spec, first, count, layout, int(bounds[j]) + c0))
            used += size
    if cur:
        batches.append(cur)
    return batches


class _Staging:
    """Two device buffers, their streams, and the weight table of every batch they will hold,
    allocated (and the table uploaded) before the fold writes anything."""

    def __init__(self, plan, host, bounds):
        budget = max(segments.CHUNK * 8, STAGING_BYTES)
        batches = staging_batches(plan, {n: a.dtype.itemsize for n, a in host.items()}, bounds,
                                  budget)
        # a piece that cannot be cut below the budget (one very long row) gets a buffer its size
        size = max([budget] + [sum(_aligned(c * host[s.weight].itemsize) for s, _, c, _, _ in b)
                               for b in batches])
        self.buffers = [cupy.empty(size, cupy.uint8) for _ in range(min(2, len(batches)))]
        self.streams = [cupy.cuda.Stream(non_blocking=True) for _ in self.buffers]
        rows, self.launches = [], []   # per batch: (first row, rows, blocks, staged pieces)
        for n, batch in enumerate(batches):
            buf, at, blocks, staged = self.buffers[n % 2], 0, 0, []
            for spec, first, count, layout, c0 in batch:
                dtype = host[spec.weight].dtype
                dev = buf[at:at + count * dtype.itemsize]
                rows.append(segments.array_row(_ptr(dev), _ptr(dev), layout, c0, dtype, dtype,
                                               blocks))
                staged.append((dev, spec, first, count))
                at += _aligned(count * dtype.itemsize)
                blocks += -(-count // segments.CHUNK)
            self.launches.append((len(rows) - len(batch), len(batch), blocks, staged))
        self.table = _upload(np.array(rows, segments.ARRAY_SEG))
        cupy.cuda.get_current_stream().synchronize()   # the streams below do not wait for it

    def run(self, host, ch):
        """Upload, rescale, download each batch; returns when every weight is back on the host."""
        for n, (row0, n_rows, blocks, staged) in enumerate(self.launches):
            stream = self.streams[n % 2]
            with stream:   # same stream: this buffer's previous download is done before the upload
                for dev, spec, first, count in staged:
                    src = host[spec.weight].reshape(-1)[first:first + count]
                    dev.set(src.view(np.uint8), stream=stream)
                ch.weights(self.table[row0 * segments.ARRAY_SEG.itemsize:], n_rows, blocks)
                for dev, spec, first, count in staged:
                    dst = host[spec.folded_weight].reshape(-1)[first:first + count]
                    _download(dev, dst.view(np.uint8), stream)
        for s in self.streams:
            s.synchronize()


def _download(dev, out, stream):
    """Device -> host on ``stream`` without waiting for it (CuPy's ``blocking`` keyword; where a CuPy
    lacks it the copy simply waits)."""
    try:
        dev.get(stream=stream, out=out, blocking=False)
    except TypeError:
        dev.get(stream=stream, out=out)


def _register(arrays):
    """Page-lock the host arrays so copies to and from them run asynchronously; best effort."""
    done, seen = [], set()
    for a in arrays:
        p = a.ctypes.data
        if p in seen or a.nbytes < PIN_MIN_BYTES:
            continue
        seen.add(p)
        try:
            cupy.cuda.runtime.hostRegister(p, a.nbytes, 0)
            done.append(p)
        except Exception:  # already registered, or not allowed: copies are then synchronous
            pass
    return done


def _unregister(ptrs):
    for p in ptrs:
        try:
            cupy.cuda.runtime.hostUnregister(p)
        except Exception:
            pass
