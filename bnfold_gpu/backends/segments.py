"""Segment tables for the CUDA kernels: the plan flattened into a few small arrays of 64-bit fields, so
that the whole fold runs in three launches whatever the number of layers. NumPy only: the host tests
build the same tables over NumPy buffers and run the kernels' code on the CPU.

The field order mirrors the structs in ``kernels/bnfold_math.cuh``.
"""
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

from ..layout import ChannelLayout
from ..plan import OUTPUT_SIDE, Plan

BLOCK = 256                 # BNFOLD_BLOCK
CHUNK = BLOCK * 16          # BNFOLD_CHUNK: weight elements per block

DTYPE_CODES = {np.dtype(np.float16): 0, np.dtype(np.float32): 1, np.dtype(np.float64): 2}

STATUS_BITS = (
    (1, "variance has non-finite values"),
    (2, "variance has negative values"),
    (4, "variance + eps is zero: the BN divides by zero"),
    (8, "mean has non-finite values"),
    (16, "gamma has non-finite values"),
    (32, "beta has non-finite values"),
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
    try:
        return DTYPE_CODES[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"unsupported dtype {np.dtype(dtype)}: float16, float32 or float64") from None


@dataclass
class Tables:
    channels: np.ndarray        # CHANNEL_SEG, one per fold
    total_channels: int
    biases: np.ndarray          # ARRAY_SEG, output-side biases; first_block = first global element
    total_bias: int
    weights: np.ndarray         # ARRAY_SEG, one per weight piece; first_block = first block
    total_blocks: int
    channel_bounds: np.ndarray  # fold k owns channels [bounds[k], bounds[k + 1])


def status_message(plan: Plan, status) -> str:
    """The FoldError message for the first fold whose status bits are set."""
    for k, bits in enumerate(np.asarray(status)):
        for bit, text in STATUS_BITS:
            if int(bits) & bit:
                return f"{plan.folds[k].bn}: {text}"
    return ""


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
          weights=True) -> Tables:
    """Tables for the folds of ``plan``, given each array's device address and dtype by name.
    ``channels=False`` leaves out the statistics and biases, ``weights=False`` the weights (their
    arrays need not be in ``pointer`` then)."""
    folds = list(enumerate(plan.folds))
    channel_rows = np.zeros(len(folds) if channels else 0, CHANNEL_SEG)
    bounds = [0]
    for j, (k, s) in enumerate(folds):
        bounds.append(bounds[-1] + s.n_channels)
        if not channels:
            continue
        row = channel_rows[j]
        for label in ("gamma", "beta", "mean", "var"):
            key = getattr(s, label)
            row[label] = 0 if key is None else pointer[key]
            row[label + "_dtype"] = 1 if key is None else dtype_code(dtype[key])
        row["eps"] = s.eps
        row["n_channels"] = s.n_channels
        row["channel_offset"] = bounds[-2]
        row["fold"] = k

    biases, total_bias = [], 0
    weight_rows, total_blocks = [], 0
    for (k, s), offset in zip(folds, bounds[:-1]):
        if channels and s.side == OUTPUT_SIDE:
            biases.append(array_row(
                pointer.get(s.bias, 0) if s.bias else 0, pointer[s.folded_bias], s.bias_layout,
                offset, dtype[s.folded_bias], dtype[s.bias] if s.bias else dtype[s.folded_bias],
                total_bias))
            total_bias += s.bias_layout.size
        if not weights:
            continue
        item = np.dtype(dtype[s.weight]).itemsize
        src, dst = pointer[s.weight], pointer[s.folded_weight]
        w_dtype = dtype[s.folded_weight]
        for first, count, layout, ch in pieces(s.weight_layout, 1 << 62):
            weight_rows.append(array_row(src + first * item, dst + first * item, layout, offset + ch,
                                      w_dtype, dtype[s.weight], total_blocks))
            total_blocks += -(-count // CHUNK)
    return Tables(channel_rows, bounds[-1], _table(biases), total_bias, _table(weight_rows), total_blocks,
                  np.asarray(bounds, np.int64))


def array_row(src, dst, layout: ChannelLayout, channel_offset, dst_dtype, src_dtype, first):
    row = np.zeros((), ARRAY_SEG)
    row["src"], row["dst"] = src, dst
    row["numel"] = layout.size
    row["inner"], row["channels"], row["rows"] = layout.inner, layout.channels, layout.rows
    row["channel_offset"] = channel_offset
    row["dtype"], row["src_dtype"] = dtype_code(dst_dtype), dtype_code(src_dtype)
    row["first_block"] = first
    row["div_inner"] = fast_divider(layout.inner)
    row["div_channels"] = fast_divider(layout.channels)
    row["div_rows_channels"] = fast_divider(layout.rows * layout.channels)
    return row


def _table(rows) -> np.ndarray:
    return np.array(rows, ARRAY_SEG) if rows else np.zeros(0, ARRAY_SEG)
