"""Plan -> rewritten graph: the folded maps taken out, the layers fed their folded parameters.

In two steps, so that a fold can build everything that may fail before it writes anything:
``prepare`` builds new functions for every region the plan touches (not yet part of the graph): each
layer with its folded parameters, each function between a layer and its maps again on the folded
values, the maps themselves left out. ``commit`` rewires the graph onto them, and ``undo`` puts the
graph back as it was. ``clone`` first makes a copy that shares only leaf variables (data inputs and
parameters) with the original, so the original can be left as it was.
"""
from typing import Dict, List, Sequence

import nnabla as nn
import nnabla.function as _function

from .plan import Plan


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


def clone(functions: List, outputs: List["nn.Variable"], inputs=None):
    """Copies of ``functions`` (same order), of ``outputs`` and of each function's inputs, sharing
    leaf variables only. ``inputs``: each function's inputs, where the caller has them already."""
    mapped: Dict = {}
    new_functions, new_inputs = [], []
    for k, f in enumerate(functions):
        ins = [mapped.get(v, v) for v in (f.inputs if inputs is None else inputs[k])]
        outs = call_like(f, ins)
        for old, new in zip(f.outputs, outs):
            new.need_grad = old.need_grad
            mapped[old] = new
        new_functions.append(outs[0].parent)
        new_inputs.append(ins)
    return new_functions, [mapped.get(v, v) for v in outputs], new_inputs


def prepare(plan: Plan, functions: List, variables: Dict[str, "nn.Variable"], outputs=(),
            inputs=None):
    """The new functions for the plan's edit over ``functions`` (the graph the plan was made for, or
    its clone); ``variables`` maps every folded array's name to its parameter variable, ``outputs``
    are the graph's outputs, ``inputs`` each function's inputs where the caller has them (NNabla
    makes new objects on each ask). Returns the rewiring to do, (variable, its new value) pairs:
    every variable of a region that is read outside it; the graph itself is not touched."""
    edit = plan.edit
    if not edit.region:
        return []
    if inputs is None:
        inputs = [f.inputs for f in functions]
    removed = dict(edit.removed)
    fused = set(edit.fused)
    adds = dict(edit.adds)
    appends = dict(edit.appends)
    new_inputs: Dict[int, Dict[int, str]] = {}
    for index, position, name in edit.inputs:
        new_inputs.setdefault(index, {})[position] = name
    region = set(edit.region)
    read_outside = set(outputs)
    for k, ins in enumerate(inputs):
        if k not in region:
            read_outside.update(ins)
    mapped: Dict = {}
    made = set()
    for index in edit.region:
        f = functions[index]
        # a variable the rest of the graph reads is rewired onto its new value: functions rebuilt
        # after it read it, not the new value (which the rewiring leaves without a parent)
        ins = [v if v in read_outside and v in mapped else mapped.get(v, v) for v in inputs[index]]
        if index in removed:                       # a map: its output is its data input's value
            mapped[f.outputs[0]] = ins[removed[index]]
            continue
        if index in adds:                          # a BN become the add of a new bias
            mapped[f.outputs[0]] = new_function("Add2", {"inplace": False},
                                                [ins[0], variables[adds[index]]])[0]
            made.add(mapped[f.outputs[0]])
            continue
        if index in fused:                         # relu(BN(x) + z): the BN part is folded
            h = ins[0]
            if len(ins) > 5:
                h = new_function("Add2", {"inplace": False}, [h, ins[5]])[0]
            mapped[f.outputs[0]] = new_function("ReLU", {"inplace": False}, [h])[0]
            made.add(mapped[f.outputs[0]])
            continue
        for position, name in new_inputs.get(index, {}).items():
            if position < len(ins):
                ins[position] = variables[name]
            else:
                ins.append(variables[name])        # a layer's new bias
        outs = call_like(f, ins)
        if index in appends:                       # a product given the add of a new bias
            outs[0] = new_function("Add2", {"inplace": False},
                                   [outs[0], variables[appends[index]]])[0]
        for old, new in zip(f.outputs, outs):
            new.need_grad = old.need_grad
            if tuple(new.shape) != tuple(old.shape):   # same function, same shapes: cannot happen
                raise ValueError(f"the rebuilt {f.info.type_name} gives shape {new.shape}, not "
                                 f"{old.shape}")
            mapped[old] = new
            made.add(new)
    rewiring = []
    for index in edit.region:
        for v in functions[index].outputs:
            if v in read_outside:
                new = mapped[v]
                if new not in made:   # the planner keeps a removed map's output inside its region
                    raise ValueError("a folded map's output is read outside the functions rebuilt")
                rewiring.append((v, new))
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
