"""``fold`` and ``plan``: the public entry points, tying graph, planner, backend and rewriter.

A fold is a transaction. Everything that can fail comes first and changes nothing the caller can
see: the plan, the checks (statistics, shapes, dtypes, overflow), the new parameters, every new bias,
device buffers and the new functions. Then, with Ctrl-C held until the end, the new parameters are
registered and the graph rewired (both undone if a later step fails), and the arrays written last. A
fold that raises has changed nothing.
"""
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import nnabla as nn
import numpy as np

from . import _interrupts, rewrite
from .backends import get_backend
from .backends.common import cuda_context, quiet_float_errors
from ._scope_lock import holding_scope_lock
from .graph import Graph, Home
from .plan import FoldSpec, Plan, Skip, check_flag, skip_patterns, warn_unmatched_skips
from .planner import plan as _make_plan


@dataclass
class FoldResult:
    """What ``fold`` did.

    ``outputs``: the rewritten graph, same structure as the outputs given. ``folded``: one
    :class:`FoldSpec` per layer side a map folds into (``.bn``, ``.bns``, ``.maps``, ``.kind``,
    ``.side``...): a BN moved into two layers (through an add) has two, and two BNs composed into one
    side share one; ``plan.folded_bns`` lists the BNs removed. ``skipped``: one :class:`Skip` per BN
    left in the graph, with its ``.reason``. ``parameters``: the parameters the fold created, by name, each
    registered beside the parameter it comes from (in the current scope, the root one or a
    module's), except those named in ``unregistered``, whose source is registered nowhere (a plain
    ``nn.Variable``).
    ``unused``: the registered parameters the unfolded graph read and ``outputs`` no longer reads (a
    folded BN's statistics, scale and shift; with ``inplace=False``, the weights replaced by folded
    copies); :meth:`prune` takes them out of the registry.
    """
    outputs: object
    folded: Tuple[FoldSpec, ...]
    skipped: Tuple[Skip, ...]
    backend: str
    plan: Plan
    parameters: Dict[str, "nn.Variable"] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)
    unregistered: Tuple[str, ...] = ()
    _read_before: Tuple[Tuple[Home, "nn.Variable"], ...] = field(default=(), repr=False)
    _pruned: Tuple[str, ...] = field(default=(), repr=False)

    def __str__(self) -> str:
        return self.plan.table()

    @property
    def unused(self) -> Tuple[str, ...]:
        """Names of the registered parameters that the unfolded graph read and the folded graph
        (``outputs``, as it is now) does not, still registered."""
        return tuple(home.name for home, _ in _unread(self._read_before, self.outputs)
                     if home.name not in self._pruned)

    def prune(self) -> Tuple[str, ...]:
        """Take :attr:`unused` out of the parameter registry (the current scope, the root one, or a
        module's), so that ``nnabla.utils.save`` and ``nn.get_parameters()`` no longer see them;
        returns their names. Another graph still reading them keeps working (it holds the
        variables), but is saved without them. Entries that now name another variable are left
        alone."""
        pruned = _prune(_unread(self._read_before, self.outputs))
        self._pruned += pruned
        return pruned


def _registered_reads(graph: Graph, p: Plan, variables) -> Tuple[Tuple[Home, "nn.Variable"], ...]:
    """(home, variable) of each registered parameter the plan reads: the only ones a fold can leave
    unread."""
    out = []
    for name in p.arrays:
        var = variables.get(name)
        home = graph.home(var) if var is not None else None
        if home is not None:
            out.append((home, var))
    return tuple(out)


def _unread(read_before, outputs) -> List[Tuple[Home, "nn.Variable"]]:
    if not read_before:
        return []
    flat, _ = _flatten(outputs)
    reads = set()

    def collect(f):
        reads.update(f.inputs)

    for out in flat:
        if out.parent is not None:
            out.visit(collect)
    flat_set = set(flat)
    out = [(home, var) for home, var in read_before if var not in reads and var not in flat_set]
    reads.clear()   # NNabla's visit keeps ``collect`` in a reference cycle: it holds nothing now
    return out


