"""An NNabla graph read once: its functions in topological order and its parameters' names."""
from collections import Counter
from typing import Dict, List, Sequence

import nnabla as nn

BN_TYPES = ("BatchNormalization", "FusedBatchNormalization")


def parameter_names(scope=None) -> Dict["nn.Variable", str]:
    """Variable -> full name for every parameter registered under ``scope`` (the current one by default).

    Walks the registry itself instead of calling ``nn.get_parameters()``: files loaded with
    ``NnpLoader`` can register unused parameters as None, on which ``nn.get_parameters()`` fails.
    """
    scope = nn.parameter.get_current_parameter_scope() if scope is None else scope
    names = {}
    stack = [("", scope)]
    while stack:
        path, d = stack.pop()
        for key, value in d.items():
            if value is None:
                continue
            if isinstance(value, nn.Variable):
                names.setdefault(value, path + key)
            elif hasattr(value, "items"):
                stack.append((path + key + "/", value))
    return names


class Graph:
    """``functions`` in topological order (each once), ``outputs``, and ``name(var)``."""

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
        # function inputs reading each variable, by NNabla's identity (which a parameter's handles
        # share): each parametric-function call that reuses a parameter gets a handle of its own,
        # whose function_references list only that call's function
        self.uses = Counter(v for f in self.functions for v in f.inputs)
        self._names = parameter_names()
        self._unnamed: Dict = {}

    def name(self, var: "nn.Variable", hint: str = "param") -> str:
        """The registered name of ``var``, or a stable made-up one that cannot clash with a real one."""
        name = self._names.get(var)
        if name is None:
            name = self._unnamed.get(var)
            if name is None:
                name = f"<unnamed {hint} #{len(self._unnamed)}>"
                self._unnamed[var] = name
        return name

    def is_registered(self, var: "nn.Variable") -> bool:
        """Whether ``var`` is in the parameter registry (not merely named by this graph)."""
        return var in self._names

    def all_names(self):
        return set(self._names.values()) | set(self._unnamed.values())

    def variables_by_name(self):
        out = {n: v for v, n in self._names.items()}
        out.update({n: v for v, n in self._unnamed.items()})
        return out
