"""bnfold_gpu: exact batch-normalization folding for NNabla graphs, on the GPU or the CPU.

Importing the package does not import nnabla: the plan types and the backends work without it
(the GPU machine has none); ``fold`` and ``plan`` import it when called.
"""
from .backends.common import FoldError
from .plan import FoldSpec, Plan, Skip

__version__ = "0.1.0"


def fold(outputs, backend: str = "auto", inplace: bool = True, skip=()):
    """Fold every BN of the graph ending at ``outputs`` into the layers around it, wherever that is
    exact, in one call; see :func:`bnfold_gpu.folding.fold`. Returns a :class:`FoldResult`."""
    from .folding import fold as _fold
    return _fold(outputs, backend=backend, inplace=inplace, skip=skip)


def plan(outputs, inplace: bool = True, skip=()):  # noqa: F811 (the function, not the submodule)
    """A dry run of :func:`fold`: the :class:`Plan` (what would fold, into what, why the rest would
    not). Changes nothing."""
    from .folding import plan as _plan
    return _plan(outputs, inplace=inplace, skip=skip)


def fold_nnp(src, dst=None, **options):
    """Fold the .nnp file ``src`` into ``dst`` (or in place); see
    :func:`bnfold_gpu.nnp_fold.fold_nnp`. Returns a :class:`Report`."""
    from .nnp_fold import fold_nnp as _fold_nnp
    return _fold_nnp(src, dst, **options)


_LAZY = {"FoldResult": "folding", "Report": "nnp_fold", "VerificationFailed": "nnp_fold",
         "VerificationImpossible": "nnp_fold", "NnpError": "nnp"}


def __getattr__(name):
    # imported when first asked for: nnp_fold imports nnabla only when a file is folded, nnp and
    # folding at once
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'bnfold_gpu' has no attribute {name!r}")


__all__ = ["fold", "plan", "fold_nnp", "FoldResult", "Report", "NnpError", "VerificationFailed",
           "VerificationImpossible", "FoldSpec", "Plan", "Skip", "FoldError", "__version__"]