def _prune(entries) -> Tuple[str, ...]:
    done = []
    with _interrupts.held():
        for home, var in entries:
            current = home.scope.get(home.key)
            if isinstance(current, nn.Variable) and current == var:
                del home.scope[home.key]
                done.append(home.name)
    return tuple(done)


def _flatten(outputs):
    if isinstance(outputs, nn.Variable):
        return [outputs], lambda flat: flat[0]
    if isinstance(outputs, (list, tuple, dict)):
        items = outputs.items() if isinstance(outputs, dict) else enumerate(outputs)
        for key, o in items:
            if not isinstance(o, nn.Variable):
                raise TypeError(f"outputs[{key!r}] must be an nnabla.Variable, not "
                                f"{type(o).__name__}")
    if isinstance(outputs, (list, tuple)):
        kind = type(outputs)
        return list(outputs), lambda flat: kind(flat)
    if isinstance(outputs, dict):
        kind, keys = type(outputs), list(outputs)   # e.g. the outputs of an NnpLoader network
        return list(outputs.values()), lambda flat: kind(zip(keys, flat))
    raise TypeError("outputs must be an nnabla.Variable, or a list, tuple or dict of them, "
                    f"not {type(outputs).__name__}")


def new_parameter(shape, dtype, need_grad: bool) -> "nn.Variable":
    """A new parameter variable with host memory of ``dtype`` allocated (its values are written by
    the fold, every one of them)."""
    from nnabla_ext.cpu import context
    var = nn.Variable(tuple(shape), need_grad=need_grad)
    var.data.data_ptr(np.dtype(dtype), context())
    return var


def prepare_arrays(graph: Graph, p: Plan, backend_name: str):
    """(every variable by name, the new parameters, the backend's arrays by name): new parameters
    are created for the plan's new arrays; arrays are zero-copy views of the parameters' data; the
    fold's own arrays (derived maps, arrays between two folds of a layer) are allocated, and the
    derived maps computed."""
    variables = graph.variables_by_name()
    new_vars = {}
    for name in p.new_arrays:
        shape, dtype = p.arrays[name]
        new_vars[name] = new_parameter(shape, dtype, variables[p.sources[name]].need_grad)
    variables.update(new_vars)
    written = set()
    for s in p.folds:
        written.update((s.folded_weight, s.folded_bias))
    params = {n: variables[n] for n in p.arrays if n not in p.intermediates}
    arrays, xp = _arrays_for(backend_name, params, written)
    derived = {n for d in p.derived for n in (d.scale, d.shift) if n}
    for name in p.intermediates - derived:
        shape, dtype = p.arrays[name]
        arrays[name] = xp.empty(shape, dtype)
    if p.derived:
        from .backends.compose import compute_derived
        arrays.update(compute_derived(p, arrays, xp))
    return variables, new_vars, arrays


def _arrays_for(backend_name: str, variables, written):
    """(zero-copy views of the parameters' data for the backend, read-write where the fold writes;
    their array module): CuPy arrays where the parameters are in NNabla's CUDA context and the
    backend is the GPU's, NumPy arrays of their host memory otherwise."""
    if backend_name == "cupy":
        from .backends.cupy_backend import cupy, from_nnabla, on_device
        if on_device(nn.get_current_context()):
            return {n: from_nnabla(v, n in written) for n, v in variables.items()}, cupy
    return host_views(variables, written), np


class _HostArray:
    """Exposes an NNabla array's host memory to NumPy (``__array_interface__``) and keeps the array
    alive while the NumPy view is."""
    __slots__ = ("__array_interface__", "owner")

    def __init__(self, pointer: int, shape, dtype, read_only: bool, owner):
        self.__array_interface__ = {"data": (pointer, read_only), "shape": tuple(shape),
                                    "typestr": dtype.str, "version": 3}
        self.owner = owner


