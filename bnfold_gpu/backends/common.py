"""What every backend shares: the error type and the checks run before any array is written."""
from math import prod


class FoldError(ValueError):
    """A fold that cannot be done exactly as planned; nothing was changed."""


def check_plan_arrays(plan, arrays) -> None:
    """Every array a fold reads or writes is present, of the planned size, C-contiguous (weights and
    biases), and a folded weight has its source's dtype."""
    for spec in plan.folds:
        n = spec.n_channels
        for label in ("beta", "gamma", "mean", "var"):
            key = getattr(spec, label)
            if key is None:
                continue
            a = _get(arrays, key, spec)
            if a.size != n:
                raise FoldError(f"{spec.bn}: {label} '{key}' has {a.size} values for {n} channels "
                                f"of {spec.kind} weight {spec.weight_shape}")
        for key, shape in ((spec.weight, spec.weight_shape), (spec.folded_weight, spec.weight_shape),
                           (spec.bias, spec.bias_shape), (spec.folded_bias, spec.bias_shape)):
            if key is None:
                continue
            a = _get(arrays, key, spec)
            if a.size != prod(shape):
                raise FoldError(f"{spec.bn}: '{key}' has shape {tuple(a.shape)}, expected {shape}")
            if not a.flags.c_contiguous:
                raise FoldError(f"{spec.bn}: '{key}' is not C-contiguous")
        if arrays[spec.folded_weight].dtype != arrays[spec.weight].dtype:
            raise FoldError(f"{spec.bn}: folded weight '{spec.folded_weight}' is "
                            f"{arrays[spec.folded_weight].dtype}, its source "
                            f"'{spec.weight}' {arrays[spec.weight].dtype}")
        if spec.weight_layout.size != prod(spec.weight_shape):
            raise FoldError(f"{spec.bn}: layout {spec.weight_layout} does not cover weight "
                            f"{spec.weight_shape}")


def _get(arrays, key, spec):
    try:
        return arrays[key]
    except KeyError:
        raise FoldError(f"{spec.bn}: array '{key}' is missing") from None
