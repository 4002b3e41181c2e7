"""The folding plan: plain data saying what will be folded into what, and why the rest will not.

A backend needs nothing but a plan and a dict of arrays keyed by the names in it.
"""
import fnmatch
import os
import warnings
from dataclasses import dataclass, field
from math import prod
from typing import Iterable, Optional, Sequence, Tuple

from .layout import ChannelLayout

OUTPUT_SIDE = "output"  # layer -> map: the map rescales the layer's output channels
INPUT_SIDE = "input"    # map -> layer: the map rescales the layer's input channels


@dataclass(frozen=True)
class MapTerm:
    """One function of a composed map, as the backends compute it.

    ``kind`` "bn": ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale`` (``gamma``,
    ``beta`` None for no_scale / no_bias). "scale": a multiply by the stored constant ``value`` (its
    reciprocal where ``reciprocal``: a Div2) or by ``scalar``. "shift": an add of ``value`` (negated
    where ``negate``: a Sub2; times ``factor`` where the graph scales it first, as NNabla's importer
    scales an ONNX Gemm's bias by beta) or of ``scalar``. ``n_channels``: the values it holds (1 for
    a scalar).
    """
    label: str
    kind: str
    n_channels: int
    gamma: Optional[str] = None
    beta: Optional[str] = None
    mean: Optional[str] = None
    var: Optional[str] = None
    eps: float = 0.0
    value: Optional[str] = None
    scalar: Optional[float] = None
    reciprocal: bool = False
    negate: bool = False
    factor: float = 1.0

    def arrays(self):
        return [n for n in (self.gamma, self.beta, self.mean, self.var, self.value) if n]


@dataclass(frozen=True)
class DerivedMap:
    """A map composed of ``terms``, applied in order, computed (float64) into the arrays ``scale`` and
    ``shift`` (None: scale only) over ``n`` channels before the fold. Each term comes with its gather
    (the term's channel for each of the ``n``; -1: not this term) and whether only its scale counts
    (the second input of an add takes the map's scale, the first its shift). The shift is divided
    by ``shift_divisor``: the beta of an ONNX Gemm whose bias takes it, which the graph multiplies
    back."""
    scale: str
    shift: Optional[str]
    n: int
    terms: Tuple[Tuple[MapTerm, Tuple[int, ...], bool], ...]
    shift_divisor: float = 1.0


@dataclass(frozen=True)
class FoldSpec:
    """A map folded into one side of one layer (or, ``weight`` None, the shift of a map into the
    stored constant of an add that stays).

    ``weight``/``bias`` name the layer's current arrays (``bias`` None when it has none);
    ``folded_weight``/``folded_bias`` name where the results go: the same names when rescaled in place,
    new names when the arrays are created (a missing bias, a weight shared with other layers,
    ``inplace=False``); ``folded_bias`` is None where the fold leaves the bias as it is (a map without
    shift folded into the layer's input, or into a layer without bias). The map is a BN's
    ``gamma``/``beta``/``mean``/``var``/``eps`` (``beta``/``gamma`` None for no_bias/no_scale), or a
    derived map (``gamma`` its scale, ``beta`` its shift, ``mean``/``var`` None: 0 and 1, ``eps`` 0).
    ``maps`` names every function the fold takes out of the graph; ``bn`` is how it is reported.
    """
    bn: str
    kind: str
    side: str
    bn_type: str
    weight: Optional[str]
    bias: Optional[str]
    folded_weight: Optional[str]
    folded_bias: Optional[str]
    beta: Optional[str]
    gamma: Optional[str]
    mean: Optional[str]
    var: Optional[str]
    eps: float
    weight_shape: Tuple[int, ...]
    bias_shape: Tuple[int, ...]
    weight_layout: Optional[ChannelLayout]
    # OUTPUT_SIDE: the bias's channel layout; INPUT_SIDE: unused (the bias is indexed by output).
    bias_layout: Optional[ChannelLayout]
    # INPUT_SIDE: the weight axes summed to push the map's shift through the layer into its bias.
    bias_reduce_axes: Tuple[int, ...] = ()
    layer_index: int = -1   # positions in the graph's function order
    bn_index: int = -1
    note: str = ""          # why arrays were cloned or created, for the report
    maps: Tuple[str, ...] = ()   # every function it takes out of the graph
    bns: Tuple[str, ...] = ()    # the BNs among them

    @property
    def n_channels(self) -> int:
        return (self.weight_layout or self.bias_layout).n_channels

    @property
    def weight_in_place(self) -> bool:
        return self.folded_weight == self.weight

    @property
    def bias_in_place(self) -> bool:
        return self.folded_bias == self.bias


