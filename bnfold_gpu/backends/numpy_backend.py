"""The reference backend: folds a plan over NumPy arrays, in place where the plan says so.

Per-channel math runs in float64; weights are multiplied in max(float32, dtype) and stored in their
own dtype, so the CUDA kernels can reproduce every bit of it.
"""
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping

import numpy as np

from ..plan import OUTPUT_SIDE, FoldSpec, Plan
from .common import FoldError, check_plan_arrays

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
    scale = gamma / np.sqrt(var + np.asarray(eps, np.float64))
    return scale, beta - mean * scale


def folded_output_bias(bias, mean, scale, beta, layout):
    """Bias after folding a BN into the layer's outputs: ``(bias - mean) * scale + beta`` (float64),
    with ``bias`` 0 when the layer has none."""
    g, r, c, i = layout.shape4
    shape = (g, 1, c, 1)
    b = np.zeros(layout.shape4) if bias is None else np.asarray(bias, np.float64).reshape(layout.shape4)
    return (b - mean.reshape(shape)) * scale.reshape(shape) + beta.reshape(shape)


def folded_input_bias(bias, weight, shift, spec: FoldSpec):
    """Bias after folding a BN into the layer's inputs: ``bias + sum(weight * shift[channel])`` over
    every weight axis but the outputs (float64), ``shift`` being the BN's offset."""
    layout = spec.weight_layout
    g, r, c, i = layout.shape4
    w = np.asarray(weight, np.float64).reshape(layout.shape4) * shift.reshape(g, 1, c, 1)
    delta = w.reshape(spec.weight_shape).sum(axis=spec.bias_reduce_axes)
    b = 0.0 if bias is None else np.asarray(bias, np.float64)
    return (b + delta.reshape(spec.bias_shape))


def rescale(src, dst, scale, layout):
    """``dst[e] = src[e] * scale[channel(e)]``, multiplied in max(float32, dtype), stored in dst's dtype.
    ``dst`` may be ``src``."""
    for task in _rescale_tasks(src, dst, scale, layout, split_bytes=None):
        _multiply(task)


def store(dst, values64):
    """Write float64 results into ``dst``: float16 through float32, as the CUDA kernels round."""
    values = values64.reshape(dst.shape)
    dst[...] = values.astype(np.float32) if dst.dtype == np.float16 else values


def _rescale_tasks(src, dst, scale, layout, split_bytes):
    """(src, dst, scale) 4-D views covering one rescale, cut into pieces of about ``split_bytes``
    along the longest of the first three axes so that threads can share a large weight."""
    work = np.result_type(src.dtype, np.float32)
    g, r, c, i = layout.shape4
    s4 = src.reshape(layout.shape4)
    d4 = dst.reshape(layout.shape4)
    k4 = scale.astype(work).reshape(g, 1, c, 1)
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


def _multiply(task):
    s4, d4, k4 = task
    np.multiply(s4, k4, out=d4, casting="same_kind")


def _run_balanced(tasks) -> None:
    """Run multiply tasks on every core: largest first, each to the least loaded worker (NumPy
    releases the GIL inside ufuncs, and one core cannot saturate memory bandwidth)."""
    workers = _pool()._max_workers
    bins = [[] for _ in range(workers)]
    load = [0] * workers
    for task in sorted(tasks, key=lambda t: -t[0].nbytes):
        k = load.index(min(load))
        bins[k].append(task)
        load[k] += task[0].nbytes
    list(_pool().map(lambda tasks: [_multiply(t) for t in tasks], [b for b in bins if b]))


_POOL = None


def _pool():
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)),
                                   thread_name_prefix="bnfold")
    return _POOL


def channel_maps(plan: Plan, arrays: Mapping[str, np.ndarray]):
    """[(scale, offset)] per fold, all BNs computed in one vectorized pass after checking their
    statistics; raises FoldError naming the BN, changes nothing."""
    if not plan.folds:
        return []
    stats = {label: [] for label in ("gamma", "beta", "mean", "var", "eps")}
    for spec in plan.folds:
        n = spec.n_channels
        for label in ("gamma", "beta", "mean", "var"):
            key = getattr(spec, label)
            stats[label].append(np.full(n, 1.0 if label == "gamma" else 0.0) if key is None
                                else np.asarray(arrays[key]).reshape(-1))
        stats["eps"].append(np.full(n, spec.eps))
    cat = {label: np.concatenate(parts).astype(np.float64) for label, parts in stats.items()}
    bounds = np.cumsum([0] + [s.n_channels for s in plan.folds])
    _check_stats(plan, cat, bounds)
    scale, offset = bn_scale_offset(cat["gamma"], cat["beta"], cat["mean"], cat["var"], cat["eps"])
    return [(scale[a:b], offset[a:b], cat["mean"][a:b], cat["beta"][a:b])
            for a, b in zip(bounds[:-1], bounds[1:])]


def _check_stats(plan, cat, bounds):
    var = cat["var"]
    problems = (
        (~np.isfinite(var), "variance has non-finite values"),
        (var < 0, "variance has negative values"),
        (var + cat["eps"] <= 0, "variance + eps is zero: the BN divides by zero"),
        (~np.isfinite(cat["mean"]), "mean has non-finite values"),
        (~np.isfinite(cat["gamma"]), "gamma has non-finite values"),
        (~np.isfinite(cat["beta"]), "beta has non-finite values"),
    )
    for bad, message in problems:
        if bad.any():
            k = int(np.searchsorted(bounds, np.argmax(bad), side="right")) - 1
            raise FoldError(f"{plan.folds[k].bn}: {message}")


def fold(plan: Plan, arrays: Mapping[str, np.ndarray]) -> None:
    """Apply every fold of ``plan`` to ``arrays`` (name -> contiguous ndarray, the plan's new arrays
    included). Everything is checked, and every new bias computed, before the first array is
    written."""
    check_plan_arrays(plan, arrays)
    maps = channel_maps(plan, arrays)
    new_biases, tasks = [], []   # all computed (and allocated) before the first write
    for spec, (scale, offset, mean, beta) in zip(plan.folds, maps):
        w, b = arrays[spec.weight], (arrays[spec.bias] if spec.bias else None)
        if spec.side == OUTPUT_SIDE:
            new_biases.append(folded_output_bias(b, mean, scale, beta, spec.bias_layout))
        else:
            new_biases.append(folded_input_bias(b, w, offset, spec))  # reads w before it is rescaled
        tasks += _rescale_tasks(w, arrays[spec.folded_weight], scale, spec.weight_layout,
                                split_bytes=_SPLIT_BYTES)
    for spec, values in zip(plan.folds, new_biases):
        store(arrays[spec.folded_bias], values)
    _run_balanced(tasks)


_SPLIT_BYTES = 8 << 20
