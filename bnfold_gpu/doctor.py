"""``bnfold doctor``: what this machine offers the GPU backend, one fact a line, as
``name: value``.

It imports neither nnabla nor any module that does, so it also runs on a GPU host where only CuPy
is installed; it needs no GPU either (NVRTC compiles without one). Each fact is found on its own:
one that cannot be found says why, and the others still print.
"""
import importlib.metadata
import os
import platform
import sys
from typing import Callable, Iterator, List, Optional, Tuple

from . import __version__, _nvrtc

# the architectures the kernels are compiled for when no device answers (Ampere and Hopper)
DEFAULT_ARCHS = ("80", "90")
CUDA_OPTIONS = ("--std=c++14", "-ftz=true")   # the backend's option, and the one CuPy appends
INSTALL_HINT = "pip install 'bnfold_gpu[cuda]'"


def facts() -> Iterator[Tuple[str, str]]:
    """(name, value) pairs, in the order printed."""
    yield "bnfold_gpu", f"{__version__} (Python {platform.python_version()})"
    cupy_backend, import_error = _cupy_backend()
    yield "backend auto picks for arrays on a GPU", _guarded(
        lambda: _auto(cupy_backend, import_error))
    yield "backend auto picks for arrays in host memory", _guarded(_auto_host)
    yield "zip CRC-32 of .nnp members", _guarded(_crc)
    cupy = getattr(cupy_backend, "cupy", None)
    yield "CuPy", _guarded(lambda: _cupy(cupy, import_error))
    yield "CUDA driver", _guarded(lambda: _driver(cupy))
    archs: List[str] = []
    for name, value in _devices(cupy, archs):
        yield name, value
    yield "NVRTC", _guarded(_nvrtc_facts)
    yield "CuPy finds NVRTC", _guarded(lambda: _cupy_nvrtc(cupy))
    yield "CUDA headers for CuPy's own kernels", _guarded(lambda: _headers(cupy))
    yield "kernel sources", _guarded(lambda: str(cupy_backend.kernel_dir()) if cupy_backend
                                     else f"unknown: {import_error}")
    yield "kernels compile with NVRTC", _guarded(
        lambda: _compiles(cupy_backend, archs or list(DEFAULT_ARCHS)))


def _crc() -> str:
    from . import _zip
    if _zip.using() == "isal":
        return f"ISA-L (isal {importlib.metadata.version('isal')})"
    return "zlib's (the isal package is not installed: files fold slower)"


def main(out=None) -> int:
    """Print the facts; 0 once they are printed, whatever they say."""
    out = out or sys.stdout
    for name, value in facts():
        print(f"{name}: {value}", file=out)
    out.flush()
    return 0


def _guarded(find: Callable[[], str]) -> str:
    try:
        return find()
    except Exception as e:   # a fact that cannot be found is a fact too
        return f"could not tell ({_words(e)})"


