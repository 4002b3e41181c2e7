"""Random plans without nnabla: every layout the planner emits, any dtype, any total size. Shared by
the kernel tests (host and GPU) and the GPU benchmark, which run where nnabla is absent."""
from typing import Dict, Tuple

import numpy as np

from .layout import ChannelLayout
from .plan import INPUT_SIDE, OUTPUT_SIDE, FoldSpec, Plan

# (kind, side, (groups, rows, channels, inner), weight shape, bias shape[, the weight axes an input
# side's bias sums, where not every axis but the first (Affine: the first)]): one of each layout
LAYOUTS = (
    ("Convolution", OUTPUT_SIDE, (1, 1, 6, 3 * 3 * 3), (6, 3, 3, 3), (6,)),
    ("Convolution", OUTPUT_SIDE, (1, 1, 5, 2 * 4), (5, 2, 4), (5,)),           # channel-last, 1-D
    ("Deconvolution", OUTPUT_SIDE, (3, 2, 4, 9), (6, 4, 3, 3), (12,)),          # groups 3
    ("Deconvolution", OUTPUT_SIDE, (2, 2 * 9, 3, 1), (4, 3, 3, 3), (6,)),       # channel-last, groups 2
    ("DepthwiseConvolution", OUTPUT_SIDE, (1, 1, 8, 9), (8, 3, 3), (8,)),
    ("DepthwiseDeconvolution", OUTPUT_SIDE, (4, 2, 1, 9), (8, 3, 3), (4,)),     # divisor 2
    ("Affine", OUTPUT_SIDE, (1, 20 * 3, 5, 2), (20, 3, 5, 2), (3, 5, 2)),         # BN on output axis 1 of 3
    ("Affine", OUTPUT_SIDE, (1, 12, 7, 1), (12, 7), (7,)),
    ("Convolution", INPUT_SIDE, (2, 3, 4, 9), (6, 4, 3, 3), (6,)),             # BN -> conv, groups 2
    ("Convolution", INPUT_SIDE, (2, 3 * 9, 4, 1), (6, 3, 3, 4), (6,)),         # BN -> channel-last conv
    ("DepthwiseConvolution", INPUT_SIDE, (4, 2, 1, 9), (8, 3, 3), (8,)),       # multiplier 2
    ("Affine", INPUT_SIDE, (1, 2, 3, 4 * 7), (24, 7), (7,)),
    # BN -> 1x1 deconvolution of stride 1, as (inputs, outputs), and grouped: (groups 3, inputs 2,
    # outputs 4 of each group), the weight (6, 4, 1, 1)
    ("Deconvolution", INPUT_SIDE, (1, 1, 6, 4), (6, 4), (4,), (0,)),
    ("Deconvolution", INPUT_SIDE, (1, 1, 6, 4), (3, 2, 4), (12,), (1,)),
)


