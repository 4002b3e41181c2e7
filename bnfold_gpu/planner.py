"""Graph -> plan: every BN, and every multiply or add by a stored per-channel constant, is a per-channel
affine map ``y = s * x + t``, moved exactly to a layer that absorbs it.

One pass over the functions finds the maps; then each map, downstream ones first, moves backward
(against the data) through the functions it commutes with (``moves``), composing every map it meets,
until the output of a layer absorbs it, which is always exact; failing that it moves forward until
the input of a layer absorbs it, where that is exact; where several functions read the value it
moves through (a fork), it goes to every reader's layer or stays. Going back, a value that other
functions read too is passed where they are slices of channels the map leaves alone (a layer's
output in parts, a BN on each). A layer absorbs one map on each side (maps on parts of it joined).
After an add of two branches, the map's scale goes into both branches' layers and its shift into
one. A layer without a bias of its own (the matrix product NNabla's ONNX importer makes of Gemm)
leaves the map's shift in the add of its bias that follows it (an add of a stored constant, never
a subtraction, whose constant would need the shift with the opposite sign). Every BN that stays says
which function stopped it.
"""
import fnmatch
from dataclasses import dataclass, field, replace
from math import prod
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import moves
from .backends.common import FoldError
from .backends.compose import compose, term_values
from .graph import BN_TYPES, Graph
from .layout import (FOLDABLE_FROM, FOLDABLE_INTO, SHIFT_FREE_ONLY, LayoutError, input_channel_axis,
                     input_layout, output_channel_axis, output_layout, pointwise_deconvolution)
from .moves import Site, Stop
from .plan import (INPUT_SIDE, OUTPUT_SIDE, DerivedMap, FoldSpec, GraphEdit, MapTerm, Plan, Skip)

_CONSTANT_OPS = ("Mul2", "Add2", "Sub2", "Div2", "MulScalar", "AddScalar")


class _Reject(Exception):
    """This map cannot fold this way; the message is the reason."""


def _before(what: str) -> str:
    """How a reason names the function a backward walk stopped at: the one right before the map, or,
    where the walk had moved on (through a concatenation, a reshape...), the one ``what`` (where the
    walk was) comes from."""
    return "the function before it is" if what == "its input" else f"{what} comes from"


class _LayerBias(_Reject):
    """The add is the bias of the matrix product before it (NNabla's ONNX importer builds a Linear
    as Reshape -> BatchMatmul -> Reshape -> Add2): part of that layer, not a map to move."""


class _Fn:
    """A function's type and inputs (read by the Graph), and its arguments, outputs and shapes, each
    asked of NNabla once, when first needed."""
    __slots__ = ("f", "index", "type", "inputs", "_args", "_outputs", "_in_shapes", "_out_shapes")

    def __init__(self, f, index, type_name, inputs):
        self.f, self.index, self.type, self.inputs = f, index, type_name, inputs
        self._args = self._outputs = self._in_shapes = self._out_shapes = None

    @property
    def args(self) -> dict:
        if self._args is None:
            self._args = self.f.info.args
        return self._args

    @property
    def outputs(self) -> list:
        if self._outputs is None:
            self._outputs = list(self.f.outputs)
        return self._outputs

    @property
    def in_shapes(self) -> list:
        if self._in_shapes is None:
            self._in_shapes = [tuple(v.shape) for v in self.inputs]
        return self._in_shapes

    @property
    def out_shapes(self) -> list:
        if self._out_shapes is None:
            self._out_shapes = [tuple(v.shape) for v in self.outputs]
        return self._out_shapes


@dataclass
class _Map:
    """A map function: its term, the input carrying the data, where its channels are (None: the
    same value for every element)."""
    fn: _Fn
    term: MapTerm
    data: int
    site: Optional[Site]
    is_bn: bool
    fused: bool = False


@dataclass
class _Term:
    term: MapTerm
    gather: Optional[np.ndarray]     # over the group's current site; None: uniform
    scale_only: bool = False
    identity: bool = False           # gather is 0, 1, 2...: the term's own channels, as they are


@dataclass
class _Walk:
    """A map on its way: its terms over the current site, the functions it passed."""
    site: Optional[Site]
    terms: List[_Term]
    maps: List[_Map]
    region: List[_Fn]
    park: Optional[tuple] = None     # (add map, its site, terms from it on): where a shift can stay
    passed: list = field(default_factory=list)   # maps passed that a layer before absorbs already
    origin: Optional[MapTerm] = None  # the term of the map the walk moves (the others it met)

    def copy(self):
        return _Walk(self.site, [_Term(t.term, t.gather, t.scale_only, t.identity)
                                 for t in self.terms],
                     list(self.maps), list(self.region), self.park, list(self.passed), self.origin)


@dataclass
class _Side:
    """What one side of one layer absorbs."""
    fn: _Fn
    side: str
    site: Site
    terms: List[_Term]
    maps: List[_Map]
    park: Optional[tuple] = None     # output side of a layer without bias: (add map, site, terms)
    label: str = ""
    region: List[_Fn] = field(default_factory=list)   # every function the fold rebuilds
    scale_only: bool = False         # the map's shift is zero where it lands (checked): not folded
    layouts: tuple = ()              # what layout.output_layout / input_layout said
    arrays: tuple = ()               # what _layer_arrays said
    append: bool = False             # input side of a matrix product without bias: an add follows


def plan(graph: Graph, inplace: bool = True, reserved=(), dtypes=None, values=None, skip=(),
         constants: bool = True, fed=None, keep: Optional[str] = None) -> Plan:
    """The plan for ``graph``. ``inplace=False`` sends every folded array to a new name; new names
    avoid every name of the graph and of ``reserved``. ``dtypes`` (name -> dtype) gives the arrays'
    dtypes where the graph's parameters hold no data; otherwise they are read from the parameters.
    ``values(var, name)`` gives a parameter's values, for the moves whose exactness depends on them
    (default: read from the variable). ``skip``: BN names or glob patterns not to fold.
    ``constants=False``: multiplies and adds by stored constants are not maps (they stay).
    ``fed``: {variable: name} of the graph's inputs fed as it runs (a file declares them), never
    taken for stored statistics or weights. ``keep``: a reason every BN stays for (nothing folds)."""
    return _Planner(graph, inplace, reserved, dtypes, values, skip, constants, fed, keep).run()


class _Facts(moves.Facts):
    """The walk's map, evaluated where it stands (float64, from the statistics)."""

    def __init__(self, planner, walk: _Walk):
        self.planner, self.walk = planner, walk
        self._values = None

    def _map(self):
        if self._values is None:
            w = self.walk
            n = w.site.n if w.site is not None else 1
            terms = tuple((t.term, np.zeros(n, np.int64) if t.gather is None else t.gather,
                           t.scale_only) for t in w.terms)
            try:
                s, t = compose(DerivedMap("", "", n, terms), self.planner.value_of, np)
            except FoldError:
                s = t = np.array([np.nan])
            self._values = (s, t)
        return self._values

    def shift_is_zero(self) -> bool:
        return bool((self._map()[1] == 0).all())

    def scale_nonnegative(self) -> bool:
        return bool((self._map()[0] >= 0).all())

    def describe(self) -> str:
        """"its map", or the map composed of it and the others the walk met, which are named (going
        back, the walk puts those it meets before its own term; going forward, after it)."""
        others = [t.term.label for t in self.walk.terms if t.term is not self.walk.origin]
        return "the map it composes with " + ", ".join(others) if others else "its map"


