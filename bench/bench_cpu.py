"""CPU benchmark, one run: bnfold_gpu.fold vs NNabla's BatchNormalizationFoldingModifier on ResNet-50
(width 64 and 128, 64x64 input), and the rescaling pass vs a NumPy in-place multiply over the same
weight bytes. Writes a JSON under --out and prints a table."""
import argparse
import datetime
import os
import platform
import statistics
import time

import numpy as np
import nnabla as nn
from nnabla.experimental.graph_converters import BatchNormalizationFoldingModifier, GraphConverter

import bnfold_gpu
from _results import readme_path, write_result
from tables import markdown
from bnfold_gpu.backends import numpy_backend
from bnfold_gpu.folding import prepare_arrays
from bnfold_gpu.graph import Graph
from bnfold_gpu.models import build_resnet50
from bnfold_gpu.planner import plan as make_plan


def fresh(width, size):
    nn.clear_parameters()
    return build_resnet50(width, size)


def time_converter(width, size):
    _, y = fresh(width, size)
    with nn.parameter_scope("resnet50"):
        t = time.perf_counter()
        GraphConverter(BatchNormalizationFoldingModifier()).convert(y)
        return time.perf_counter() - t


def time_ours(width, size):
    """(fold() phases, NumPy multiply over the folded weights, the rescaling pass alone, bytes)."""
    _, y = fresh(width, size)
    graph = Graph([y])
    p = make_plan(graph)
    _, _, arrays = prepare_arrays(graph, p, "numpy")
    weights = [arrays[s.weight] for s in p.folds]
    t = time.perf_counter()
    for w in weights:               # the memory floor: one pass over the same weight bytes
        np.multiply(w, np.float32(1.0), out=w)
    multiply = time.perf_counter() - t
    t = time.perf_counter()
    numpy_backend.fold(p, arrays)   # the rescaling pass: checks, biases, weights
    rescale = time.perf_counter() - t
    _, y = fresh(width, size)
    res = bnfold_gpu.fold(y, backend="numpy")
    assert len(res.folded) == 53 and not res.skipped
    return res.seconds, multiply, rescale, res.plan.bytes_rescaled()


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench/results/")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    rows = []
    for width in (64, 128):
        conv = [time_converter(width, args.size) for _ in range(args.repeats)]
        runs = [time_ours(width, args.size) for _ in range(args.repeats)]
        total = statistics.median(r[0]["total"] for r in runs)
        multiply = statistics.median(r[1] for r in runs)
        rescale = statistics.median(r[2] for r in runs)
        conv_warm = statistics.median(conv[1:])
        rows.append({
            "model": f"ResNet-50 width {width}, {args.size}x{args.size}",
            "weight_bytes": runs[0][3],
            "nnabla_converter_first_s": conv[0], "nnabla_converter_warm_s": conv_warm,
            "fold_total_s": total, "fold_phases_s": {k: statistics.median(r[0][k] for r in runs)
                                                     for k in runs[0][0]},
            "rescale_s": rescale, "numpy_multiply_s": multiply,
            "speedup_vs_converter_warm": conv_warm / total,
            "fold_total_over_multiply": total / multiply,
            "rescale_over_multiply": rescale / multiply,
        })
    result = {
        "benchmark": "cpu", "date": datetime.date.today().isoformat(),
        "device": f"{cpu_name()}, {os.cpu_count()} cores",
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "nnabla": nn.__version__, "bnfold_gpu": bnfold_gpu.__version__},
        "repeats": args.repeats, "rows": rows,
    }
    out = write_result(result, args.out, f"cpu-{result['date']}.json")
    print(f"{result['device']}; numpy {np.__version__}, nnabla {nn.__version__}")
    print(f"{'model':32} {'MB':>6} {'converter':>10} {'fold':>8} {'speedup':>8} "
          f"{'rescale':>8} {'multiply':>9} {'fold/mul':>8}")
    for r in rows:
        print(f"{r['model']:32} {r['weight_bytes'] / 1e6:6.1f} {r['nnabla_converter_warm_s'] * 1e3:8.1f}ms "
              f"{r['fold_total_s'] * 1e3:6.1f}ms {r['speedup_vs_converter_warm']:7.1f}x "
              f"{r['rescale_s'] * 1e3:6.1f}ms {r['numpy_multiply_s'] * 1e3:7.1f}ms "
              f"{r['fold_total_over_multiply']:7.2f}x")
    print(f"written to {out}\n\nFor the README:\n")
    print(markdown(result, readme_path(out)))


if __name__ == "__main__":
    main()