@dataclass(frozen=True)
class Skip:
    """A BN left in the graph, and why."""
    bn: str
    bn_type: str
    reason: str
    bn_index: int = -1
    next_pass: bool = False   # always False: one fold does every fold there is


@dataclass(frozen=True)
class GraphEdit:
    """How the graph changes, by positions in the graph's function order: the map functions taken out
    (each with the input that carries the data), the FusedBatchNormalizations whose BN part is taken
    out (their add and ReLU stay), the parameters given to functions ((function, input position,
    array); a position past the last input appends one, a layer's new bias), and every function of
    the regions the folds touch, which the rewriter rebuilds; the BNs that become the add of a new
    array ((function, array): ``x + array``, the bias of a matrix product that had none)."""
    removed: Tuple[Tuple[int, int], ...] = ()
    fused: Tuple[int, ...] = ()
    inputs: Tuple[Tuple[int, int, str], ...] = ()
    region: Tuple[int, ...] = ()
    adds: Tuple[Tuple[int, str], ...] = ()
    appends: Tuple[Tuple[int, str], ...] = ()   # (matrix product, array): its output + array


@dataclass(frozen=True)
class Plan:
    folds: Tuple[FoldSpec, ...]
    skipped: Tuple[Skip, ...]
    # shape and dtype of every array the folds read or write, by name
    arrays: dict = field(default_factory=dict, compare=False)
    # each new array's source (the array it copies, or for a created bias the layer's weight)
    sources: dict = field(default_factory=dict, compare=False)
    derived: Tuple[DerivedMap, ...] = ()
    # arrays of the fold itself, never parameters: derived maps, and what a layer folded on both
    # sides holds between its two folds
    intermediates: frozenset = frozenset()
    edit: GraphEdit = field(default_factory=GraphEdit, compare=False)

    @property
    def new_arrays(self):
        """Names of the parameters the plan creates (folded copies and missing biases)."""
        existing = {n for s in self.folds for n in (s.weight, s.bias) if n is not None}
        names = []
        for s in self.folds:
            for name in (s.folded_weight, s.folded_bias):
                if name is not None and name not in existing and name not in self.intermediates \
                        and name not in names:
                    names.append(name)
        return names

    @property
    def folded_maps(self) -> Tuple[str, ...]:
        """Every map function the plan takes out of the graph, once, in plan order."""
        return _unique(m for s in self.folds for m in s.maps)

    @property
    def folded_bns(self) -> Tuple[str, ...]:
        """Every BN the plan folds, once, in plan order."""
        return _unique(b for s in self.folds for b in s.bns)

    def bytes_rescaled(self) -> int:
        return sum(self.arrays[s.folded_weight][1].itemsize * prod(s.weight_shape)
                   for s in self.folds if s.folded_weight in self.arrays)

    def table(self) -> str:
        rows = [("BN", "into", "side", "weight", "note")]
        for s in self.folds:
            rows.append((s.bn, s.kind, s.side, "x".join(map(str, s.weight_shape)), s.note))
        lines = [format_table(rows)]
        if self.skipped:
            lines.append("")
            lines.append(format_table([("BN left in the graph", "reason")] +
                                      [(s.bn, s.reason) for s in self.skipped]))
        lines.append("")
        others = len(self.folded_maps) - len(self.folded_bns)   # multiplies and adds by constants
        also = (f"; also folded: {others} multipl{'y' if others == 1 else 'ies'} or "
                f"add{'' if others == 1 else 's'} by a constant") if others else ""
        lines.append(f"{len(self.folded_bns)} folded, {len(self.skipped)} left in the graph{also}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _unique(names) -> tuple:
    out = []
    for n in names:
        if n not in out:
            out.append(n)
    return tuple(out)


def format_table(rows) -> str:
    """Rows as aligned text columns, the first row a header underlined with dashes."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, r in enumerate(rows):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


class SkipPatternWarning(UserWarning):
    """A ``skip`` pattern that matches no BN: a misspelt one would fold what it was meant to keep."""


def skip_patterns(skip) -> Tuple[str, ...]:
    """``skip`` as a tuple of patterns: one pattern may be given as a string, None as none; a
    TypeError says what else was given."""
    if skip is None:
        return ()
    if isinstance(skip, str):
        return (skip,)
    if isinstance(skip, (bytes, bytearray)):
        raise TypeError(f"skip must be a BN name or glob pattern (str), or a list of them, not "
                        f"{type(skip).__name__} ({skip!r:.40})")
    try:
        patterns = tuple(skip)
    except TypeError:
        raise TypeError(f"skip must be a BN name or glob pattern, or a list of them, not "
                        f"{type(skip).__name__}") from None
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"skip patterns are BN names or glob patterns (str), not "
                            f"{type(p).__name__} ({p!r:.40})")
    return patterns


def check_path(name: str, value) -> str:
    """``value`` as a path string (str or os.PathLike of str); a TypeError naming the argument
    otherwise."""
    try:
        path = os.fspath(value)
    except TypeError:
        path = None
    if not isinstance(path, str):
        raise TypeError(f"{name} must be a path (str or os.PathLike), not "
                        f"{type(value).__name__} ({value!r:.40})")
    return path


def check_flag(name: str, value) -> bool:
    """``value`` where it is True or False (NumPy's too); a TypeError otherwise: a string such as
    "no" would otherwise count as true."""
    if value is True or value is False or type(value).__name__ == "bool_":
        return bool(value)
    raise TypeError(f"{name} must be True or False, not {type(value).__name__} ({value!r:.40})")


def bn_names(plans: Iterable[Plan]) -> Tuple[str, ...]:
    """Every BN of ``plans``, folded or kept, once."""
    plans = list(plans)
    return tuple(dict.fromkeys([b for p in plans for b in p.folded_bns] +
                               [s.bn for p in plans for s in p.skipped]))


def unmatched_skips(patterns: Sequence[str], names: Sequence[str]) -> Tuple[str, ...]:
    """The ``patterns`` (names or globs) that match none of ``names``."""
    return tuple(pattern for pattern in dict.fromkeys(patterns)
                 if not any(fnmatch.fnmatchcase(name, pattern) for name in names))


def unmatched_words(pattern: str, names: Sequence[str], where: str) -> str:
    sample = ", ".join(repr(n) for n in names[:3])
    return (f"skip pattern {pattern!r} matches no BN of {where}"
            + (f" (their names are like {sample})" if sample else " (it has none)"))


def warn_unmatched_skips(patterns: Sequence[str], plans: Iterable[Plan], where: str) -> None:
    """A :class:`SkipPatternWarning` for each pattern that matches no BN of ``plans``, naming a few
    of the BNs of ``where`` ("the graph", "the file")."""
    if not patterns:
        return
    names = bn_names(plans)
    for pattern in unmatched_skips(patterns, names):
        warnings.warn(unmatched_words(pattern, names, where), SkipPatternWarning, stacklevel=2)
