"""The CPU benchmark's plot, rendered from result JSONs: fold time against the bytes of weights
folded, log-log, for ``fold()`` on the CPU, NNabla's converter, NNabla's API floor, a NumPy in-place
multiply over the same bytes, and the GPU ``fold()`` call of a GPU result. Needs matplotlib (the
``bench`` extra); NumPy-free otherwise.

    python bench/plot.py bench/results/cpu-DATE.json [--gpu bench/results/gpu-X.json] [-o OUT.png]
"""
import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure

# (key of a CPU row, label, colour, line style)
CPU_SERIES = (("fold_total_s", "fold(), CPU (NumPy)", "tab:blue", "-"),
              ("nnabla_converter_s", "NNabla's converter", "tab:red", "--"),
              ("floor_s", "NNabla API floor", "tab:green", ":"),
              ("numpy_multiply_s", "NumPy w *= 1.0, same bytes", "tab:gray", "-."))


def _is_resnet50(row) -> bool:
    return row["model"].startswith("ResNet-50 ")


def render(result: dict, path, gpu: dict = None, gpu_path: str = None) -> Path:
    """Writes the plot of ``result`` (a bench_cpu.py result), with the GPU rows of ``gpu`` (a
    bench_gpu.py result, named ``gpu_path``) if given, to ``path`` (PNG); returns the path."""
    rows = sorted(result["rows"], key=lambda r: r["weight_bytes"])
    resnet50 = [r for r in rows if _is_resnet50(r)]
    deep = [r for r in rows if not _is_resnet50(r)]
    fig = Figure(figsize=(8, 5.5), dpi=120)
    ax = fig.add_subplot()
    for key, label, colour, style in CPU_SERIES:
        ax.plot([r["weight_bytes"] / 1e6 for r in resnet50], [r[key] for r in resnet50],
                color=colour, linestyle=style, marker="o", label=f"{label}, ResNet-50")
        for r in deep:
            stopped = key == "nnabla_converter_s" and r.get("nnabla_converter_stopped_after_s")
            ax.plot([r["weight_bytes"] / 1e6], [r[key]], color=colour, linestyle="none",
                    marker="^" if stopped else "*", markersize=12)
    for r in deep:
        ax.annotate(f"{r['model'].split(',')[0]} ({r['bns']} BNs)",
                    (r["weight_bytes"] / 1e6, r["fold_total_s"]), textcoords="offset points",
                    xytext=(8, -12), fontsize=8)
    if gpu:
        ok = sorted((r for r in gpu["rows"] if "fold_s" in r), key=lambda r: r["weight_bytes"])
        ax.plot([r["weight_bytes"] / 1e6 for r in ok], [r["fold_s"] for r in ok], color="tab:purple",
                marker="s", label=f"fold(), GPU ({gpu['device']}, {gpu_path or gpu['date']})")
    ax.plot([], [], color="black", linestyle="none", marker="*", markersize=10,
            label="deep ResNet (" + ("converter stopped: ^, a lower bound)"
                                     if any(r.get("nnabla_converter_stopped_after_s") for r in deep)
                                     else "same colours)"))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("float32 weights folded (MB)")
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"Batch-norm folding: time against model size\n{result['device']}, "
                 f"NNabla {result['versions']['nnabla']}, {result['date']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    fig.savefig(path, bbox_inches="tight")
    return Path(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("result", help="a bench_cpu.py result (JSON)")
    ap.add_argument("--gpu", help="a bench_gpu.py result (JSON) whose fold() times to add")
    ap.add_argument("-o", "--out", help="the PNG (default: the result's name, .png)")
    args = ap.parse_args(argv)
    gpu = json.loads(Path(args.gpu).read_text()) if args.gpu else None
    out = args.out or str(Path(args.result).with_suffix(".png"))
    print(render(json.loads(Path(args.result).read_text()), out, gpu, args.gpu))


if __name__ == "__main__":
    main()