def _words(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _cupy_backend():
    try:
        from .backends import cupy_backend
    except Exception as e:   # CuPy that imports but fails inside, among others
        return None, _words(e)
    return cupy_backend, None


def _auto(cupy_backend, import_error: Optional[str]) -> str:
    """What ``fold`` picks for a graph in NNabla's CUDA context."""
    from .backends import get_backend
    if cupy_backend is None:
        return f"numpy, because the GPU backend does not import ({import_error})"
    if get_backend("auto", on_device=True).name == "cupy":
        return "cupy, because CuPy imports and a CUDA device answers"
    return f"numpy, because {cupy_backend.unavailable_reason()}"


def _auto_host() -> str:
    """What ``fold`` picks in NNabla's CPU context, and what ``fold_nnp``, ``load`` and the command
    line pick for a file, whose arrays are read into host memory."""
    from .backends import get_backend
    picked = get_backend("auto", on_device=False).name
    return (f"{picked} (.nnp files, NNabla's CPU context; --backend cupy streams such arrays "
            "through the GPU)")


def _cupy(cupy, import_error: Optional[str]) -> str:
    if cupy is None:
        return f"unusable ({import_error})" if import_error else f"not installed; {INSTALL_HINT}"
    runtime = cupy.cuda.runtime.runtimeGetVersion()
    return f"{cupy.__version__}, CUDA runtime {_cuda_version(runtime)}"


def _driver(cupy) -> str:
    if cupy is None:
        return "unknown without CuPy"
    version = cupy.cuda.runtime.driverGetVersion()
    return f"supports CUDA {_cuda_version(version)}" if version else "none found"


def _devices(cupy, archs: List[str]) -> Iterator[Tuple[str, str]]:
    """A line per device; ``archs`` gets their compute capabilities."""
    if cupy is None:
        yield "device", "unknown without CuPy"
        return
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        yield "device", f"none answers ({_words(e)})"
        return
    if count == 0:
        yield "device", "none found"
    for i in range(count):
        yield f"device {i}", _guarded(lambda: _device(cupy, i, archs))


def _device(cupy, i: int, archs: List[str]) -> str:
    props = cupy.cuda.runtime.getDeviceProperties(i)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    arch = f"{props['major']}{props['minor']}"
    if arch not in archs:
        archs.append(arch)
    with cupy.cuda.Device(i):
        free, total = cupy.cuda.runtime.memGetInfo()
    return (f"{name}, compute capability {props['major']}.{props['minor']}, "
            f"{total / 2 ** 30:.1f} GiB memory, {free / 2 ** 30:.1f} GiB free")


def _nvrtc_facts() -> str:
    try:
        _, where = _nvrtc.load()
    except OSError as e:
        return f"not found ({_words(e)}); {INSTALL_HINT}"
    major, minor = _nvrtc.version()
    return f"{major}.{minor}, from {where}"


def _cupy_nvrtc(cupy) -> str:
    if cupy is None:
        return "unknown without CuPy"
    try:
        _nvrtc.load()     # as the backend does before it compiles
    except OSError:
        pass
    from cupy.cuda import nvrtc
    try:
        major, minor = nvrtc.getVersion()
    except Exception as e:
        return f"no ({_words(e)})"
    return f"yes, {major}.{minor}"


def _headers(cupy) -> str:
    """CuPy 13 compiles its own kernels (dtype conversions, copies of strided arrays) with the CUDA
    runtime headers from CUDA 12.2 on; it takes them from a CUDA toolkit, or from the
    nvidia-cuda-runtime wheel of exactly its NVRTC's major.minor."""
    try:
        major, minor = _nvrtc.version()
    except Exception as e:
        return f"unknown without NVRTC ({_words(e)})"
    if (major, minor) < (12, 2):
        return f"not needed with NVRTC {major}.{minor}"
    package = f"nvidia-cuda-runtime-cu{major}"
    try:
        installed = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed is not None and installed.split(".")[:2] == [str(major), str(minor)]:
        return f"{package} {installed}"
    toolkit = cupy.cuda.get_cuda_path() if cupy is not None else None
    if toolkit and os.path.exists(os.path.join(toolkit, "include", "cuda_fp16.h")):
        return f"from the CUDA toolkit at {toolkit}"
    found = f"{package} {installed} does not match NVRTC {major}.{minor}" if installed \
        else f"{package} is not installed"
    return f"missing ({found}); pip install '{package}=={major}.{minor}.*'"


def _compiles(cupy_backend, archs: List[str]) -> str:
    if cupy_backend is None:
        return "not checked: the kernel sources were not found"
    source = cupy_backend.kernel_source()
    try:
        _nvrtc.load()
    except OSError as e:
        return f"not checked: NVRTC not found ({_words(e)})"
    failed = []
    for arch in archs:
        try:
            _nvrtc.compile_ptx(source, f"compute_{arch}", CUDA_OPTIONS)
        except _nvrtc.CompileError as e:
            failed.append(f"compute_{arch}: {' '.join(str(e).split())[:200]}")
    where = " and ".join(f"compute_{a}" for a in archs)
    return f"no ({'; '.join(failed)})" if failed else f"yes, for {where}, without warnings"


def _cuda_version(encoded: int) -> str:
    """CUDA's version numbers: 1000 * major + 10 * minor."""
    return f"{encoded // 1000}.{encoded % 1000 // 10}"
