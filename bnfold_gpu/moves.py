"""Where a per-channel affine map goes when it is moved through a function: one rule per function type.

A BN (and a multiply or add by a stored per-channel constant) is a map ``y = s * x + t`` whose ``s`` and
``t`` depend on one index of the tensor, its channel. A :class:`Site` says which: the index over a
range of axes of the tensor (one axis for a BN over ``axes=[1]``). A map moves *backward* through a
function ``f`` when ``map(f(x)) == f(map'(x))`` for a map ``map'`` on ``f``'s input, and *forward*
when ``f(map(x)) == map'(f(x))``; each rule gives the site on the other side and how each channel
index there relates to the map's own (a gather: ``g_other = transform(g)``, entries of -1 meaning
"no map here": scale 1, shift 0), or raises :class:`Stop` with the reason the function does not
commute with the map.

Each rule's exactness condition is in its docstring. Where it depends on the statistics (a ReLU
commutes only with a map whose shift is 0 and whose scale is not negative), the rule asks the
:class:`Facts` it is given, which the planner computes from the map's values. NumPy only: the rules
know shapes and arguments, nothing of NNabla.
"""
from dataclasses import dataclass
from math import prod
from typing import Callable, List, Sequence, Tuple

import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]


def same(g: np.ndarray) -> np.ndarray:
    """The transform of a move that leaves every channel where it was."""
    return g


class Stop(Exception):
    """The map does not move through this function; the message says why."""


@dataclass(frozen=True)
class Site:
    """The channel of an element of a tensor of ``shape`` is its index over the axes [a0, a1)
    (flattened in C order)."""
    shape: Tuple[int, ...]
    a0: int
    a1: int

    @property
    def n(self) -> int:
        return prod(self.shape[self.a0:self.a1])

    @property
    def inner(self) -> int:
        """Elements after the site's axes: flat index f has channel (f // inner) % n."""
        return prod(self.shape[self.a1:])

    def axes(self) -> range:
        return range(self.a0, self.a1)


class Facts:
    """What a rule may ask of the map where it stands. The planner's subclass computes them from the
    statistics; this one knows nothing and answers no."""

    def shift_is_zero(self) -> bool:
        return False

    def scale_nonnegative(self) -> bool:
        return False

    def describe(self) -> str:
        """The map, for a reason: which statistic broke a condition."""
        return "the map"


