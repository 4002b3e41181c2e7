"""GPU benchmark, one run, NumPy and CuPy only (no nnabla): the CUDA kernels checked against the NumPy
backend on random plans (every layout and dtype), then fold times for models of 0.1, 1, 4 and 16 GB of
float32 weights (as many as fit): the whole ``fold`` call (host-side tables included) and the weight
kernel alone, each beside a device-to-device copy of the same bytes, and the NumPy path on the same
machine; then the weight kernel built with other BNFOLD_PER_THREAD (elements per thread) and
BNFOLD_UNROLL (loads a thread issues before it stores) for float32 and float16 weights, each checked
against the default build. Writes a JSON under --out and prints tables."""
import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _results import readme_path, write_result  # noqa: E402
from tables import markdown  # noqa: E402
from bnfold_gpu._synthetic import in_place_cases, make_arrays, random_plan, sized_plan  # noqa: E402
from bnfold_gpu.backends import cupy_backend, numpy_backend, segments  # noqa: E402
from bnfold_gpu.plan import OUTPUT_SIDE, Plan  # noqa: E402

cp = cupy_backend.cupy


def check_correctness(seeds=30):
    """CuPy result vs NumPy backend on fresh random plans; outputs poisoned with NaN first."""
    failures, checked = [], 0
    for seed in range(seeds):
        rng = np.random.RandomState(seed)
        plan = random_plan(rng)
        host = make_arrays(plan, np, seed=seed)
        want = {k: v.copy() for k, v in host.items()}
        numpy_backend.fold(plan, want)
        dev = {k: cp.asarray(v) for k, v in host.items()}
        cupy_backend.fold(plan, dev)
        for s in plan.folds:
            checked += 1
            g, w = dev[s.folded_weight].get(), want[s.folded_weight]
            ok = np.array_equal(g.view(np.uint8), w.view(np.uint8))
            gb, wb = dev[s.folded_bias].get(), want[s.folded_bias]
            if s.side == OUTPUT_SIDE:
                ok = ok and np.array_equal(gb.view(np.uint8), wb.view(np.uint8))
            else:
                ok = ok and np.allclose(gb.astype(np.float64), wb.astype(np.float64), rtol=1e-3, atol=1e-3)
            if not ok:
                failures.append(f"seed {seed}: {s.kind} {s.side} {g.dtype}")
    for case, dtype, plan, host in in_place_cases():
        spec = plan.folds[0]
        want = {k: v.copy() for k, v in host.items()}
        numpy_backend.fold(plan, want)
        dev = {k: cp.asarray(v) for k, v in host.items()}
        cupy_backend.fold(plan, dev)
        checked += 1
        g = dev[spec.folded_weight].get()
        if not np.array_equal(g.view(np.uint8), want[spec.folded_weight].view(np.uint8)):
            failures.append(f"in place: {case[0]} {case[1]} {np.dtype(dtype)}")
    return checked, failures


def device_arrays(plan, dtype=np.float32):
    """The plan's arrays on the device, weights carved out of one buffer (filled at random)."""
    total = sum(int(np.prod(s.weight_shape)) for s in plan.folds)
    buf = cp.random.standard_normal(total, dtype=cp.float32).astype(dtype, copy=False)
    arrays, at = {}, 0
    for s in plan.folds:
        n = int(np.prod(s.weight_shape))
        arrays[s.weight] = buf[at:at + n].reshape(s.weight_shape)
        at += n
    small = Plan(plan.folds, (), {k: v for k, v in plan.arrays.items() if k not in arrays})
    for k, v in make_arrays(small, np, poison=False).items():
        if k not in arrays:
            arrays[k] = cp.asarray(v)
    return arrays, buf


def weight_launch(plan, arrays, chunk=segments.CHUNK, channels=None):
    """The per-channel scales of ``plan`` over device ``arrays`` (computed unless given) and a
    function that launches the weight kernel (``kernels``: a build) over its table for blocks of
    ``chunk`` elements, uploaded once."""
    pointers = {n: a.data.ptr for n, a in arrays.items()}
    dtypes = {n: a.dtype for n, a in arrays.items()}
    if channels is None:
        channels = cupy_backend._Channels(plan, segments.build(plan, pointers, dtypes, weights=False),
                                          cupy_backend._kernels())
    t = segments.build(plan, pointers, dtypes, channels=False, chunk=chunk)
    seg = cupy_backend._upload(t.weights)
    return channels, lambda kernels: channels.weights(seg, len(t.weights), t.total_blocks, kernels)


def cuda_time(fn, repeats):
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    fn()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3)
    return statistics.median(times)