class _Planner:
    def __init__(self, graph: Graph, inplace: bool, reserved=(), dtypes=None, values=None, skip=(),
                 constants: bool = True, fed=None, keep=None):
        self.g = graph
        self.keep = keep
        self.fed = fed or {}
        self.constants = constants
        self.dtypes = dtypes or {}
        self.inplace = inplace
        self.values = values
        self.skip = tuple(skip)
        self.outputs = set(graph.outputs)
        self.taken = graph.all_names() | set(reserved)
        self.fns = [_Fn(f, i, t, ins) for i, (f, t, ins) in
                    enumerate(zip(graph.functions, graph.types, graph.inputs))]
        self.by_f = {fn.f: fn for fn in self.fns}
        self.consumers: Dict = {}
        for fn in self.fns:
            for k, v in enumerate(fn.inputs):
                self.consumers.setdefault(v, []).append((fn, k))
        self.arrays: Dict[str, Tuple[tuple, np.dtype]] = {}
        self.sources: Dict[str, str] = {}
        self.claimed = set()                          # map functions taken by a fold
        self.held = set()                             # adds whose constant holds a layer's bias
        self.sides: Dict[Tuple[int, str], _Side] = {}
        self.owner: Dict[int, Tuple[int, str]] = {}   # map function -> the first side taking it
        self.pending: Dict[Tuple[int, str], _Side] = {}   # the sides the current walk reached
        self.wanted_bias = set()                      # matrix products a map after found no bias of
        self.bad_constants: Dict[int, str] = {}       # constant function -> why it is no map
        self._values_cache = {}
        self._holders = None                          # array -> the graph's variables holding it
        # running statistics a BN on batch statistics updates as the graph runs: not constants
        self.updated: Dict = {}
        for fn in self.fns:
            if fn.type in BN_TYPES and fn.args.get("batch_stat") and len(fn.inputs) >= 3:
                at = (3, 4) if fn.type == "FusedBatchNormalization" else \
                    (len(fn.inputs) - 2, len(fn.inputs) - 1)
                for k in at:
                    if k < len(fn.inputs):
                        for v in (fn.inputs[k], self._statistic(fn.inputs[k])):
                            if v is not None:
                                self.updated.setdefault(v, fn)
        self._labels, self._bases = self._bn_labels()

    # -- reading the graph ---------------------------------------------------------------------------
    def _uses(self, var) -> int:
        """How many function inputs read ``var``. In the graph, by NNabla's variable identity: a
        parameter reused by several parametric-function calls has one handle per call. Through this
        handle's ``function_references``, which also sees functions outside the graph. A function
        that reads ``var`` twice counts twice."""
        in_graph = self.g.uses[var]
        if in_graph > 1:    # enough to say no: spared NNabla's references
            return in_graph
        refs = var.function_references
        if len(refs) == 1 and refs[0] in self.by_f:   # the usual case: the graph's one reader
            return max(in_graph, 1)
        elsewhere = sum(1 for f in refs if _live(f) for v in f.inputs if v == var)
        return max(in_graph, elsewhere)

    def _only_here(self, var, what: str):
        """_Reject unless ``var`` is read by one function input and is no graph output: a fold
        changes its values."""
        if var in self.outputs:
            raise _Reject(f"{what} is also a graph output")
        uses = self._uses(var)
        if uses > 1:
            raise self._read_elsewhere(var, what, uses)

    def _read_elsewhere(self, var, what: str, uses: int) -> _Reject:
        """Why ``var``, which ``uses`` function inputs read, stops a map."""
        readers = self.consumers.get(var, [])
        if len(readers) == uses and all(fn is readers[0][0] for fn, _ in readers):
            return _Reject(f"{what} is read {uses} times, all by the same {readers[0][0].type} "
                           f"(its inputs {', '.join(str(k) for _, k in readers)})")
        return _Reject(f"{what} also feeds {uses - 1} other function input(s)")

    def value_of(self, name: str) -> np.ndarray:
        got = self._values_cache.get(name)
        if got is None:
            if not hasattr(self, "_by_name"):
                self._by_name = self.g.variables_by_name()
            var = self._by_name.get(name)
            if self.values is not None:
                got = np.asarray(self.values(var, name))
            else:
                got = np.array(var.data.get_data("r"))
            self._values_cache[name] = got
        return got

    def _stored(self, var) -> Optional[Tuple["object", List[_Fn]]]:
        """(parameter, reshapes between) when ``var`` is a stored parameter, possibly through
        reshapes read only here (as NNabla's ONNX importer feeds matrices and biases); else None."""
        reshapes = []
        while var.parent is not None:
            fn = self.by_f.get(var.parent)
            if fn is None or fn.type != "Reshape" or self._uses(var) != 1 or var in self.outputs:
                return None
            reshapes.append(fn)
            var = fn.inputs[0]
        return var, reshapes[::-1]

    def _scaled_stored(self, var):
        """((parameter, the functions between), factor) when ``var`` is a stored parameter times a
        constant, through reshapes and one MulScalar each read only here (NNabla's importer feeds
        an ONNX Gemm's bias so, scaled by beta); else (None, 1.0)."""
        chain, factor = [], None
        while var.parent is not None:
            fn = self.by_f.get(var.parent)
            if fn is None or fn.type not in ("Reshape", "MulScalar") or self._uses(var) != 1 \
                    or var in self.outputs or fn.type == "MulScalar" and factor is not None:
                return None, 1.0
            if fn.type == "MulScalar":
                factor = float(fn.args["val"])
            chain.append(fn)
            var = fn.inputs[0]
        if factor is None or factor == 0.0 or not np.isfinite(factor):
            return None, 1.0
        return (var, chain[::-1]), factor

    def _registered(self, var) -> bool:
        """A constant operand is a parameter, not a data input fed at run time: it is registered."""
        return self.g.home(var) is not None

    def _statistic(self, var):
        """The parameter holding a BN's statistic ``var``: ``var`` itself, or the parameter it is
        reshaped from (as NNabla's BN over several axes feeds them: through Transposes that keep
        the order of the elements, and Reshapes); None where ``var`` is computed otherwise."""
        while var.parent is not None:
            fn = self.by_f.get(var.parent)
            if fn is None or fn.type not in ("Reshape", "Transpose"):
                return None
            if fn.type == "Transpose":
                shape = fn.in_shapes[0]
                moved = [a for a in fn.args["axes"] if shape[a] != 1]
                if moved != sorted(moved):
                    return None
            var = fn.inputs[0]
        return var

    def _not_updated(self, var, what: str):
        """_Reject where ``var`` is a running statistic that a BN on batch statistics updates, or
        an input of the graph fed as it runs."""
        if var in self.fed:
            raise _Reject(f"{what} is '{self.fed[var]}', an input of the network fed as it runs, "
                          f"not a stored parameter")
        writer = self.updated.get(var)
        if writer is not None:
            raise _Reject(f"{what} is a running statistic that the {writer.type} "
                          f"{self._bn_label(writer)} (batch_stat=True) updates as the network runs")

    def _bn_label(self, fn: _Fn) -> str:
        return self._labels[fn.index]

    def _bn_labels(self):
        """({BN index: its name}, {BN index: its own name}): a BN's own name is its mean's without
        ``/mean``; a second BN of the same statistics (a module applied twice) is named with
        `` (2)`` after it, and so on, so that each is counted and reported."""
        bases = {fn.index: self._own_label(fn) for fn in self.fns if fn.type in BN_TYPES}
        used, seen, labels = set(bases.values()), set(), {}
        for index, base in bases.items():
            label, k = base, 1
            while label in seen or (k > 1 and label in used):
                k += 1
                label = f"{base} ({k})"
            seen.add(label)
            labels[index] = label
        return labels, bases

    def _own_label(self, fn: _Fn) -> str:
        inputs = fn.inputs
        mean_at = 3 if fn.type == "FusedBatchNormalization" else len(inputs) - 2
        if len(inputs) < 3:
            return f"<{fn.type} #{fn.index}>"
        mean = self._statistic(inputs[mean_at])
        mean = inputs[mean_at] if mean is None else mean
        name = self.fed.get(mean) or self.g.name(mean, fn.type)
        return name[:-len("/mean")] if name.endswith("/mean") else name

    # -- the maps of the graph -------------------------------------------------------------------------
    def _bn_map(self, fn: _Fn) -> _Map:
        args = fn.args
        if args["batch_stat"]:
            raise _Reject("batch_stat=True: it normalizes with each batch's statistics, not a fixed "
                          "per-channel map")
        if fn.type == "FusedBatchNormalization" and args.get("nonlinearity") != "relu":
            raise _Reject(f"nonlinearity {args.get('nonlinearity')!r} is not supported")
        inputs = fn.inputs
        if fn.type == "BatchNormalization":
            labels = ["beta"] * (not args["no_bias"]) + ["gamma"] * (not args["no_scale"])
            labels += ["mean", "var"]
            if len(inputs) != 1 + len(labels):
                raise _Reject(f"has {len(inputs) - 1} parameter inputs, expected {len(labels)} "
                              f"for no_bias={args['no_bias']}, no_scale={args['no_scale']}")
        else:
            labels = ["beta", "gamma", "mean", "var"]
        params = dict(zip(labels, inputs[1:]))
        for label, v in params.items():
            params[label] = self._statistic(v)
            if params[label] is None:
                raise _Reject(f"its {label} is computed in the graph, not a stored parameter")
            self._not_updated(params[label], f"its {label}")
        x = inputs[0]
        axes = sorted(a + (x.ndim if a < 0 else 0) for a in args["axes"])
        if axes != list(range(axes[0], axes[0] + len(axes))):
            raise _Reject(f"normalizes over axes {list(args['axes'])}, which are not adjacent")
        site = Site(tuple(x.shape), axes[0], axes[-1] + 1)
        label = self._bn_label(fn)
        names = {k: self.g.name(v, k) for k, v in params.items()}
        for k, v in params.items():
            if v.size != site.n:
                raise FoldError(f"{label}: {k} has {v.size} values but the BN normalizes "
                                f"{site.n} channels")
            self.arrays[names[k]] = (tuple(v.shape), self._dtype(names[k], v))
        term = MapTerm(label, "bn", site.n, gamma=names.get("gamma"), beta=names.get("beta"),
                       mean=names["mean"], var=names["var"], eps=float(args["eps"]))
        # one channel: the same map for every element, moved as a uniform map (a scalar's)
        return _Map(fn, term, 0, site if site.n > 1 else None, True,
                    fused=fn.type == "FusedBatchNormalization")

    def _constant_map(self, fn: _Fn) -> Optional[_Map]:
        """A multiply or add by a stored constant as a map, or None."""
        if fn.type in ("MulScalar", "AddScalar"):
            label = f"{fn.type}({fn.args['val']:g}) #{fn.index}"
            kind = "scale" if fn.type == "MulScalar" else "shift"
            term = MapTerm(label, kind, 1, scalar=float(fn.args["val"]))
            if not self._finite_map(fn, term):
                return None
            return _Map(fn, term, 0, None, False)
        if len(fn.inputs) != 2:
            return None
        for data, const in ((0, 1), (1, 0)):
            if fn.type in ("Sub2", "Div2") and data != 0:
                continue      # c - x and c / x are not maps of x of this form
            x, c = fn.inputs[data], fn.inputs[const]
            if tuple(x.shape) != fn.out_shapes[0] or x.parent is None:
                continue
            stored, factor = self._stored(c), 1.0
            if stored is None and fn.type in ("Add2", "Sub2"):
                stored, factor = self._scaled_stored(c)
            if stored is None or not self._registered(stored[0]) or stored[0] in self.updated:
                continue
            site = _constant_site(tuple(c.shape), tuple(x.shape))
            if site is False:
                continue
            name = self.g.name(stored[0], "constant")
            dtype = self._dtype(name, stored[0])
            kind = "scale" if fn.type in ("Mul2", "Div2") else "shift"
            shown = name if factor == 1.0 else f"{factor:g} * {name}"
            term = MapTerm(f"{fn.type}({shown})", kind, site.n if site else 1, value=name,
                           reciprocal=fn.type == "Div2", negate=fn.type == "Sub2", factor=factor)
            if not self._finite_map(fn, term):
                return None
            self.arrays[name] = (tuple(stored[0].shape), dtype)
            m = _Map(fn, term, data, site, False)
            m.constant = (const, stored)
            return m
        return None

    def _finite_map(self, fn: _Fn, term: MapTerm) -> bool:
        """Whether the constant of ``term`` makes a finite map (as the backends check it: no inf or
        NaN, no quotient by 0); where it does not, the function stays, saying why to a map it
        stops, rather than make the whole fold fail."""
        try:
            with np.errstate(all="ignore"):
                term_values(term, self.value_of, np)
        except FoldError as e:
            self.bad_constants[fn.index] = str(e)
            return False
        return True

    def _dtype(self, name: str, var) -> np.dtype:
        dtype = self.dtypes.get(name)
        if dtype is not None:
            return np.dtype(dtype)
        try:
            return np.dtype(var.data.dtype)
        except RuntimeError:    # NNabla: "Array is not initialized"
            raise FoldError(f"parameter '{name}' holds no values (created without an initializer "
                            f"and never set)") from None

    # -- the plan -----------------------------------------------------------------------------------
    def run(self) -> Plan:
        maps: Dict[int, _Map] = {}
        results: Dict[int, str] = {}     # BN index -> why it stays
        bns = []
        for fn in self.fns:
            if fn.type in BN_TYPES:
                bns.append(fn)
                label = self._bn_label(fn)
                base = self._bases[fn.index]   # a skipped name keeps every use of its BN
                pattern = next((p for p in self.skip if fnmatch.fnmatchcase(label, p)
                                or fnmatch.fnmatchcase(base, p)), None)
                if pattern is not None:
                    results[fn.index] = f"skipped on request (matches {pattern!r})"
                    continue
                if self.keep is not None:
                    results[fn.index] = self.keep
                    continue
                try:
                    maps[fn.index] = self._bn_map(fn)
                except _Reject as r:
                    results[fn.index] = str(r)
            elif self.constants and self.keep is None and fn.type in _CONSTANT_OPS:
                m = self._constant_map(fn)
                if m is not None:
                    maps[fn.index] = m
        self.maps = maps
        why_back = {}
        for index in sorted(maps, reverse=True):    # downstream first: it composes those before it
            if index in self.claimed:
                continue
            try:
                self._backward(maps[index])
            except _LayerBias:   # stays with its layer: moving it on would take a layer's bias away
                continue
            except _Reject as r:
                why_back[index] = str(r)
        for index in sorted(why_back):              # upstream first: it composes those after it
            m = maps[index]
            if index in self.claimed:
                continue
            if m.fused:
                results[index] = (f"{why_back[index]}; it does not move forward: its own ReLU "
                                  f"(and add) come after its map")
                continue
            try:
                self._forward(m)
            except _Reject as r:
                results[index] = f"{why_back[index]}; {r}"
        specs, derived, intermediates, edit = self._specs()
        skipped = tuple(Skip(self._bn_label(fn), fn.type, results[fn.index], fn.index)
                        for fn in bns if fn.index not in self.claimed)
        return Plan(specs, skipped, dict(self.arrays), dict(self.sources), derived,
                    frozenset(intermediates), edit)

    # -- backward: to a layer's output ---------------------------------------------------------------
    def _start(self, m: _Map) -> _Walk:
        gather = None if m.site is None else np.arange(m.site.n)
        return _Walk(m.site, [_Term(m.term, gather, identity=gather is not None)], [m], [m.fn],
                     origin=m.term)

    def _backward(self, m: _Map):
        if self._is_layer_bias(m):
            raise _LayerBias("it is the bias of the BatchMatmul before it")
        walk = self._start(m)
        self.pending = {}   # the sides this walk reaches: branches reaching one layer join there
        try:
            self._walk_back(m.fn.inputs[m.data], walk, "its input", (m.fn, m.data))
            sides = list(self.pending.values())
        finally:
            self.pending = {}
        for side in sides:   # every branch reached a layer: commit
            self._claim_side(side)

    def _is_layer_bias(self, m: _Map) -> bool:
        """Whether ``m`` is the add of a layer's bias: the stored constant added after a BatchMatmul
        by a stored matrix, through reshapes only (:meth:`_matmul_bias`)."""
        if m.term.kind != "shift" or m.term.value is None:
            return False
        var = m.fn.inputs[m.data]
        while var.parent is not None:
            fn = self.by_f.get(var.parent)
            if fn is None:
                return False
            if fn.type == "BatchMatmul":
                if len(fn.inputs) != 2 or self._stored(fn.inputs[1]) is None:
                    return False
                bias = self._matmul_bias(fn)
                return bias is not None and bias[2] is m
            if fn.type != "Reshape":
                return False
            var = fn.inputs[0]
        return False

    def _walk_back(self, var, walk: _Walk, what: str, reader):
        """Moves the walk's map back from ``var``, which ``reader`` (function, input) reads, to the
        layers that absorb it (each side into ``self.pending``), or raises _Reject. Branches (a
        concatenation, an add) are followed from a list, not by recursion: graphs nest deeply."""
        todo = [(var, walk, what, reader)]
        while todo:
            var, walk, what, reader = todo.pop()
            while True:
                self._apart(var, what, walk, reader)
                fn = self.by_f.get(var.parent)
                if fn is None:
                    raise _Reject(f"no layer before it ({what} is not computed by a function)")
                m = self.maps.get(fn.index)
                if m is not None and m.fn.outputs[0] == var and not m.fused and \
                        self._absorbed_before(m):
                    # a layer before absorbs it already (or another branch of this walk takes it
                    # there): the walk goes on to that layer, to be applied after it
                    walk.passed.append(m)
                    walk.region.append(fn)
                    var, what, reader = fn.inputs[m.data], f"the input of {m.term.label}", \
                        (fn, m.data)
                    continue
                if m is not None and fn.index not in self.claimed and m.fn.outputs[0] == var \
                        and (not m.fused or self._through_relu(fn, m, walk, what)):
                    self._compose_before(walk, m)
                    var, what, reader = fn.inputs[m.data], f"the input of {m.term.label}", \
                        (fn, m.data)
                    continue
                if fn.type in FOLDABLE_INTO and fn.outputs[0] == var:
                    self._absorb_output(fn, walk)
                    break
                if fn.type in ("Add2", "Sub2") and self.maps.get(fn.index) is None:
                    todo += self._join_back(fn, walk, what)[::-1]
                    break
                if fn.type in BN_TYPES or m is not None:
                    raise _Reject(f"{_before(what)} {self._map_name(fn, m)}")
                before = self._site_for(walk, fn.out_shapes[0])
                part = self._split_part(fn) if fn.type == "Stack" else None
                if part is not None:   # a slice of the Split's input: moved back as one
                    var, what, reader = self._back_through_split(fn, walk, before, *part,
                                                                 what=what)
                    continue
                ways = self._through(fn, walk, what)
                if len(ways) == 1:
                    k, site, transform = ways[0]
                    # a uniform map (a scalar's, a one-channel BN's) through a slice of a value
                    # others read too: over the channels kept only, so that what they read stays
                    shared = fn.type == "Slice" and len(self.consumers.get(fn.inputs[k], ())) > 1
                    self._move(walk, site, transform, before if shared else None)
                    var, what, reader = fn.inputs[k], f"the input of {fn.type}", (fn, k)
                    continue
                branches = []
                for k, site, transform in ways:   # a concatenation: every input takes its channels
                    branch = walk.copy()
                    branch.park = None
                    self._move(branch, site, transform)
                    branches.append((fn.inputs[k], branch, f"input {k} of {fn.type}", (fn, k)))
                todo += branches[::-1]
                break

    def _back_through_split(self, fn: _Fn, walk: _Walk, before: Site, split: _Fn, args, axis,
                            kept, what: str = "its input"):
        """The walk moved back through the Stack ``fn`` and the Split before it, as through a
        slice of the Split's input; (the Split's input, what it is, its reader) to go on from."""
        try:
            (_, site, transform), = moves.Slice.backward(args, split.in_shapes, fn.out_shapes,
                                                         before, _Facts(self, walk))
        except Stop as s:
            raise _Reject(f"{_before(what)} Stack: {s}") from None
        walk.region += [fn, split]
        self._move(walk, site, transform, before)
        if kept.size < split.in_shapes[0][axis]:   # the Split's other outputs read the rest
            touched = self._touched(walk)
            if touched is None or (walk.site.a0, walk.site.a1) != (axis, axis + 1) or \
                    np.delete(touched, kept).any():
                raise _Reject("the Split before it has other outputs, which read what the map "
                              "would change")
        return split.inputs[0], "the input of Split", (split, 0)

    def _split_part(self, fn: _Fn) -> Optional[tuple]:
        """(the Split, the Slice arguments the pair amounts to, the axis, the indices kept) where
        the Stack ``fn`` joins consecutive outputs of one Split, in order, along the axis the Split
        removed, each output read by this Stack only: a slice of the Split's input (older NNabla
        ONNX importers make an ONNX Split into a Split and a Stack per part). Else None."""
        parents = {v.parent for v in fn.inputs}
        split = self.by_f.get(next(iter(parents))) if len(parents) == 1 else None
        if split is None or split.type != "Split":
            return None
        shape = split.in_shapes[0]
        axis = split.args["axis"] % len(shape)
        if fn.args["axis"] % len(fn.out_shapes[0]) != axis:
            return None
        at = [next((i for i, o in enumerate(split.outputs) if o == v), -1) for v in fn.inputs]
        if at != list(range(at[0], at[0] + len(at))) or at[0] < 0:
            return None
        if any(v in self.outputs or self._uses(v) != 1 for v in fn.inputs):
            return None
        start, stop = [0] * len(shape), list(shape)
        start[axis], stop[axis] = at[0], at[0] + len(at)
        kept = np.arange(at[0], at[0] + len(at))
        return split, {"start": start, "stop": stop, "step": [1] * len(shape)}, axis, kept

    def _absorbed_before(self, m: _Map) -> bool:
        """Whether a layer's output side takes ``m`` already: claimed by an earlier walk, or by
        another branch of this one."""
        return self.owner.get(m.fn.index, (None, None))[1] == OUTPUT_SIDE or self._pending_takes(m)

    def _pending_takes(self, m: _Map) -> bool:
        """Whether another branch of the current walk takes ``m`` into a layer."""
        return any(q is m for side in self.pending.values() for q in side.maps)

    def _apart(self, var, what: str, walk: _Walk, reader):
        """_Reject unless changing ``var`` where the walk's map touches it changes nothing but what
        ``reader`` reads: ``var`` is no graph output, and every other function reading it is a
        Slice of channels the map leaves alone (a layer's output split into parts, each with its
        own BN). A map before ``var`` that the walk composes goes whole into the layer, so the
        others still read it applied."""
        others = [(fn, k) for fn, k in self.consumers.get(var, ()) if (fn, k) != reader]
        if not others or var in self.outputs:
            self._only_here(var, what)
            return
        touched = self._touched(walk)
        for fn, k in others:
            read = self._slice_reads(fn, walk.site) if touched is not None else None
            if read is None or (read & touched).any():
                raise self._read_elsewhere(var, what, self._uses(var))
        self._not_read_outside(var, what)

    @staticmethod
    def _touched(walk: _Walk) -> Optional[np.ndarray]:
        """The channels of the walk's site its map changes (a mask), None where it changes all."""
        if walk.site is None or any(t.gather is None for t in walk.terms):
            return None
        touched = np.zeros(walk.site.n, bool)
        for t in walk.terms:
            touched |= t.gather >= 0
        return touched

    @staticmethod
    def _slice_reads(fn: _Fn, site: Site) -> Optional[np.ndarray]:
        """The channels of ``site`` a Slice reads (a mask), None where ``fn`` is no Slice."""
        if fn.type != "Slice" or tuple(fn.in_shapes[0]) != site.shape:
            return None
        axes = list(site.axes())
        read = np.zeros([site.shape[a] for a in axes], bool)
        read[np.ix_(*[moves.Slice.kept(fn.args, site.shape, a) for a in axes])] = True
        return read.reshape(-1)

    def _through_relu(self, fn: _Fn, m: _Map, walk: _Walk, what: str = "its input") -> bool:
        """relu(BN(x)) without an add: whether the walk's map passes the ReLU (no shift, no negative
        scale), and so composes with the BN before it, the ReLU staying. _Reject where it does not;
        False where the fused BN adds another input (the map stops there, as for any fused BN)."""
        if len(fn.inputs) > 5:
            return False
        try:
            moves.ReLU.check(_Facts(self, walk))
        except Stop as s:
            raise _Reject(f"{_before(what)} {fn.type} {m.term.label}, whose ReLU it "
                          f"does not pass: {s}") from None
        return True

    def _through(self, fn: _Fn, walk: _Walk, what: str = "its input"):
        """The rule's ways through ``fn`` for the walk's map (``moves.backward``), ``fn`` added to
        the walk's region; _Reject with the rule's reason where the map stops."""
        site = self._site_for(walk, fn.out_shapes[0])
        if fn.index in self.bad_constants:
            raise _Reject(f"{_before(what)} {fn.type}, which stays: "
                          f"{self.bad_constants[fn.index]}")
        ways, _, why = self._first_passing(walk, site, lambda s: moves.backward(
            fn.type, fn.args, fn.in_shapes, fn.out_shapes, s, _Facts(self, walk)))
        if why is not None:
            raise _Reject(f"{_before(what)} {fn.type}: {why}")
        walk.region.append(fn)
        return ways

    @staticmethod
    def _first_passing(walk: _Walk, site: Site, rule):
        """(``rule(s)``, ``s``, None) for the first site ``s`` the rule passes: ``site``, and for a
        uniform map (a scalar's, a one-channel BN's: the same map for every element, placed on axis
        1 by default) each other axis in turn, since any axis holds it (a function working along
        axis 1, such as a channel-last pooling or a mean over the channels, stops it on that axis
        only). Else (None, None, the rule's reason for ``site``)."""
        sites = [site]
        if walk.site is None:
            sites += [Site(site.shape, a, a + 1) for a in range(len(site.shape)) if a != site.a0]
        why = None
        for s in sites:
            try:
                return rule(s), s, None
            except Stop as e:
                why = why or str(e)   # the text: the exception would hold this frame
        return None, None, why

    def _map_name(self, fn: _Fn, m: Optional[_Map]) -> str:
        """A map function that a walk meets and cannot compose, and why."""
        if m is None:
            return f"{fn.type} {self._bn_label(fn)}, which stays"
        if m.fused:
            return f"{fn.type} {m.term.label}, whose add and ReLU stop the map"
        if fn.index in self.claimed:
            return f"{m.term.label}, which folds into another layer"
        return f"{m.term.label}, which it does not reach on its data input"

    def _join_back(self, fn: _Fn, walk: _Walk, what: str = "its input") -> list:
        """``map(a + b)``: the map's scale goes to both inputs' layers, its shift to the first.
        The branches to follow: (input, walk, what it is, its reader)."""
        branches = []
        for k, site, transform in self._through(fn, walk, what):
            branch = walk.copy()
            branch.park = None
            if k > 0:
                for t in branch.terms:
                    t.scale_only = True
            self._move(branch, site, transform)
            branches.append((fn.inputs[k], branch, f"input {k} of {fn.type}", (fn, k)))
        return branches

    def _compose_before(self, walk: _Walk, m: _Map):
        """``m`` applies before the walk's terms: it goes first."""
        gather = self._gather_here(walk, m)
        walk.terms.insert(0, _Term(m.term, gather, identity=self._identity(walk, m, gather)))
        walk.maps.append(m)
        walk.region.append(m.fn)
        if m.term.kind == "shift" and m.term.value is not None and not m.term.negate:
            # the add's stored constant can hold the shift of the maps after it (c * s + t); not a
            # subtraction's (x - c would need c * s - t)
            walk.park = (m, walk.site, [_Term(t.term, t.gather, t.scale_only, t.identity)
                                        for t in walk.terms])
        else:
            walk.park = None

    def _gather_here(self, walk: _Walk, m: _Map) -> Optional[np.ndarray]:
        """``m``'s gather over the walk's site (the site widened where the two differ)."""
        if m.site is None:
            return None
        if walk.site is None or all(t.gather is None for t in walk.terms):
            walk.site = m.site
            return np.arange(m.site.n)
        if (walk.site.a0, walk.site.a1) == (m.site.a0, m.site.a1):
            return np.arange(m.site.n)
        wider = Site(walk.site.shape, min(walk.site.a0, m.site.a0), max(walk.site.a1, m.site.a1))
        for t in walk.terms:
            if t.gather is not None:
                t.gather = moves.widen(walk.site, t.gather, wider)
                t.identity = False
        walk.site = wider
        return moves.widen(m.site, np.arange(m.site.n), wider)

    @staticmethod
    def _identity(walk: _Walk, m: _Map, gather) -> bool:
        return gather is not None and m.site is not None and walk.site is not None and \
            (walk.site.a0, walk.site.a1) == (m.site.a0, m.site.a1)

    def _site_for(self, walk: _Walk, shape) -> Site:
        """The walk's site over a tensor of ``shape`` (a uniform map takes the channel axis 1)."""
        if walk.site is None:
            if not len(shape):   # no axis to hold it: the rules work along axes
                raise _Reject("it meets a 0-d value (one number, no axis), which maps are not "
                              "moved across")
            return Site(tuple(shape), min(1, len(shape) - 1), min(2, len(shape)))
        return walk.site

    @staticmethod
    def _move(walk: _Walk, site: Site, transform, before: Optional[Site] = None):
        """The walk moved to ``site``. ``before``, for a forward move: the site the rule was given,
        over which a uniform term (a scalar's, a one-channel BN's) takes a gather where the move
        leaves elements the map does not reach (-1: another input of a concatenation), instead of
        covering them too."""
        if transform is moves.same:
            if walk.site is not None:
                walk.site = site
            return
        gathered = walk.site is not None
        for t in walk.terms:
            if t.gather is not None:
                t.gather = transform(t.gather)
                t.identity = False
            elif before is not None:
                g = transform(np.zeros(before.n, np.int64))
                if (g < 0).any():
                    t.gather = g
                    t.identity = False
                    gathered = True
        if gathered:
            walk.site = site

    # -- forward: to a layer's input -------------------------------------------------------------------
    def _forward(self, m: _Map):
        self.pending = {}   # the sides this walk reaches: paths reaching one layer join there
        try:
            self._walk_forward(m.fn.outputs[0], self._start(m), "its output")
            sides = list(self.pending.values())
        finally:
            self.pending = {}
        for side in sides:   # every reader reached a layer: commit
            self._claim_side(side)

    def _readers(self, var, what: str) -> list:
        """The graph's (function, input) pairs reading ``var``, every one of which a forward map must
        reach a layer through; _Reject where ``var`` is a graph output or is read outside the
        graph."""
        readers = self.consumers.get(var, [])
        if len(readers) < 2:
            self._only_here(var, what)
            return readers
        if var in self.outputs:
            raise _Reject(f"{what} is also a graph output")
        self._not_read_outside(var, what)
        return readers

    def _not_read_outside(self, var, what: str):
        """_Reject where a function outside the graph (one the caller holds) reads ``var``."""
        outside = sum(1 for f in var.function_references if _live(f) and f not in self.by_f
                      for v in f.inputs if v == var)
        if outside:
            raise _Reject(f"{what} also feeds {outside} function input(s) outside the graph")

    def _walk_forward(self, var, walk: _Walk, what: str):
        """Moves the walk's map forward from ``var`` to the layers that absorb it (each side into
        ``self.pending``), or raises _Reject. Where ``var`` (or a value after it) is read by
        several functions (a fork), the map goes to every reader, each on its own copy of the
        walk, or nowhere; the readers are followed from a list, not by recursion."""
        todo = [(var, walk, what, "")]   # ..., what a reason from there on is prefixed with
        while todo:
            var, walk, what, prefix = todo.pop()
            try:
                while True:
                    readers = self._readers(var, what)
                    if not readers:   # nothing to absorb the map: it would be lost
                        raise _Reject(f"{what} is read by no function")
                    if len(readers) == 1:
                        steps = self._step_forward(*readers[0], walk)
                        if len(steps) == 1:
                            var, walk, what = steps[0]
                            continue
                        todo += [(v, w, t, prefix) for v, w, t in steps[::-1]]
                        break
                    branches = []
                    for n, (fn, k) in enumerate(readers):
                        inner = f"{what} feeds {len(readers)} function inputs, and reader " \
                                f"{n + 1} ({fn.type}) does not take the map: "
                        try:
                            steps = self._step_forward(fn, k, walk.copy())
                        except _Reject as r:
                            raise _Reject(inner + str(r)) from None
                        branches += [(v, w, t, prefix + inner) for v, w, t in steps]
                    todo += branches[::-1]
                    break
            except _Reject as r:
                raise _Reject(prefix + str(r)) from None

    def _step_forward(self, fn: _Fn, k: int, walk: _Walk) -> list:
        """The walk's map at input ``k`` of ``fn``: absorbed ([]), or composed or moved past it
        ([(the output, the walk, what it is)] to go on from; one per part after a Split)."""
        nxt = self.maps.get(fn.index)
        if nxt is not None and nxt.data == k and not nxt.fused and self._pending_takes(nxt):
            # another path of this walk takes it into a layer: this path goes on to that layer,
            # to be applied before it there
            walk.passed.append(nxt)
            walk.region.append(fn)
            return [(fn.outputs[0], walk, f"the output of {nxt.term.label}")]
        if nxt is not None and fn.index not in self.claimed and nxt.data == k and not nxt.fused:
            gather = self._gather_here(walk, nxt)
            walk.terms.append(_Term(nxt.term, gather, identity=self._identity(walk, nxt, gather)))
            walk.maps.append(nxt)
            walk.region.append(fn)
            return [(fn.outputs[0], walk, f"the output of {nxt.term.label}")]
        if fn.type in FOLDABLE_FROM and k == 0:
            self._absorb_input(fn, walk)
            return []
        if fn.type in BN_TYPES or nxt is not None:
            raise _Reject(f"the function after it is {self._map_name(fn, nxt)}")
        before = self._site_for(walk, fn.in_shapes[k])
        if fn.index in self.bad_constants:
            raise _Reject(f"the function after it is {fn.type}, which stays: "
                          f"{self.bad_constants[fn.index]}")
        if fn.type == "Split":
            return self._forward_through_split(fn, walk, before)
        moved, before, why = self._first_passing(walk, before, lambda s: moves.forward(
            fn.type, fn.args, fn.in_shapes, fn.out_shapes, k, s, _Facts(self, walk)))
        if why is not None:
            raise _Reject(f"the function after it is {fn.type}: {why}")
        site, transform = moved
        walk.region.append(fn)
        self._move(walk, site, transform, before)
        return [(fn.outputs[0], walk, f"the output of {fn.type}")]

    def _forward_through_split(self, split: _Fn, walk: _Walk, before: Site) -> list:
        """The walk through ``split`` to each Stack joining its outputs back as a slice of its
        input (:meth:`_split_part`), one copy of the walk per Stack; _Reject where an output is
        read otherwise."""
        stacks = []
        for o in split.outputs:
            readers = self.consumers.get(o, [])
            if o in self.outputs or len(readers) > 1 or readers and readers[0][0].type != "Stack":
                raise _Reject("the function after it is Split: it removes an axis, and its outputs "
                              "are not each stacked back by one Stack")
            self._not_read_outside(o, "an output of the Split after it")
            if readers and not any(readers[0][0] is f for f in stacks):
                stacks.append(readers[0][0])
        steps = []
        for stack in stacks:
            part = self._split_part(stack)
            if part is None or part[0] is not split:
                raise _Reject("the function after it is Split: it removes an axis, and a Stack "
                              "joins its outputs other than as consecutive ones in order")
            branch = walk.copy()
            try:
                site, transform = moves.Slice.forward(part[1], split.in_shapes, stack.out_shapes,
                                                      0, before, _Facts(self, branch))
            except Stop as s:
                raise _Reject(f"the function after it is Split: {s}") from None
            branch.region += [split, stack]
            self._move(branch, site, transform, before)
            steps.append((stack.outputs[0], branch, "the output of Stack"))
        return steps

    # -- absorbing ------------------------------------------------------------------------------------
    def _layer_arrays(self, fn: _Fn, side: str):
        """(weight parameter, the reshapes it passes, bias parameter or None, its reshapes, the add
        holding it or None): the stored arrays a fold of ``side`` rewrites. A BatchMatmul has no bias:
        the stored operand of the add that follows it (through reshapes) is its bias, as NNabla's ONNX
        importer builds a Gemm."""
        if fn.type == "BatchMatmul":
            stored = self._stored(fn.inputs[1]) if len(fn.inputs) == 2 else None
            if stored is None:
                raise _Reject("the BatchMatmul's second operand is computed in the graph, not stored")
            self._not_updated(stored[0], "the BatchMatmul's matrix")
            bias = self._matmul_bias(fn)
            if bias is None:
                return stored[0], stored[1], None, [], None
            param, reshapes, add, path = bias
            self._not_updated(param, "the BatchMatmul's bias")
            return stored[0], stored[1], param, reshapes, (add, path)
        inputs = fn.inputs
        if len(inputs) not in (2, 3):
            # NNabla's layers read a bias only as the third of three inputs: with more, they add
            # none, so a shift written into the third would be lost
            raise _Reject(f"the {fn.type} it reaches has {len(inputs)} inputs: NNabla adds a bias "
                          f"only as the third of three, so a shift written there would be lost")
        w, b = inputs[1], (inputs[2] if len(inputs) > 2 else None)
        for label, v in (("weight", w), ("bias", b)):
            if v is not None and v.parent is not None:
                raise _Reject(f"the {fn.type}'s {label} is computed in the graph, not a stored "
                              f"parameter")
            if v is not None:
                self._not_updated(v, f"the {fn.type}'s {label}")
        return w, [], b, [], None

    def _matmul_bias(self, fn: _Fn):
        """(bias parameter, its reshapes, the add, the reshapes between) of the add of a stored
        constant that follows a BatchMatmul through reshapes, varying along its columns (one value,
        where the product has one column); or None."""
        var = fn.outputs[0]
        shape = fn.out_shapes[0]
        one = shape[-1] == 1
        site = Site(shape, len(shape) - 1, len(shape))
        path = []
        while var not in self.outputs and self._uses(var) == 1 and var in self.consumers:
            nxt, k = self.consumers[var][0]
            if nxt.type == "Reshape":
                if not one:
                    try:
                        site, _ = moves.on_shape(site, nxt.out_shapes[0])
                    except Stop:
                        return None
                path.append(nxt)
                var = nxt.outputs[0]
                continue
            m = self.maps.get(nxt.index)
            if m is None:
                return None
            along = m.site is None if one else \
                m.site is not None and (m.site.a0, m.site.a1) == (site.a0, site.a1)
            if along and m.term.kind == "shift" and m.term.value is not None \
                    and not m.term.negate and m.data == k:
                param, reshapes = m.constant[1]
                return param, reshapes, m, path
            return None
        return None

    def _scaled_bias(self, fn: _Fn) -> Optional[str]:
        """The function scaling the stored operand of the add after the BatchMatmul ``fn`` (through
        reshapes on both sides), as NNabla's importer builds an ONNX Gemm with beta != 1
        (``MulScalar(beta)`` of its bias); None where there is none such."""
        var = fn.outputs[0]
        while len(self.consumers.get(var, ())) == 1:
            nxt, k = self.consumers[var][0]
            if nxt.type == "Reshape":
                var = nxt.outputs[0]
                continue
            if nxt.type != "Add2" or len(nxt.inputs) != 2:
                return None
            other = nxt.inputs[1 - k]
            while other.parent is not None:
                g = self.by_f.get(other.parent)
                if g is None:
                    return None
                if g.type == "Reshape":
                    other = g.inputs[0]
                    continue
                if g.type == "MulScalar" and self._stored(g.inputs[0]) is not None:
                    return f"MulScalar({g.args['val']:g})"
                return None
            return None
        return None

    def _absorb_output(self, fn: _Fn, walk: _Walk) -> _Side:
        key = (fn.index, OUTPUT_SIDE)
        existing = self.pending.get(key) or self.sides.get(key)   # pending: another branch's
        if existing is not None and (fn.type == "BatchMatmul" or existing.park is not None):
            raise _Reject(f"the {fn.type} before it already absorbs another map")
        walk = self._with_existing(fn, walk, existing, "before")
        arrays = self._layer_arrays(fn, OUTPUT_SIDE)
        w, w_reshapes = arrays[:2]
        site = self._resite(fn, walk, OUTPUT_SIDE)
        try:
            layouts = output_layout(fn.type, fn.args, self._matrix_shape(fn, w), fn.out_shapes[0],
                                    site)
        except LayoutError as e:
            raise _Reject(str(e)) from None
        park, scale_only = None, False
        if fn.type == "BatchMatmul":
            # no bias of its own: the shift stays in the add of a stored constant the map passed
            # first (nothing composed between it and the product), else it must be zero
            if walk.park is not None and walk.terms[0].term is walk.park[0].term:
                park = walk.park
            elif not _Facts(self, walk).shift_is_zero():
                bn = self._bn_as_bias(walk, site)
                if bn is None:
                    self.wanted_bias.add(fn.index)   # no new bias before it (a second call's)
                    scaled = self._scaled_bias(fn)
                    if scaled is not None:
                        raise _Reject(f"the BatchMatmul before it has no bias to take the map's "
                                      f"shift: the bias added after it is a stored value scaled by "
                                      f"{scaled} that cannot take it (scaled by 0, read elsewhere, "
                                      f"or no constant)")
                    raise _Reject("the BatchMatmul before it has no bias to take the map's shift: "
                                  "the map passes no add of a stored value per output, and is not "
                                  "BNs over its columns, reached through reshapes, that can become "
                                  "one")
                park = (bn, site, walk.terms)   # the BN becomes the add of a new bias
            else:
                scale_only = True
            other = self.sides.get((fn.index, INPUT_SIDE))
            if other is not None and other.append and not (
                    park is None and scale_only or park is not None and park[0].is_bn):
                raise _Reject("the BatchMatmul before it gets a new bias from the map on its input, "
                              "which this map would have to take too")
            if park is not None and not park[0].is_bn:
                if prod(park[0].constant[1][0].shape) != site.n:   # its bias: one value per output
                    self.wanted_bias.add(fn.index)
                    raise _Reject("the add after the BatchMatmul adds one value to all its outputs, "
                                  "not one per output, and cannot take the map's shift")
                if park[1] is None:   # one value for every output: one output
                    park = (park[0], site, park[2])
        region = walk.region + [fn] + w_reshapes
        if park is not None and not park[0].is_bn:   # the add's constant is rewritten: the
            region += park[0].constant[1][1]         # reshapes it passes are rebuilt
        side = _Side(fn, OUTPUT_SIDE, site, walk.terms, walk.maps, park, _label(walk),
                     list(dict.fromkeys(region)), scale_only, layouts, arrays)
        self.pending[key] = side
        return side

    def _bn_as_bias(self, walk: _Walk, site: Site) -> Optional[_Map]:
        """The BN that can become the add of a new bias after a matrix product without one (a
        Linear without bias, then a BatchNorm1d): the walk's one map, a BN of its own statistics
        stored in a shape that broadcasts over its input, reached through reshapes only, over the
        product's columns as they are; else None."""
        if not walk.maps:
            return None
        m = walk.maps[0]      # where the walk began: the last map applied
        if not m.is_bn or m.site is None or m.site.n != site.n or walk.terms[-1].term is not m.term:
            return None
        if any(other.fused for other in walk.maps) or any(
                t.scale_only or not (t.identity or t.gather is None) for t in walk.terms):
            return None
        maps = {other.fn.index for other in walk.maps}
        if any(f.type != "Reshape" for f in walk.region if f.index not in maps):
            return None
        mean = m.fn.inputs[len(m.fn.inputs) - 2]
        if mean.parent is not None or \
                _constant_site(tuple(mean.shape), tuple(m.fn.inputs[0].shape)) != m.site:
            return None
        return m

    def _absorb_input(self, fn: _Fn, walk: _Walk) -> _Side:
        key = (fn.index, INPUT_SIDE)
        existing = self.pending.get(key) or self.sides.get(key)   # pending: another path's
        walk = self._with_existing(fn, walk, existing, "after")
        arrays = self._layer_arrays(fn, INPUT_SIDE)
        w, w_reshapes, b, b_reshapes, holder = arrays
        site = self._resite(fn, walk, INPUT_SIDE)
        try:
            layouts = input_layout(fn.type, fn.args, self._matrix_shape(fn, w), fn.in_shapes[0],
                                   site)
        except LayoutError as e:
            raise _Reject(str(e)) from None
        facts = _Facts(self, walk)
        scale_only = False
        if fn.type in SHIFT_FREE_ONLY:
            w_shape = self._matrix_shape(fn, w)
            if not pointwise_deconvolution(fn.type, fn.args, w_shape):
                if not facts.shift_is_zero():
                    raise _Reject(f"the {fn.type} after it adds each input through different "
                                  f"kernel taps (or none) at different outputs, so a shift is not "
                                  f"one bias per output ({facts.describe()} has a shift that is "
                                  f"not zero)")
                scale_only = True
        elif any(p != 0 for p in fn.args.get("pad", ())):
            if not facts.shift_is_zero():
                raise _Reject(f"the {fn.type} after it zero-pads, and the padding would not be "
                              f"shifted ({facts.describe()} has a shift that is not zero)")
            scale_only = True
        append = False
        if fn.type == "BatchMatmul" and holder is None:
            if facts.shift_is_zero():
                scale_only = True
            else:   # a Linear without bias: the product gets the add of a new bias
                out = self.sides.get((fn.index, OUTPUT_SIDE))
                if fn.index in self.wanted_bias or out is not None and not (
                        out.park is None and out.scale_only
                        or out.park is not None and out.park[0].is_bn):
                    raise _Reject("the BatchMatmul after it has no bias to take the map's shift "
                                  "(no add of a stored value per output follows it), and a map "
                                  "after it needs one too: a new bias for both is not made")
                # a BN after it become an add holds both shifts; a scale after it scales this one
                append = True
        region = walk.region + [fn] + w_reshapes
        if holder is not None and not scale_only:
            add = holder[0].fn.index
            if add in self.claimed and add not in self.held:
                raise _Reject(f"the add of the {fn.type}'s bias after it folds into another layer")
            region += [holder[0].fn] + holder[1] + b_reshapes
        side = _Side(fn, INPUT_SIDE, site, walk.terms, walk.maps, None, _label(walk),
                     list(dict.fromkeys(region)), scale_only, layouts, arrays, append)
        self.pending[key] = side
        return side

    def _with_existing(self, fn: _Fn, walk: _Walk, existing: Optional[_Side], where: str) -> _Walk:
        """The walk joined with the map the layer's side takes already (``existing``, or None):
        every map the walk passed must be among that one's."""
        if existing is None:
            if walk.passed:
                raise _Reject(f"the {fn.type} {where} it is not the layer that absorbs "
                              f"{walk.passed[0].term.label}")
            return walk
        if not all(any(p is q for q in existing.maps) for p in walk.passed):
            raise _Reject(f"the {fn.type} {where} it already absorbs another map")
        return self._joined(existing, walk, fn, where, walk.passed, first=where == "after")

    def _joined(self, side: _Side, walk: _Walk, fn: _Fn, where: str = "after",
                passed=(), first: bool = False) -> _Walk:
        """The walk joined with the map a layer's side already absorbs, where both reach it over
        the same channels and cover none in common (each on its own input of a concatenation, or
        its own slice of the layer's output), but for the maps of ``side`` the walk passed, which
        apply before the walk's terms, or with ``first`` (a forward walk) after them: one map,
        applied term after term, each the identity off its channels."""
        wsite = walk.site or side.site   # a walk of uniform terms: over the side's channels
        if side.site is None or wsite.shape != side.site.shape:
            raise _Reject(f"the {fn.type} {where} it already absorbs another map on its channels")
        wider = Site(side.site.shape, min(side.site.a0, wsite.a0), max(side.site.a1, wsite.a1))

        def widened(terms, site):
            out = []
            for t in terms:
                g = t.gather
                if g is not None and g.size != site.n:
                    return None
                if g is not None and site != wider:
                    g = moves.widen(site, g, wider)
                out.append(_Term(t.term, g, t.scale_only, t.identity and site == wider))
            return out

        def covered(terms):
            c = np.zeros(wider.n, bool)
            for t in terms:
                c |= True if t.gather is None else t.gather >= 0
            return c
        terms, added = widened(side.terms, side.site), widened(walk.terms, wsite)
        if terms is None or added is None or (covered(
                [t for t in terms if not any(t.term is p.term for p in passed)])
                & covered(added)).any():
            raise _Reject(f"the {fn.type} {where} it already absorbs another map on its channels")
        at = len(terms)
        if first and passed:   # before the first passed map's term: the walk's apply before it
            at = next((k for k, t in enumerate(terms) if any(t.term is p.term for p in passed)),
                      at)
        terms[at:at] = added
        maps = list(side.maps) + [m for m in walk.maps if not any(m is o for o in side.maps)]
        return _Walk(wider, terms, maps, side.region + walk.region, origin=walk.origin)

    def _resite(self, fn: _Fn, walk: _Walk, side: str) -> Site:
        """The walk's site, or for a map that does not vary, the layer's channels."""
        if all(t.gather is None for t in walk.terms):
            site = self._layer_site(fn, side)
            for t in walk.terms:
                t.gather = np.zeros(site.n, np.int64)
            walk.site = site
        return walk.site

    def _layer_site(self, fn: _Fn, side: str) -> Site:
        shape = fn.out_shapes[0] if side == OUTPUT_SIDE else fn.in_shapes[0]
        if fn.type == "Affine":
            base = fn.args.get("base_axis", 1) % len(shape)
            return Site(shape, base, len(shape))
        axis = (output_channel_axis if side == OUTPUT_SIDE else input_channel_axis)(
            fn.type, fn.args, len(shape))
        return Site(shape, axis, axis + 1)

    @staticmethod
    def _matrix_shape(fn: _Fn, w) -> tuple:
        return fn.in_shapes[1] if fn.type == "BatchMatmul" else tuple(w.shape)

    def _claim_side(self, side: _Side):
        self.sides[(side.fn.index, side.side)] = side
        for m in side.maps:
            self.claimed.add(m.fn.index)
            self.owner.setdefault(m.fn.index, (side.fn.index, side.side))
        # the add holding a matrix product's bias stays, its constant rewritten: no other fold may
        # move it (it would take the old constant, without the shift written into it)
        if side.park is not None:
            self.held.add(side.park[0].fn.index)
        holder = side.arrays[4] if side.arrays else None
        if side.side == INPUT_SIDE and holder is not None and not side.scale_only:
            self.claimed.add(holder[0].fn.index)
            self.held.add(holder[0].fn.index)

    # -- specs, names, the graph edit --------------------------------------------------------------
    def _specs(self):
        """The folds in order, with their arrays named: where several folds write one array (a
        layer folded on both sides; a matrix product's bias also taking a map's shift) each but the
        last writes an array between them, and the folds writing those come first."""
        removed, fused, region = {}, set(), set()
        drafts = []
        for key in sorted(self.sides, key=lambda k: (k[0], 0 if k[1] == INPUT_SIDE else 1)):
            side = self.sides[key]
            region.update(f.index for f in side.region)
            for m in side.maps:
                if side.park is not None and m is side.park[0]:
                    continue
                if m.fused:
                    fused.add(m.fn.index)
                else:
                    removed[m.fn.index] = m.data
            drafts += self._drafts(side)
        writers: Dict[str, List[int]] = {}
        for k, d in enumerate(drafts):
            for role in ("weight", "bias"):
                if d[role + "_writes"]:
                    writers.setdefault(d[role + "_key"], []).append(k)
        current: Dict[str, Optional[str]] = {}
        derived: List[DerivedMap] = []
        intermediates = set()
        inputs, adds, appends = [], [], []
        first, rest = [], []
        for k, d in enumerate(drafts):
            names = {}
            between = False
            for role in ("weight", "bias"):
                key = d[role + "_key"]
                if key is None:
                    names[role] = (None, None)
                    continue
                now = current.get(key, d[role + "_name"])
                if not d[role + "_writes"]:
                    names[role] = (now, None)
                    continue
                last = writers[key][-1] == k
                if not last:
                    base = d[role + "_name"] or _prefix(d["weight_name"]) + "b"
                    dst = self._new_name(base + "_folding")
                    intermediates.add(dst)
                    between = True
                else:
                    dst = self._final(d, role)
                    if d.get("bn_add") is not None:
                        adds.append((d["bn_add"], dst))
                    elif role == "bias" and d.get("append") is not None:
                        appends.append((d["append"], dst))
                    else:
                        inputs.append(d[role + "_at"] + (dst,))
                self.arrays[dst] = d[role + "_array"]
                if dst != d[role + "_name"] and dst not in intermediates:
                    self.sources[dst] = d[role + "_name"] or d["weight_name"] or d.get("source")
                current[key] = dst
                names[role] = (now, dst)
            spec = self._spec(d, names, derived, intermediates)
            (first if between else rest).append(spec)
        edit = GraphEdit(tuple(sorted(removed.items())), tuple(sorted(fused)),
                         tuple(dict.fromkeys(inputs)), tuple(sorted(region)), tuple(sorted(adds)),
                         tuple(sorted(appends)))
        return tuple(first + rest), tuple(derived), intermediates, edit

    def _final(self, d, role: str) -> str:
        """Where the last fold of an array writes: in place, or a new parameter (a copy where the
        array is shared or the fold is not in place; a bias the layer did not have)."""
        name = d[role + "_name"]
        if name is None:
            d["notes"].append("bias created")
            if d.get("created_base"):
                return self._new_name(d["created_base"])
            return self._new_name(_prefix(d["weight_name"]) + ("b" if self.inplace else "b_folded"))
        if not self.inplace or d["shared_" + role]:
            return self._new_name(name + "_folded")
        return name

    def _drafts(self, side: _Side) -> List[dict]:
        """The folds of one side of one layer, their arrays not yet named."""
        fn = side.fn
        w, w_reshapes, b, b_reshapes, holder = side.arrays
        g = self.g
        w_name = g.name(w, "weight")
        w_array = (tuple(w.shape), self._dtype(w_name, w))
        self.arrays.setdefault(w_name, w_array)
        shape = self._matrix_shape(fn, w)
        has_shift = _has_shift(side)
        if side.side == OUTPUT_SIDE:
            wl, bl = side.layouts
            reduce_axes, sum_shape = (), shape
            if fn.type == "BatchMatmul":
                b = None              # its shift stays in the add (the park), or is zero
        else:
            wl, reduce_axes, sum_shape = side.layouts
            bl = None
        b_name = None if b is None else g.name(b, "bias")
        if b is not None:
            self.arrays.setdefault(b_name, (tuple(b.shape), self._dtype(b_name, b)))
        if fn.type == "Affine":
            bias_shape = tuple(w.shape[1:])
        elif b is not None:
            bias_shape = tuple(b.shape)
        elif side.side == OUTPUT_SIDE:
            bias_shape = (wl.n_channels,)
        elif fn.type == "Deconvolution":   # summed as ([groups,] inputs, outputs): every output
            bias_shape = (prod(sum_shape) // sum_shape[-2],)
        elif fn.type == "DepthwiseDeconvolution":   # summed as (outputs, divisor * kernel)
            bias_shape = (sum_shape[0],)
        else:
            bias_shape = (w.shape[0],)
        writes_bias = has_shift or (side.side == OUTPUT_SIDE and b is not None)
        if side.side == OUTPUT_SIDE and b is None and fn.type != "BatchMatmul":
            # the input side's shift makes the layer a bias (written before): it scales too
            other = self.sides.get((fn.index, INPUT_SIDE))
            writes_bias = writes_bias or (other is not None and _has_shift(other))
        appended = side.append
        if fn.type == "BatchMatmul" and side.side == OUTPUT_SIDE and side.park is None:
            # the input side's new bias, added after the product: this scale-only side scales it
            other = self.sides.get((fn.index, INPUT_SIDE))
            appended = other is not None and other.append
            writes_bias = writes_bias or appended
        if fn.type == "BatchMatmul" and appended:   # a new bias, added after the product
            b_key, b_at = f"bias after function {fn.index}", None   # as a BN become an add
            n_out = fn.out_shapes[0]
            bias_shape = (1,) * (len(n_out) - 1) + (n_out[-1],)
        elif fn.type == "BatchMatmul":
            b_key = None if holder is None else "bias of " + holder[0].term.label
            b_at = None if holder is None else ((b_reshapes[0].index, 0) if b_reshapes else
                                                (holder[0].fn.index, 1 - holder[0].data))
        else:
            b_key = f"bias of function {fn.index}"
            b_at = (fn.index, 2)
        # arrays are chained per layer (a layer folded on both sides), not per parameter: layers
        # sharing a weight each fold their own copy of it
        draft = dict(
            side=side, fn=fn, weight_key=f"weight of function {fn.index}", weight_name=w_name,
            weight_writes=True,
            weight_array=w_array, weight_at=(w_reshapes[0].index, 0) if w_reshapes else (fn.index, 1),
            bias_key=b_key if (writes_bias or b is not None) else None, bias_name=b_name,
            bias_writes=writes_bias,
            bias_array=(bias_shape if b is None else tuple(b.shape),
                        self.arrays[b_name][1] if b_name else w_array[1]),
            bias_at=b_at, shared_weight=self._shared(w), shared_bias=b is not None and self._shared(b),
            has_shift=has_shift, layout=wl, bias_layout=bl, reduce_axes=reduce_axes,
            sum_shape=sum_shape, bias_shape=bias_shape,
            notes=["an add of it after the product"] if appended else [],
            append=fn.index if appended else None,
            # the add of the bias it writes reads factor * b (an ONNX Gemm's beta)
            shift_divisor=holder[0].term.factor if side.side == INPUT_SIDE and holder else 1.0)
        shared = [role for role in ("weight", "bias") if draft[role + "_writes"] and draft["shared_" + role]]
        if shared:
            draft["notes"].append(f"{' and '.join(shared)} shared (also read elsewhere): folded into "
                                  f"a copy")
        drafts = [draft]
        if side.park is not None:
            drafts.append(self._park_draft(side))
        return drafts

    def _park_draft(self, side: _Side) -> dict:
        """The shift of a map folded into a matrix product stays in the add of a stored constant it
        passed: that constant becomes ``c * scale + shift`` of the terms after it."""
        add, site, terms = side.park
        if add.is_bn:
            return self._bn_add_draft(side)
        param, reshapes = add.constant[1]
        name = self.g.name(param, "constant")
        array = (tuple(param.shape), self._dtype(name, param))
        self.arrays.setdefault(name, array)
        sub = _Side(add.fn, OUTPUT_SIDE, site, terms[1:], [m for m in side.maps if m is not add],
                    None, side.label, [], False)
        return dict(
            side=sub, fn=add.fn, park=True, weight_key=None, weight_name=None, weight_writes=False,
            bias_key="bias of " + add.term.label, bias_name=name, bias_writes=True, bias_array=array,
            bias_at=(reshapes[0].index, 0) if reshapes else (add.fn.index, 1 - add.data),
            shared_weight=False, shared_bias=self._shared(param), has_shift=bool(terms[1:]),
            layout=None, bias_layout=_flat_layout(site, param), reduce_axes=(), sum_shape=(),
            bias_shape=tuple(param.shape), notes=["the map's shift stays in this add"],
            shift_divisor=add.term.factor)   # the add reads factor * c

    def _bn_add_draft(self, side: _Side) -> dict:
        """A BN after a matrix product without bias (:meth:`_bn_as_bias`) becomes ``x + bias``: the
        product takes its scale, the new bias (the BN's statistics' shape) its shift."""
        bn, site, terms = side.park
        mean = bn.fn.inputs[len(bn.fn.inputs) - 2]
        array = (tuple(mean.shape), self._dtype(bn.term.mean, mean))
        sub = _Side(bn.fn, OUTPUT_SIDE, site, terms, [bn], None, side.label, [], False)
        return dict(
            side=sub, fn=bn.fn, kind="Add2", park=True, bn_add=bn.fn.index, weight_key=None,
            weight_name=None,
            weight_writes=False, bias_key=f"bias after function {side.fn.index}", bias_name=None,
            bias_writes=True, bias_array=array, bias_at=None, shared_weight=False,
            shared_bias=False, has_shift=True, layout=None, bias_layout=_flat_layout(site, mean),
            reduce_axes=(), sum_shape=(), bias_shape=array[0],
            created_base=_prefix(bn.term.mean) + "bias", source=bn.term.beta or bn.term.mean,
            notes=["the BN's shift: an add of a new bias in its place"])

    def _shared(self, v) -> bool:
        """Read elsewhere (another function, the same one twice, or the caller, as a graph output),
        or its array is also another variable's of the graph (``w2.data = w.data``): that reader
        must keep seeing the original values."""
        return self._uses(v) > 1 or v in self.outputs or self._array_shared(v)

    def _array_shared(self, v) -> bool:
        if self._holders is None:   # NNabla's arrays compare and hash by identity
            self._holders = {}
            for var in self.g.uses:   # every variable a function reads, once
                self._holders.setdefault(var.data, []).append(var)
        return len(self._holders.get(v.data, ())) > 1

    def _spec(self, d: dict, names, derived, intermediates) -> FoldSpec:
        side = d["side"]
        (w_now, w_dst), (b_now, b_dst) = names["weight"], names["bias"]
        if d.get("park") and not side.terms:
            fields = dict(gamma=None, beta=None, mean=None, var=None, eps=0.0)
        else:
            fields = self._map_fields(side, d["has_shift"], derived, intermediates,
                                      d.get("shift_divisor", 1.0))
        taken_out = [] if d.get("park") else [m for m in side.maps if side.park is None
                                              or m is not side.park[0] or m.is_bn]
        taken_out.sort(key=lambda m: m.fn.index)
        maps = tuple(m.term.label for m in taken_out)
        bns = tuple(m.term.label for m in taken_out if m.is_bn)
        return FoldSpec(
            bn=side.label, kind=d.get("kind") or d["fn"].type, side=side.side,
            bn_type=_map_type(side),
            weight=w_now, bias=b_now if b_dst is not None else None, folded_weight=w_dst,
            folded_bias=b_dst, weight_shape=tuple(d["sum_shape"]), bias_shape=tuple(d["bias_shape"]),
            weight_layout=d["layout"], bias_layout=d["bias_layout"],
            bias_reduce_axes=tuple(d["reduce_axes"]), layer_index=d["fn"].index,
            bn_index=side.maps[0].fn.index if side.maps else -1, note="; ".join(d["notes"]),
            maps=maps, bns=bns, **fields)

    def _map_fields(self, side: _Side, has_shift: bool, derived, intermediates,
                    divisor: float = 1.0) -> dict:
        """The map as a BN's arrays: the BN's own where one BN covers the channels as they are,
        else a map derived from every term (its shift divided by ``divisor``: the beta by which
        the graph multiplies the bias that takes it, an ONNX Gemm's)."""
        terms, n = side.terms, side.site.n
        t0 = terms[0] if len(terms) == 1 and divisor == 1.0 else None
        if t0 is not None and t0.term.kind == "bn" and not t0.scale_only and has_shift \
                and t0.term.n_channels == n and t0.identity:
            t = t0.term
            return dict(gamma=t.gamma, beta=t.beta, mean=t.mean, var=t.var, eps=t.eps)
        base = side.label.replace("+", "_") or "map"
        scale = self._new_name(f"{base}/scale_composed")
        shift = self._new_name(f"{base}/shift_composed") if has_shift else None
        terms_data = tuple((t.term, tuple(int(x) for x in (np.zeros(n, np.int64) if t.gather is None
                                                           else t.gather)), t.scale_only)
                           for t in terms)
        derived.append(DerivedMap(scale, shift, n, terms_data, divisor))
        for name in (scale, shift):
            if name is not None:
                intermediates.add(name)
                self.arrays[name] = ((n,), np.dtype(np.float64))
        return dict(gamma=scale, beta=shift, mean=None, var=None, eps=0.0)

    def _new_name(self, base: str) -> str:
        name, k = base, 2
        while name in self.taken:
            name = f"{base}_{k}"
            k += 1
        self.taken.add(name)
        return name


def _flat_layout(site: Site, param):
    """A stored constant broadcast over a site holds one value per channel, in order."""
    from .layout import ChannelLayout
    return ChannelLayout(1, 1, site.n, int(np.prod(param.shape)) // site.n)


def _has_shift(side: _Side) -> bool:
    """Whether the fold of ``side`` writes a shift into the layer's bias."""
    return not side.scale_only and side.park is None and \
        any(not t.scale_only and t.term.kind != "scale" for t in side.terms)


def _map_type(side: _Side) -> str:
    types = [m.fn.type for m in side.maps if m.is_bn]
    return types[0] if types else (side.maps[0].fn.type if side.maps else "")


def _label(walk: _Walk) -> str:
    """How a fold is reported: its BNs' names in graph order (its other maps' where it has none)."""
    maps = sorted(walk.maps, key=lambda m: m.fn.index)
    bns = [m.term.label for m in maps if m.is_bn]
    return "+".join(bns) if bns else "+".join(m.term.label for m in maps)


def _constant_site(c_shape, x_shape):
    """The site of a constant broadcast over a tensor: the axes where it varies (adjacent), None for
    a constant that does not vary, False where it does not broadcast that way."""
    if len(c_shape) > len(x_shape):
        return False
    c_shape = (1,) * (len(x_shape) - len(c_shape)) + tuple(c_shape)
    varying = [k for k, (c, x) in enumerate(zip(c_shape, x_shape)) if c != 1]
    if any(c_shape[k] != x_shape[k] for k in varying):
        return False
    if not varying:
        return None
    if varying != list(range(varying[0], varying[-1] + 1)):
        return False
    return Site(tuple(x_shape), varying[0], varying[-1] + 1)


def _live(f) -> bool:
    """Whether ``f`` still computes its output: one that an earlier fold replaced (its output rewired
    onto the new layer) stays among its inputs' references until it is collected."""
    return f.outputs[0].parent == f


def _prefix(weight_name: str) -> str:
    """'conv1/conv/W' -> 'conv1/conv/', 'conv1_W' -> 'conv1_' (as NNabla's ONNX importer names them)."""
    for sep in ("/", "_"):
        k = weight_name.rfind(sep)
        if k >= 0:
            return weight_name[:k + 1]
    return weight_name + "_"
