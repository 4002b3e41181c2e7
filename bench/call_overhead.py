"""The host side of a GPU fold call, measured without a GPU: ``cupy_backend.fold`` over real
``cupy.ndarray`` objects (their memory is never touched), with CuPy's allocations, copies, launches and
syncs replaced by stand-ins that do nothing. What remains is the Python work per layer that a real call
adds to its kernels: reading each array's address, size, dtype and contiguity, the checks, and the
segment tables. Needs CuPy (importable without a driver), not nnabla. Prints microseconds per layer:

- call: a call with a plan the backend has seen (what follows from the plan alone is kept per plan);
  cold: the first call with a plan (that work included);
- facts, checks, tables: the parts of a call: reading the arrays' attributes, checking them against
  the plan, completing the plan's segment tables;
- floor: the attribute reads alone (address, device, size, contiguity, dtype of each array the plan
  names, once, each attribute one ``map`` over all arrays): what any call over these ``cupy.ndarray``
  objects costs at least in Python.

    python bench/call_overhead.py [--sizes-gb 1,16] [--repeats 30]
"""
import argparse
import operator
import sys
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bnfold_gpu._synthetic import LAYOUTS, random_plan, sized_plan  # noqa: E402
from bnfold_gpu.backends import cupy_backend, segments  # noqa: E402


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
    # CuPy's empty does not touch the memory (NumPy's zeros would, a millisecond per 16 MB)
    cp.empty = lambda n, dtype=np.float32: np.empty(n, dtype).view(_HostArray)
    cp.zeros = lambda n, dtype=np.float32: np.zeros(n, dtype).view(_HostArray)
    cp.asarray = lambda a, dtype=None: np.array(a, dtype=dtype).view(_HostArray)
    cp.RawModule = None
    cp.cuda = types.SimpleNamespace(
        Device=_Nothing, Stream=_Nothing, get_current_stream=_Nothing,
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, getDevice=lambda: 0))
    return cp


_READS = tuple(map(operator.attrgetter, ("data", "ptr", "device_id", "size", "_c_contiguous",
                                          "dtype")))


def attribute_reads(named):
    """The floor: each attribute the fold needs of each array, read once."""
    data, ptr, device_id, size, contiguous, dtype = _READS
    memory = list(map(data, named))
    return (list(map(ptr, memory)), list(map(device_id, memory)), list(map(size, named)),
            list(map(contiguous, named)), list(map(dtype, named)))


def measure(plan, arrays, repeats):
    """Fastest of ``repeats`` runs of each (seconds): the whole call, its parts, the floor, and the
    first call with the plan. The runs take turns, so that a busy machine slows each alike."""
    columns = cupy_backend._columns(plan)
    facts = cupy_backend._read(columns, arrays)
    assert cupy_backend._fits(columns, facts)
    named = columns.get(arrays)
    runs = {"call": (None, lambda: cupy_backend.fold(plan, arrays)),
            "array facts": (None, lambda: cupy_backend._read(columns, arrays)),
            "checks": (None, lambda: cupy_backend._fits(columns, facts)),
            "tables": (None, lambda: columns.template.fill(facts.pointer, facts.code)),
            "floor": (None, lambda: attribute_reads(named)),
            "cold": (segments._PER_PLAN.clear, lambda: cupy_backend.fold(plan, arrays))}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, (setup, fn) in runs.items():
            if setup:
                setup()
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


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
        print(f"{'plan':32} {'layers':>6} {'call':>6} {'facts':>6} {'checks':>6} {'tables':>6} "
              f"{'floor':>6} {'cold':>6}")
        rows = []
        for label, plan in plans:
            t = measure(plan, device_arrays(plan, cupy), args.repeats)
            per = {k: v / len(plan.folds) * 1e6 for k, v in t.items()}
            rows.append((label, len(plan.folds), per))
            print(f"{label:32} {len(plan.folds):6} {per['call']:6.2f} {per['array facts']:6.2f} "
                  f"{per['checks']:6.2f} {per['tables']:6.2f} {per['floor']:6.2f} {per['cold']:6.2f}")
        return rows
    finally:
        cupy_backend.cupy, cupy_backend.unavailable_reason, cupy_backend._kernels = saved


if __name__ == "__main__":
    main()
