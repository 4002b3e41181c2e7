"""The folding plan: plain data saying what will be folded into what, and why the rest will not.

A backend needs nothing but a plan and a dict of arrays keyed by the names in it.
"""
from dataclasses import dataclass, field
from math import prod
from typing import Optional, Tuple

from .layout import ChannelLayout

OUTPUT_SIDE = "output"  # layer -> BN: the BN rescales the layer's output channels
INPUT_SIDE = "input"    # BN -> layer: the BN rescales the layer's input channels


@dataclass(frozen=True)
class FoldSpec:
    """One BN folded into one layer.

    ``weight``/``bias`` name the layer's current arrays (``bias`` is None when it has none);
    ``folded_weight``/``folded_bias`` name where the results go: the same names when rescaled in place,
    new names when the arrays are created (a missing bias, a weight shared with other layers,
    ``inplace=False``). ``beta``/``gamma`` are None for ``no_bias``/``no_scale``.
    """
    bn: str
    kind: str
    side: str
    bn_type: str
    weight: str
    bias: Optional[str]
    folded_weight: str
    folded_bias: str
    beta: Optional[str]
    gamma: Optional[str]
    mean: str
    var: str
    eps: float
    weight_shape: Tuple[int, ...]
    bias_shape: Tuple[int, ...]
    weight_layout: ChannelLayout
    # OUTPUT_SIDE: the bias's channel layout; INPUT_SIDE: unused (the bias is indexed by output).
    bias_layout: Optional[ChannelLayout]
    # INPUT_SIDE: the weight axes summed to push the BN's shift through the layer into its bias.
    bias_reduce_axes: Tuple[int, ...] = ()
    layer_index: int = -1   # positions in the graph's function order, for the rewriter
    bn_index: int = -1
    note: str = ""          # why arrays were cloned or created, for the report

    @property
    def n_channels(self) -> int:
        return self.weight_layout.n_channels

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
    next_pass: bool = False   # folds on a later pass: folding the result again (a layer takes one BN
                              # per pass)


@dataclass(frozen=True)
class Plan:
    folds: Tuple[FoldSpec, ...]
    skipped: Tuple[Skip, ...]
    # shape and dtype of every array the folds read or write, by name
    arrays: dict = field(default_factory=dict, compare=False)
    # each new array's source (the array it copies, or for a created bias the layer's weight)
    sources: dict = field(default_factory=dict, compare=False)

    @property
    def new_arrays(self):
        """Names of the arrays the plan creates (folded copies and missing biases)."""
        names = []
        for s in self.folds:
            if not s.weight_in_place:
                names.append(s.folded_weight)
            if not s.bias_in_place:
                names.append(s.folded_bias)
        return names

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
        lines.append(f"{len(self.folds)} folded, {len(self.skipped)} left in the graph")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def format_table(rows) -> str:
    """Rows as aligned text columns, the first row a header underlined with dashes."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, r in enumerate(rows):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
