"""Backends apply a plan to arrays. They never import nnabla."""
from .common import FoldError

BACKENDS = ("numpy", "cupy")


def get_backend(name: str = "auto", on_device: bool = True):
    """The backend module for ``name`` ('auto', 'numpy' or 'cupy').

    'auto' goes by where the arrays are (``on_device``): arrays on a CUDA device are folded there by
    'cupy' when it is usable; arrays in host memory by 'numpy'. Streaming host arrays through a GPU
    is bound by the host link (20 GB/s page-locked on an H200 machine, whose 16 cores rescaled the
    same arrays with NumPy at 73 GB/s), and NumPy then needs no second copy of them."""
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {name!r}: choose one of 'auto', 'numpy', 'cupy'")
    if name == "cupy" or (name == "auto" and on_device):
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
