"""Plan -> rewritten graph: each folded BN removed, its layer fed the folded weight and bias.

In two steps, so that a fold can build everything that may fail before it writes anything:
``prepare`` creates the new functions (not yet part of the graph), ``commit`` rewires the graph onto
them, and ``undo`` puts the graph back as it was. ``clone`` first makes a copy that shares only leaf variables (data inputs and
parameters) with the original, so the original can be left as it was.
"""
from typing import Dict, List, Sequence, Tuple

import nnabla as nn
import nnabla.function as _function

from .plan import OUTPUT_SIDE, Plan


def call_like(f, inputs: Sequence["nn.Variable"]):
    """A new function of ``f``'s type and arguments applied to ``inputs``; returns its outputs."""
    return new_function(f.info.type_name, f.info.args, inputs, len(f.outputs))


def new_function(type_name: str, args: dict, inputs: Sequence["nn.Variable"], n_outputs: int = 1):
    """A new NNabla function ``type_name(**args)`` in the current context applied to ``inputs``, not
    computed yet; returns its outputs."""
    ctx = nn.get_current_context()
    new = getattr(_function, type_name)(ctx, **args)
    out = new(*inputs, n_outputs=n_outputs, auto_forward=False)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def clone(functions: List, outputs: List["nn.Variable"]):
    """Copies of ``functions`` (same order) and of ``outputs``, sharing leaf variables only."""
    mapped: Dict = {}
    new_functions = []
    for f in functions:
        outs = call_like(f, [mapped.get(v, v) for v in f.inputs])
        for old, new in zip(f.outputs, outs):
            new.need_grad = old.need_grad
            mapped[old] = new
        new_functions.append(outs[0].parent)
    return new_functions, [mapped.get(v, v) for v in outputs]


def prepare(plan: Plan, functions: List, variables: Dict[str, "nn.Variable"]
            ) -> List[Tuple["nn.Variable", "nn.Variable"]]:
    """The new functions for every fold of ``plan`` over ``functions`` (the graph the plan was made
    for, or its clone); ``variables`` maps every folded array's name to its parameter variable.
    Returns the rewiring to do, (variable, its new value) pairs; the graph itself is not touched."""
    rewiring = []
    for spec in plan.folds:
        layer, bn = functions[spec.layer_index], functions[spec.bn_index]
        w, b = variables[spec.folded_weight], variables[spec.folded_bias]
        if spec.side == OUTPUT_SIDE:
            h = call_like(layer, [layer.inputs[0], w, b])[0]
            if spec.bn_type == "FusedBatchNormalization":
                bn_inputs = bn.inputs
                if len(bn_inputs) > 5:
                    h = new_function("Add2", {"inplace": False}, [h, bn_inputs[5]])[0]
                h = new_function("ReLU", {"inplace": False}, [h])[0]
            target = bn.outputs[0]
        else:
            h = call_like(layer, [bn.inputs[0], w, b])[0]
            target = layer.outputs[0]
        if tuple(h.shape) != tuple(target.shape):   # same layer, same weight shape: cannot happen
            raise ValueError(f"{spec.bn}: the folded {spec.kind} gives shape {h.shape}, "
                             f"not {target.shape}")
        rewiring.append((target, h))
    return rewiring


def commit(rewiring) -> list:
    """Rewire each variable onto its new value: the graph computes the folded network. Each
    variable's previous parent is kept on a stand-in variable, so that :func:`undo` can put it back;
    returns what to undo (drop it to free the replaced functions). On failure, undoes what it did."""
    done = []
    try:
        for target, h in rewiring:
            keep = nn.Variable(target.shape)
            rewire(keep, target)          # keep takes target's parent
            done.append((target, keep))
            rewire(target, h)             # target takes the new function
    except BaseException:
        undo(done)
        raise
    return done


def undo(done) -> None:
    """Put back the parents :func:`commit` replaced."""
    for target, keep in reversed(done):
        rewire(target, keep)


def rewire(target: "nn.Variable", source: "nn.Variable") -> None:
    """``target`` takes ``source``'s parent function (NNabla's rewire_on); ``source`` is left
    without one."""
    target.rewire_on(source)
