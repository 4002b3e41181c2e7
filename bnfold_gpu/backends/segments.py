"""Segment tables for the CUDA kernels: the plan flattened into a few small arrays of 64-bit fields, so
that the whole fold runs in four launches whatever the number of layers. NumPy only: the host tests
build the same tables over NumPy buffers and run the kernels' code on the CPU.

The field order mirrors the structs in ``kernels/bnfold_math.cuh``.
"""
from dataclasses import dataclass
from functools import lru_cache
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

STATUS_BITS = (
    (1, "variance has non-finite values"),
    (2, "variance has negative values"),
    (4, "variance + eps is zero: the BN divides by zero"),
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
    ("first_block", "<i8")])


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


def build(plan: Plan, pointer: Dict[str, int], dtype: Dict[str, np.dtype], channels=True,
          weights=True, chunk=CHUNK) -> Tables:
    """Tables for the folds of ``plan``, given each array's device address and dtype by name.
    ``channels=False`` leaves out the statistics and biases, ``weights=False`` the weights and the
    BN -> layer biases, which read them (their arrays need not be in ``pointer`` then); ``chunk`` is
    the kernels' BNFOLD_CHUNK. Built column by column: thousands of layers cost milliseconds, not
    several times the kernels' own time."""
    folds = plan.folds
    bias_folds = input_folds = weight_folds = np.zeros(0, np.int64)
    bounds = np.zeros(len(folds) + 1, np.int64)
    np.cumsum([s.n_channels for s in folds], out=bounds[1:])
    offsets = bounds[:-1]
    channel_rows = np.zeros(len(folds) if channels else 0, CHANNEL_SEG)
    biases, weight_rows = np.zeros(0, ARRAY_SEG), np.zeros(0, ARRAY_SEG)
    inputs = np.zeros(0, INPUT_SEG)
    total_bias = total_blocks = total_input_blocks = 0
    if channels and folds:
        for label in ("gamma", "beta", "mean", "var"):
            keys = [getattr(s, label) for s in folds]
            channel_rows[label] = [0 if k is None else pointer[k] for k in keys]
            channel_rows[label + "_dtype"] = _codes([dtype[k] if k else _F32 for k in keys])
        channel_rows["eps"] = [s.eps for s in folds]
        channel_rows["n_channels"] = np.diff(bounds)
        channel_rows["channel_offset"] = offsets
        channel_rows["fold"] = np.arange(len(folds))
        out = [j for j, s in enumerate(folds) if s.side == OUTPUT_SIDE and s.folded_bias]
        bias_folds = np.array(out, np.int64)
        biases = _rows(
            [folds[j].bias_layout for j in out],
            src=[pointer[folds[j].bias] if folds[j].bias else 0 for j in out],
            dst=[pointer[folds[j].folded_bias] for j in out],
            channel_offset=offsets[out],
            dtype=_codes([dtype[folds[j].folded_bias] for j in out]),
            src_dtype=_codes([dtype[folds[j].bias or folds[j].folded_bias] for j in out]),
            units=lambda numel: numel)
        total_bias = int(biases["numel"].sum())
        if weights:   # BN -> layer biases read the weights
            ins = [(j, s) for j, s in enumerate(folds) if s.side != OUTPUT_SIDE and s.folded_bias]
            input_folds = np.array([j for j, _ in ins], np.int64)
            inputs = _input_rows(ins, pointer, dtype, offsets)
            total_input_blocks = int(inputs["outputs"].sum())
    with_weight = [j for j, s in enumerate(folds) if s.weight is not None]
    if weights and with_weight:
        ws = [folds[j] for j in with_weight]
        weight_folds = np.array(with_weight, np.int64)
        weight_rows = _rows(
            [s.weight_layout for s in ws],
            src=[pointer[s.weight] for s in ws], dst=[pointer[s.folded_weight] for s in ws],
            channel_offset=offsets[with_weight], dtype=_codes([dtype[s.folded_weight] for s in ws]),
            src_dtype=_codes([dtype[s.weight] for s in ws]),
            units=lambda numel: -(-numel // chunk))
        last = weight_rows[-1]
        total_blocks = int(last["first_block"]) + -(-int(last["numel"]) // chunk)
    return Tables(channel_rows, int(bounds[-1]), biases, total_bias, inputs, total_input_blocks,
                  weight_rows, total_blocks, bounds, bias_folds, input_folds, weight_folds)


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


def with_destinations(rows: np.ndarray, dst) -> np.ndarray:
    """A copy of table ``rows`` writing to ``dst`` (one address per row)."""
    out = rows.copy()
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


def input_terms(spec) -> Tuple[int, int, int, int]:
    """(outputs, out_stride, terms, term_stride) of a BN -> layer bias: output o sums the weight
    elements ``o * out_stride + j * term_stride`` for ``j < terms``."""
    shape, axes = spec.weight_shape, tuple(spec.bias_reduce_axes)
    per_first = int(np.prod(shape[1:]))
    if axes == tuple(range(1, len(shape))):   # convolutions: an output's weights are one row
        return shape[0], per_first, per_first, 1
    if axes == (0,):                          # Affine: an output's weights are one column
        return per_first, 1, shape[0], per_first
    raise ValueError(f"{spec.bn}: a bias summed over weight axes {axes} has no table row")


def _input_rows(folds, pointer, dtype, offsets) -> np.ndarray:
    rows = np.zeros(len(folds), INPUT_SEG)
    for row, (j, s) in zip(rows, folds):
        layout = s.weight_layout
        outputs, out_stride, terms, term_stride = input_terms(s)
        row["weight"], row["weight_dtype"] = pointer[s.weight], dtype_code(dtype[s.weight])
        if s.bias:
            row["bias"], row["bias_dtype"] = pointer[s.bias], dtype_code(dtype[s.bias])
        row["dst"], row["dst_dtype"] = pointer[s.folded_bias], dtype_code(dtype[s.folded_bias])
        row["inner"], row["channels"], row["rows"] = layout.inner, layout.channels, layout.rows
        row["channel_offset"] = offsets[j]
        row["outputs"], row["out_stride"] = outputs, out_stride
        row["terms"], row["term_stride"] = terms, term_stride
    if len(rows):
        np.cumsum(rows["outputs"][:-1], out=rows["first_block"][1:])
    return rows


def _rows(layouts, src, dst, channel_offset, dtype, src_dtype, units) -> np.ndarray:
    """ARRAY_SEG rows, one per layout; ``first_block`` counts ``units(numel)`` of the rows before."""
    rows = np.zeros(len(layouts), ARRAY_SEG)
    if not layouts:
        return rows
    shape = np.array([lay.shape4 for lay in layouts], np.int64)   # groups, rows, channels, inner
    numel = shape.prod(axis=1)
    rows["src"], rows["dst"] = src, dst
    rows["numel"] = numel
    rows["rows"], rows["channels"], rows["inner"] = shape[:, 1], shape[:, 2], shape[:, 3]
    rows["channel_offset"] = channel_offset
    rows["dtype"], rows["src_dtype"] = dtype, src_dtype
    first = np.zeros(len(layouts), np.int64)
    np.cumsum(units(numel)[:-1], out=first[1:])
    rows["first_block"] = first
    for field, divisors in (("div_inner", shape[:, 3]), ("div_channels", shape[:, 2]),
                            ("div_rows_channels", shape[:, 1] * shape[:, 2])):
        rows[field] = [fast_divider(d) for d in divisors.tolist()]
    return rows


def array_row(src, dst, layout: ChannelLayout, channel_offset, dst_dtype, src_dtype, first):
    """One ARRAY_SEG row (the staged path builds its tables piece by piece)."""
    row = _rows([layout], [src], [dst], [channel_offset], [dtype_code(dst_dtype)],
                [dtype_code(src_dtype)], units=lambda numel: numel)[0]
    row["first_block"] = first
    return row
