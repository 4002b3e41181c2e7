"""Maps composed of several functions, computed before a fold: ``scale`` and ``shift`` over a fold's
channels, in float64, with NumPy or CuPy (``xp``: the module of the arrays).

For terms applied in order, each ``x -> s_j * x + t_j`` read through its gather (the term's channel for
each of the fold's; -1 for none: 1 and 0)::

    scale = prod_j s_j
    shift = sum_j t_j * prod_{i > j} s_i

A term whose only scale counts (the second input of an add) contributes ``t_j = 0``.
"""
from .common import FoldError


def term_values(term, get, xp):
    """(scale, shift) of one term over its own channels (float64), checked; ``get(name)`` gives an
    array."""
    f64 = xp.float64
    if term.kind == "bn":
        mean = xp.asarray(get(term.mean), f64).reshape(-1)
        var = xp.asarray(get(term.var), f64).reshape(-1)
        gamma = xp.ones_like(mean) if term.gamma is None else xp.asarray(get(term.gamma), f64).reshape(-1)
        beta = xp.zeros_like(mean) if term.beta is None else xp.asarray(get(term.beta), f64).reshape(-1)
        _check(term, (
            (not bool(xp.isfinite(xp.asarray(term.eps, f64))), "eps is not finite"),
            (not bool(xp.isfinite(var).all()), "variance has non-finite values"),
            (bool((var < 0).any()), "variance has negative values"),
            (bool((var + term.eps <= 0).any()), "variance + eps is not positive: the BN divides by zero or by the root of a negative number"),
            (not bool(xp.isfinite(mean).all()), "mean has non-finite values"),
            (not bool(xp.isfinite(gamma).all()), "gamma has non-finite values"),
            (not bool(xp.isfinite(beta).all()), "beta has non-finite values")))
        scale = gamma / xp.sqrt(var + term.eps)
        shift = beta - mean * scale
    else:
        v = xp.asarray(term.scalar if term.value is None else get(term.value), f64).reshape(-1)
        _check(term, ((not bool(xp.isfinite(v).all()), "its constant has non-finite values"),))
        if term.kind == "scale":
            if term.reciprocal:
                _check(term, ((bool((v == 0).any()), "it divides by zero"),))
                v = 1.0 / v
            scale, shift = v, xp.zeros_like(v)
        else:
            v = v * term.factor
            scale, shift = xp.ones_like(v), (-v if term.negate else v)
    _check(term, ((not bool(xp.isfinite(scale).all()),
                   "its scale is not finite (var + eps is too close to 0)"),
                  (not bool(xp.isfinite(shift).all()), "its shift is not finite")))
    return scale, shift


def _check(term, problems):
    for bad, message in problems:
        if bad:
            raise FoldError(f"{term.label}: {message}")


def compose(derived, get, xp):
    """(scale, shift) over ``derived.n`` channels (shift None where it has none)."""
    f64 = xp.float64
    scale = xp.ones(derived.n, f64)
    shift = xp.zeros(derived.n, f64)
    for term, gather, scale_only in derived.terms:
        s, t = term_values(term, get, xp)
        g = xp.asarray(gather, xp.int64)
        present = g >= 0
        where = xp.where(present, g, 0)
        s_here = xp.where(present, s[where], 1.0)
        scale = scale * s_here
        shift = shift * s_here
        if not scale_only:
            shift = shift + xp.where(present, t[where], 0.0)
    if derived.shift_divisor != 1.0:
        shift = shift / derived.shift_divisor
    if not bool(xp.isfinite(scale).all()) or not bool(xp.isfinite(shift).all()):
        raise FoldError(f"{derived.terms[-1][0].label}: the composed map is not finite")
    return scale, (None if derived.shift is None else shift)


def compute_derived(plan, arrays, xp) -> dict:
    """name -> array of every derived map of ``plan`` (scale and shift), from ``arrays``."""
    out = {}
    for d in plan.derived:
        scale, shift = compose(d, arrays.__getitem__, xp)
        out[d.scale] = scale
        if d.shift is not None:
            out[d.shift] = shift
    return out
