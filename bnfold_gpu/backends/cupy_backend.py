"""The GPU backend: the plan applied by the CUDA kernels in ``kernels/`` through CuPy.

- ``fold(plan, arrays)`` with CuPy arrays rescales device-resident parameters in place, in four
  launches whatever the number of layers (``segments`` packs the plan into tables).
- ``fold(plan, arrays)`` with NumPy arrays streams the weights through the device in bounded chunks,
  uploads overlapped with compute and downloads on two streams, so a model larger than GPU memory
  still folds.
- ``from_nnabla(var, writable)`` reaches a parameter that lives in NNabla's CUDA context without a
  copy, through DLPack.

Results equal the NumPy backend bit for bit, except for BN -> layer biases, whose sums are reduced in
another order (within float64 rounding).
"""
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from . import numpy_backend, segments
from .common import FoldError, check_plan_arrays
from ..plan import OUTPUT_SIDE, Plan

name = "cupy"

_IMPORT_ERROR = "No module named 'cupy'"
try:
    import cupy
except ImportError as _e:  # the module imports without CuPy; unavailable_reason() says why
    cupy = None
    _IMPORT_ERROR = str(_e)

KERNEL_NAMES = ("bnfold_channels", "bnfold_biases", "bnfold_input_biases", "bnfold_weights")
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
    return None


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
        module = cupy.RawModule(code=kernel_source(),
                                options=("--std=c++14",) + tuple("-D" + x for x in defines))
        _MODULES[key] = {k: module.get_function(k) for k in KERNEL_NAMES}
    return _MODULES[key]


def from_nnabla(var, writable: bool):
    """A zero-copy CuPy view of an NNabla parameter in a CUDA context; a NumPy view otherwise (the
    host-staged path then folds it)."""
    import nnabla as nn
    ctx = nn.get_current_context()
    if ctx.backend and ctx.backend[0].split(":")[0] in ("cuda", "cudnn"):
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
    """Per-channel scale/offset of every BN of the plan, on the device, checked. Every table of the
    plan is uploaded first, so that an allocation that fails does so before anything is written."""

    def __init__(self, plan: Plan, t: segments.Tables, kernels):
        n = max(1, t.total_channels)
        self.tables, self.kernels = t, kernels
        self.scale_d = cupy.empty(n, cupy.float64)
        self.scale_f = cupy.empty(n, cupy.float32)
        self.offset = cupy.empty(n, cupy.float64)
        self.mean_d = cupy.empty(n, cupy.float64)
        self.beta_d = cupy.empty(n, cupy.float64)
        status = cupy.zeros(max(1, len(plan.folds)), cupy.int32)
        seg = _upload(t.channels)
        self._biases = _upload(t.biases) if t.total_bias else None
        self._inputs = _upload(t.inputs) if t.total_input_blocks else None
        self._weights = _upload(t.weights) if t.total_blocks else None
        if t.total_channels:
            kernels["bnfold_channels"](
                _grid(t.total_channels), (segments.BLOCK,),
                (seg, np.int32(len(t.channels)), np.int64(t.total_channels), self.scale_d,
                 self.scale_f, self.offset, self.mean_d, self.beta_d, status))
        message = segments.status_message(plan, status.get())
        if message:
            raise FoldError(message)

    def biases(self):
        t = self.tables
        if self._biases is not None:
            self.kernels["bnfold_biases"](_grid(t.total_bias), (segments.BLOCK,),
                                          (self._biases, np.int32(len(t.biases)),
                                           np.int64(t.total_bias), self.scale_d, self.mean_d,
                                           self.beta_d))

    def input_biases(self):
        """BN -> layer biases; before the weights are rescaled, as they read them."""
        t = self.tables
        if self._inputs is not None:
            self.kernels["bnfold_input_biases"]((int(t.total_input_blocks),), (segments.BLOCK,),
                                                (self._inputs, np.int32(len(t.inputs)), self.offset))

    def weights(self, seg=None, n_segs=None, blocks=None, kernels=None):
        """The plan's weights, or those of another table (uploaded; its rows and blocks): a staged
        batch, or the GPU benchmark's builds (``kernels``)."""
        if seg is None:
            seg, n_segs, blocks = self._weights, len(self.tables.weights), self.tables.total_blocks
        if blocks:
            (kernels or self.kernels)["bnfold_weights"](
                (int(blocks),), (segments.BLOCK,), (seg, np.int32(n_segs), self.scale_d, self.scale_f))


