"""A stand-in for CuPy whose 'device' is host memory and whose kernels are the real kernel code
compiled for the CPU (tests/host/bnfold_host.cpp). With it the GPU backend's Python side (tables,
launch arguments, status checks, staging) runs in CI, where no GPU is."""
import ctypes
import time
import types

import numpy as np


class _Memory:
    def __init__(self, array):
        self.ptr = array.ctypes.data
        self.array = array
        self.device_id = getattr(array, "fake_device", 0)

    def copy_from_device(self, src, nbytes):
        ctypes.memmove(self.ptr, src.ptr, nbytes)


class ndarray(np.ndarray):
    """Host memory posing as device memory."""

    @property
    def data(self):
        return _Memory(self)

    # as strict as CuPy's own: same dtype and shape, contiguous memory
    def get(self, stream=None, out=None, blocking=True):
        if out is None:
            return np.array(self.view(np.ndarray))
        if out.dtype != self.dtype or out.shape != self.shape or not out.flags.c_contiguous:
            raise ValueError(f"get(out=): {out.dtype}{out.shape} for {self.dtype}{self.shape}")
        out[...] = self.view(np.ndarray)
        return out

    def set(self, arr, stream=None):
        if not isinstance(arr, np.ndarray) or arr.dtype != self.dtype or arr.shape != self.shape:
            raise ValueError(f"set(): {getattr(arr, 'dtype', type(arr))}{getattr(arr, 'shape', '')} "
                             f"for {self.dtype}{self.shape}")
        if not self.flags.c_contiguous:
            raise RuntimeError("Cannot set to non-contiguous array")
        self.view(np.ndarray)[...] = arr


class _Event:
    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass


class _Context:
    """A device or a stream: usable in ``with``, nothing to wait for."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        pass


# Each kernel's parameters as CuPy passes them: device arrays as pointers, NumPy scalars by their own
# size. A Python int would be passed as a 64-bit value whatever the parameter, and a host array not
# at all, so both are refused here as CuPy (or the kernel) would.
_SIGNATURES = {
    "bnfold_channels": ("p", np.int32, np.int64, "p", "p", "p", "p", "p", "p"),
    "bnfold_biases": ("p", np.int32, np.int64, "p", "p", "p", "p"),
    "bnfold_input_biases": ("p", np.int32, "p", "p"),
    "bnfold_weights": ("p", np.int32, "p", "p"),
    "bnfold_weight_check": ("p", np.int32, "p", "p", "p"),
    "bnfold_copy": ("p", np.int32, np.int64),
}


def _check_arguments(name, args):
    want = _SIGNATURES[name]
    assert len(args) == len(want), (name, len(args))
    for i, (a, w) in enumerate(zip(args, want)):
        if w == "p":
            assert isinstance(a, ndarray), f"{name} argument {i}: {type(a).__name__}, not a device array"
        else:
            assert type(a) is w, f"{name} argument {i}: {type(a).__name__}, not {w.__name__}"


def make(host_lib, build=None):
    """A module-like object exposing what the GPU backend uses of CuPy. ``build(defines)`` compiles
    the host kernels with ``-D`` options, for modules built with them (default: ``host_lib`` for all)."""
    cp = types.SimpleNamespace()
    cp.ndarray = ndarray
    for name in ("float16", "float32", "float64", "int32", "int64", "uint8", "nan"):
        setattr(cp, name, getattr(np, name))
    cp.asarray = lambda a, dtype=None: np.array(a, dtype=dtype, copy=True).view(ndarray)
    cp.empty = lambda shape, dtype=np.float32: np.empty(shape, dtype).view(ndarray)
    cp.zeros = lambda shape, dtype=np.float32: np.zeros(shape, dtype).view(ndarray)
    cp.full = lambda shape, value, dtype=np.float32: np.full(shape, value, dtype).view(ndarray)
    cp.empty_like = lambda a: np.empty_like(a).view(ndarray)
    cp.ascontiguousarray = lambda a: np.ascontiguousarray(a).view(ndarray)
    for name in ("ones", "ones_like", "zeros_like", "where", "isfinite", "sqrt"):   # for compose
        setattr(cp, name, lambda *a, _f=getattr(np, name), **k: np.asarray(_f(*a, **k)).view(ndarray))
    cp.launches = []
    cp.__version__ = "emulated"
    rs = np.random.RandomState(0)
    cp.random = types.SimpleNamespace(
        standard_normal=lambda n, dtype=np.float32: rs.standard_normal(n).astype(dtype).view(ndarray))
    cp.get_default_memory_pool = lambda: types.SimpleNamespace(free_all_blocks=lambda: None)
    runtime = types.SimpleNamespace(
        getDeviceCount=lambda: 1, getDevice=lambda: 0, memGetInfo=lambda: (1 << 30, 1 << 30),
        hostRegister=lambda ptr, size, flags: None, hostUnregister=lambda ptr: None,
        getDeviceProperties=lambda i: {"name": b"host emulation"}, driverGetVersion=lambda: 0,
        runtimeGetVersion=lambda: 0)
    cp.cuda = types.SimpleNamespace(
        runtime=runtime, Stream=_Context, get_current_stream=_Context, Event=_Event,
        get_elapsed_time=lambda a, b: (b.t - a.t) * 1e3,
        Device=_Context, nvrtc=types.SimpleNamespace(getVersion=lambda: (12, 9)))

    def ptr(a):
        return ctypes.c_void_p(a.ctypes.data)

    def kernels(lib):
        def channels(grid, block, args):
            seg, n, total, sd, sf, off, mean, beta, status = args
            lib.bnfold_host_channels(ptr(seg), int(n), int(total), ptr(sd), ptr(sf), ptr(off),
                                     ptr(mean), ptr(beta), ptr(status))

        def biases(grid, block, args):
            seg, n, total, sd, mean, beta, flags = args
            lib.bnfold_host_biases(ptr(seg), int(n), int(total), ptr(sd), ptr(mean), ptr(beta),
                                   ptr(flags))

        def input_biases(grid, block, args):
            seg, n, offset, flags = args
            lib.bnfold_host_input_biases(ptr(seg), int(n), int(grid[0]), ptr(offset), ptr(flags))

        def weights(grid, block, args):
            seg, n, sd, sf = args
            lib.bnfold_host_weights(ptr(seg), int(n), int(grid[0]), ptr(sd), ptr(sf))

        def weight_check(grid, block, args):
            seg, n, sd, sf, flags = args
            lib.bnfold_host_weight_check(ptr(seg), int(n), int(grid[0]), ptr(sd), ptr(sf), ptr(flags))

        def copy(grid, block, args):
            seg, n, total = args
            lib.bnfold_host_copy(ptr(seg), int(n), int(total))

        return {"bnfold_channels": channels, "bnfold_biases": biases,
                "bnfold_input_biases": input_biases, "bnfold_weights": weights,
                "bnfold_weight_check": weight_check, "bnfold_copy": copy}

    class RawModule:
        def __init__(self, code, options=()):
            assert "bnfold_weights" in code and '#include "' not in code   # one self-contained source
            defines = [o[2:] for o in options if o.startswith("-D")]
            assert build or not defines, "this emulated device has no builds with -D options"
            self.kernels = kernels(build(defines) if defines else host_lib)

        def get_function(self, name):
            def launch(grid, block, args):
                assert block == (256,) and all(g >= 1 for g in grid)
                _check_arguments(name, args)
                cp.launches.append(name)
                self.kernels[name](grid, block, args)
            return launch

    cp.RawModule = RawModule
    return cp
