"""Graph -> plan: one pass over the functions, deciding for each BN what it folds into, or why not.

Preference: a BN folds into the layer that produces its input (always exact); failing that, into the
single layer that consumes its output, where that is exact. A layer absorbs at most one BN.
"""
from math import prod
from typing import Dict, List, Optional, Tuple

import numpy as np

from .backends.common import FoldError
from .graph import BN_TYPES, Graph
from .layout import FOLDABLE_FROM, FOLDABLE_INTO, LayoutError, input_layout, output_layout
from .plan import INPUT_SIDE, OUTPUT_SIDE, FoldSpec, Plan, Skip


class _Reject(Exception):
    """This BN cannot fold this way; the message is the reason."""


class _BN:
    """A BN function's inputs and arguments, read once."""

    def __init__(self, f, index: int, graph: Graph):
        self.f = f
        self.index = index
        self.type = f.info.type_name
        self.args = f.info.args
        inputs = f.inputs
        self.x = inputs[0]
        self.out = f.outputs[0]
        self.z = None
        self.params: Dict[str, Optional[object]] = {}
        if self.type == "BatchNormalization":
            labels = ["beta"] * (not self.args["no_bias"]) + ["gamma"] * (not self.args["no_scale"])
            labels += ["mean", "var"]
            if len(inputs) != 1 + len(labels):
                raise _Reject(f"has {len(inputs) - 1} parameter inputs, expected {len(labels)} "
                              f"for no_bias={self.args['no_bias']}, no_scale={self.args['no_scale']}")
        else:
            labels = ["beta", "gamma", "mean", "var"]
            self.z = inputs[5] if len(inputs) > 5 else None
        for label, v in zip(labels, inputs[1:]):
            self.params[label] = v
        mean = self.params["mean"]
        self.name = graph.name(mean, self.type)
        if self.name.endswith("/mean"):
            self.name = self.name[:-len("/mean")]

    def check_foldable(self):
        if self.args["batch_stat"]:
            raise _Reject("batch_stat=True: it normalizes with each batch's statistics, "
                          "not a fixed per-channel map")
        if self.type == "FusedBatchNormalization" and self.args.get("nonlinearity") != "relu":
            raise _Reject(f"nonlinearity {self.args.get('nonlinearity')!r} is not supported")
        for label, v in self.params.items():
            if v.parent is not None:
                raise _Reject(f"its {label} is computed in the graph, not a stored parameter")
        axes = list(self.args["axes"])
        if len(axes) != 1:
            raise _Reject(f"normalizes over axes {axes}; only one channel axis folds")
        axis = axes[0] + (self.x.ndim if axes[0] < 0 else 0)
        return axis


def plan(graph: Graph, inplace: bool = True, reserved=(), dtypes=None) -> Plan:
    """The plan for ``graph``. ``inplace=False`` sends every folded array to a new name; new names
    avoid every name of the graph and of ``reserved``. ``dtypes`` (name -> dtype) gives the arrays'
    dtypes where the graph's parameters hold no data; otherwise they are read from the parameters."""
    return _Planner(graph, inplace, reserved, dtypes).run()


