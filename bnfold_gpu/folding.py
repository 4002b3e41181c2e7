"""``fold`` and ``plan``: the public entry points, tying graph, planner, backend and rewriter."""
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Tuple

import nnabla as nn
import numpy as np

from . import rewrite
from .backends import get_backend
from .graph import Graph
from .plan import FoldSpec, Plan, Skip
from .planner import plan as _make_plan


def _fast_nnabla_imports():
    """NNabla's compiled modules import ``nnabla`` and ``nnabla_ext`` the Python 2 way: a relative
    import first (``nnabla.nnabla``, ``nnabla.nnabla_ext``), which always fails and is not cached,
    then the absolute one. That costs about 20 us on every ``.data``/``get_data`` call and on every
    function created. Naming the same modules under the relative names makes those calls several
    times cheaper; they are the modules NNabla ends up using anyway."""
    sys.modules.setdefault("nnabla.nnabla", nn)
    try:
        import nnabla_ext
    except ImportError:
        return
    sys.modules.setdefault("nnabla.nnabla_ext", nnabla_ext)


@dataclass
class FoldResult:
    """What ``fold`` did.

    ``outputs``: the rewritten graph, same structure as the outputs given. ``folded``: one
    :class:`FoldSpec` per BN removed (``.bn``, ``.kind``...). ``skipped``: one :class:`Skip` per BN left in
    the graph, with its ``.reason``. ``parameters``: the parameters the fold created, by name.
    """
    outputs: object
    folded: Tuple[FoldSpec, ...]
    skipped: Tuple[Skip, ...]
    backend: str
    plan: Plan
    parameters: Dict[str, "nn.Variable"] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.plan.table()


def _flatten(outputs):
    if isinstance(outputs, nn.Variable):
        return [outputs], lambda flat: flat[0]
    if isinstance(outputs, (list, tuple)) and all(isinstance(o, nn.Variable) for o in outputs):
        kind = type(outputs)
        return list(outputs), lambda flat: kind(flat)
    if isinstance(outputs, dict) and all(isinstance(o, nn.Variable) for o in outputs.values()):
        kind, keys = type(outputs), list(outputs)   # e.g. the outputs of an NnpLoader network
        return list(outputs.values()), lambda flat: kind(zip(keys, flat))
    raise TypeError("outputs must be an nnabla.Variable, or a list, tuple or dict of them, "
                    f"not {type(outputs).__name__}")


def prepare_arrays(graph: Graph, p: Plan, backend_name: str):
    """(every variable by name, the new parameters, the backend's arrays by name): new parameters
    are created for the plan's new arrays; arrays are zero-copy views of the parameters' data."""
    variables = graph.variables_by_name()
    new_vars = {}
    for name in p.new_arrays:
        shape, dtype = p.arrays[name]
        src = variables[p.sources[name]]
        new_vars[name] = nn.Variable.from_numpy_array(np.zeros(shape, dtype), need_grad=src.need_grad)
    variables.update(new_vars)
    written = set()
    for s in p.folds:
        written.update((s.folded_weight, s.folded_bias))
    return variables, new_vars, _arrays_for(backend_name, {n: variables[n] for n in p.arrays}, written)


def _arrays_for(backend_name: str, variables, written):
    """Zero-copy views of the parameters' data for the backend (read-write where the fold writes)."""
    if backend_name == "cupy":
        from .backends.cupy_backend import from_nnabla
        return {n: from_nnabla(v, n in written) for n, v in variables.items()}
    return {n: v.data.get_data("rw" if n in written else "r") for n, v in variables.items()}


def plan(outputs, inplace: bool = True) -> Plan:
    """A dry run: what ``fold(outputs, inplace=inplace)`` would fold, into what, and why the rest would
    not. Changes nothing."""
    flat, _ = _flatten(outputs)
    return _make_plan(Graph(flat), inplace)


def fold(outputs, backend: str = "auto", inplace: bool = True) -> FoldResult:
    """Fold every BN of the graph ending at ``outputs`` into its adjacent layer where that is exact.

    ``inplace=True`` rescales the layers' weight and bias arrays where they are and rewires the given
    graph itself: afterwards ``outputs`` compute the folded network, and any other graph using those
    parameters is stale. Weights shared with other layers are never rescaled in place: their layer gets
    a folded copy. ``inplace=False`` leaves the given graph and every parameter untouched and returns a
    new graph using new parameters. New parameters are registered in the current parameter scope under
    names that collide with no existing one, where the weight they come from is registered (all are
    in the result's ``parameters``).

    Every array is checked before any is written (shapes, negative or non-finite variance): a fold that
    raises has changed nothing.
    """
    flat, rebuild = _flatten(outputs)
    be = get_backend(backend)  # fails before any work on a bad name; imports CuPy once (not timed)
    t0 = time.perf_counter()
    _fast_nnabla_imports()
    graph = Graph(flat)
    p = _make_plan(graph, inplace)
    t1 = time.perf_counter()
    variables, new_vars, arrays = prepare_arrays(graph, p, be.name)
    t2 = time.perf_counter()
    be.fold(p, arrays)   # checks everything first: raises with nothing written
    t3 = time.perf_counter()
    functions, flat_out = graph.functions, flat
    if not inplace and p.folds:
        functions, flat_out = rewrite.clone(graph.functions, flat)
    rewrite.apply(p, functions, variables)
    for name, v in new_vars.items():
        if graph.is_registered(variables[p.sources[name]]):
            nn.parameter.set_parameter(name, v)
    t4 = time.perf_counter()
    return FoldResult(rebuild(flat_out), p.folds, p.skipped, be.name, p, new_vars,
                      {"plan": t1 - t0, "prepare": t2 - t1, "rescale": t3 - t2, "rewrite": t4 - t3,
                       "total": t4 - t0})
