"""The reference backend: folds a plan over NumPy arrays, in place where the plan says so.

Per-channel math runs in float64; weights are multiplied in max(float32, dtype) and stored in their
own dtype, so the CUDA kernels can reproduce every bit of it.

``prepare(plan, arrays)`` checks everything and computes what can be computed without writing (the
per-channel maps, every new bias, the overflow checks); its ``commit()`` then writes.
"""
import os
import threading
from contextlib import contextmanager
from typing import List, Mapping

import numpy as np

from .. import _interrupts
from ..plan import OUTPUT_SIDE, FoldSpec, Plan
from .common import (FoldError, check_plan_arrays, check_statistics_exact, fold_own_arrays,
                     quiet_float_errors, split_stages)

name = "numpy"


def bn_scale_offset(gamma, beta, mean, var, eps):
    """The BN as a per-channel affine map ``y = scale * x + offset`` (float64)::

        scale  = gamma / sqrt(var + eps)
        offset = beta - mean * scale

    ``gamma``/``beta`` may be None (``no_scale``/``no_bias``: 1 and 0); ``eps`` a scalar or per channel.
    """
    mean = np.asarray(mean, np.float64).reshape(-1)
    var = np.asarray(var, np.float64).reshape(-1)
    gamma = np.ones_like(mean) if gamma is None else np.asarray(gamma, np.float64).reshape(-1)
    beta = np.zeros_like(mean) if beta is None else np.asarray(beta, np.float64).reshape(-1)
    with np.errstate(all="ignore"):   # non-finite results are reported by the checks, by BN name
        scale = gamma / np.sqrt(var + np.asarray(eps, np.float64))
        return scale, beta - mean * scale


def folded_output_bias(bias, mean, scale, beta, layout):
    """Bias after folding a BN into the layer's outputs: ``(bias - mean) * scale + beta`` (float64),
    with ``bias`` 0 when the layer has none."""
    g, r, c, i = layout.shape4
    shape = (g, 1, c, 1)
    b = np.zeros(layout.shape4) if bias is None else np.asarray(bias, np.float64).reshape(layout.shape4)
    with np.errstate(all="ignore"):
        return (b - mean.reshape(shape)) * scale.reshape(shape) + beta.reshape(shape)


def folded_input_bias(bias, weight, shift, spec: FoldSpec):
    """Bias after folding a BN into the layer's inputs: ``bias + sum(weight * shift[channel])`` over
    every weight axis but the outputs (float64), ``shift`` being the BN's offset."""
    layout = spec.weight_layout
    g, r, c, i = layout.shape4
    with np.errstate(all="ignore"):
        w = np.asarray(weight, np.float64).reshape(layout.shape4) * shift.reshape(g, 1, c, 1)
        delta = w.reshape(spec.weight_shape).sum(axis=spec.bias_reduce_axes)
        b = 0.0 if bias is None else np.asarray(bias, np.float64)
        return (b + delta.reshape(spec.bias_shape))


def rescale(src, dst, scale, layout):
    """``dst[e] = src[e] * scale[channel(e)]``, multiplied in max(float32, dtype), stored in dst's dtype.
    ``dst`` may be ``src``."""
    steps = _steps(_rescale_tasks(src, dst, scale, layout, split_bytes=None))
    scratch = _scratch(steps)
    for step in steps:
        _multiply(step, scratch)


def stored(values64, dtype) -> np.ndarray:
    """float64 results as ``dtype`` holds them: float16 through float32, as the CUDA kernels round."""
    dtype = np.dtype(dtype)
    if dtype == np.float64:
        return values64.astype(dtype)
    with np.errstate(all="ignore"):   # an overflow is found by the caller, by name
        if dtype == np.float16:
            return values64.astype(np.float32).astype(np.float16)
        return values64.astype(dtype)


def store(dst, values64):
    """Write float64 results into ``dst`` (see :func:`stored`)."""
    dst[...] = stored(values64, dst.dtype).reshape(dst.shape)


