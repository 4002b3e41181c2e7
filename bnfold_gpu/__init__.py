"""bnfold_gpu: exact batch-normalization folding for NNabla graphs, on the GPU or the CPU."""
from .backends.common import FoldError
from .folding import FoldResult, fold, plan
from .plan import FoldSpec, Plan, Skip

__version__ = "0.1.0"
__all__ = ["fold", "plan", "FoldResult", "FoldSpec", "Plan", "Skip", "FoldError", "__version__"]