class _Planner:
    def __init__(self, graph: Graph, inplace: bool, reserved=(), dtypes=None):
        self.g = graph
        self.dtypes = dtypes or {}
        self.inplace = inplace
        self.outputs = set(graph.outputs)
        self.taken = graph.all_names() | set(reserved)
        self.index = {f: i for i, f in enumerate(graph.functions)}
        self.used_layers = set()
        self.arrays: Dict[str, Tuple[tuple, np.dtype]] = {}
        self.sources: Dict[str, str] = {}

    def _dtype(self, name: str, var) -> np.dtype:
        dtype = self.dtypes.get(name)
        return np.dtype(var.data.dtype) if dtype is None else np.dtype(dtype)

    def run(self) -> Plan:
        bns: List[Tuple[int, object]] = [(i, f) for i, f in enumerate(self.g.functions)
                                         if f.info.type_name in BN_TYPES]
        results: Dict[int, object] = {}
        pending = []
        # Output-side folds first, so a BN between two layers goes to the one before it.
        for i, f in bns:
            try:
                bn = _BN(f, i, self.g)
                axis = bn.check_foldable()
            except _Reject as r:
                results[i] = Skip(self._bn_label(f, i), f.info.type_name, str(r), i)
                continue
            try:
                results[i] = self._output_side(bn, axis)
            except _Reject as r:
                pending.append((bn, axis, str(r)))
        kept = []
        for bn, axis, why_not_output in pending:
            try:
                results[bn.index] = self._input_side(bn, axis)
            except _Reject as r:
                reason = why_not_output if bn.type == "FusedBatchNormalization" \
                    else f"{why_not_output}; {r}"
                kept.append((bn, axis, reason))
        for bn, axis, reason in kept:   # once every fold is known
            again = self._next_pass(bn, axis, results)
            results[bn.index] = Skip(bn.name, bn.type, reason + (again or ""), bn.index,
                                     next_pass=again is not None)
        ordered = [results[i] for i, _ in bns]
        folds = tuple(r for r in ordered if isinstance(r, FoldSpec))
        skipped = tuple(r for r in ordered if isinstance(r, Skip))
        return Plan(folds, skipped, dict(self.arrays), dict(self.sources))

    def _next_pass(self, bn: _BN, axis: int, results) -> Optional[str]:
        """Why ``bn``, kept, folds in a later pass (a fold of this plan's result, or of that one's when
        two BNs wait for the same layer), or None: checked exactly, not guessed."""
        # sizes are checked now, as for this pass's folds: a BN that can never fold says so at once
        layout = self._folds_once_its_neighbour_is_gone(bn, axis, results)
        if layout is not None:
            _check_sizes(bn, layout[0], layout[1].n_channels)
            return "; it folds on a later pass, once the BN next to it is gone"
        if bn.type != "FusedBatchNormalization":
            try:   # only the layer after it being taken stood in the way
                layer, kind, w, b, wl = self._input_target(bn, axis, ignore_used=True)[:5]
                self._stored(kind, w, b)
            except _Reject:
                return None
            if layer in self.used_layers:
                _check_sizes(bn, kind, wl.n_channels)
                return f"; it folds into the {kind} on a later pass (a layer takes one BN per pass)"
        return None

    def _folds_once_its_neighbour_is_gone(self, bn: _BN, axis: int, results):
        """(layer kind, weight layout) if ``bn`` would fold in a fold of this plan's result because
        the BN before it folds into the layer before that, or the BN after it into the layer after
        that, and nothing else stands in the way once that BN is removed; else None."""
        def folded(f, side):
            r = results.get(self.index.get(f))
            return r if isinstance(r, FoldSpec) and r.side == side else None

        def layout_fits(spec, fits):
            layer = self.g.functions[spec.layer_index]
            kind = layer.info.type_name
            try:
                return kind, fits(kind, layer.info.args, layer.inputs[1].shape)[0]
            except LayoutError:
                return None

        before = folded(bn.x.parent, OUTPUT_SIDE)   # layer -> BN (folds) -> bn
        if before is not None and before.bn_type == "BatchNormalization" \
                and self._uses(bn.x) == 1 and bn.x not in self.outputs:   # (a fused BN leaves a ReLU)
            return layout_fits(before, lambda kind, args, w: output_layout(kind, args, w, bn.x.shape,
                                                                           axis))
        after = [f for f in bn.out.function_references if _live(f)]   # bn -> BN (folds) -> layer
        after = folded(after[0], INPUT_SIDE) if len(after) == 1 else None
        if after is not None and bn.type != "FusedBatchNormalization" and self._uses(bn.out) == 1 \
                and bn.out not in self.outputs:
            return layout_fits(after, lambda kind, args, w: input_layout(kind, args, w, bn.out.shape,
                                                                         axis))
        return None

    def _bn_label(self, f, i):
        """A name for a BN whose inputs did not parse: its mean's name where it has one."""
        inputs = f.inputs
        mean_at = 3 if f.info.type_name == "FusedBatchNormalization" else len(inputs) - 2
        if len(inputs) < 3:
            return f"<{f.info.type_name} #{i}>"
        name = self.g.name(inputs[mean_at], f.info.type_name)
        return name[:-len("/mean")] if name.endswith("/mean") else name

    # -- layer -> BN ------------------------------------------------------------------------------
    def _output_side(self, bn: _BN, axis: int) -> FoldSpec:
        layer = bn.x.parent
        if layer is None:
            raise _Reject("no layer before it (its input is not computed by a function)")
        kind = layer.info.type_name
        if kind not in FOLDABLE_INTO:
            raise _Reject(f"the layer before it is {kind}, which has no weight to fold into")
        if layer in self.used_layers:
            raise _Reject(f"the {kind} before it already absorbs another BN")
        uses = self._uses(bn.x)
        if uses > 1:
            raise _Reject(f"the {kind}'s output also feeds {uses - 1} other function input(s)")
        if bn.x in self.outputs:
            raise _Reject(f"the {kind}'s output is also a graph output")
        args = layer.info.args
        inputs = layer.inputs
        w, b = inputs[1], (inputs[2] if len(inputs) > 2 else None)
        try:
            wl, bl = output_layout(kind, args, w.shape, bn.x.shape, axis)
        except LayoutError as e:
            raise _Reject(str(e)) from None
        bias_shape = tuple(w.shape[1:]) if kind == "Affine" else (wl.n_channels,)
        spec = self._spec(bn, layer, kind, OUTPUT_SIDE, w, b, wl, bl, bias_shape, ())
        return spec

    # -- BN -> layer ------------------------------------------------------------------------------
    def _input_side(self, bn: _BN, axis: int) -> FoldSpec:
        layer, kind, w, b, wl, reduce_axes, bias_shape = self._input_target(bn, axis)
        return self._spec(bn, layer, kind, INPUT_SIDE, w, b, wl, None, bias_shape, reduce_axes)

    def _input_target(self, bn: _BN, axis: int, ignore_used=False):
        """The layer after ``bn`` and what folding into its input side needs; _Reject if it cannot
        (``ignore_used``: even if it already absorbs another BN)."""
        if bn.type == "FusedBatchNormalization":
            raise _Reject("its activation follows it")
        if bn.out in self.outputs:
            raise _Reject("its output is a graph output")
        refs = [f for f in bn.out.function_references if _live(f)]
        if len(refs) != 1 or self._uses(bn.out) != 1:
            raise _Reject(f"its output feeds {self._uses(bn.out)} function inputs, not one layer's")
        layer = refs[0]
        kind = layer.info.type_name
        if kind not in FOLDABLE_FROM:
            raise _Reject(f"the function after it is {kind}, into which a BN does not fold exactly")
        if layer in self.used_layers and not ignore_used:
            raise _Reject(f"the {kind} after it already absorbs another BN")
        inputs = layer.inputs
        if inputs[0] != bn.out:
            raise _Reject(f"it feeds the {kind}'s weight, not its data input")
        args = layer.info.args
        if any(p != 0 for p in args.get("pad", ())):
            raise _Reject(f"the {kind} after it zero-pads, and the padding would not be shifted")
        w, b = inputs[1], (inputs[2] if len(inputs) > 2 else None)
        try:
            wl, reduce_axes = input_layout(kind, args, w.shape, bn.out.shape, axis)
        except LayoutError as e:
            raise _Reject(str(e)) from None
        bias_shape = tuple(w.shape[1:]) if kind == "Affine" else (w.shape[0],)
        return layer, kind, w, b, wl, reduce_axes, bias_shape

    # -- shared -----------------------------------------------------------------------------------
    @staticmethod
    def _stored(kind, w, b):
        for label, v in (("weight", w), ("bias", b)):
            if v is not None and v.parent is not None:
                raise _Reject(f"the {kind}'s {label} is computed in the graph, not a stored parameter")

    def _spec(self, bn, layer, kind, side, w, b, wl, bl, bias_shape, reduce_axes) -> FoldSpec:
        self._stored(kind, w, b)
        _check_sizes(bn, kind, wl.n_channels)
        if b is not None and b.size != prod(bias_shape):
            raise FoldError(f"{bn.name}: the {kind}'s bias has shape {b.shape}, expected {bias_shape}")
        g = self.g
        w_name = g.name(w, "weight")
        b_name = None if b is None else g.name(b, "bias")
        notes = []
        # read elsewhere (another function, the same one twice, or the caller, as a graph output):
        # that reader must keep seeing the original values
        shared = [label for label, v in (("weight", w), ("bias", b))
                  if v is not None and (self._uses(v) > 1 or v in self.outputs)]
        if shared:
            notes.append(f"{' and '.join(shared)} shared (also read elsewhere): folded into a copy")
        copy_w = not self.inplace or "weight" in shared
        copy_b = not self.inplace or "bias" in shared
        prefix = _prefix(w_name)
        folded_w = self._new_name(w_name + "_folded") if copy_w else w_name
        if b is None:
            folded_b = self._new_name(prefix + "b" if self.inplace else prefix + "b_folded")
            notes.append("bias created")
        else:
            folded_b = self._new_name(b_name + "_folded") if copy_b else b_name
        dtype = self._dtype(w_name, w)
        self.arrays[w_name] = (tuple(w.shape), dtype)
        self.arrays[folded_w] = (tuple(w.shape), dtype)
        if b is not None:
            self.arrays[b_name] = (tuple(b.shape), self._dtype(b_name, b))
        self.arrays[folded_b] = (tuple(bias_shape), self.arrays[b_name][1] if b is not None else dtype)
        if folded_w != w_name:
            self.sources[folded_w] = w_name
        if folded_b != b_name:
            self.sources[folded_b] = b_name if b is not None else w_name
        p = {label: g.name(v, label) for label, v in bn.params.items()}
        for label, v in bn.params.items():
            self.arrays[p[label]] = (tuple(v.shape), self._dtype(p[label], v))
        self.used_layers.add(layer)
        return FoldSpec(
            bn=bn.name, kind=kind, side=side, bn_type=bn.type, weight=w_name, bias=b_name,
            folded_weight=folded_w, folded_bias=folded_b, beta=p.get("beta"), gamma=p.get("gamma"),
            mean=p["mean"], var=p["var"], eps=float(bn.args["eps"]), weight_shape=tuple(w.shape),
            bias_shape=tuple(bias_shape), weight_layout=wl, bias_layout=bl,
            bias_reduce_axes=tuple(reduce_axes), layer_index=self.index[layer], bn_index=bn.index,
            note="; ".join(notes))

    def _uses(self, var) -> int:
        """How many function inputs read ``var``. In the graph, by NNabla's variable identity: a
        parameter reused by several parametric-function calls has one handle per call. Through this
        handle's ``function_references``, which also sees functions outside the graph. A function
        that reads ``var`` twice (a FusedBatchNormalization whose residual is its own input, ``x * x``)
        counts twice."""
        elsewhere = sum(1 for f in var.function_references if _live(f) for v in f.inputs if v == var)
        return max(self.g.uses[var], elsewhere)

    def _new_name(self, base: str) -> str:
        name, k = base, 2
        while name in self.taken:
            name = f"{base}_{k}"
            k += 1
        self.taken.add(name)
        return name


def _check_sizes(bn: _BN, kind: str, n: int):
    for label, v in bn.params.items():
        if v.size != n:
            raise FoldError(f"{bn.name}: {label} has {v.size} values but the {kind} it folds "
                            f"into has {n} channels")


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
