"""bnfold_gpu: exact batch-normalization folding for NNabla graphs, on the GPU or the CPU.

Importing the package does not import nnabla: the plan types and the backends work without it
(the GPU machine has none); ``fold`` and ``plan`` import it when called.
"""
from .backends.common import FoldError
from .plan import FoldSpec, Plan, Skip

__version__ = "0.1.0"


def fold(outputs, backend: str = "auto", inplace: bool = True):
    """Fold every BN of the graph ending at ``outputs`` into its adjacent layer where exact; see
    :func:`bnfold_gpu.folding.fold`. Returns a :class:`FoldResult`."""
    from .folding import fold as _fold
    return _fold(outputs, backend=backend, inplace=inplace)


def plan(outputs, inplace: bool = True):  # noqa: F811 (the function, not the submodule)
    """A dry run of :func:`fold`: the :class:`Plan` (what would fold, into what, why the rest would
    not). Changes nothing."""
    from .folding import plan as _plan
    return _plan(outputs, inplace=inplace)


def __getattr__(name):
    if name == "FoldResult":
        from .folding import FoldResult
        return FoldResult
    raise AttributeError(f"module 'bnfold_gpu' has no attribute {name!r}")


__all__ = ["fold", "plan", "FoldResult", "FoldSpec", "Plan", "Skip", "FoldError", "__version__"]
