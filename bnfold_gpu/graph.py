"""An NNabla graph read once: its functions in topological order and where its parameters live."""
import gc
from collections import Counter
from typing import Dict, List, NamedTuple, Optional, Sequence

import nnabla as nn

from .layout import FOLDABLE_INTO

BN_TYPES = ("BatchNormalization", "FusedBatchNormalization")
_PARAMETRIC = BN_TYPES + FOLDABLE_INTO


class Home(NamedTuple):
    """Where a parameter is registered: its full name, the scope dict holding it and its key there."""
    name: str
    scope: dict
    key: str


def _walk(root: dict, prefix: str = ""):
    """(variable or None, full name, holding dict, key) for every entry under the scope dict ``root``.
    Files loaded with ``NnpLoader`` can register unused parameters as None: they are yielded with
    their names (a name in use), and ``nn.get_parameters()``, which fails on them, is not used."""
    stack = [(prefix, root)]
    while stack:
        path, d = stack.pop()
        for key, value in d.items():
            if value is None or isinstance(value, nn.Variable):
                yield value, path + key, d, key
            elif hasattr(value, "items"):
                stack.append((path + key + "/", value))


def parameter_names(scope=None) -> Dict["nn.Variable", str]:
    """Variable -> full name for every parameter registered under ``scope`` (the current one by
    default)."""
    scope = nn.parameter.get_current_parameter_scope() if scope is None else scope
    names: Dict["nn.Variable", str] = {}
    for var, name, _, _ in _walk(scope):
        if var is not None:
            names.setdefault(var, name)
    return names


def module_scopes():
    """[(name prefix, scope dict)] of the parameter scopes of the modules alive in the process
    (``nnabla.Module`` and modules written the same way, such as the ``neu`` library's): each keeps
    its parameters in a scope dict of its own, outside the global registry, and names them as its
    ``get_parameters`` does (``@child/`` before a submodule's). Found through the garbage collector,
    as nothing else lists them: only asked for when a graph's parameters are not in the current
    scope. A module's instance dict holds ``_parameter_scope``; root modules only (their submodules
    are walked from them)."""
    instance_dicts = [o for o in gc.get_objects()
                      if type(o) is dict and isinstance(o.get("_parameter_scope"), dict)]
    children = set()
    for d in instance_dicts:
        for sub in (d.get("_submodules") or {}).values():
            children.add(id(getattr(sub, "__dict__", None)))
    out = []
    stack = [("", d) for d in instance_dicts if id(d) not in children]
    while stack:
        prefix, d = stack.pop()
        out.append((prefix, d["_parameter_scope"]))
        for name, sub in (d.get("_submodules") or {}).items():
            sub_dict = getattr(sub, "__dict__", None)
            if isinstance(sub_dict, dict) and isinstance(sub_dict.get("_parameter_scope"), dict):
                stack.append((f"{prefix}@{name}/", sub_dict))
    return out


class Graph:
    """``functions`` in topological order (each once), ``outputs``, ``name(var)`` and ``home(var)``."""

    def __init__(self, outputs: Sequence["nn.Variable"]):
        self.outputs = list(outputs)
        functions: List = []
        seen = set()

        def add(f):
            if f not in seen:
                seen.add(f)
                functions.append(f)

        for out in self.outputs:
            if out.parent is not None:
                out.visit(add)
        # NNabla's visit keeps ``add`` in a reference cycle, freed only by the garbage collector:
        # emptied, its list and set hold no function past this point, so the functions a fold
        # replaces (and their buffers) go when the fold returns, not at the next collection
        self.functions = list(functions)
        functions.clear()
        seen.clear()
        # each function's type and inputs, asked of NNabla once
        self.types = [f.info.type_name for f in self.functions]
        self.inputs = [list(f.inputs) for f in self.functions]
        # function inputs reading each variable, by NNabla's identity (which a parameter's handles
        # share): each parametric-function call that reuses a parameter gets a handle of its own,
        # whose function_references list only that call's function
        self.uses = Counter(v for inputs in self.inputs for v in inputs)
        self._homes: Dict["nn.Variable", Home] = {}
        self._taken = set()
        current = nn.parameter.get_current_parameter_scope()
        self._add_scope(current, "")
        # called inside a parameter_scope other than the graph's: its parameters are named from the
        # root, as nn.get_parameters() there names them
        root = getattr(nn.parameter, "root_scope", None)
        if isinstance(root, dict) and root is not current and self._unregistered_parameters():
            self._add_scope(root, "")
        if self._unregistered_parameters():
            for prefix, scope in module_scopes():
                self._add_scope(scope, prefix)
        self._unnamed: Dict = {}

    def _add_scope(self, scope: dict, prefix: str):
        for var, name, d, key in _walk(scope, prefix):
            self._taken.add(name)
            if var is not None and var not in self._homes:
                self._homes[var] = Home(name, d, key)

    def _unregistered_parameters(self) -> bool:
        """Whether a stored input of a BN or of a layer (its weight, bias or statistics) is missing
        from the current scope: the model may keep its parameters in a module's scope."""
        for type_name, inputs in zip(self.types, self.inputs):
            if type_name not in _PARAMETRIC:
                continue
            for v in inputs[1:]:
                if v.parent is None and v not in self._homes:
                    return True
        return False

    def name(self, var: "nn.Variable", hint: str = "param") -> str:
        """The registered name of ``var``, or a stable made-up one that cannot clash with a real one."""
        home = self._homes.get(var)
        if home is not None:
            return home.name
        name = self._unnamed.get(var)
        if name is None:
            name = f"<unnamed {hint} #{len(self._unnamed)}>"
            self._unnamed[var] = name
        return name

    def home(self, var: "nn.Variable") -> Optional[Home]:
        """Where ``var`` is registered (the current scope, or a module's), or None."""
        return self._homes.get(var)

    def all_names(self):
        return self._taken | set(self._unnamed.values())

    def variables_by_name(self):
        out = {h.name: v for v, h in self._homes.items()}
        out.update({n: v for v, n in self._unnamed.items()})
        return out
