"""Segment tables for the CUDA kernels: the plan flattened into a few small arrays of 64-bit fields, so
that the whole fold runs in four launches whatever the number of layers. NumPy only: the host tests
build the same tables over NumPy buffers and run the kernels' code on the CPU.

All the tables hold but the arrays' addresses and dtypes follows from the plan alone: it is built
once per plan (:func:`template`) and completed per call by a few gathers (``Template.fill``).

The field order mirrors the structs in ``kernels/bnfold_math.cuh``.
"""
import weakref
from dataclasses import dataclass, replace
from functools import lru_cache
from itertools import chain, repeat
from math import prod
from operator import attrgetter, is_, is_not
from typing import Dict, List, Tuple

import numpy as np

from ..layout import ChannelLayout
from ..plan import OUTPUT_SIDE, Plan

BLOCK = 256                 # BNFOLD_BLOCK
PER_THREAD = 16             # BNFOLD_PER_THREAD
CHUNK = BLOCK * PER_THREAD  # BNFOLD_CHUNK: weight elements per block

DTYPE_CODES = {np.dtype(np.float16): 0, np.dtype(np.float32): 1, np.dtype(np.float64): 2}
DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
_ITEMSIZES = np.array([2, 4, 8], np.int64)   # by dtype code

STATISTICS = ("gamma", "beta", "mean", "var")   # the order of their fields in CHANNEL_SEG

STATUS_BITS = (
    (1, "variance has non-finite values"),
    (2, "variance has negative values"),
    (4, "variance + eps is not positive: the BN divides by zero or by the root of a negative number"),
    (8, "mean has non-finite values"),
    (16, "gamma has non-finite values"),
    (32, "beta has non-finite values"),
    (64, "its scale gamma / sqrt(var + eps) is not finite (var + eps is too close to 0)"),
    (128, "its shift beta - mean * scale is not finite"),
)

CHANNEL_SEG = np.dtype([
    ("gamma", "<u8"), ("beta", "<u8"), ("mean", "<u8"), ("var", "<u8"),
    ("gamma_dtype", "<i8"), ("beta_dtype", "<i8"), ("mean_dtype", "<i8"), ("var_dtype", "<i8"),
    ("eps", "<f8"), ("n_channels", "<i8"), ("channel_offset", "<i8"), ("fold", "<i8")])

ARRAY_SEG = np.dtype([
    ("src", "<u8"), ("dst", "<u8"), ("numel", "<i8"), ("inner", "<i8"), ("channels", "<i8"),
    ("rows", "<i8"), ("channel_offset", "<i8"), ("dtype", "<i8"), ("src_dtype", "<i8"),
    ("first_block", "<i8"), ("div_inner", "<u8"), ("div_channels", "<u8"),
    ("div_rows_channels", "<u8")])

INPUT_SEG = np.dtype([
    ("weight", "<u8"), ("bias", "<u8"), ("dst", "<u8"),
    ("weight_dtype", "<i8"), ("bias_dtype", "<i8"), ("dst_dtype", "<i8"),
    ("inner", "<i8"), ("channels", "<i8"), ("rows", "<i8"), ("channel_offset", "<i8"),
    ("outputs", "<i8"), ("out_stride", "<i8"), ("terms", "<i8"), ("term_stride", "<i8"),
    ("per_group", "<i8"), ("group_stride", "<i8"), ("first_block", "<i8")])


@lru_cache(maxsize=None)
def fast_divider(d: int) -> int:
    """``magic | shift << 32`` such that ``(umulhi(n, magic) + n) >> shift == n // d`` for every
    ``n < 2**31`` (the kernels' ``bnfold_fastdiv``); 0 where ``d`` does not fit the 32-bit path."""
    if not 1 <= d < 2 ** 31:
        return 0
    shift = 0
    while (1 << shift) < d:
        shift += 1
    magic = ((1 << 32) * ((1 << shift) - d)) // d + 1
    return (magic & 0xFFFFFFFF) | (shift << 32)