def host_views(variables, written) -> Dict[str, np.ndarray]:
    """name -> NumPy view of each variable's data in host memory (read-only unless in ``written``).

    NNabla's own accessors (``.d``, ``.data.get_data``) import ``nnabla_ext.cpu`` on every call, the
    Python 2 way: a relative import first, which fails and is not cached (about 40 us), then the
    absolute one. ``data_ptr`` with the context they use gives the same memory, synchronized the same
    way, without importing anything; arrays without a dtype yet (never written) take the usual way."""
    from nnabla_ext.cpu import context
    ctx = context()
    out = {}
    for n, v in variables.items():
        nd = v.data
        writable = n in written
        try:
            dtype = np.dtype(nd.dtype)
        except Exception:   # no array behind it yet
            dtype = None
        if dtype is None or not v.size:
            out[n] = nd.get_data("rw" if writable else "r")
            continue
        pointer = nd.data_ptr(dtype, ctx)
        out[n] = np.asarray(_HostArray(pointer, v.shape, dtype, not writable, nd))
    return out


def _registrations(graph: Graph, p: Plan, new_vars, variables) -> List[Tuple[dict, str, str, object]]:
    """(scope dict, key, full name, variable) for each new parameter whose source is registered: it
    goes into the dict holding its source, under the last part of its name, which the planner made
    beside its source's (``conv/W`` -> ``conv/b``, ``conv/W_folded``; ``conv1_W`` -> ``conv1_b``)."""
    out = []
    for name, var in new_vars.items():
        home: Home = graph.home(variables[p.sources[name]])
        if home is None:
            continue
        folder, _, key = name.rpartition("/")
        assert folder == home.name.rpartition("/")[0], (name, home.name)
        out.append((home.scope, key, name, var))
    return out


def register(registrations) -> list:
    """Put each new parameter into its scope dict (the planner chose names no entry has); returns
    what to undo."""
    done = []
    try:
        for scope, key, name, var in registrations:
            assert key not in scope, name
            _insert(scope, key, var)
            done.append((scope, key))
    except BaseException:
        unregister(done)
        raise
    return done


def _insert(scope: dict, key: str, var) -> None:
    scope[key] = var


def unregister(done) -> None:
    for scope, key in reversed(done):
        del scope[key]


# NNabla's compiled modules import ``nnabla`` and ``nnabla_ext`` the Python 2 way: a relative
# import first (``nnabla.nnabla``, ``nnabla.nnabla_ext``), which always fails and is not cached,
# then the absolute one. That costs tens of microseconds on every new variable and function. A None
# entry in sys.modules is Python's own way to make an import fail at once: it is there only while a
# fold or plan runs, for names that do not exist, and removed before the call returns.
_FAILING_NAMES = ("nnabla.nnabla", "nnabla.nnabla_ext")
_failing_lock = threading.Lock()
_failing_users = 0
_blockable = None


def _names_that_fail():
    global _blockable
    if _blockable is None:
        from importlib.machinery import PathFinder
        _blockable = tuple(n for n in _FAILING_NAMES if n not in sys.modules and PathFinder.find_spec(
            n, list(nn.__path__)) is None)
    return _blockable


@contextmanager
def _relative_imports_fail_fast():
    global _failing_users
    names = _names_that_fail()
    with _failing_lock:
        if _failing_users == 0:
            for n in names:
                sys.modules.setdefault(n, None)
        _failing_users += 1
    try:
        yield
    finally:
        with _failing_lock:
            _failing_users -= 1
            if _failing_users == 0:
                for n in names:
                    if n in sys.modules and sys.modules[n] is None:
                        del sys.modules[n]


@quiet_float_errors
@holding_scope_lock
def plan(outputs, inplace: bool = True, skip: Sequence[str] = ()) -> Plan:
    """A dry run: what ``fold(outputs, inplace=inplace, skip=skip)`` would fold, into what, and why
    the rest would not. Changes nothing."""
    flat, _ = _flatten(outputs)
    skip = skip_patterns(skip)
    inplace = check_flag("inplace", inplace)
    with _relative_imports_fail_fast():
        p = _make_plan(Graph(flat), inplace, skip=skip)
    warn_unmatched_skips(skip, [p], "the graph")
    return p


