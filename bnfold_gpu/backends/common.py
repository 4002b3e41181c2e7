"""What every backend shares: the error type and the checks run before any array is written."""
from math import prod


class FoldError(ValueError):
    """A fold that cannot be done exactly as planned; nothing was changed."""


def check_plan_arrays(plan, arrays) -> list:
    """Every array a fold reads or writes is present, of the planned size, C-contiguous (weights and
    biases), and a folded weight has its source's dtype. Returns the names of the statistics that are
    strided (allowed: a backend that reads them by address copies them first). One pass, no helper
    calls per array: the GPU backend runs this over thousands of layers on every call."""
    strided = []
    for spec in plan.folds:
        layout = spec.weight_layout
        n = layout.n_channels
        for label, key in (("beta", spec.beta), ("gamma", spec.gamma), ("mean", spec.mean),
                           ("var", spec.var)):
            if key is None:
                continue
            a = arrays.get(key)
            if a is None:
                _missing(spec, key)
            if a.size != n:
                raise FoldError(f"{spec.bn}: {label} '{key}' has {a.size} values for {n} channels "
                                f"of {spec.kind} weight {spec.weight_shape}")
            if not a.flags.c_contiguous:
                strided.append(key)
        w_size, b_size = prod(spec.weight_shape), prod(spec.bias_shape)
        # an array rescaled in place is both source and destination: checked once
        keys = [(spec.weight, spec.weight_shape, w_size), (spec.bias, spec.bias_shape, b_size)]
        if spec.folded_weight != spec.weight:
            keys.append((spec.folded_weight, spec.weight_shape, w_size))
        if spec.folded_bias != spec.bias:
            keys.append((spec.folded_bias, spec.bias_shape, b_size))
        for key, shape, size in keys:
            if key is None:
                continue
            a = arrays.get(key)
            if a is None:
                _missing(spec, key)
            if a.size != size:
                raise FoldError(f"{spec.bn}: '{key}' has shape {tuple(a.shape)}, expected {shape}")
            if not a.flags.c_contiguous:
                raise FoldError(f"{spec.bn}: '{key}' is not C-contiguous")
        w, fw = arrays[spec.weight], arrays[spec.folded_weight]
        if fw.dtype != w.dtype:
            raise FoldError(f"{spec.bn}: folded weight '{spec.folded_weight}' is {fw.dtype}, its "
                            f"source '{spec.weight}' {w.dtype}")
        if layout.size != w_size:
            raise FoldError(f"{spec.bn}: layout {layout} does not cover weight {spec.weight_shape}")
    return strided


def _missing(spec, key):
    raise FoldError(f"{spec.bn}: array '{key}' is missing")
