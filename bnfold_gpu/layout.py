"""Where the channels are in a weight: the one place that knows each layer's layout.

Every weight (and bias) a fold touches is viewed as a 4-D array ``(groups, rows, channels, inner)``
in C order. The BN channel of flat element ``e`` is then::

    group   = e // (inner * channels * rows)
    channel = group * channels + (e // inner) % channels

One formula covers every layout the planner emits; the NumPy backend broadcasts over the 4-D view and
the CUDA kernels (``kernels/bnfold_index.cuh``) evaluate the same formula per element.

Output channels (layer -> BN), with K the product of the kernel dims and g the groups:

=========================  ====================  ========================================
layer                      weight                (groups, rows, channels, inner)
=========================  ====================  ========================================
Convolution                (O, I/g, k...)        (1, 1, O, I/g*K)
Convolution channel-last   (O, k..., I/g)        (1, 1, O, K*I/g)
DepthwiseConvolution       (C*m, k...)           (1, 1, C*m, K)
Deconvolution              (I, O/g, k...)        (g, I/g, O/g, K)
Deconvolution ch.-last     (I, k..., O/g)        (g, I/g*K, O/g, 1)
DepthwiseDeconvolution     (C, k...), divisor d  (C/d, d, 1, K)
Affine, BN on out axis j   (In, L_0, ..., L_n)   (1, In*L_0..L_{j-1}, L_j, L_{j+1}..L_n)
=========================  ====================  ========================================

Input channels (BN -> layer):

=========================  ====================  ========================================
Convolution                (O, I/g, k...)        (g, O/g, I/g, K)
Convolution channel-last   (O, k..., I/g)        (g, O/g*K, I/g, 1)
DepthwiseConvolution       (C*m, k...)           (C, m, 1, K)
Affine, x axis a, base b   (In, L...)            (1, P, C, Q*L)  with In = P*C*Q
=========================  ====================  ========================================
"""
from dataclasses import dataclass
from math import prod
from typing import Sequence, Tuple

FOLDABLE_INTO = ("Convolution", "Deconvolution", "DepthwiseConvolution", "DepthwiseDeconvolution",
                 "Affine")
# BN -> layer is exact only where the layer is a linear map of each input element alone plus a
# constant: a zero-padded border sees padding, not the BN's shift, and a deconvolution sums a varying
# number of inputs at its borders.
FOLDABLE_FROM = ("Convolution", "DepthwiseConvolution", "Affine")


class LayoutError(ValueError):
    """A layer and a BN disagree on where the channels are; the message says why."""


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
    """The axis of the layer's output that holds its output channels (Affine: the first output axis)."""
    if args.get("channel_last", False):
        return out_ndim - 1
    return _base_axis(args, out_ndim)


def input_channel_axis(kind: str, args: dict, in_ndim: int) -> int:
    return output_channel_axis(kind, args, in_ndim)


def output_layout(kind: str, args: dict, weight_shape: Sequence[int], out_shape: Sequence[int],
                  bn_axis: int) -> Tuple[ChannelLayout, ChannelLayout]:
    """(weight layout, bias layout) for BN over axis ``bn_axis`` of the layer's output."""
    w = tuple(weight_shape)
    ndim = len(out_shape)
    if kind == "Affine":
        base_axis = _base_axis(args, ndim)
        j = bn_axis - base_axis
        if not 0 <= j < len(w) - 1:
            raise LayoutError(f"BN axis {bn_axis} is a batch axis of the Affine output "
                              f"(base_axis={base_axis})")
        out = w[1:]
        before, chans, after = prod(out[:j]), out[j], prod(out[j + 1:])
        return (ChannelLayout(1, w[0] * before, chans, after), ChannelLayout(1, before, chans, after))
    axis = output_channel_axis(kind, args, ndim)
    if bn_axis != axis:
        raise LayoutError(f"BN axis {bn_axis} is not the {kind}'s channel axis {axis}")
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
    else:
        raise LayoutError(f"cannot fold into {kind}")
    return weight, ChannelLayout(1, 1, weight.n_channels, 1)


def input_layout(kind: str, args: dict, weight_shape: Sequence[int], in_shape: Sequence[int],
                 bn_axis: int) -> Tuple[ChannelLayout, Tuple[int, ...]]:
    """(weight layout over input channels, weight axes to sum for the bias) for BN over ``bn_axis``
    of the layer's input."""
    w = tuple(weight_shape)
    ndim = len(in_shape)
    if kind == "Affine":
        base_axis = _base_axis(args, ndim)
        if bn_axis < base_axis:
            raise LayoutError(f"BN axis {bn_axis} is a batch axis of the Affine input "
                              f"(base_axis={base_axis})")
        before = prod(in_shape[base_axis:bn_axis])
        after = prod(in_shape[bn_axis + 1:])
        chans = in_shape[bn_axis]
        return ChannelLayout(1, before, chans, after * prod(w[1:])), (0,)
    axis = input_channel_axis(kind, args, ndim)
    if bn_axis != axis:
        raise LayoutError(f"BN axis {bn_axis} is not the {kind}'s input channel axis {axis}")
    reduce_axes = tuple(range(1, len(w)))
    if kind == "Convolution":
        g = args.get("group", 1)
        if args.get("channel_last", False):
            layout = ChannelLayout(g, w[0] // g * _kernel_size(w, 1, len(w) - 1), w[-1], 1)
        else:
            layout = ChannelLayout(g, w[0] // g, w[1], _kernel_size(w, 2, len(w)))
        return layout, reduce_axes
    if kind == "DepthwiseConvolution":
        m = args.get("multiplier", 1)
        return ChannelLayout(w[0] // m, m, 1, _kernel_size(w, 1, len(w))), reduce_axes
    raise LayoutError(f"cannot fold a BN into the input of {kind}")