def dtype_code(dtype) -> int:
    code = DTYPE_CODES.get(dtype)   # already a NumPy dtype: no conversion
    if code is not None:
        return code
    try:
        return DTYPE_CODES[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise TypeError(f"unsupported dtype {np.dtype(dtype)}: float16, float32 or float64") from None


_F32 = np.dtype(np.float32)


def _codes(dtypes) -> list:
    """``dtype_code`` of each dtype, converting each distinct dtype once."""
    known = {}
    return [known[d] if d in known else known.setdefault(d, dtype_code(d)) for d in dtypes]


@dataclass
class Tables:
    channels: np.ndarray        # CHANNEL_SEG, one per fold
    total_channels: int
    biases: np.ndarray          # ARRAY_SEG, output-side biases; first_block = first global element
    total_bias: int
    inputs: np.ndarray          # INPUT_SEG, BN -> layer folds; one block per output of each
    total_input_blocks: int
    weights: np.ndarray         # ARRAY_SEG, one per weight piece; first_block = first block
    total_blocks: int
    channel_bounds: np.ndarray  # fold k owns channels [bounds[k], bounds[k + 1])
    bias_folds: np.ndarray = None    # the fold of each row of biases, inputs, weights
    input_folds: np.ndarray = None
    weight_folds: np.ndarray = None


def status_message(plan: Plan, status) -> str:
    """The FoldError message for the first fold whose status bits are set."""
    bad = np.flatnonzero(np.asarray(status))
    if not bad.size:
        return ""
    k = int(bad[0])
    bits = int(status[k])
    text = next((text for bit, text in STATUS_BITS if bits & bit), f"status bits {bits:#x}")
    return f"{plan.folds[k].bn}: {text}"


def pieces(layout: ChannelLayout, numel_limit: int) -> List[Tuple[int, int, ChannelLayout, int]]:
    """Contiguous pieces of an array of ``layout`` holding at most ``numel_limit`` elements each (where
    the layout allows): (first element, count, piece layout, channel offset within the array).
    Cut along groups, else rows, else channels, so that every piece stays one contiguous range."""
    g, r, c, i = layout.shape4
    if layout.size <= numel_limit:
        return [(0, layout.size, layout, 0)]
    out = []
    if g > 1:
        step = max(1, numel_limit // (r * c * i))
        for a in range(0, g, step):
            n = min(step, g - a)
            out.append((a * r * c * i, n * r * c * i, ChannelLayout(n, r, c, i), a * c))
    elif r > 1:
        step = max(1, numel_limit // (c * i))
        for a in range(0, r, step):
            n = min(step, r - a)
            out.append((a * c * i, n * c * i, ChannelLayout(1, n, c, i), 0))
    else:
        step = max(1, numel_limit // i)
        for a in range(0, c, step):
            n = min(step, c - a)
            out.append((a * i, n * i, ChannelLayout(1, 1, n, i), a))
    return out


_PER_PLAN: Dict[tuple, tuple] = {}   # (id(plan), key) -> (weak reference to the plan, value)
_PER_PLAN_MAX = 32


def per_plan(plan, key, make):
    """``make(plan)``, computed once per plan object and ``key``: a plan and its folds are frozen,
    so what follows from them alone holds while the plan lives (``make``'s result must not refer to
    ``plan`` itself, or it would live as long as the cache)."""
    k = (id(plan), key)
    hit = _PER_PLAN.get(k)
    if hit is not None and hit[0]() is plan:
        return hit[1]
    value = make(plan)
    if len(_PER_PLAN) >= _PER_PLAN_MAX:
        _PER_PLAN.pop(next(iter(_PER_PLAN)))
    _PER_PLAN[k] = (weakref.ref(plan, lambda _, k=k: _PER_PLAN.pop(k, None)), value)
    return value


@dataclass(frozen=True)
class Template:
    """A plan's tables less the arrays' addresses and dtypes. ``names``: every array the plan's
    folds name, once each (``fold_columns``), of which the tables address those at ``used``; each
    row of an ``*_at`` array is a column of positions in ``names`` (-1: no array)."""
    names: Tuple[str, ...]
    used: np.ndarray
    tables: Tables              # every field but the addresses and dtypes
    channel_at: np.ndarray      # gamma, beta, mean, var of each fold
    bias_at: np.ndarray         # src, dst, and whose dtype the source has (the bias, else dst)
    input_at: np.ndarray        # weight, bias, dst
    weight_at: np.ndarray       # src, dst

    def fill(self, pointer, code) -> Tables:
        """The tables over the arrays ``names`` at device addresses ``pointer``, of dtypes ``code``
        (:func:`dtype_code`): a few gathers, whatever the number of layers."""
        t = self.tables
        pointer = np.append(np.asarray(pointer, np.uint64), np.uint64(0))   # [-1]: no array, 0
        code = np.asarray(code, np.int64)
        # a statistic that is absent reads as float32; an absent bias as dtype 0
        f32, zero = np.append(code, DTYPE_CODES[_F32]), np.append(code, 0)
        channels = copy_table(t.channels)
        for label, at in zip(STATISTICS, self.channel_at):
            channels[label], channels[label + "_dtype"] = pointer[at], f32[at]
        biases = copy_table(t.biases)
        src, dst, src_code = self.bias_at
        biases["src"], biases["dst"] = pointer[src], pointer[dst]
        biases["dtype"], biases["src_dtype"] = code[dst], code[src_code]
        inputs = copy_table(t.inputs)
        for label, at in zip(("weight", "bias", "dst"), self.input_at):
            inputs[label], inputs[label + "_dtype"] = pointer[at], zero[at]
        weights = copy_table(t.weights)
        src, dst = self.weight_at
        weights["src"], weights["dst"] = pointer[src], pointer[dst]
        weights["dtype"], weights["src_dtype"] = code[dst], code[src]
        return replace(t, channels=channels, biases=biases, inputs=inputs, weights=weights)


def build(plan: Plan, pointer: Dict[str, int], dtype: Dict[str, np.dtype], channels=True,
          weights=True, chunk=CHUNK) -> Tables:
    """Tables for the folds of ``plan``, given each array's device address and dtype by name.
    ``channels=False`` leaves out the statistics and biases, ``weights=False`` the weights and the
    BN -> layer biases, which read them (their arrays need not be in ``pointer`` then); ``chunk`` is
    the kernels' BNFOLD_CHUNK."""
    t = template(plan, channels, weights, chunk)
    used = take(t.names, t.used)
    pointers, codes = np.zeros(len(t.names), np.uint64), np.zeros(len(t.names), np.int64)
    pointers[t.used] = [pointer[n] for n in used]
    codes[t.used] = _codes([dtype[n] for n in used])
    return t.fill(pointers, codes)


def template(plan: Plan, channels=True, weights=True, chunk=CHUNK) -> Template:
    """The tables of ``plan`` (as :func:`build`) less addresses and dtypes; built once per plan,
    column by column: thousands of layers cost milliseconds, not several times the kernels' own
    time."""
    return per_plan(plan, ("tables", channels, weights, chunk),
                    lambda p: _template(p, channels, weights, chunk))


# what the per-plan work reads of each fold; the first eight name arrays
FIELDS = ("gamma", "beta", "mean", "var", "bias", "folded_bias", "weight", "folded_weight",
          "weight_layout", "bias_layout", "weight_shape", "bias_shape", "eps", "side")
NAMES = FIELDS[:8]


def fold_columns(plan: Plan) -> Dict[str, object]:
    """Each of ``FIELDS`` over the folds of ``plan`` (a tuple per field: each fold read once, the
    loops in C); "n_channels" (an array); "with_weight": the folds that have a weight; "names":
    every array the folds name (a weight, a folded weight: of a fold with a weight), once each, in
    the order of ``plan.arrays``, then any it does not describe; "at": for each of ``NAMES``, the
    position in "names" of each fold's array (-1: none). Kept while the plan lives."""
    return per_plan(plan, "fields", _fold_columns)


def _fold_columns(plan: Plan) -> Dict[str, object]:
    folds = plan.folds
    columns = dict(zip(FIELDS, zip(*map(attrgetter(*FIELDS), folds)) if folds else
                       [()] * len(FIELDS)))
    weight_layouts = columns["weight_layout"]
    layouts = ([w or b for w, b in zip(weight_layouts, columns["bias_layout"])]
               if any(map(is_, weight_layouts, repeat(None))) else weight_layouts)
    columns["n_channels"] = _shapes(layouts)[:, [0, 2]].prod(axis=1)   # groups * channels
    has_weight = np.fromiter(map(is_not, columns["weight"], repeat(None)), bool, len(folds))
    columns["with_weight"] = np.flatnonzero(has_weight)
    # positions among all the arrays the plan describes (and any it does not), then among those the
    # folds name
    names = list(plan.arrays)
    index = dict(zip(names, range(len(names))))
    at = {field: positions(index, columns[field]) for field in NAMES}
    named = {field: np.fromiter(map(is_not, columns[field], repeat(None)), bool, len(folds))
             for field in NAMES}
    for field in ("weight", "folded_weight"):
        named[field] &= has_weight
        at[field][~has_weight] = -1
    if any(((a >= 0) != named[field]).any() for field, a in at.items()):   # not in plan.arrays
        unknown = dict.fromkeys(chain(*(take(columns[field], np.flatnonzero(named[field] & (a < 0)))
                                        for field, a in at.items())))
        index.update(zip(unknown, range(len(names), len(names) + len(unknown))))
        names += unknown
        at = {field: np.where(named[field], positions(index, columns[field]), -1)
              for field in NAMES}
    used = np.zeros(len(names) + 1, bool)   # [-1]: none
    for a in at.values():
        used[a] = True
    used = used[:-1]
    renumber = np.cumsum(used) - 1
    columns["names"] = tuple(names if used.all() else take(names, np.flatnonzero(used)))
    columns["at"] = {field: np.where(a >= 0, renumber[a], -1) for field, a in at.items()}
    return columns


def take(values, at) -> list:
    """``values[j]`` for each ``j`` of ``at``."""
    return list(map(values.__getitem__, np.asarray(at).tolist()))


def positions(index: Dict[str, int], keys) -> np.ndarray:
    """The position of each of ``keys`` in ``index``; -1 for None."""
    return np.fromiter(map(index.get, keys, repeat(-1)), np.int64, len(keys))


def _template(plan: Plan, channels, weights, chunk) -> Template:
    folds = plan.folds
    c = fold_columns(plan)
    at = c["at"]
    bounds = np.zeros(len(folds) + 1, np.int64)
    np.cumsum(c["n_channels"], out=bounds[1:])
    offsets = bounds[:-1]
    bias_folds = input_folds = weight_folds = np.zeros(0, np.int64)
    channel_rows = np.zeros(len(folds) if channels else 0, CHANNEL_SEG)
    biases, weight_rows = np.zeros(0, ARRAY_SEG), np.zeros(0, ARRAY_SEG)
    inputs = np.zeros(0, INPUT_SEG)
    none = np.zeros(0, np.int64)
    channel_at, bias_at, input_at, weight_at = [none] * 4, [none] * 3, [none] * 3, [none] * 2
    total_bias = total_blocks = total_input_blocks = 0
    if channels and folds:
        channel_at = [at[label] for label in STATISTICS]
        channel_rows["eps"] = c["eps"]
        channel_rows["n_channels"] = np.diff(bounds)
        channel_rows["channel_offset"] = offsets
        channel_rows["fold"] = np.arange(len(folds))
        output_side = np.fromiter(map(OUTPUT_SIDE.__eq__, c["side"]), bool, len(folds))
        has_bias = np.fromiter(map(bool, c["folded_bias"]), bool, len(folds))
        # the tables take a bias that is named "" for none
        bias = np.where(np.fromiter(map(bool, c["bias"]), bool, len(folds)), at["bias"], -1)
        bias_folds = np.flatnonzero(output_side & has_bias)
        biases = _rows(take(c["bias_layout"], bias_folds), offsets[bias_folds],
                       units=lambda numel: numel)
        bias_at = [bias[bias_folds], at["folded_bias"][bias_folds],
                   np.where(bias >= 0, bias, at["folded_bias"])[bias_folds]]
        total_bias = int(biases["numel"].sum())
        if weights:   # BN -> layer biases read the weights
            input_folds = np.flatnonzero(has_bias & ~output_side)
            inputs = _input_rows(take(folds, input_folds), offsets[input_folds])
            input_at = [at["weight"][input_folds], bias[input_folds],
                        at["folded_bias"][input_folds]]
            total_input_blocks = int(inputs["outputs"].sum())
    if weights and len(c["with_weight"]):
        weight_folds = c["with_weight"]
        weight_rows = _rows(take(c["weight_layout"], weight_folds), offsets[weight_folds],
                            units=lambda numel: -(-numel // chunk))
        weight_at = [at["weight"][weight_folds], at["folded_weight"][weight_folds]]
        last = weight_rows[-1]
        total_blocks = int(last["first_block"]) + -(-int(last["numel"]) // chunk)
    tables = Tables(channel_rows, int(bounds[-1]), biases, total_bias, inputs, total_input_blocks,
                    weight_rows, total_blocks, bounds, bias_folds, input_folds, weight_folds)
    tables_at = [np.array(columns, np.int64).reshape(len(columns), -1)
                 for columns in (channel_at, bias_at, input_at, weight_at)]
    used = np.unique(np.concatenate([a.reshape(-1) for a in tables_at]))
    return Template(c["names"], used[used >= 0], tables, *tables_at)


def bias_scratch(t: Tables, align: int = 256):
    """(bytes, start of each output-side bias row, start of each BN -> layer row) of scratch memory
    holding every new bias of ``t`` (each start aligned to ``align`` bytes)."""
    sizes = np.concatenate([t.biases["numel"] * _ITEMSIZES[t.biases["dtype"]],
                            t.inputs["outputs"] * _ITEMSIZES[t.inputs["dst_dtype"]]])
    padded = -(-sizes // align) * align
    starts = np.zeros(len(sizes), np.int64)
    np.cumsum(padded[:-1], out=starts[1:])
    n = len(t.biases)
    return int(padded.sum()), starts[:n].astype(np.uint64), starts[n:].astype(np.uint64)


def copy_table(rows: np.ndarray) -> np.ndarray:
    """A copy of table ``rows``, byte for byte (NumPy copies a structured array field by field, an
    order of magnitude slower)."""
    return rows.view(np.uint8).copy().view(rows.dtype)


def with_destinations(rows: np.ndarray, dst) -> np.ndarray:
    """A copy of table ``rows`` writing to ``dst`` (one address per row)."""
    out = copy_table(rows)
    out["dst"] = dst
    return out


def copy_rows(t: Tables, bias_src, input_src) -> Tuple[np.ndarray, int]:
    """(ARRAY_SEG rows, elements) copying every new bias from scratch memory (``bias_src``,
    ``input_src``: one address per row of ``t.biases``, ``t.inputs``) to where ``t`` writes it;
    ``first_block`` counts elements, as for the output-side biases."""
    nb = len(t.biases)
    rows = np.zeros(nb + len(t.inputs), ARRAY_SEG)
    rows["src"] = np.concatenate([np.asarray(bias_src, np.uint64), np.asarray(input_src, np.uint64)])
    rows["dst"] = np.concatenate([t.biases["dst"], t.inputs["dst"]])
    rows["numel"] = np.concatenate([t.biases["numel"], t.inputs["outputs"]])
    rows["dtype"] = np.concatenate([t.biases["dtype"], t.inputs["dst_dtype"]])
    rows["src_dtype"] = rows["dtype"]
    if len(rows):
        np.cumsum(rows["numel"][:-1], out=rows["first_block"][1:])
    return rows, int(rows["numel"].sum())


def input_terms(spec) -> Tuple[int, int, int, int, int, int]:
    """(outputs, out_stride, terms, term_stride, per_group, group_stride) of a BN -> layer bias:
    output o of group g = o // per_group sums the weight elements
    ``g * group_stride + (o - g * per_group) * out_stride + j * term_stride`` for ``j < terms``."""
    shape, axes = spec.weight_shape, tuple(spec.bias_reduce_axes)
    per_first = prod(shape[1:])
    if axes == tuple(range(1, len(shape))):   # convolutions: an output's weights are one row
        return shape[0], per_first, per_first, 1, shape[0], 0
    if axes == (0,):                          # Affine: an output's weights are one column
        return per_first, 1, shape[0], per_first, per_first, 0
    if axes == (1,) and len(shape) == 3:      # (groups, inputs, outputs) of a grouped matrix
        g, i, o = shape
        return g * o, 1, i, o, o, i * o
    raise ValueError(f"{spec.bn}: a bias summed over weight axes {axes} has no table row")


def _input_rows(specs, offsets) -> np.ndarray:
    """INPUT_SEG rows of the BN -> layer folds ``specs`` (first channels ``offsets``), addresses and
    dtypes unset."""
    rows = np.zeros(len(specs), INPUT_SEG)
    if not specs:
        return rows
    shape = _shapes([s.weight_layout for s in specs])
    rows["rows"], rows["channels"], rows["inner"] = shape[:, 1], shape[:, 2], shape[:, 3]
    rows["channel_offset"] = offsets
    terms = np.array([input_terms(s) for s in specs], np.int64)
    (rows["outputs"], rows["out_stride"], rows["terms"], rows["term_stride"], rows["per_group"],
     rows["group_stride"]) = terms.T
    np.cumsum(rows["outputs"][:-1], out=rows["first_block"][1:])
    return rows


_SHAPE4 = attrgetter("groups", "rows", "channels", "inner")


def _shapes(layouts) -> np.ndarray:
    """(groups, rows, channels, inner) of each layout."""
    return np.array(list(map(_SHAPE4, layouts)), np.int64).reshape(-1, 4)


def layout_sizes(layouts) -> np.ndarray:
    """The number of elements of each layout."""
    return _shapes(layouts).prod(axis=1)


def _rows(layouts, channel_offset, units) -> np.ndarray:
    """ARRAY_SEG rows, one per layout, addresses and dtypes unset; ``first_block`` counts
    ``units(numel)`` of the rows before."""
    rows = np.zeros(len(layouts), ARRAY_SEG)
    if not layouts:
        return rows
    shape = _shapes(layouts)
    numel = shape.prod(axis=1)
    rows["numel"] = numel
    rows["rows"], rows["channels"], rows["inner"] = shape[:, 1], shape[:, 2], shape[:, 3]
    rows["channel_offset"] = channel_offset
    first = np.zeros(len(layouts), np.int64)
    np.cumsum(units(numel)[:-1], out=first[1:])
    rows["first_block"] = first
    for field, divisors in (("div_inner", shape[:, 3]), ("div_channels", shape[:, 2]),
                            ("div_rows_channels", shape[:, 1] * shape[:, 2])):
        distinct, inverse = np.unique(divisors, return_inverse=True)
        rows[field] = np.array([fast_divider(d) for d in distinct.tolist()],
                               np.uint64)[inverse.reshape(-1)]
    return rows


def array_row(src, dst, layout: ChannelLayout, channel_offset, dst_dtype, src_dtype, first):
    """One ARRAY_SEG row (the staged path builds its tables piece by piece)."""
    row = _rows([layout], [channel_offset], units=lambda numel: numel)[0]
    row["src"], row["dst"] = src, dst
    row["dtype"], row["src_dtype"] = dtype_code(dst_dtype), dtype_code(src_dtype)
    row["first_block"] = first
    return row
