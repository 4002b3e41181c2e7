"""The README's benchmark tables, rendered from a result JSON, so that what the README shows is what a
committed run measured: ``python bench/tables.py bench/results/X.json`` prints the Markdown (a test
checks the README against the newest committed results). NumPy-free: the JSON alone."""
import json
import sys
from pathlib import Path


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def _gb(nbytes) -> str:
    return f"{nbytes / 1e9:.3g} GB"


def _times(ratio) -> str:
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.2g}x"


def _table(header, rows) -> str:
    return "\n".join([_row(header), _row(["---"] * len(header))] + [_row(r) for r in rows])


def cpu_caption(result: dict, path: str) -> str:
    v = result["versions"]
    python = ".".join(v["python"].split(".")[:2])
    return (f"CPU benchmark (`make bench`, [{path}]({path});\n{result['device']}, Python {python}, "
            f"NumPy {v['numpy']}, NNabla {v['nnabla']}; medians of {result['repeats']}, one run):")


def cpu_markdown(result: dict) -> str:
    """``bench_cpu.py``'s rows: NNabla's converter against ``fold()``, and the rescale pass and the
    whole call against a NumPy multiply over the same bytes."""
    rows = []
    for r in result["rows"]:
        model = r["model"].split(",")[0].replace("ResNet-50 ", "ResNet-50, ")
        rows.append([model, f"{r['weight_bytes'] / 1e6:.1f} MB",
                     f"{r['nnabla_converter_warm_s'] * 1e3:.0f} ms", f"{r['fold_total_s'] * 1e3:.1f} ms",
                     f"{r['speedup_vs_converter_warm']:.0f}x", f"{r['rescale_s'] * 1e3:.1f} ms",
                     f"{r['numpy_multiply_s'] * 1e3:.1f} ms", f"{r['fold_total_over_multiply']:.1f}x"])
    size = result["rows"][0]["model"].split(", ")[-1]
    return _table([f"model ({size} input)", "weights", "NNabla converter", "`fold()`", "speed-up",
                   "rescale pass", "NumPy `w *= 1.0`, same bytes", "`fold()` / multiply"], rows)


def gpu_caption(result: dict, path: str) -> str:
    v = result["versions"]
    return (f"GPU benchmark ([{path}]({path}); {result['device']}, driver {result['driver']}, "
            f"CUDA runtime {result['cuda_runtime']}, Python {v['python']}, NumPy {v['numpy']}, "
            f"CuPy {v['cupy']}; medians of {result['repeats']}, one run; "
            f"{result['correctness']['folds_checked']} random folds checked against the NumPy "
            f"backend, {len(result['correctness']['failures'])} failures):")


def gpu_markdown(result: dict) -> str:
    """``bench_gpu.py``'s rows: the whole call and the weight kernel beside a device copy of the same
    bytes (GB/s count bytes read plus written), and the NumPy path on the same machine."""
    rows = []
    for r in result["rows"]:
        if "skipped" in r:
            rows.append([_gb(r["size_gb"] * 1e9), "skipped: " + r["skipped"]] + [""] * 7)
            continue
        numpy = [f"{r['numpy_s'] * 1e3:.0f} ms", _times(r["speedup_vs_numpy"])] \
            if "numpy_s" in r else ["-", "-"]
        rows.append([_gb(r["weight_bytes"]), str(r["layers"]),
                     f"{r['fold_s'] * 1e3:.2f} ms", f"{r['fold_gbps']:.0f}",
                     f"{r['weight_kernel_gbps']:.0f}", f"{r['copy_gbps']:.0f}",
                     f"{r['fold_over_copy_bandwidth']:.0%} / {r['kernel_over_copy_bandwidth']:.0%}"]
                    + numpy)
    return _table(["float32 weights", "layers", "`fold()`", "`fold()` GB/s", "weight kernel GB/s",
                   "device copy GB/s", "`fold()` / kernel vs copy", "NumPy path", "speed-up"], rows)


def gpu_staged_markdown(result: dict) -> str:
    """Host-resident weights streamed through the device, page-locked and pageable, beside NumPy."""
    rows = [[_gb(r["weight_bytes"]), f"{r['host_staged_gbps']:.1f}",
             f"{r['host_staged_pageable_gbps']:.1f}", f"{2 * r['weight_bytes'] / r['numpy_s'] / 1e9:.1f}"]
            for r in result["rows"] if "host_staged_s" in r]
    return _table(["host weights", "streamed, page-locked GB/s", "streamed, pageable GB/s",
                   "NumPy GB/s"], rows)


def gpu_sweep_markdown(result: dict) -> str:
    """The weight kernel in each BNFOLD_PER_THREAD x BNFOLD_UNROLL build."""
    rows = [[r["dtype"], f"{r['per_thread']} x {r['unroll']}", f"{r['weight_kernel_gbps']:.0f}",
             f"{r['copy_gbps']:.0f}", f"{r['kernel_over_copy_bandwidth']:.0%}",
             "yes" if r["matches_default_build"] else "NO"]
            for r in result["build_sweep"]]
    return _table(["weights", "per thread x unroll", "kernel GB/s", "copy GB/s", "kernel / copy",
                   "same bits as default"], rows)


def markdown(result: dict, path: str) -> str:
    if result["benchmark"] == "cpu":
        return cpu_caption(result, path) + "\n\n" + cpu_markdown(result)
    return "\n\n".join([gpu_caption(result, path), gpu_markdown(result), gpu_staged_markdown(result),
                        gpu_sweep_markdown(result)])


def newest(kind: str, folder: Path) -> Path:
    """The newest committed result of a kind (``cpu``, ``gpu``): dates sort as text."""
    found = sorted(folder.glob(f"{kind}-*.json"), key=lambda p: p.stem[-10:])
    return found[-1] if found else None


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python bench/tables.py RESULT.json")
    print(markdown(json.loads(Path(sys.argv[1]).read_text()), sys.argv[1]))