def fold(plan: Plan, arrays: Mapping[str, object]) -> None:
    """Apply ``plan`` to ``arrays``: CuPy arrays are folded where they are; NumPy arrays are streamed
    through the device. Everything is checked before the first array is written."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"backend 'cupy' is not usable: {reason}")
    facts, pointers, devices = _facts(arrays)
    strided = check_plan_arrays(plan, arrays, facts)
    dtypes = {n: f[2] for n, f in facts.items()}
    for d in set(dtypes.values()):
        segments.dtype_code(d)
    if 0 < len(pointers) < len(arrays):
        on_host = next(n for n in arrays if n not in pointers)
        raise FoldError(f"the arrays are partly on the GPU ('{next(iter(pointers))}') and partly on "
                        f"the host ('{on_host}'); give all of them as CuPy arrays, or all as NumPy")
    if len(pointers) == len(arrays):
        if len(devices) > 1:
            raise FoldError(f"the arrays live on several GPUs ({', '.join(map(str, sorted(devices)))}); "
                            f"a plan folds on one")
        with cupy.cuda.Device(devices.pop() if devices else None):
            _fold_device(plan, arrays, dtypes, pointers, strided)
    else:
        _fold_host(plan, arrays)


def _facts(arrays):
    """(``common.array_facts``, device pointers, device ids) in one pass over the arrays: a model may
    hold thousands of layers, and this runs on every call."""
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


def _fold_device(plan, arrays, dtypes, pointers, strided):
    k = _kernels()
    if strided:
        arrays, pointers = _contiguous_statistics(arrays, pointers, strided)
    t = segments.build(plan, pointers, dtypes)
    ch = _Channels(plan, t, k)   # allocates and checks: raises with nothing written
    ch.biases()
    ch.input_biases()    # same stream: done before the weights it reads are rescaled
    ch.weights()
    cupy.cuda.get_current_stream().synchronize()


def _contiguous_statistics(arrays, pointers, strided):
    """The kernels read statistics by address: the ``strided`` ones (views the NumPy backend accepts)
    are replaced by contiguous copies; they are only read, so the caller's arrays are unaffected.
    Returns the arrays and their pointers, updated."""
    copies = {key: cupy.ascontiguousarray(arrays[key]) for key in strided}
    return {**arrays, **copies}, {**pointers, **{key: _ptr(a) for key, a in copies.items()}}


def _fold_host(plan, host):
    """Host arrays: statistics and biases (small) are uploaded whole; weights stream through two
    device buffers of ``STAGING_BYTES`` on two streams, so one chunk's upload overlaps the previous
    chunk's kernel and download. Every device allocation and every new bias is made before the
    first host array is written."""
    k = _kernels()
    small = {}
    for spec in plan.folds:
        for key in (spec.gamma, spec.beta, spec.mean, spec.var, spec.bias, spec.folded_bias):
            if key is not None and key not in small:
                small[key] = cupy.asarray(np.ascontiguousarray(host[key]))
    tables = segments.build(plan, {n: _ptr(a) for n, a in small.items()},
                            {n: a.dtype for n, a in small.items()}, weights=False)
    ch = _Channels(plan, tables, k)          # raises before anything is written
    bounds = tables.channel_bounds
    staging = _Staging(plan, host, bounds)
    ch.biases()
    offset = ch.offset.get()
    new_biases = []                          # before the weights are rescaled: BN -> layer reads them
    for j, spec in enumerate(plan.folds):
        if spec.side == OUTPUT_SIDE:
            new_biases.append(small[spec.folded_bias].get())
        else:
            b = host[spec.bias] if spec.bias else None
            new_biases.append(numpy_backend.folded_input_bias(
                b, host[spec.weight], offset[bounds[j]:bounds[j + 1]], spec))
    weights = [host[s.weight] for s in plan.folds] + [host[s.folded_weight] for s in plan.folds]
    pinned = _register(weights) if PIN_HOST else []
    try:
        for spec, values in zip(plan.folds, new_biases):   # the first writes
            numpy_backend.store(host[spec.folded_bias], values)
        staging.run(host, ch)
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