def fold_spec(k: int, case, dtype, with_bias=True, no_scale=False, no_bias=False, eps=1e-5,
              stat_dtype=np.float32, inplace=False) -> Tuple[FoldSpec, Dict[str, Tuple[tuple, np.dtype]]]:
    """One fold named ``f{k}`` of layout ``case`` and the shape/dtype of every array it uses;
    ``inplace`` folds into the layer's own weight (and bias, where it has one)."""
    kind, side, shape4, wshape, bshape = case[:5]
    layout = ChannelLayout(*shape4)
    n = layout.n_channels
    name = f"f{k}"
    dtype, stat_dtype = np.dtype(dtype), np.dtype(stat_dtype)
    folded_w = name + "/W" if inplace else name + "/W_folded"
    folded_b = name + "/b" if inplace and with_bias else name + "/b_folded"
    arrays = {name + "/W": (wshape, dtype), folded_w: (wshape, dtype), folded_b: (bshape, dtype)}
    if with_bias:
        arrays[name + "/b"] = (bshape, dtype)
    for label in ("mean", "var", "gamma", "beta"):
        arrays[f"{name}/{label}"] = ((1, n, 1), stat_dtype)
    bias_layout, reduce_axes = None, ()
    if side == OUTPUT_SIDE:
        bias_layout = (ChannelLayout(1, int(np.prod(bshape)) // (n * layout.inner), n, layout.inner)
                       if kind == "Affine" else ChannelLayout(1, 1, n, 1))
    elif len(case) > 5:
        reduce_axes = tuple(case[5])
    else:
        reduce_axes = (0,) if kind == "Affine" else tuple(range(1, len(wshape)))
    spec = FoldSpec(
        bn=name, kind=kind, side=side, bn_type="BatchNormalization", weight=name + "/W",
        bias=name + "/b" if with_bias else None, folded_weight=folded_w,
        folded_bias=folded_b, beta=None if no_bias else name + "/beta",
        gamma=None if no_scale else name + "/gamma", mean=name + "/mean", var=name + "/var",
        eps=float(eps), weight_shape=tuple(wshape), bias_shape=tuple(bshape), weight_layout=layout,
        bias_layout=bias_layout, bias_reduce_axes=reduce_axes)
    return spec, arrays


def random_plan(rng, n_folds=None, dtype=None, first=0, cases=LAYOUTS) -> Plan:
    """A plan of random folds (named from ``f{first}``) over ``cases``, random dtypes and BN options."""
    folds, arrays = [], {}
    for k in range(first, first + (n_folds or int(rng.randint(1, 8)))):
        case = cases[rng.randint(len(cases))]
        spec, arr = fold_spec(
            k, case, dtype or rng.choice([np.float16, np.float32, np.float64]),
            with_bias=bool(rng.rand() < 0.5), no_scale=bool(rng.rand() < 0.3),
            no_bias=bool(rng.rand() < 0.3), eps=rng.choice([1e-5, 1e-3, 0.0]),
            stat_dtype=rng.choice([np.float16, np.float32, np.float64]))
        folds.append(spec)
        arrays.update(arr)
    return Plan(tuple(folds), (), arrays)


def sized_plan(rng, total_bytes: int, dtype=np.float32) -> Plan:
    """In-place Convolution -> BN folds of ResNet-like shapes until the weights reach ``total_bytes``."""
    folds, arrays, size, k = [], {}, 0, 0
    item = np.dtype(dtype).itemsize
    while size < total_bytes:
        o, i = (int(rng.choice([64, 128, 256, 512, 1024, 2048])) for _ in range(2))
        kk = int(rng.choice([1, 3]))
        case = ("Convolution", OUTPUT_SIDE, (1, 1, o, i * kk * kk), (o, i, kk, kk), (o,))
        spec, arr = fold_spec(k, case, dtype, with_bias=False, inplace=True)
        folds.append(spec)
        arrays.update(arr)
        size += o * i * kk * kk * item
        k += 1
    return Plan(tuple(folds), (), arrays)


def make_arrays(plan: Plan, xp=np, seed=0, poison=True):
    """Random arrays for ``plan`` with ``xp`` (NumPy or CuPy): variances in [0.2, 3], means far from 0;
    outputs of the fold filled with NaN when ``poison``, so an element never written shows."""
    rs = xp.random.RandomState(seed)
    sources = {s.weight for s in plan.folds} | {s.bias for s in plan.folds}
    new = {s.folded_weight for s in plan.folds} | {s.folded_bias for s in plan.folds}
    variances = {s.var for s in plan.folds}
    means = {s.mean for s in plan.folds}
    arrays = {}
    for name, (shape, dtype) in plan.arrays.items():
        if name in new - sources:
            arrays[name] = (xp.full(shape, xp.nan, dtype) if poison else xp.zeros(shape, dtype))
        elif name in variances:
            arrays[name] = rs.uniform(0.2, 3.0, shape).astype(dtype)
        elif name in means:
            arrays[name] = rs.normal(0.5, 1.0, shape).astype(dtype)
        else:
            arrays[name] = rs.normal(0.0, 1.0, shape).astype(dtype)
    return arrays


def in_place_cases(seed=1):
    """(case, dtype, plan, arrays) for every layout of :data:`LAYOUTS` in float16, float32 and
    float64, each a single fold into the layer's own arrays."""
    for case in LAYOUTS:
        for dtype in (np.float16, np.float32, np.float64):
            spec, shapes = fold_spec(0, case, dtype, inplace=True)
            plan = Plan((spec,), (), shapes)
            yield case, dtype, plan, make_arrays(plan, np, seed=seed)
