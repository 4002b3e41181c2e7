"""Backends apply a plan to arrays. They never import nnabla."""
from .common import FoldError

BACKENDS = ("numpy", "cupy")


def get_backend(name: str = "auto"):
    """The backend module for ``name`` ('auto', 'numpy' or 'cupy')."""
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {name!r}: choose one of 'auto', 'numpy', 'cupy'")
    if name == "cupy" or name == "auto":
        try:
            from . import cupy_backend
        except ImportError as e:
            if name == "cupy":
                raise RuntimeError(f"backend 'cupy' is not available: {e}") from None
        else:
            reason = cupy_backend.unavailable_reason()
            if reason is None:
                return cupy_backend
            if name == "cupy":
                raise RuntimeError(f"backend 'cupy' is not usable: {reason}")
    from . import numpy_backend
    return numpy_backend


__all__ = ["BACKENDS", "FoldError", "get_backend"]