def wall_time(fn, repeats, setup=None):
    """Median wall time of ``fn`` (``setup``, untimed, before each run: a fold in place must start
    from the same weights, or repeated scales > 1 would grow them past the dtype's range)."""
    if setup:
        setup()
    fn()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(repeats):
        if setup:
            setup()
            cp.cuda.Device().synchronize()
        t = time.perf_counter()
        fn()
        cp.cuda.Device().synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_seconds(buf, repeats):
    """A device-to-device copy of ``buf`` (same bytes read and written as a fold), CUDA events."""
    dst = cp.empty_like(buf)
    return cuda_time(lambda: dst.data.copy_from_device(buf.data, buf.nbytes), repeats)


def measure(gb, nbytes, args):
    """One size: the whole fold call, the weight kernel alone, a device copy of the same bytes, and
    (up to --numpy-max-gb) the NumPy path and the host-staged GPU path."""
    plan = sized_plan(np.random.RandomState(0), nbytes)
    arrays, buf = device_arrays(plan)
    weight_bytes = buf.nbytes
    copy_s = copy_seconds(buf, args.repeats)
    original = buf.copy()

    def restore_device():
        buf.data.copy_from_device(original.data, buf.nbytes)
    fold_s = wall_time(lambda: cupy_backend.fold(plan, arrays), args.repeats, restore_device)
    # the weight kernel alone (tables built and uploaded once), timed with CUDA events
    kernels = cupy_backend._kernels()
    _, launch = weight_launch(plan, arrays)
    kernel_s = cuda_time(lambda: launch(kernels), args.repeats)
    row = {"size_gb": gb, "weight_bytes": int(weight_bytes), "layers": len(plan.folds),
           "fold_s": fold_s, "weight_kernel_s": kernel_s, "copy_s": copy_s,
           "fold_gbps": 2 * weight_bytes / fold_s / 1e9,
           "weight_kernel_gbps": 2 * weight_bytes / kernel_s / 1e9,
           "copy_gbps": 2 * weight_bytes / copy_s / 1e9,
           # what the call adds to the weight kernel (checks, tables, the small launches, one sync)
           "overhead_us_per_layer": (fold_s - kernel_s) / len(plan.folds) * 1e6}
    row["fold_over_copy_bandwidth"] = row["fold_gbps"] / row["copy_gbps"]
    row["kernel_over_copy_bandwidth"] = row["weight_kernel_gbps"] / row["copy_gbps"]
    if gb <= args.numpy_max_gb:
        restore_device()
        host = {k: v.get() for k, v in arrays.items()}
        weights = {s.weight: host[s.weight].copy() for s in plan.folds}

        def restore_host():
            for name, values in weights.items():
                np.copyto(host[name], values)
        np_s = wall_time(lambda: numpy_backend.fold(plan, host), max(2, args.repeats // 3),
                         restore_host)
        row["numpy_s"] = np_s
        row["speedup_vs_numpy"] = np_s / fold_s
        for key, pin in (("host_staged", True), ("host_staged_pageable", False)):
            cupy_backend.PIN_HOST = pin   # page-locked host weights (the default) or not
            try:
                seconds = wall_time(lambda: cupy_backend.fold(plan, host), 2, restore_host)
            finally:
                cupy_backend.PIN_HOST = True
            row[key + "_s"] = seconds
            row[key + "_gbps"] = 2 * weight_bytes / seconds / 1e9
    return row


def build_sweep(args):
    """The weight kernel built with each BNFOLD_PER_THREAD x BNFOLD_UNROLL of --builds, float32 and
    float16 weights of --sweep-gb: GB/s beside a device copy of the same bytes, and whether it
    writes what the default build does."""
    rows = []
    for dtype in (np.float32, np.float16):
        plan = sized_plan(np.random.RandomState(1), int(args.sweep_gb * 1e9), dtype)
        arrays, buf = device_arrays(plan, dtype)
        original = buf.copy()
        copy_s = copy_seconds(buf, args.repeats)
        channels, launch = weight_launch(plan, arrays)
        launch(cupy_backend._kernels())
        reference = buf.copy()
        for build in args.builds.split(","):
            per_thread, unroll = (int(x) for x in build.split("x"))
            kernels = cupy_backend._kernels((f"BNFOLD_PER_THREAD={per_thread}", f"BNFOLD_UNROLL={unroll}"))
            _, launch = weight_launch(plan, arrays, chunk=segments.BLOCK * per_thread, channels=channels)
            buf[...] = original
            launch(kernels)
            same = bool((buf.view(cp.uint8) == reference.view(cp.uint8)).all())
            kernel_s = cuda_time(lambda: launch(kernels), args.repeats)
            rows.append({"dtype": np.dtype(dtype).name, "per_thread": per_thread, "unroll": unroll,
                         "weight_bytes": int(buf.nbytes),
                         "weight_kernel_gbps": 2 * buf.nbytes / kernel_s / 1e9,
                         "copy_gbps": 2 * buf.nbytes / copy_s / 1e9,
                         "kernel_over_copy_bandwidth": copy_s / kernel_s,
                         "matches_default_build": same})
        del arrays, buf, original, reference
        cp.get_default_memory_pool().free_all_blocks()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench/results/")
    ap.add_argument("--sizes-gb", default="0.1,1,4,16")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--numpy-max-gb", type=float, default=1.0,
                    help="time the NumPy path up to this size (it is slow)")
    ap.add_argument("--builds", default="16x1,16x2,16x4,16x8,16x16,4x4,64x4,64x8",
                    help="weight-kernel builds to compare: BNFOLD_PER_THREAD x BNFOLD_UNROLL")
    ap.add_argument("--sweep-gb", type=float, default=1.0, help="weights for that comparison")
    args = ap.parse_args()
    reason = cupy_backend.unavailable_reason()
    if reason:
        raise SystemExit(f"no GPU: {reason}")
    props = cp.cuda.runtime.getDeviceProperties(0)
    checked, failures = check_correctness()
    print(f"correctness: {checked} folds checked against the NumPy backend, {len(failures)} failures")
    for f in failures:
        print("  FAIL", f)
    rows = []
    for gb in (float(x) for x in args.sizes_gb.split(",")):
        nbytes = int(gb * 1e9)
        free = cp.cuda.runtime.memGetInfo()[0]
        if 2.2 * nbytes > free:     # weights + a copy's destination
            print(f"{gb} GB: skipped, {free / 1e9:.0f} GB free on the device")
            rows.append({"size_gb": gb, "skipped": f"needs {2.2 * nbytes / 1e9:.0f} GB, "
                                                   f"{free / 1e9:.0f} GB free"})
            continue
        rows.append(measure(gb, nbytes, args))
        cp.get_default_memory_pool().free_all_blocks()
    sweep = build_sweep(args)
    failures += [f"build {r['per_thread']}x{r['unroll']} ({r['dtype']}) differs from the default build"
                 for r in sweep if not r["matches_default_build"]]
    result = {
        "benchmark": "gpu", "date": datetime.date.today().isoformat(),
        "device": props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"]),
        "driver": cp.cuda.runtime.driverGetVersion(), "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "cupy": cp.__version__},
        "host_cpus": os.cpu_count(), "repeats": args.repeats,
        "correctness": {"folds_checked": checked, "failures": failures},
        "rows": rows, "build_sweep": sweep,
    }
    name = result["device"].replace(" ", "-").replace("/", "-")
    out = write_result(result, args.out, f"gpu-{name}-{result['date']}.json")
    print(f"{result['device']}, driver {result['driver']}, CuPy {cp.__version__}, NumPy {np.__version__}")
    print(f"{'GB':>5} {'layers':>6} {'fold ms':>9} {'fold GB/s':>10} {'kernel GB/s':>12} "
          f"{'copy GB/s':>10} {'fold/copy':>9} {'kernel/copy':>11} {'us/layer':>8} {'numpy ms':>9} "
          f"{'speed-up':>9}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['size_gb']:5} skipped: {r['skipped']}")
            continue
        print(f"{r['size_gb']:5} {r['layers']:6} {r['fold_s'] * 1e3:9.2f} {r['fold_gbps']:10.0f} "
              f"{r['weight_kernel_gbps']:12.0f} {r['copy_gbps']:10.0f} "
              f"{r['fold_over_copy_bandwidth']:9.0%} {r['kernel_over_copy_bandwidth']:11.0%} "
              f"{r['overhead_us_per_layer']:8.1f} "
              f"{r.get('numpy_s', float('nan')) * 1e3:9.1f} {r.get('speedup_vs_numpy', float('nan')):8.0f}x")
    staged = [r for r in rows if "host_staged_s" in r]
    if staged:
        print("host-resident weights, streamed through the device (GB/s, bytes read + written):")
        print(f"{'GB':>5} {'page-locked':>12} {'pageable':>9} {'NumPy':>7}")
        for r in staged:
            print(f"{r['size_gb']:5} {r['host_staged_gbps']:12.1f} {r['host_staged_pageable_gbps']:9.1f} "
                  f"{2 * r['weight_bytes'] / r['numpy_s'] / 1e9:7.1f}")
    print(f"weight kernel by build (elements per thread x loads before stores), {args.sweep_gb} GB:")
    print(f"{'dtype':>8} {'build':>6} {'kernel GB/s':>12} {'copy GB/s':>10} {'kernel/copy':>11} {'same':>5}")
    for r in sweep:
        build = f"{r['per_thread']}x{r['unroll']}"
        print(f"{r['dtype']:>8} {build:>6} {r['weight_kernel_gbps']:12.0f} {r['copy_gbps']:10.0f} "
              f"{r['kernel_over_copy_bandwidth']:11.0%} {str(r['matches_default_build']):>5}")
    print(f"written to {out}\n\nFor the README:\n")
    print(markdown(result, readme_path(out)))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
