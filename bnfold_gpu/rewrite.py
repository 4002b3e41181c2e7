"""Plan -> rewritten graph: each folded BN removed, its layer fed the folded weight and bias.

Rewiring is done on the graph given; ``clone`` first makes a copy that shares only leaf variables
(data inputs and parameters) with the original, so the original can be left as it was.
"""
from typing import Dict, List, Sequence

import nnabla as nn
import nnabla.function as _function
import nnabla.functions as F

from .plan import OUTPUT_SIDE, Plan


def call_like(f, inputs: Sequence["nn.Variable"]):
    """A new function of ``f``'s type and arguments applied to ``inputs``; returns its outputs."""
    ctx = nn.get_current_context()
    new = getattr(_function, f.info.type_name)(ctx, **f.info.args)
    out = new(*inputs, n_outputs=len(f.outputs), auto_forward=False)
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


def apply(plan: Plan, functions: List, variables: Dict[str, "nn.Variable"]) -> None:
    """Rewire ``functions`` (the graph the plan was made for, or its clone) as the plan says.
    ``variables`` maps every folded array's name to its parameter variable."""
    for spec in plan.folds:
        layer, bn = functions[spec.layer_index], functions[spec.bn_index]
        w, b = variables[spec.folded_weight], variables[spec.folded_bias]
        if spec.side == OUTPUT_SIDE:
            h = call_like(layer, [layer.inputs[0], w, b])[0]
            if spec.bn_type == "FusedBatchNormalization":
                bn_inputs = bn.inputs
                if len(bn_inputs) > 5:
                    h = F.add2(h, bn_inputs[5])
                h = F.relu(h)
            bn.outputs[0].rewire_on(h)
        else:
            h = call_like(layer, [bn.inputs[0], w, b])[0]
            layer.outputs[0].rewire_on(h)
