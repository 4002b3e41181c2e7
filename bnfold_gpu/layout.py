"""Where the channels are in a weight: the one place that knows each layer's layout.

Every weight (and bias) a fold touches is viewed as a 4-D array ``(groups, rows, channels, inner)``
in C order. The map channel of flat element ``e`` is then::

    group   = e // (inner * channels * rows)
    channel = group * channels + (e // inner) % channels

One formula covers every layout the planner emits; the NumPy backend broadcasts over the 4-D view and
the CUDA kernels (``kernels/bnfold_math.cuh``) evaluate the same formula per element.

The map's channels are a range of axes [a0, a1) of the layer's output (or input): a Site. Output
channels (layer -> map), with K the product of the kernel dims and g the groups:

=========================  ====================  ========================================
layer                      weight                (groups, rows, channels, inner)
=========================  ====================  ========================================
Convolution                (O, I/g, k...)        (1, 1, O, I/g*K)
Convolution channel-last   (O, k..., I/g)        (1, 1, O, K*I/g)
DepthwiseConvolution       (C*m, k...)           (1, 1, C*m, K)
Deconvolution              (I, O/g, k...)        (g, I/g, O/g, K)
Deconvolution ch.-last     (I, k..., O/g)        (g, I/g*K, O/g, 1)
DepthwiseDeconvolution     (C, k...), divisor d  (C/d, d, 1, K)
Affine, site over L_j..L_k (In, L_0, ..., L_n)   (1, In*L_0..L_{j-1}, L_j..L_k, L_{k+1}..L_n)
BatchMatmul, b (K, N)      a @ b                 (1, K, N, 1)
BatchMatmul, b (N, K)      a @ b^T               (1, 1, N, K)
=========================  ====================  ========================================

Input channels (map -> layer):

=========================  ====================  ========================================
Convolution                (O, I/g, k...)        (g, O/g, I/g, K)
Convolution channel-last   (O, k..., I/g)        (g, O/g*K, I/g, 1)
DepthwiseConvolution       (C*m, k...)           (C, m, 1, K)
Deconvolution              (I, ...)              (1, 1, I, rest)
DepthwiseDeconvolution     (C, k...)             (1, 1, C, K)
Affine, x axes a..b        (In, L...)            (1, P, C, Q*L)  with In = P*C*Q
BatchMatmul, b (K, N)      a @ b                 (1, 1, K, N)
BatchMatmul, b (N, K)      a @ b^T               (1, N, K, 1)
=========================  ====================  ========================================
"""
from dataclasses import dataclass
from math import prod
from typing import Sequence, Tuple

# layers a map folds into from their output side
FOLDABLE_INTO = ("Convolution", "Deconvolution", "DepthwiseConvolution", "DepthwiseDeconvolution",
                 "Affine", "BatchMatmul")
# map -> layer is exact for any map where the layer is a linear map of each input element alone plus
# a constant; a zero-padded border sees padding, not the map's shift, and a deconvolution sums a
# varying number of inputs at its borders: those take a map whose shift is 0
FOLDABLE_FROM = ("Convolution", "DepthwiseConvolution", "Affine", "BatchMatmul", "Deconvolution",
                 "DepthwiseDeconvolution")
SHIFT_FREE_ONLY = ("Deconvolution", "DepthwiseDeconvolution")


def pointwise_deconvolution(kind: str, args: dict, weight_shape: Sequence[int]) -> bool:
    """A (depthwise) deconvolution of a 1x1 kernel, stride 1 and no output padding: every output
    element takes exactly one input element of each input channel of its group, through the whole
    kernel (a padding only crops the output), so it takes a map's shift as a convolution does
    (other deconvolutions sum a varying set of kernel taps per output, or none)."""
    w = tuple(weight_shape)
    if kind == "Deconvolution":
        kernel = w[1:-1] if args.get("channel_last", False) else w[2:]
    elif kind == "DepthwiseDeconvolution":
        kernel = w[1:]
    else:
        return False
    return (all(k == 1 for k in kernel) and all(s == 1 for s in args.get("stride", ()))
            and not any(args.get("output_padding", ())))


