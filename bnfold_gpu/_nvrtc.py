"""NVRTC, the CUDA compiler CuPy builds the kernels with: found, loaded, and asked directly (no GPU
needed).

CuPy 13 loads NVRTC by its soname alone (``libnvrtc.so.12``), so it finds a CUDA toolkit on the
dynamic loader's path but not the library of the ``nvidia-cuda-nvrtc-cu12`` wheel, which the
``[cuda]`` extra installs inside site-packages. :func:`load` loads that library by its full path;
the loader then hands the same library to CuPy's later request by soname, without
``LD_LIBRARY_PATH``. The wheel's library comes first because the ``[cuda]`` extra installs the CUDA
headers of the same version beside it, and CuPy takes headers only of its NVRTC's version.
"""
import ctypes
import importlib.util
from pathlib import Path
from typing import Optional, Sequence, Tuple

CUDA_MAJOR = 12                       # cupy-cuda12x's
SONAME = f"libnvrtc.so.{CUDA_MAJOR}"
WHEEL_PACKAGE = "nvidia.cuda_nvrtc"   # where nvidia-cuda-nvrtc-cu12 installs lib/
LOADER_PATH = "the dynamic loader's search path"

_loaded: Optional[Tuple[ctypes.CDLL, str]] = None


class CompileError(RuntimeError):
    """NVRTC refused a source; the message is its log."""


def wheel_library() -> Optional[Path]:
    """The NVRTC library of the nvidia-cuda-nvrtc wheel, if that wheel is installed."""
    try:
        spec = importlib.util.find_spec(WHEEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "lib" / SONAME
        if candidate.exists():
            return candidate
    return None


def load() -> Tuple[ctypes.CDLL, str]:
    """NVRTC, loaded once for the process, and where it was found (a path, or ``LOADER_PATH``).
    Call before CuPy first compiles. Raises OSError when neither the wheel nor the loader has it."""
    global _loaded
    if _loaded is None:
        path = wheel_library()
        lib, where = (ctypes.CDLL(str(path)), str(path)) if path is not None \
            else (ctypes.CDLL(SONAME), LOADER_PATH)
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        _loaded = lib, where
    return _loaded


def version() -> Tuple[int, int]:
    lib, _ = load()
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(lib, lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)))
    return major.value, minor.value


def compile_ptx(source: str, arch: str, options: Sequence[str] = (),
                name: str = "bnfold.cu") -> str:
    """``source`` compiled to PTX for ``arch`` (``"compute_90"``). Raises :class:`CompileError`
    with NVRTC's log when it fails, or when it succeeds with warnings (the kernels have none)."""
    lib, _ = load()
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None,
                                       None))
    try:
        opts = [f"--gpu-architecture={arch}".encode()] + [o.encode() for o in options]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        _check(lib, lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)))
        log = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetProgramLog(prog, log))
        text = log.value.decode(errors="replace").strip()
        if rc != 0 or text:
            raise CompileError(text or lib.nvrtcGetErrorString(rc).decode())
        _check(lib, lib.nvrtcGetPTXSize(prog, ctypes.byref(size)))
        ptx = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetPTX(prog, ptx))
        return ptx.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _check(lib, rc: int) -> None:
    if rc != 0:
        raise CompileError(lib.nvrtcGetErrorString(rc).decode())