@quiet_float_errors
@holding_scope_lock
def fold(outputs, backend: str = "auto", inplace: bool = True, skip: Sequence[str] = (),
         prune: bool = False) -> FoldResult:
    """Fold every BN of the graph ending at ``outputs`` (and every multiply or add by a stored
    per-channel constant) into the layers around it, wherever that is exact, in one call.

    ``inplace=True`` rescales the layers' weight and bias arrays where they are and rewires the given
    graph itself: afterwards ``outputs`` compute the folded network, and any other graph using those
    parameters is stale. Weights shared with other layers are never rescaled in place: their layer gets
    a folded copy. ``inplace=False`` leaves the given graph and every parameter untouched and returns a
    new graph using new parameters. New parameters are registered beside the parameter they come from,
    wherever that is registered: the current parameter scope, the root one (a call inside another
    ``parameter_scope``) or a module's (all are in the result's ``parameters``).

    A fold is all or nothing: a fold that raises (a bad statistic, a value the dtype cannot hold, a
    failed allocation...) has changed no array, registration or function of the graph; Ctrl-C during
    the writes takes effect once they are complete. The process is otherwise left as it was.

    ``prune=True`` then takes the parameters the folded graph no longer reads out of the registry
    (see :meth:`FoldResult.prune`), so that ``nnabla.utils.save`` writes a clean model.
    """
    inplace, prune, skip = check_flag("inplace", inplace), check_flag("prune", prune), \
        skip_patterns(skip)
    try:
        with _relative_imports_fail_fast():
            result = _fold(outputs, backend, inplace, skip)
    except BaseException as e:
        # what the failed fold made goes now, not when the traceback does (a session may keep it):
        # its new functions would count as consumers of the parameters they read in a later fold
        traceback.clear_frames(e.__traceback__)
        raise
    if prune:
        result.prune()
    return result


def _fold(outputs, backend: str, inplace: bool, skip) -> FoldResult:
    flat, rebuild = _flatten(outputs)
    # fails before any work on a bad name; imports CuPy once (not timed)
    be = get_backend(backend, on_device=cuda_context(nn.get_current_context()))
    t0 = time.perf_counter()
    graph = Graph(flat)
    p = _make_plan(graph, inplace, skip=skip)
    warn_unmatched_skips(skip, [p], "the graph")
    t1 = time.perf_counter()
    variables, new_vars, arrays = prepare_arrays(graph, p, be.name)
    job = be.prepare(p, arrays)       # checks everything, computes the new biases: writes nothing
    functions, flat_out, inputs = graph.functions, flat, graph.inputs
    if not inplace and p.folds:
        functions, flat_out, inputs = rewrite.clone(graph.functions, flat, graph.inputs)
    rewiring = rewrite.prepare(p, functions, variables, flat_out, inputs)
    registrations = _registrations(graph, p, new_vars, variables)
    t2 = time.perf_counter()
    with _interrupts.held():
        registered = register(registrations)
        try:
            rewired = rewrite.commit(rewiring)
            try:
                t3 = time.perf_counter()
                job.commit()
            except BaseException:
                rewrite.undo(rewired)
                raise
        except BaseException:
            unregister(registered)
            raise
    rewired.clear()        # the replaced functions, and their buffers, go now
    t4 = time.perf_counter()
    names = {name for _, _, name, _ in registrations}
    return FoldResult(rebuild(flat_out), p.folds, p.skipped, be.name, p, new_vars,
                      {"plan": t1 - t0, "prepare": t2 - t1, "rewrite": t3 - t2, "rescale": t4 - t3,
                       "total": t4 - t0},
                      tuple(n for n in new_vars if n not in names),
                      _registered_reads(graph, p, variables) if p.folds else ())
