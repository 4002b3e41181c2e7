"""What every backend shares: the error type and the checks run before any array is written."""
import functools
from math import prod

import numpy as np

# what a weight or bias may be: the fold writes it in its own dtype
FLOAT_DTYPES = frozenset(np.dtype(t) for t in (np.float16, np.float32, np.float64))
# what a statistic may be: read only, converted to float64 (integers where that is exact)
_STATISTIC_KINDS = frozenset("biuf")
_EXACT_INTEGER = 2 ** 53


class FoldError(ValueError):
    """A fold that cannot be done exactly as planned; nothing was changed."""


def quiet_float_errors(fn):
    """``fn`` run with NumPy's floating-point warnings off in this thread (its setting restored on
    return): the fold checks what it computes and names a value that is not finite by BN and array,
    so a NaN in a parameter (a signalling one warns as it is merely cast) is said once that way, not
    as RuntimeWarning lines, nor as the FloatingPointError a caller's ``np.seterr`` would make."""
    @functools.wraps(fn)
    def quiet(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)
    return quiet


def array_facts(arrays) -> dict:
    """name -> (size, C-contiguous, dtype) of every array, each read once."""
    return {n: (a.size, a.flags.c_contiguous, a.dtype) for n, a in arrays.items()}


def check_plan_arrays(plan, arrays, facts=None) -> list:
    """Every array a fold reads or writes is present, of the planned size, of a dtype the fold
    handles (weights and biases float16, float32 or float64; statistics any real number type),
    C-contiguous (weights and biases), and a folded weight has its source's dtype. ``facts`` are
    :func:`array_facts` (a backend that has them already passes them). Returns the names of the
    statistics that are strided (allowed: a backend that reads them by address copies them first). The GPU backend runs this over
    thousands of layers on every call: a dict lookup per array, messages built only on failure."""
    if facts is None:
        facts = array_facts(arrays)
    strided = []
    for spec in plan.folds:
        layout = spec.weight_layout
        n = spec.n_channels
        for key in (spec.beta, spec.gamma, spec.mean, spec.var):
            if key is None:
                continue
            f = facts.get(key)
            if f is None or f[0] != n:
                _bad_statistic(spec, key, f, n)
            if f[2].kind not in _STATISTIC_KINDS or f[2].itemsize > 8:
                _bad_dtype(spec, key, f[2], "a statistic", "a real number type")
            if not f[1]:
                strided.append(key)
        if spec.weight is not None:   # first: a new bias takes the weight's dtype
            w_size = prod(spec.weight_shape)
            w = _fact(spec, spec.weight, w_size, spec.weight_shape, facts)
            if spec.folded_weight != spec.weight:   # an array rescaled in place is checked once
                if _fact(spec, spec.folded_weight, w_size, spec.weight_shape, facts)[2] != w[2]:
                    raise FoldError(f"{spec.bn}: folded weight '{spec.folded_weight}' is "
                                    f"{facts[spec.folded_weight][2]}, its source '{spec.weight}' "
                                    f"{w[2]}")
            if layout.size != w_size:
                raise FoldError(f"{spec.bn}: layout {layout} does not cover weight "
                                f"{spec.weight_shape}")
        b_size = prod(spec.bias_shape)   # the shift of a map into an add's constant: no weight
        _fact(spec, spec.bias, b_size, spec.bias_shape, facts)
        if spec.folded_bias != spec.bias:
            _fact(spec, spec.folded_bias, b_size, spec.bias_shape, facts)
    return strided


def fold_own_arrays(plan) -> set:
    """The arrays of ``plan`` that are the fold's own, not the caller's: those it creates and those
    between two folds of a layer. Taken from the whole plan: a stage of :func:`split_stages` alone
    would count an array of the caller's that another stage reads (a layer's bias, folded on both
    sides) as one it creates."""
    return set(plan.new_arrays) | set(plan.intermediates)


def split_stages(plan):
    """(the folds that write arrays between two folds of one layer, as a plan or None; the rest): the
    first run before the others are checked, since these read what they write."""
    from ..plan import Plan
    between = plan.intermediates
    first = tuple(s for s in plan.folds if s.folded_weight in between or s.folded_bias in between)
    if not first:
        return None, plan
    ids = {id(s) for s in first}
    rest = tuple(s for s in plan.folds if id(s) not in ids)
    return (Plan(first, (), plan.arrays, plan.sources),   # one stage: nothing between its folds
            Plan(rest, plan.skipped, plan.arrays, plan.sources, (), plan.intermediates))


def _fact(spec, key, size, shape, facts):
    """The facts of a weight or bias ``key`` (None: no array), checked: present, ``size`` elements
    (``shape``), C-contiguous."""
    if key is None:
        return None
    f = facts.get(key)
    if f is None:
        _missing(spec, key)
    if f[0] != size:
        raise FoldError(f"{spec.bn}: '{key}' has {f[0]} elements, expected shape {shape}")
    if not f[1]:
        raise FoldError(f"{spec.bn}: '{key}' is not C-contiguous")
    if f[2] not in FLOAT_DTYPES:
        _bad_dtype(spec, key, f[2], "a weight or bias", "float16, float32 or float64")
    return f


def _bad_dtype(spec, key, dtype, what, allowed):
    raise FoldError(f"{spec.bn}: '{key}' is {np.dtype(dtype).name}; {what} of a fold must be {allowed}")


def check_statistics_exact(plan, arrays) -> None:
    """Integer statistics are read as float64: refused where a value is past 2^53, where that would
    round."""
    for spec in plan.folds:
        for key in (spec.beta, spec.gamma, spec.mean, spec.var):
            if key is None:
                continue
            a = arrays[key]
            if a.dtype.kind in "iu" and a.dtype.itemsize == 8 and a.size:
                top = max(abs(int(a.max())), abs(int(a.min())))
                if top > _EXACT_INTEGER:
                    raise FoldError(f"{spec.bn}: '{key}' holds the integer {top}, which float64 "
                                    f"cannot hold exactly")


def _bad_statistic(spec, key, f, n):
    if f is None:
        _missing(spec, key)
    label = next(x for x in ("beta", "gamma", "mean", "var") if getattr(spec, x) == key)
    raise FoldError(f"{spec.bn}: {label} '{key}' has {f[0]} values for {n} channels "
                    f"of {spec.kind} weight {spec.weight_shape}")


def _missing(spec, key):
    raise FoldError(f"{spec.bn}: array '{key}' is missing")


def cuda_context(ctx) -> bool:
    """Whether NNabla's context ``ctx`` (anything with its ``backend`` list) keeps arrays on a CUDA
    device."""
    return bool(ctx.backend) and ctx.backend[0].split(":")[0] in ("cuda", "cudnn")