# -- shapes ---------------------------------------------------------------------------------------
def on_shape(site: Site, shape: Sequence[int]) -> Tuple[Site, Transform]:
    """The same channels on a tensor holding the same elements in the same C order under another
    ``shape`` (a reshape): an axis range of ``shape`` with the same layout, or one axis of ``shape``
    that contains the site's axes (each channel then repeats along the rest of that axis)."""
    shape = tuple(int(d) for d in shape)
    inner, n = site.inner, site.n
    suffix = [prod(shape[k:]) for k in range(len(shape) + 1)]
    if inner in suffix and inner * n in suffix:
        a1 = suffix.index(inner)                                   # tightest: no trailing 1s
        a0 = max(k for k, s in enumerate(suffix) if s == inner * n and k <= a1)
        if a0 < a1 and prod(shape[a0:a1]) == n:
            return Site(shape, a0, a1), same
    for b, size in enumerate(shape):
        inner_b = suffix[b + 1]
        if inner % inner_b == 0 and (size * inner_b) % (inner * n) == 0:
            k = inner // inner_b
            index = (np.arange(size) // k) % n
            return Site(shape, b, b + 1), lambda g, index=index: g[index]
    raise Stop("it spreads the channels over several axes")


def _reshape(site: Site, out_shape) -> Tuple[Site, Transform]:
    return on_shape(site, out_shape)


class Reshape:
    """Exact both ways: the elements keep their C order, so a channel stays a set of elements,
    wherever they land (the channels must still be one index over a range of axes, or one axis that
    contains it: Flatten, and Reshape of channels into (channels, height, width) and back)."""

    @staticmethod
    def backward(args, in_shapes, out_shapes, site, facts):
        return [(0,) + on_shape(site, in_shapes[0])]

    @staticmethod
    def forward(args, in_shapes, out_shapes, index, site, facts):
        return on_shape(site, out_shapes[0])


class Transpose:
    """Exact both ways where the site's axes stay adjacent and in order."""

    @staticmethod
    def backward(args, in_shapes, out_shapes, site, facts):
        axes = list(args["axes"])
        first = axes[site.a0]
        if axes[site.a0:site.a1] != list(range(first, first + site.a1 - site.a0)):
            raise Stop("it reorders the axes the channels span")
        return [(0, Site(tuple(in_shapes[0]), first, first + site.a1 - site.a0), same)]

    @staticmethod
    def forward(args, in_shapes, out_shapes, index, site, facts):
        axes = list(args["axes"])
        where = [axes.index(a) for a in site.axes()]
        if where != list(range(where[0], where[0] + len(where))):
            raise Stop("it reorders the axes the channels span")
        return Site(tuple(out_shapes[0]), where[0], where[0] + len(where)), same


class Identity:
    """Exact: it copies."""

    @staticmethod
    def backward(args, in_shapes, out_shapes, site, facts):
        return [(0, site, same)]

    @staticmethod
    def forward(args, in_shapes, out_shapes, index, site, facts):
        return site, same


def _require(condition, facts: Facts) -> None:
    """Stop unless ``condition`` ((Facts -> bool, reason), or None for none) holds of the map."""
    if condition is not None:
        holds, reason = condition
        if not holds(facts):
            raise Stop(reason.format(map=facts.describe()))


def _spatial_axes(args, ndim: int, n_spatial: int) -> range:
    if args.get("channel_last", False):
        return range(ndim - 1 - n_spatial, ndim - 1)
    return range(ndim - n_spatial, ndim)


class _Spatial:
    """A function of the spatial axes alone, per channel; the map's axes must not be spatial. The
    site keeps its axes; the shapes of the spatial ones change."""
    condition = None   # (Facts -> bool, reason) where exactness depends on the map

    @classmethod
    def spatial(cls, args, ndim) -> range:
        return _spatial_axes(args, ndim, len(args["kernel"]))

    @classmethod
    def touched(cls, args, ndim) -> List[int]:
        """The spatial axes it changes: not those of a 1-wide window that moves 1 at a time without
        padding (a kernel (1, 2, 2) over (C, H, W) leaves the channels alone)."""
        axes = list(cls.spatial(args, ndim))
        kernel = list(args.get("kernel", ()))
        if len(kernel) != len(axes):
            return axes
        stride = list(args.get("stride", [1] * len(axes)))
        pad = list(args.get("pad", [0] * len(axes)))
        return [a for k, a in enumerate(axes)
                if not (kernel[k] == 1 and (stride[k] if k < len(stride) else 1) == 1
                        and not (pad[k] if k < len(pad) else 0))]

    @classmethod
    def check(cls, args, in_shape, site, facts):
        if set(cls.touched(args, len(in_shape))) & set(site.axes()):
            raise Stop("it works along the axes the channels span")
        _require(cls.condition_for(args), facts)

    @classmethod
    def condition_for(cls, args):
        return cls.condition

    @classmethod
    def backward(cls, args, in_shapes, out_shapes, site, facts):
        cls.check(args, in_shapes[0], site, facts)
        return [(0, Site(tuple(in_shapes[0]), site.a0, site.a1), same)]

    @classmethod
    def forward(cls, args, in_shapes, out_shapes, index, site, facts):
        cls.check(args, in_shapes[0], site, facts)
        return Site(tuple(out_shapes[0]), site.a0, site.a1), same


def _shift_zero(facts: Facts) -> bool:
    return facts.shift_is_zero()


def _scale_nonnegative(facts: Facts) -> bool:
    return facts.scale_nonnegative()


class Interpolate(_Spatial):
    """Nearest and linear: each output is a weighted mean of inputs of its own channel, with weights
    summing to 1, so ``interp(s * x + t) == s * interp(x) + t``. Other modes stop the map."""

    @classmethod
    def spatial(cls, args, ndim):
        return _spatial_axes(args, ndim, len(args["output_size"]))

    @classmethod
    def check(cls, args, in_shape, site, facts):
        if args.get("mode") not in ("nearest", "linear"):
            raise Stop(f"its mode {args.get('mode')!r} is not a weighted mean")
        super().check(args, in_shape, site, facts)


class Unpooling(_Spatial):
    """Exact: it repeats each element."""


def _no_empty_window(args, in_shape, out_shape):
    """Stop where a pooling window covers no element of the input: the first starts at ``-pad``,
    the last at ``(out - 1) * stride - pad``, and those between cannot be empty if neither is.
    (NNabla's output sizes give a last window past the end only with a pad of at least the kernel,
    as far as searched; that clause is kept as a guard.)"""
    kernel = list(args.get("kernel", ()))
    axes = list(_spatial_axes(args, len(in_shape), len(kernel)))
    stride = list(args.get("stride", ())) or [1] * len(kernel)
    pad = list(args.get("pad", ())) or [0] * len(kernel)
    for k, a in enumerate(axes):
        p = pad[k] if k < len(pad) else 0
        st = stride[k] if k < len(stride) else 1
        if kernel[k] <= p or (out_shape[a] - 1) * st - p >= in_shape[a]:
            raise Stop(f"some of its windows lie wholly in the padding (kernel {kernel[k]}, pad "
                       f"{p}), where NNabla's output is not computed from the channel's elements")


class AveragePooling(_Spatial):
    """Exact where every window's weights sum to 1: no zero padding counted (``including_pad=False``,
    or no padding). A window that counts padding averages zeros the shift never reached: then
    exact only for a map whose shift is 0."""

    @classmethod
    def condition_for(cls, args):
        if any(p for p in args.get("pad", ())) and args.get("including_pad", True):
            return _shift_zero, ("{map} has a shift that is not zero, and the windows average in "
                                 "zero padding that it never reaches")
        return None


class SumPooling(_Spatial):
    """A sum of a window adds the shift once per element: exact only for a map whose shift is 0."""
    condition = (_shift_zero, "{map} has a shift that is not zero, which a sum over each window "
                              "multiplies")


class MaxPooling(_Spatial):
    """``max(s * x + t) == s * max(x) + t`` exactly where ``s >= 0`` (padding counts as -inf, which
    the map leaves -inf); a negative scale turns the maximum into a minimum. No window may lie
    wholly in the padding (:func:`_no_empty_window`): NNabla computes such an output from memory
    outside the window (another channel's, another sample's), not from the channel's elements. (Sum
    and average pooling give such a window 0, or 0 / 0 without the padding counted: exact under
    their own conditions.)"""
    condition = (_scale_nonnegative, "{map} has a negative scale, which turns the maximum into a "
                                     "minimum")

    @classmethod
    def backward(cls, args, in_shapes, out_shapes, site, facts):
        ways = super().backward(args, in_shapes, out_shapes, site, facts)
        _no_empty_window(args, in_shapes[0], out_shapes[0])
        return ways

    @classmethod
    def forward(cls, args, in_shapes, out_shapes, index, site, facts):
        moved = super().forward(args, in_shapes, out_shapes, index, site, facts)
        _no_empty_window(args, in_shapes[0], out_shapes[0])
        return moved


class GlobalAveragePooling(_Spatial):
    """Exact: a mean over every spatial position of the channel."""

    @classmethod
    def spatial(cls, args, ndim):
        return range(2, ndim)


class Mean:
    """A mean over axes the channels do not span (``F.mean(x, axis=(2, 3))``, as ONNX's
    ReduceMean and many global poolings are written): each output averages elements of one
    channel with weights summing to 1, so ``mean(s * x + t) == s * mean(x) + t``. A mean over an
    axis the channels span stops the map. The reduced axes go (``keep_dims=False``) or stay as 1s."""
    condition = None

    @staticmethod
    def _reduced(args, ndim):
        return sorted({int(a) % ndim for a in args.get("axes", range(ndim))})

    @classmethod
    def backward(cls, args, in_shapes, out_shapes, site, facts):
        in_shape = tuple(in_shapes[0])
        reduced = cls._reduced(args, len(in_shape))
        kept = list(range(len(in_shape))) if args.get("keep_dims", False) else \
            [a for a in range(len(in_shape)) if a not in reduced]
        axes = kept[site.a0:site.a1]
        if not axes or any(a in reduced for a in axes) \
                or axes != list(range(axes[0], axes[0] + len(axes))):
            raise Stop(f"it {cls.verb} across the axes the channels span")
        _require(cls.condition, facts)
        return [(0, Site(in_shape, axes[0], axes[0] + len(axes)), same)]

    @classmethod
    def forward(cls, args, in_shapes, out_shapes, index, site, facts):
        ndim = len(in_shapes[0])
        reduced = cls._reduced(args, ndim)
        if set(reduced) & set(site.axes()):
            raise Stop(f"it {cls.verb} across the axes the channels span")
        _require(cls.condition, facts)
        gone = 0 if args.get("keep_dims", False) else sum(a < site.a0 for a in reduced)
        return Site(tuple(out_shapes[0]), site.a0 - gone, site.a1 - gone), same

    verb = "averages"


class Sum(Mean):
    """A sum over axes the channels do not span adds the shift once per element summed: exact only
    for a map whose shift is 0."""
    condition = (_shift_zero, "{map} has a shift that is not zero, which a sum multiplies")
    verb = "sums"


class Broadcast:
    """Broadcast and Tile copy each element along other axes: exact both ways where the axes the
    channels span keep their size (a tile's new leading axes are other axes)."""

    @staticmethod
    def _offset(in_shape, out_shape, a0, a1):
        d = len(out_shape) - len(in_shape)
        if d < 0 or any(in_shape[a] != out_shape[a + d] for a in range(a0, a1)):
            raise Stop("it repeats elements along the axes the channels span")
        return d

    @classmethod
    def backward(cls, args, in_shapes, out_shapes, site, facts):
        d = len(out_shapes[0]) - len(in_shapes[0])
        if site.a0 < d:
            raise Stop("it adds the axes the channels span")
        cls._offset(tuple(in_shapes[0]), tuple(out_shapes[0]), site.a0 - d, site.a1 - d)
        return [(0, Site(tuple(in_shapes[0]), site.a0 - d, site.a1 - d), same)]

    @classmethod
    def forward(cls, args, in_shapes, out_shapes, index, site, facts):
        d = cls._offset(tuple(in_shapes[0]), tuple(out_shapes[0]), site.a0, site.a1)
        return Site(tuple(out_shapes[0]), site.a0 + d, site.a1 + d), same


class Pad(_Spatial):
    """``reflect`` and ``repeat`` padding copy elements of each channel: exact for any map. Constant
    padding writes a value the map would change (``s * c + t`` for ``c``): exact for ``c == 0`` and a
    map whose shift is 0. Padding along an axis the channels span stops the map."""

    @classmethod
    def check(cls, args, in_shape, site, facts):
        widths = list(args.get("pad_width", ()))
        first = len(in_shape) - len(widths) // 2
        padded = {first + k // 2 for k, w in enumerate(widths) if w}
        if padded & set(site.axes()):
            raise Stop("it pads along the axes the channels span")
        if args.get("mode", "constant") in ("reflect", "repeat") or not padded:
            return
        if args.get("mode", "constant") != "constant":
            raise Stop(f"its mode {args.get('mode')!r} is not a copy of the channel's elements")
        value = float(args.get("constant_value", 0.0))
        if value != 0:
            raise Stop(f"it pads with the constant {value:g}, which the map would change")
        if not facts.shift_is_zero():
            raise Stop(f"{facts.describe()} has a shift that is not zero, and the padding's zeros "
                       f"would not be shifted")


class ReLU:
    """``relu(s * x) == s * relu(x)`` for ``s >= 0``; a shift moves the kink, so only a map with
    shift 0 and no negative scale passes (LeakyReLU alike). Other activations stop a map."""

    @staticmethod
    def check(facts):
        if not facts.shift_is_zero():
            raise Stop(f"{facts.describe()} has a shift that is not zero, which moves the "
                       f"activation's kink")
        if not facts.scale_nonnegative():
            raise Stop(f"{facts.describe()} has a negative scale, which flips the activation")

    @classmethod
    def backward(cls, args, in_shapes, out_shapes, site, facts):
        cls.check(facts)
        return [(0, site, same)]

    @classmethod
    def forward(cls, args, in_shapes, out_shapes, index, site, facts):
        cls.check(facts)
        return site, same


class Concatenate:
    """Along the map's channel axis: the channels split between the inputs (backward) or a map on one
    input covers its part of the output (forward). Along another axis, backward only: every input
    then carries the whole map."""

    @staticmethod
    def backward(args, in_shapes, out_shapes, site, facts):
        axis = args["axis"] % len(out_shapes[0])
        if axis in site.axes() and site.a1 - site.a0 > 1:
            raise Stop("it joins along one of several axes the channels span")
        out, start = [], 0
        for k, shape in enumerate(in_shapes):
            shape = tuple(shape)
            if axis in site.axes():
                size = shape[axis]
                out.append((k, Site(shape, site.a0, site.a1),
                            lambda g, a=start, b=start + size: g[a:b]))
                start += size
            else:
                out.append((k, Site(shape, site.a0, site.a1), same))
        return out

    @staticmethod
    def forward(args, in_shapes, out_shapes, index, site, facts):
        axis = args["axis"] % len(out_shapes[0])
        if axis not in site.axes() or site.a1 - site.a0 > 1:
            raise Stop("it joins along an axis the channels do not span, with inputs the map "
                       "does not reach")
        start = sum(int(s[axis]) for s in in_shapes[:index])
        total = int(out_shapes[0][axis])

        def place(g, start=start, total=total):
            out = np.full(total, -1, np.int64)
            out[start:start + g.size] = g
            return out
        return Site(tuple(out_shapes[0]), site.a0, site.a1), place


class Slice:
    """Exact both ways: backward, the channels the slice drops get no map (nothing reads them);
    forward, the map keeps the channels the slice keeps. Over several axes the channels span, only
    a slice that keeps them all."""

    @staticmethod
    def kept(args, shape, axis) -> np.ndarray:
        """The indices along ``axis`` of a tensor of ``shape`` that the slice keeps."""
        start, stop, step = args["start"][axis], args["stop"][axis], args["step"][axis]
        return np.arange(shape[axis])[slice(start, stop, step)]

    @classmethod
    def _sliced_axis(cls, args, in_shape, site):
        cut = [a for a in site.axes() if cls.kept(args, in_shape, a).size != in_shape[a]
               or (cls.kept(args, in_shape, a) != np.arange(in_shape[a])).any()]
        if cut and site.a1 - site.a0 > 1:
            raise Stop("it cuts one of several axes the channels span")
        return cut[0] if cut else None

    @classmethod
    def backward(cls, args, in_shapes, out_shapes, site, facts):
        in_shape = tuple(in_shapes[0])
        axis = cls._sliced_axis(args, in_shape, Site(in_shape, site.a0, site.a1))
        if axis is None:
            return [(0, Site(in_shape, site.a0, site.a1), same)]
        kept = cls.kept(args, in_shape, axis)

        def spread(g, kept=kept, size=in_shape[axis]):
            out = np.full(size, -1, np.int64)
            out[kept] = g
            return out
        return [(0, Site(in_shape, site.a0, site.a1), spread)]

    @classmethod
    def forward(cls, args, in_shapes, out_shapes, index, site, facts):
        in_shape = tuple(in_shapes[0])
        axis = cls._sliced_axis(args, in_shape, site)
        out = Site(tuple(out_shapes[0]), site.a0, site.a1)
        if axis is None:
            return out, same
        kept = cls.kept(args, in_shape, axis)
        return out, lambda g, kept=kept: g[kept]


class _Join:
    """``map(a + b) == map(a) + (s * b)``: backward, both inputs carry the map, the shift only the
    first (the planner gives the second a scale-only copy); ``map(a - b)`` alike. An input broadcast
    along other axes than the channels' (a pooled branch of shape (N, C, 1, 1)) carries it too. Each input must then
    reach a layer that absorbs it, and feed nothing else. Forward, the other input would have to carry
    the map too: the map stops."""

    @staticmethod
    def backward(args, in_shapes, out_shapes, site, facts):
        out = tuple(out_shapes[0])
        if any(len(s) != len(out) or any(s[a] != out[a] for a in site.axes()) for s in in_shapes):
            raise Stop("it broadcasts one input over the other along the axes the channels span")
        return [(k, Site(tuple(in_shapes[k]), site.a0, site.a1), same) for k in range(2)]

    @staticmethod
    def forward(args, in_shapes, out_shapes, index, site, facts):
        raise Stop("it adds another input, which the map would have to reach too")


Add2 = Sub2 = _Join

RULES = {
    "Reshape": Reshape, "Transpose": Transpose, "Identity": Identity,
    "Interpolate": Interpolate, "Unpooling": Unpooling, "AveragePooling": AveragePooling,
    "SumPooling": SumPooling, "MaxPooling": MaxPooling, "GlobalAveragePooling": GlobalAveragePooling,
    "Mean": Mean, "Sum": Sum, "Pad": Pad, "Broadcast": Broadcast,
    "Tile": Broadcast, "ReLU": ReLU, "LeakyReLU": ReLU, "Concatenate": Concatenate, "Slice": Slice,
    "Add2": Add2, "Sub2": Sub2,
}

# Functions that stop a map, and why: the reason a kept BN gives.
WHY_NOT = {
    "Sigmoid": "a nonlinear activation", "Tanh": "a nonlinear activation", "ELU": "a nonlinear activation",
    "SELU": "a nonlinear activation", "Swish": "a nonlinear activation", "GELU": "a nonlinear activation",
    "ReLU6": "a clipped activation", "HardSigmoid": "a clipped activation", "Softmax": "a softmax across channels",
    "Mul2": "a product with a tensor that is computed, or stored but not one value per channel",
    "Div2": "a quotient with a tensor that is computed, or stored but not one value per channel",
    "Dropout": "random in training",
    "Split": "it removes an axis", "BatchMatmul": "a matrix product with a computed operand",
    "Stack": "it adds an axis, other than as consecutive outputs of one Split stacked back in order",
}


def why_not(type_name: str) -> str:
    """Why a function without a rule stops a map."""
    return WHY_NOT.get(type_name, "it does not commute with a per-channel map")


def backward(type_name: str, args, in_shapes, out_shapes, site: Site, facts: Facts
             ) -> List[Tuple[int, Site, Transform]]:
    """[(input index, site there, gather transform)] for a map on the output of a ``type_name``
    function moved to its inputs; raises Stop."""
    rule = RULES.get(type_name)
    if rule is None:
        raise Stop(why_not(type_name))
    return rule.backward(args, in_shapes, out_shapes, site, facts)


def forward(type_name: str, args, in_shapes, out_shapes, index: int, site: Site, facts: Facts
            ) -> Tuple[Site, Transform]:
    """(site on the output, gather transform) for a map on input ``index`` of a ``type_name``
    function moved to its output; raises Stop."""
    rule = RULES.get(type_name)
    if rule is None:
        raise Stop(why_not(type_name))
    return rule.forward(args, in_shapes, out_shapes, index, site, facts)


def widen(site: Site, gather: np.ndarray, wider: Site) -> np.ndarray:
    """``gather`` of ``site`` expressed over ``wider``, a range of axes of the same tensor that
    contains the site's: each channel of ``wider`` takes the map of the site's index within it."""
    assert wider.a0 <= site.a0 and site.a1 <= wider.a1 and wider.shape == site.shape
    index = np.arange(wider.n)
    return gather[(index // prod(site.shape[site.a1:wider.a1])) % site.n]