class LayoutError(ValueError):
    """A layer and a map disagree on where the channels are; the message says why."""


@dataclass(frozen=True)
class ChannelLayout:
    groups: int
    rows: int
    channels: int
    inner: int

    @property
    def n_channels(self) -> int:
        return self.groups * self.channels

    @property
    def size(self) -> int:
        return self.groups * self.rows * self.channels * self.inner

    @property
    def shape4(self) -> Tuple[int, int, int, int]:
        return (self.groups, self.rows, self.channels, self.inner)

    def channel_of(self, index: int) -> int:
        group = index // (self.inner * self.channels * self.rows)
        return group * self.channels + (index // self.inner) % self.channels


def _kernel_size(shape: Sequence[int], first: int, last: int) -> int:
    return prod(shape[first:last]) if last > first else 1


def _base_axis(args: dict, ndim: int) -> int:
    base_axis = args.get("base_axis", 1)
    return base_axis + ndim if base_axis < 0 else base_axis


def output_channel_axis(kind: str, args: dict, out_ndim: int) -> int:
    """The axis of the layer's output that holds its output channels (Affine: the first output axis;
    BatchMatmul: the last)."""
    if kind == "BatchMatmul" or args.get("channel_last", False):
        return out_ndim - 1
    return _base_axis(args, out_ndim)


def input_channel_axis(kind: str, args: dict, in_ndim: int) -> int:
    if kind == "BatchMatmul":
        return in_ndim - 2 if args.get("transpose_a", False) else in_ndim - 1
    return output_channel_axis(kind, args, in_ndim)


def _one_axis(kind: str, site, axis: int, where: str):
    if (site.a0, site.a1) == (axis, axis + 1):
        return
    if site.a0 <= axis < site.a1:   # e.g. a BN composed with the add of a stored [N, C] value
        raise LayoutError(f"the map has a value for each element of axes {site.a0}..{site.a1 - 1}, "
                          f"not one per {where} channel of the {kind} (axis {axis}), which is what "
                          f"a layer's weights can take")
    raise LayoutError(f"the map's channels (axes {site.a0}..{site.a1 - 1}) are not the {kind}'s "
                      f"{where} channel axis {axis}")


def _matrix(kind: str, w: Sequence[int]) -> Tuple[int, int]:
    """A BatchMatmul's stored operand as one matrix: its leading axes must be 1 (one matrix for
    every batch)."""
    if len(w) < 2 or prod(w[:-2]) != 1:
        raise LayoutError(f"the {kind}'s stored operand {tuple(w)} is not one matrix")
    return w[-2], w[-1]


def output_layout(kind: str, args: dict, weight_shape: Sequence[int], out_shape: Sequence[int],
                  site) -> Tuple[ChannelLayout, ChannelLayout]:
    """(weight layout, bias layout) for a map over ``site`` (a range of axes of the layer's
    output)."""
    w = tuple(weight_shape)
    ndim = len(out_shape)
    if kind == "Affine":
        base_axis = _base_axis(args, ndim)
        if site.a0 < base_axis:
            raise LayoutError(f"the map's axis {site.a0} is a batch axis of the Affine output "
                              f"(base_axis={base_axis})")
        out = w[1:]
        j, k = site.a0 - base_axis, site.a1 - base_axis
        before, chans, after = prod(out[:j]), prod(out[j:k]), prod(out[k:])
        return (ChannelLayout(1, w[0] * before, chans, after), ChannelLayout(1, before, chans, after))
    axis = output_channel_axis(kind, args, ndim)
    _one_axis(kind, site, axis, "output")
    channel_last = args.get("channel_last", False)
    if kind in ("Convolution", "DepthwiseConvolution"):
        o = w[0]
        weight = ChannelLayout(1, 1, o, prod(w[1:]))
    elif kind == "Deconvolution":
        g = args.get("group", 1)
        if channel_last:
            o_per_group = w[-1]
            weight = ChannelLayout(g, w[0] // g * _kernel_size(w, 1, len(w) - 1), o_per_group, 1)
        else:
            weight = ChannelLayout(g, w[0] // g, w[1], _kernel_size(w, 2, len(w)))
    elif kind == "DepthwiseDeconvolution":
        d = args.get("divisor", 1)
        weight = ChannelLayout(w[0] // d, d, 1, _kernel_size(w, 1, len(w)))
    elif kind == "BatchMatmul":
        rows, cols = _matrix(kind, w)
        weight = ChannelLayout(1, 1, rows, cols) if args.get("transpose_b", False) \
            else ChannelLayout(1, rows, cols, 1)
    else:
        raise LayoutError(f"cannot fold into {kind}")
    return weight, ChannelLayout(1, 1, weight.n_channels, 1)


def input_layout(kind: str, args: dict, weight_shape: Sequence[int], in_shape: Sequence[int],
                 site) -> Tuple[ChannelLayout, Tuple[int, ...], Tuple[int, ...]]:
    """(weight layout over input channels, weight axes to sum for the bias, the weight's shape for
    that sum) for a map over ``site`` (a range of axes of the layer's data input)."""
    w = tuple(weight_shape)
    ndim = len(in_shape)
    if kind == "Affine":
        base_axis = _base_axis(args, ndim)
        if site.a0 < base_axis:
            raise LayoutError(f"the map's axis {site.a0} is a batch axis of the Affine input "
                              f"(base_axis={base_axis})")
        before = prod(in_shape[base_axis:site.a0])
        after = prod(in_shape[site.a1:])
        return ChannelLayout(1, before, site.n, after * prod(w[1:])), (0,), w
    axis = input_channel_axis(kind, args, ndim)
    _one_axis(kind, site, axis, "input")
    reduce_axes = tuple(range(1, len(w)))
    if kind == "Convolution":
        g = args.get("group", 1)
        if args.get("channel_last", False):
            layout = ChannelLayout(g, w[0] // g * _kernel_size(w, 1, len(w) - 1), w[-1], 1)
        else:
            layout = ChannelLayout(g, w[0] // g, w[1], _kernel_size(w, 2, len(w)))
        return layout, reduce_axes, w
    if kind == "DepthwiseConvolution":
        m = args.get("multiplier", 1)
        return ChannelLayout(w[0] // m, m, 1, _kernel_size(w, 1, len(w))), reduce_axes, w
    if kind in ("Deconvolution", "DepthwiseDeconvolution"):
        # the input channel is the weight's first axis; a map folds here only without shift (the
        # bias is never summed: no reduce axes), except into a pointwise deconvolution, a matrix
        # (inputs, outputs) like an Affine's, per group: (groups, inputs, outputs of the group)
        if pointwise_deconvolution(kind, args, w):
            if kind == "DepthwiseDeconvolution":   # output o sums inputs o * d ... o * d + d - 1
                d = args.get("divisor", 1)
                return (ChannelLayout(1, 1, w[0], prod(w[1:])), (1,),
                        (w[0] // d, d * prod(w[1:])))
            g = args.get("group", 1)
            if g == 1:
                return ChannelLayout(1, 1, w[0], prod(w[1:])), (0,), (w[0], prod(w[1:]))
            return ChannelLayout(1, 1, w[0], prod(w[1:])), (1,), (g, w[0] // g, prod(w[1:]))
        return ChannelLayout(1, 1, w[0], prod(w[1:])), (), w
    if kind == "BatchMatmul":
        rows, cols = _matrix(kind, w)
        if args.get("transpose_b", False):    # b (N, K): input channel k is the column
            return ChannelLayout(1, rows, cols, 1), (1,), (rows, cols)
        return ChannelLayout(1, 1, rows, cols), (0,), (rows, cols)   # b (K, N): the row
    raise LayoutError(f"cannot fold a map into the input of {kind}")
