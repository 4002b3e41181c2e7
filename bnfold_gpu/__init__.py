"""bnfold_gpu: exact batch-normalization folding for NNabla graphs, on the GPU or the CPU.

Importing the package does not import nnabla: the plan types and the backends work without it
(the GPU machine has none); ``fold`` and ``plan`` import it when called.
"""
import logging
import os
import sys
import warnings
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Tuple, Union

# the plan types need neither nnabla nor NumPy (and the submodule ``plan``, imported here, is
# then not set over the function ``plan`` below when something imports it later)
from .plan import FoldSpec, Plan, Skip, SkipPatternWarning

if TYPE_CHECKING:   # for the annotations alone: importing these at run time would import nnabla
    import nnabla
    from nnabla.utils.nnp_graph import NnpNetwork
    from .backends.common import FoldError
    from .folding import FoldResult
    from .nnp_fold import Report

__version__ = "0.1.0"

# a graph's outputs: a Variable, or a list, tuple or dict of them (a dict as NnpLoader hands them)
_Outputs = Union["nnabla.Variable", Sequence["nnabla.Variable"], Dict[str, "nnabla.Variable"]]
_Networks = Union["NnpNetwork", Dict[str, "NnpNetwork"]]
_PathLike = Union[str, "os.PathLike[str]"]


def import_nnabla() -> None:
    """Import nnabla, where it is not yet, leaving the process as it was: importing it configures
    the root logger (``logging.basicConfig``: INFO, a handler on stderr), adds warning filters and
    logs an INFO line; the root logger's level, its handlers (but a log file the user's
    ``nnabla.conf`` asks for), the filters and the ``nnabla`` logger's level are put back (its INFO
    line hidden) once it is imported. Every entry point that imports nnabla calls this first."""
    if "nnabla" in sys.modules:
        return
    root, own = logging.getLogger(), logging.getLogger("nnabla")
    level, handlers, own_level = root.level, list(root.handlers), own.level
    try:
        if own_level == logging.NOTSET:
            own.setLevel(logging.WARNING)
        with warnings.catch_warnings():   # the filters as they were, once imported
            import nnabla  # noqa: F401
    finally:
        for handler in list(root.handlers):
            if handler not in handlers and type(handler) is logging.StreamHandler:   # basicConfig's
                root.removeHandler(handler)
        root.setLevel(level)
        own.setLevel(own_level)


def fold(outputs: _Outputs, backend: str = "auto", inplace: bool = True, skip: Sequence[str] = (),
         prune: bool = False) -> "FoldResult":
    """Fold every BN of the graph ending at ``outputs`` into the layers around it, wherever that is
    exact, in one call; see :func:`bnfold_gpu.folding.fold`. Returns a :class:`FoldResult`."""
    import_nnabla()
    from .folding import fold as _fold
    return _fold(outputs, backend=backend, inplace=inplace, skip=skip, prune=prune)


def plan(outputs: _Outputs, inplace: bool = True,  # noqa: F811 (the function, not the submodule)
         skip: Sequence[str] = ()) -> Plan:
    """A dry run of :func:`fold`: the :class:`Plan` (what would fold, into what, why the rest would
    not). Changes nothing."""
    import_nnabla()
    from .folding import plan as _plan
    return _plan(outputs, inplace=inplace, skip=skip)


def fold_nnp(src: _PathLike, dst: Optional[_PathLike] = None, **options: Any) -> "Report":
    """Fold the .nnp file ``src`` into ``dst`` (or in place); see
    :func:`bnfold_gpu.nnp_fold.fold_nnp`. Returns a :class:`Report`."""
    import_nnabla()
    from .nnp_fold import fold_nnp as _fold_nnp
    return _fold_nnp(src, dst, **options)


def load(path: _PathLike, network: Optional[str] = None, *, batch_size: Optional[int] = None,
         backend: str = "auto", skip: Sequence[str] = (),
         with_report: bool = False) -> Union[_Networks, Tuple[_Networks, "Report"]]:
    """The networks of the .nnp file ``path`` folded in memory, as ``NnpLoader`` hands them; see
    :func:`bnfold_gpu.nnp_fold.load`."""
    import_nnabla()
    from .nnp_fold import load as _load
    return _load(path, network, batch_size=batch_size, backend=backend, skip=skip,
                 with_report=with_report)


_LAZY = {"FoldResult": "folding", "Report": "nnp_fold", "VerificationFailed": "nnp_fold",
         "VerificationImpossible": "nnp_fold", "NnpError": "nnp"}
# without nnabla, but with NumPy: imported when first asked for too, so that importing the package
# (the command line starting, its Ctrl-C handling set up) takes no time
_LAZY_PLAIN = {"FoldError": "backends.common"}


def __getattr__(name):
    # imported when first asked for: nnp_fold imports nnabla only when a file is folded, nnp and
    # folding at once
    import importlib
    if name in _LAZY_PLAIN:
        return getattr(importlib.import_module(f".{_LAZY_PLAIN[name]}", __name__), name)
    if name in _LAZY:
        import_nnabla()
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'bnfold_gpu' has no attribute {name!r}")


__all__ = ["fold", "plan", "fold_nnp", "load", "FoldResult", "Report", "NnpError",
           "VerificationFailed", "VerificationImpossible", "FoldSpec", "Plan", "Skip", "FoldError",
           "SkipPatternWarning", "__version__"]
