"""The host side of a GPU fold call, measured without a GPU: ``cupy_backend.fold`` over real
``cupy.ndarray`` objects (their memory is never touched), with CuPy's allocations, copies, launches and
syncs replaced by stand-ins that do nothing. What remains is the Python work per layer that a real call
adds to its kernels: reading each array's address, size, dtype and contiguity, the checks, and the
segment tables. Needs CuPy (importable without a driver), not nnabla. Prints microseconds per layer.

    python bench/call_overhead.py [--sizes-gb 1,16] [--repeats 30]
"""
import argparse
import sys
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bnfold_gpu._synthetic import LAYOUTS, random_plan, sized_plan  # noqa: E402
from bnfold_gpu.backends import common, cupy_backend, segments  # noqa: E402


def device_arrays(plan, cupy):
    """A ``cupy.ndarray`` per array of ``plan``, over unowned addresses that nothing dereferences."""
    arrays, at = {}, 1 << 40
    for name, (shape, dtype) in plan.arrays.items():
        dtype = np.dtype(dtype)
        nbytes = max(1, int(np.prod(shape)) * dtype.itemsize)
        memory = cupy.cuda.UnownedMemory(at, nbytes, None, device_id=0)
        arrays[name] = cupy.ndarray(tuple(shape), dtype, cupy.cuda.MemoryPointer(memory, 0))
        at += -(-nbytes // 256) * 256
    return arrays


class _HostArray(np.ndarray):
    """The backend's own small arrays (scales, tables, status), in host memory."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data, device_id=0)

    def get(self, stream=None):
        return np.array(self)


class _Nothing:
    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        pass


def stand_in(cupy):
    """A CuPy whose ``ndarray`` is CuPy's own and whose device work does nothing."""
    cp = types.SimpleNamespace(ndarray=cupy.ndarray, ascontiguousarray=cupy.ascontiguousarray)
    for name in ("float16", "float32", "float64", "int32", "uint8"):
        setattr(cp, name, getattr(np, name))
    cp.empty = cp.zeros = lambda n, dtype=np.float32: np.zeros(n, dtype).view(_HostArray)
    cp.asarray = lambda a, dtype=None: np.array(a, dtype=dtype).view(_HostArray)
    cp.RawModule = None
    cp.cuda = types.SimpleNamespace(
        Device=_Nothing, Stream=_Nothing, get_current_stream=_Nothing,
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, getDevice=lambda: 0))
    return cp


def measure(plan, arrays, repeats):
    """Fastest of ``repeats`` calls (seconds): the whole call, and its parts."""
    def best(fn):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)
    facts, pointers, _ = cupy_backend._facts(arrays)
    dtypes = {n: f[2] for n, f in facts.items()}
    return {"call": best(lambda: cupy_backend.fold(plan, arrays)),
            "array facts": best(lambda: cupy_backend._facts(arrays)),
            "checks": best(lambda: common.check_plan_arrays(plan, arrays, facts)),
            "tables": best(lambda: segments.build(plan, pointers, dtypes))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-gb", default="1,16", help="plans of ResNet-like layers (as bench_gpu.py)")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args(argv)
    import cupy
    saved = (cupy_backend.cupy, cupy_backend.unavailable_reason, cupy_backend._kernels)
    cupy_backend.cupy = stand_in(cupy)
    cupy_backend.unavailable_reason = lambda: None
    cupy_backend._kernels = lambda defines=(): {k: lambda grid, block, kernel_args: None
                                                for k in cupy_backend.KERNEL_NAMES}
    try:
        plans = [(f"{gb:g} GB of float32 weights", sized_plan(np.random.RandomState(0), int(gb * 1e9)))
                 for gb in map(float, args.sizes_gb.split(","))]
        plans.append(("every layout, random dtypes", random_plan(np.random.RandomState(0), 1000,
                                                                 cases=LAYOUTS)))
        print(f"CuPy {cupy.__version__}, NumPy {np.__version__}, Python {sys.version.split()[0]}; "
              "microseconds per layer, fastest of {}:".format(args.repeats))
        print(f"{'plan':32} {'layers':>6} {'call':>6} {'facts':>6} {'checks':>6} {'tables':>6}")
        rows = []
        for label, plan in plans:
            t = measure(plan, device_arrays(plan, cupy), args.repeats)
            per = {k: v / len(plan.folds) * 1e6 for k, v in t.items()}
            rows.append((label, len(plan.folds), per))
            print(f"{label:32} {len(plan.folds):6} {per['call']:6.1f} {per['array facts']:6.1f} "
                  f"{per['checks']:6.1f} {per['tables']:6.1f}")
        return rows
    finally:
        cupy_backend.cupy, cupy_backend.unavailable_reason, cupy_backend._kernels = saved


if __name__ == "__main__":
    main()