def _rescale_tasks(src, dst, scale, layout, split_bytes):
    """(src, dst, scale) 4-D views covering one rescale, cut into pieces of about ``split_bytes``
    along the longest of the first three axes so that threads can share a large weight."""
    work = np.result_type(src.dtype, np.float32)
    g, r, c, i = layout.shape4
    s4 = src.reshape(layout.shape4)
    d4 = dst.reshape(layout.shape4)
    k4 = scale.astype(work, copy=False).reshape(g, 1, c, 1)
    pieces = 1 if split_bytes is None else max(1, min(src.nbytes // split_bytes, max(g, r, c)))
    if pieces == 1:
        return [(s4, d4, k4)]
    axis = int(np.argmax((g, r, c)))
    bounds = np.linspace(0, (g, r, c)[axis], pieces + 1).astype(int)
    tasks = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        cut = [slice(None)] * 4
        cut[axis] = slice(a, b)
        kcut = list(cut)
        kcut[1] = slice(None)  # the scale has one row
        tasks.append((s4[tuple(cut)], d4[tuple(cut)], k4[tuple(kcut)]))
    return tasks


def _steps(tasks) -> list:
    """The multiplies of ``tasks`` ((src, dst, scale) 4-D views), each one ufunc call that writes
    nothing if it fails (the scale it needs, where repeated, is put into the caller's scratch
    memory first): (kind, src, dst, scale)."""
    steps = []
    for s4, d4, k4 in tasks:
        if not s4.dtype == d4.dtype == k4.dtype:   # float16 through float32: the casts need buffers
            steps.append(("cast", s4, d4, k4))
        elif s4.shape[3] == 1 or s4.shape[3] >= _LONG_ROW:
            steps.append(("rows", s4, d4, k4))
        else:
            steps += _short_row_steps(s4, d4, k4)
    return steps


def _short_row_steps(s4, d4, k4):
    """The multiply where each channel's run of elements (the last axis) is short, as in the input
    side of a 3x3 convolution: NumPy would loop once per run. The scale is repeated along the run
    for a block of channels at a time (a block that stays in cache), so that each loop covers
    a whole block, scale and weights both contiguous."""
    g, r, c, i = s4.shape
    step = max(1, _SCALE_BLOCK // (g * i))
    return [("block", _runs(s4[:, :, a:a + step]), _runs(d4[:, :, a:a + step]),
             k4[:, :, a:a + step]) for a in range(0, c, step)]


def _scratch(steps):
    """Memory for the repeated scale of the blocks of ``steps`` (one thread's), or None."""
    sizes = [k.size * s.shape[2] // k.shape[2] for kind, s, _, k in steps if kind == "block"]
    if not sizes:
        return None
    return np.empty(max(sizes), np.float64)


def _multiply(step, scratch):
    kind, s, d, k = step
    # overflow was ruled out beforehand (``weight_overflow``); a NaN or inf weight stays one
    with np.errstate(all="ignore"):
        if kind == "cast":
            np.multiply(s, k, out=d, casting="same_kind")
            return
        if kind == "block":   # the scale repeated along each run, into scratch memory
            g, _, n = s.shape
            c = k.shape[2]
            repeated = scratch.view(k.dtype)[:g * n].reshape(g, 1, c, n // c)
            repeated[...] = k
            k = repeated.reshape(g, 1, n)
        with _unbuffered():
            np.multiply(s, k, out=d)


def _runs(a4):
    """(g, r, c, i) -> (g, r, c * i), a view of the same memory (the multiply writes through it)."""
    v = a4.reshape(a4.shape[:2] + (a4.shape[2] * a4.shape[3],))
    if not np.may_share_memory(v, a4):   # a copy: the last two axes were not one run of memory
        raise ValueError(f"bnfold_gpu: a weight view of strides {a4.strides} cannot be merged")
    return v


_ROW_BUFFER = 16        # elements: the smallest buffer NumPy accepts, shorter than a long row
_LONG_ROW = 256         # elements per channel from which a plain broadcast loops at memory speed
_SCALE_BLOCK = 1 << 16  # elements of repeated scale per block (256 KiB of float32)


@contextmanager
def _unbuffered():
    """This thread's ufunc buffer made shorter than a weight row, for the duration.

    A per-channel multiply broadcasts the scale along each row. With NumPy's default buffer (8192
    elements) the ufunc iterator lets one inner loop span several rows, so it copies the broadcast
    scale into its buffer first: twice the time of a plain multiply. With a buffer shorter than a
    row, each row is one loop straight over memory (same arithmetic, same bits). The setting is the
    calling thread's own (NumPy keeps it per thread, or per context) and is put back."""
    before = np.getbufsize()
    np.setbufsize(_ROW_BUFFER)
    try:
        yield
    finally:
        np.setbufsize(before)


def _balanced(steps, workers: int) -> List[list]:
    """The steps in at most ``workers`` bins of about equal bytes: largest first, each to the least
    loaded bin."""
    bins = [[] for _ in range(workers)]
    load = [0] * workers
    for step in sorted(steps, key=lambda t: -t[1].nbytes):
        k = load.index(min(load))
        bins[k].append(step)
        load[k] += step[1].nbytes
    return [b for b in bins if b]


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _run_bin(work, scratch):
    """Run the steps of ``work``; None once all are done, else (work, how many were done, the
    error that stopped them, scratch)."""
    for done, step in enumerate(work):
        try:
            _multiply(step, scratch)
        except BaseException as e:
            return work, done, e, scratch
    return None


class _Threads:
    """Threads that each run a bin of multiply steps once ``go()`` is called (NumPy releases the GIL
    inside ufuncs, and one core cannot saturate memory bandwidth). They are started before anything
    is written, since starting a thread can fail."""

    def __init__(self, bins, scratches):
        self._start = threading.Event()
        self._cancel = False
        self.failed = []   # (bin, index of the step that failed, its error, scratch)
        self._threads = []
        try:
            for work, scratch in zip(bins, scratches):
                t = threading.Thread(target=self._run, args=(work, scratch), name="bnfold",
                                     daemon=True)
                t.start()
                self._threads.append(t)
        except BaseException:
            self.cancel()
            raise

    def _run(self, work, scratch):
        self._start.wait()
        if self._cancel:
            return
        failure = _run_bin(work, scratch)
        if failure is not None:
            self.failed.append(failure)

    def go(self) -> list:
        """Run every step; returns, once each thread is done, the bins that stopped on an error."""
        self._start.set()
        for t in self._threads:
            t.join()
        return self.failed

    def cancel(self):
        self._cancel = True
        self._start.set()
        for t in self._threads:
            t.join()


class Maps(list):
    """[(scale, offset, mean, beta)] per fold (float64), slices of ``scale``, the scales of every
    fold one after the other (fold k's are ``scale[starts[k]:starts[k + 1]]``)."""

    def __init__(self, items, scale, starts):
        super().__init__(items)
        self.scale = scale
        self.starts = starts

    def largest_scales(self) -> np.ndarray:
        """max |scale| of each fold (0 where it has no channel), in one pass."""
        out = np.zeros(len(self))
        sizes = np.diff(self.starts)
        some = sizes > 0
        if some.any():
            out[some] = np.maximum.reduceat(np.abs(self.scale), self.starts[:-1][some])
        return out


def channel_maps(plan: Plan, arrays: Mapping[str, np.ndarray]) -> Maps:
    """[(scale, offset, mean, beta)] per fold, all BNs computed in one vectorized pass after checking
    their statistics; raises FoldError naming the BN, changes nothing."""
    if not plan.folds:
        return Maps([], np.zeros(0), np.zeros(1, np.intp))
    counts = [s.n_channels for s in plan.folds]
    cat = {}
    for label, missing in (("gamma", 1.0), ("beta", 0.0), ("mean", 0.0), ("var", 1.0)):
        parts = []
        for spec, n in zip(plan.folds, counts):
            key = getattr(spec, label)
            parts.append(np.full(n, missing) if key is None else np.asarray(arrays[key]).reshape(-1))
        cat[label] = np.concatenate(parts).astype(np.float64)
    cat["eps"] = np.repeat(np.array([s.eps for s in plan.folds], np.float64), counts)
    bounds = np.cumsum([0] + counts)
    _check_stats(plan, cat, bounds)
    scale, offset = bn_scale_offset(cat["gamma"], cat["beta"], cat["mean"], cat["var"], cat["eps"])
    _check_map(plan, scale, offset, cat, bounds)
    return Maps([(scale[a:b], offset[a:b], cat["mean"][a:b], cat["beta"][a:b])
                 for a, b in zip(bounds[:-1], bounds[1:])], scale, bounds)


def output_biases(plan: Plan, arrays, maps) -> dict:
    """fold index -> its new output-side bias, float64 (:func:`folded_output_bias`); the biases
    holding one value per channel, as convolutions' do, computed in one pass."""
    out = {}
    flat = []
    for k, spec in enumerate(plan.folds):
        if spec.side != OUTPUT_SIDE or spec.folded_bias is None:
            continue
        if spec.bias_layout.shape4 == (1, 1, spec.n_channels, 1):
            flat.append(k)
        else:
            scale, _, mean, beta = maps[k]
            b = arrays[spec.bias] if spec.bias else None
            out[k] = folded_output_bias(b, mean, scale, beta, spec.bias_layout)
    if flat:
        def joined(part):
            return np.concatenate([part(k) for k in flat])
        b = joined(lambda k: np.asarray(arrays[plan.folds[k].bias], np.float64).reshape(-1)
                   if plan.folds[k].bias else np.zeros(plan.folds[k].n_channels))
        with np.errstate(all="ignore"):
            values = (b - joined(lambda k: maps[k][2])) * joined(lambda k: maps[k][0]) + \
                joined(lambda k: maps[k][3])
        at = 0
        for k in flat:
            n = plan.folds[k].n_channels
            out[k] = values[at:at + n]
            at += n
    return out


def stored_output_biases(plan: Plan, arrays, outputs) -> dict:
    """fold index -> its new output-side bias (``outputs``, float64) as its destination stores it,
    one conversion and one check per dtype; a dtype where a value is not finite is left out, for
    :func:`check_bias` to name it."""
    groups = {}
    for k in outputs:
        groups.setdefault(np.dtype(arrays[plan.folds[k].folded_bias].dtype), []).append(k)
    out = {}
    for dtype, ks in groups.items():
        joined = stored(np.concatenate([outputs[k].reshape(-1) for k in ks]), dtype)
        if not np.isfinite(joined).all():
            continue
        at = 0
        for k in ks:
            n = outputs[k].size
            out[k] = joined[at:at + n]
            at += n
    return out


def _first_bad(plan, bad, bounds, message):
    if bad.any():
        k = int(np.searchsorted(bounds, np.argmax(bad), side="right")) - 1
        raise FoldError(f"{plan.folds[k].bn}: {message}")


def _check_stats(plan, cat, bounds):
    var = cat["var"]
    with np.errstate(invalid="ignore"):
        problems = (
            (~np.isfinite(cat["eps"]), "eps is not finite"),
            (~np.isfinite(var), "variance has non-finite values"),
            (var < 0, "variance has negative values"),
            (var + cat["eps"] <= 0, "variance + eps is not positive: the BN divides by zero or by the root of a negative number"),
            (~np.isfinite(cat["mean"]), "mean has non-finite values"),
            (~np.isfinite(cat["gamma"]), "gamma has non-finite values"),
            (~np.isfinite(cat["beta"]), "beta has non-finite values"),
        )
    for bad, message in problems:
        _first_bad(plan, bad, bounds, message)


def _check_map(plan, scale, offset, cat, bounds):
    """The map itself is finite: statistics that are each finite can still give gamma / sqrt(var + eps)
    or beta - mean * scale past float64's range (var + eps subnormal)."""
    _first_bad(plan, ~np.isfinite(scale), bounds,
               "its scale gamma / sqrt(var + eps) is not finite (var + eps is too close to 0)")
    _first_bad(plan, ~np.isfinite(offset), bounds, "its shift beta - mean * scale is not finite")


_DOT_PIECE = 1 << 22   # elements per dot product of the magnitude bound


def _magnitude_bound(a: np.ndarray) -> float:
    """An upper bound of max |a|, from one BLAS dot product per piece (max |a| <= sqrt(sum a^2),
    with the dot's own rounding allowed for): one read of the array, on every core BLAS uses, no
    temporary. inf or NaN where the array holds such values, or its squares overflow."""
    flat = a.reshape(-1)
    if flat.dtype == np.float16:   # no BLAS for float16: |a| <= 65504 is known, max and min read it
        return max(float(flat.max()), -float(flat.min())) if flat.size else 0.0
    u = float(np.finfo(flat.dtype).eps) / 2
    top = 0.0
    for k in range(0, flat.size, _DOT_PIECE):
        piece = flat[k:k + _DOT_PIECE]
        squares = float(np.dot(piece, piece))
        top = max(top, np.sqrt(squares / (1 - (piece.size + 2) * u)) * (1 + 4 * u))
    return top


def magnitude_bounds(plan: Plan, arrays, largest) -> list:
    """The magnitude bound of each fold's weight where its overflow check needs one (a scale
    above 1: ``largest`` holds each fold's max |scale|), else None; computed on every core (BLAS and
    NumPy's reductions release the GIL)."""
    need = [k for k, spec in enumerate(plan.folds) if spec.weight is not None and largest[k] > 1]
    bounds = [None] * len(plan.folds)
    missing = {}
    for k in need:
        missing.setdefault(plan.folds[k].weight, []).append(k)
    found = weight_bounds({name: arrays[name] for name in missing})
    for name, ks in missing.items():
        for k in ks:
            bounds[k] = found[name]
    return bounds


def weight_bounds(weights, workers=None) -> dict:
    """name -> magnitude bound (:func:`_magnitude_bound`) of each array of ``weights``, in pieces
    shared between threads."""
    pieces = []
    step = max(_DOT_PIECE // 8, 1)
    for name, w in weights.items():
        flat = w.reshape(-1)
        pieces += [(name, flat[a:a + step]) for a in range(0, flat.size, step)]
    out = {}
    if not pieces:
        return out
    workers = min(workers or _workers(), len(pieces))
    for (name, _), value in zip(pieces, _map_threads(lambda piece: _magnitude_bound(piece[1]),
                                                      pieces, workers)):
        out[name] = max(out.get(name, value), value)
    return out


def _map_threads(f, items, workers: int) -> list:
    """[f(item) for item in items], shared between this thread and up to ``workers - 1`` more
    (fewer where one cannot start); an exception in any is raised here."""
    out = [None] * len(items)
    errors = []
    lock = threading.Lock()
    f = quiet_float_errors(f)   # each thread's own setting
    todo = iter(range(len(items)))

    def run():
        try:
            while True:
                with lock:
                    k = next(todo, None)
                if k is None:
                    return
                out[k] = f(items[k])
        except BaseException as e:   # re-raised below
            errors.append(e)

    threads = []
    for _ in range(min(workers, len(items)) - 1):
        t = threading.Thread(target=run, name="bnfold", daemon=True)
        try:
            t.start()
        except RuntimeError:   # no more threads: this one does the rest
            break
        threads.append(t)
    run()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


# products up to these (in float64) are finite once stored: the dtype's largest value (float64:
# a margin for the bound's own rounding)
_FINITE_LIMIT = {np.dtype(np.float16): 65504.0, np.dtype(np.float32): float(np.finfo(np.float32).max),
                 np.dtype(np.float64): 1e308}


def weight_overflow(spec: FoldSpec, weight: np.ndarray, scale: np.ndarray, bound=None,
                    largest=None):
    """None, or (channel, |weight| there, scale there) of the first channel where folding would turn
    a finite weight into inf: the rescale's own arithmetic (multiply in max(float32, dtype), round,
    store in the weight's dtype) applied to the largest finite |weight| of each channel, which is
    exact since rounding is monotone. Cheap where it can be: a scale of at most 1 cannot overflow,
    nor can a bound of the largest |weight| of the whole array times the largest scale when that
    stays in range (one read of the array; ``bound``, where the caller has it already, and
    ``largest``, the float64 max |scale|, whose rounding to the multiply's dtype the margin covers);
    per-channel maxima are computed only past that."""
    dtype = np.dtype(weight.dtype)
    if largest is not None and (largest <= 1 or (
            bound is not None and bound * largest * (1 + 1e-6) <= _FINITE_LIMIT[dtype])):
        return None
    work = np.result_type(dtype, np.float32)
    with np.errstate(over="ignore"):   # a scale past the dtype's range: found below
        s = np.abs(scale.astype(work))
    if not s.size or not s.max() > 1:
        return None

    def folds_to_finite(m, k):
        with np.errstate(all="ignore"):
            return np.isfinite(stored(np.multiply(m.astype(work), k).astype(np.float64), dtype))

    if bound is None:
        bound = _magnitude_bound(weight)
    if bound * float(s.max()) * (1 + 1e-6) <= _FINITE_LIMIT[dtype]:   # the largest product is finite
        return None
    layout = spec.weight_layout
    g, r, c, i = layout.shape4
    a = np.abs(weight.reshape(layout.shape4).astype(work))
    a[~np.isfinite(a)] = 0   # a non-finite weight stays non-finite: not the fold's doing
    per_channel = a.max(axis=(1, 3)).reshape(-1)
    bad = ~folds_to_finite(per_channel, s)
    if not bad.any():
        return None
    k = int(np.argmax(bad))
    return k, float(per_channel[k]), float(scale[k])


def _overflow_error(spec: FoldSpec, what: str, where, dtype) -> FoldError:
    return FoldError(f"{spec.bn}: the folded {what} would overflow {np.dtype(dtype).name} ({where}); "
                     f"nothing was changed")


def check_weight_overflow(spec, weight, scale, bound=None, largest=None):
    found = weight_overflow(spec, weight, scale, bound, largest)
    if found is not None:
        k, top, s = found
        raise _overflow_error(spec, f"weight '{spec.folded_weight}'",
                              f"channel {k}: |weight| up to {top:.4g} times scale {s:.4g}", weight.dtype)


def check_bias(spec: FoldSpec, values64: np.ndarray, dtype, bias, weight=None) -> np.ndarray:
    """``values64`` as ``dtype`` stores them, checked: a value that is not finite where the values it
    comes from were (the layer's bias and, for BN -> layer, the weights it sums) is a FoldError. The
    statistics and the map are checked finite before."""
    out = stored(values64, dtype)
    bad = ~np.isfinite(out)
    if bad.any():
        if bias is not None:
            bad &= np.isfinite(np.asarray(bias)).reshape(bad.shape)
        if weight is not None and spec.side != OUTPUT_SIDE and bad.any():
            finite_w = np.isfinite(np.asarray(weight).reshape(spec.weight_shape)).all(
                axis=spec.bias_reduce_axes)
            bad &= finite_w.reshape(bad.shape)
        if bad.any():
            k = int(np.argmax(bad.reshape(-1)))
            raise _overflow_error(spec, f"bias '{spec.folded_bias}'",
                                  f"element {k}: {values64.reshape(-1)[k]:.4g}", dtype)
    return out


class Prepared:
    """A fold of ``plan`` over ``arrays``, checked and computed up to its writes; ``commit()``
    writes. Nothing is written before ``commit``."""

    def __init__(self, plan: Plan, arrays: Mapping[str, np.ndarray]):
        own = fold_own_arrays(plan)   # of the whole plan: a stage alone takes others' for new
        first, plan = split_stages(plan)
        if first is not None:   # writes only arrays of the fold's own: nothing the caller sees
            fold(first, arrays)
        check_plan_arrays(plan, arrays)
        check_statistics_exact(plan, arrays)
        maps = channel_maps(plan, arrays)
        outputs = output_biases(plan, arrays, maps)
        ready = stored_output_biases(plan, arrays, outputs)
        largest = maps.largest_scales().tolist()
        bounds = magnitude_bounds(plan, arrays, largest)
        with np.errstate(over="ignore"):   # a scale past float32: the overflow check names it
            scale32 = maps.scale.astype(np.float32)   # what float32 and float16 weights multiply by
        starts = maps.starts.tolist()
        self.biases = []   # (destination, values as it stores them), every one computed first
        tasks = []
        saved = []
        for k, (spec, (scale, offset, mean, beta)) in enumerate(zip(plan.folds, maps)):
            w = None if spec.weight is None else arrays[spec.weight]
            if spec.folded_bias is not None:
                dst = arrays[spec.folded_bias]
                values = ready.get(k)
                if values is None:
                    b = arrays[spec.bias] if spec.bias else None
                    if spec.side == OUTPUT_SIDE:
                        values = outputs[k]
                    else:
                        values = folded_input_bias(b, w, offset, spec)   # reads w before rescaling
                    values = check_bias(spec, values, dst.dtype, b, w)
                self.biases.append((dst, values.reshape(dst.shape)))
                if spec.folded_bias not in own:   # restored if the writes fail before the weights
                    saved.append((dst, dst.copy()))
            if w is not None:
                check_weight_overflow(spec, w, scale, bounds[k], largest[k])
                if w.dtype != np.float64:
                    scale = scale32[starts[k]:starts[k + 1]]
                tasks += _rescale_tasks(w, arrays[spec.folded_weight], scale, spec.weight_layout,
                                        split_bytes=_SPLIT_BYTES)
        self.bins = _balanced(_steps(tasks), _workers())
        self.scratches = [_scratch(b) for b in self.bins]   # what the writes need, made first
        self._saved = saved

    def commit(self) -> None:
        """Write every new bias and rescale every weight, on all cores. Ctrl-C waits for the end of
        the writes (then raises). Each multiply writes nothing if it fails (an allocation of NumPy's,
        say): where one fails before any weight is written, the biases are put back and its error
        raised; after, the multiplies left are done here, so that the fold completes (an error
        again is a RuntimeError saying that the parameters are half folded)."""
        with _interrupts.held():
            bins, scratches = self.bins, self.scratches
            threads = None
            if len(bins) > 1:
                try:
                    threads = _Threads(bins, scratches)
                except RuntimeError:   # no more threads: the bins run one after another here
                    threads = None
            try:
                write_biases(self.biases, self._saved)
            except BaseException:
                if threads is not None:
                    threads.cancel()
                raise
            if threads is not None:
                failed = threads.go()
            else:
                failed = [f for f in map(_run_bin, bins, scratches) if f is not None]
            if failed:
                self._after_a_failure(bins, failed)

    def _after_a_failure(self, bins, failed) -> None:
        error = failed[0][2]
        if len(failed) == len(bins) and all(done == 0 for _, done, _, _ in failed):
            restore(self._saved)   # no weight written: all is as it was
            raise error
        left = sum(len(work) - done for work, done, _, _ in failed)
        try:
            for work, done, _, scratch in failed:
                for step in work[done:]:
                    _multiply(step, scratch)
        except BaseException as again:
            raise RuntimeError(f"bnfold_gpu: rescaling the weights failed part-way ({error!r}), "
                               f"and again as the {left} multiplies left were retried ({again!r}): "
                               f"the parameters are half folded") from again


def write_biases(biases, saved) -> None:
    """Write each new bias, (destination, values as it stores them); if one fails, put back the
    ``saved`` (destination, values before) of those rewritten in place."""
    try:
        for dst, values in biases:
            _store_bias(dst, values)
    except BaseException:
        restore(saved)
        raise


def restore(saved) -> None:
    for dst, before in saved:
        dst[...] = before


def _store_bias(dst, values) -> None:
    dst[...] = values


def prepare(plan: Plan, arrays: Mapping[str, np.ndarray]) -> Prepared:
    """Check ``plan`` against ``arrays`` (name -> contiguous ndarray, the plan's new arrays included)
    and compute everything up to the writes: per-channel maps, new biases, overflow checks. Raises
    FoldError naming the BN, having changed nothing."""
    return Prepared(plan, arrays)


def fold(plan: Plan, arrays: Mapping[str, np.ndarray]) -> None:
    """Apply every fold of ``plan`` to ``arrays``: :func:`prepare`, then commit."""
    prepare(plan, arrays).commit()


_SPLIT_BYTES = 8 << 20
