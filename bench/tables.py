"""The README's benchmark tables, rendered from a result JSON, so that what the README shows is what a
committed run measured: ``python bench/tables.py bench/results/X.json`` prints the Markdown (a test
checks the README against the newest committed results). NumPy-free: the JSON alone."""
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterable, Optional


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def _gb(nbytes) -> str:
    return f"{nbytes / 1e9:.3g} GB"


def _times(ratio) -> str:
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.2g}x"


def _table(header, rows) -> str:
    return "\n".join([_row(header), _row(["---"] * len(header))] + [_row(r) for r in rows])


def _seconds(s) -> str:
    if s >= 10:
        return f"{s:.0f} s"
    if s >= 1:
        return f"{s:.1f} s"
    ms = s * 1e3
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.1f} ms" if ms >= 1 else f"{ms:.2f} ms"


def _mb(nbytes) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def _model(row) -> str:
    """"ResNet-50 width 64, 64x64" -> "ResNet-50, width 64"."""
    name, width = row["model"].split(",")[0].split(" width ")
    return f"{name}, width {width}"


def cpu_caption(result: dict, path: str) -> str:
    v = result["versions"]
    python = ".".join(v["python"].split(".")[:2])
    return (f"CPU benchmark (`make bench`, [{path}]({path});\n{result['device']}, Python {python}, "
            f"NumPy {v['numpy']}, NNabla {v['nnabla']}; medians of {result['repeats']}, one run):")


def _legacy(result: dict) -> bool:
    """Whether ``result`` predates the API floor and the files (it has one table)."""
    return "floor_s" not in result["rows"][0]


def _legacy_cpu_markdown(result: dict) -> str:
    """The table of results written before the API floor and the files were measured."""
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


def _converter(r) -> tuple:
    """(the converter's time, the speed-up): a run stopped at its timeout gives bounds."""
    if r.get("nnabla_converter_stopped_after_s"):
        return (f"> {_seconds(r['nnabla_converter_s'])} (stopped)",
                f">= {_times(r['speedup_vs_converter'])}")
    once = " (once)" if r["nnabla_converter_runs"] == 1 else ""
    return _seconds(r["nnabla_converter_s"]) + once, _times(r["speedup_vs_converter"])


def cpu_markdown(result: dict) -> str:
    """``bench_cpu.py``'s rows: ``fold()`` against NNabla's converter and against NNabla's API floor
    on the same graph (results before the floor was measured: their own table)."""
    if _legacy(result):
        return _legacy_cpu_markdown(result)
    rows = [[_model(r), str(r["bns"]), _mb(r["weight_bytes"]), *_converter(r)[:1],
             _seconds(r["fold_total_s"]), _converter(r)[1], _seconds(r["floor_s"]),
             _times(r["fold_over_floor"]), _times(r["fold_over_floor_plus_multiply"])]
            for r in result["rows"]]
    size = result["rows"][0]["model"].split(", ")[-1]
    us = result["accessor_us"]
    return _table([f"model ({size} input)", "BNs", "weights", "NNabla converter", "`fold()`",
                   "speed-up (target >= 30x)", "NNabla API floor",
                   "`fold()` / floor (target <= 1.5x)", "`fold()` / (floor + multiply)"], rows) + (
        "\n\nNNabla API floor: one `visit` of the graph, `Variable.data.data_ptr(dtype, ctx)` for "
        "each array the plan touches (a new `Variable` first for each it creates; "
        f"{us['Variable.data.data_ptr(dtype, ctx)']:.1f} us a call, against "
        f"{us['Variable.d']:.0f} us for `Variable.d`), one new function per fold.")


def cpu_memory_markdown(result: dict) -> str:
    """The rescale pass and the whole call against a NumPy multiply over the same bytes; where the
    result has them, the pass's checks (the overflow read among them) and writes apart."""
    if "rescale_writes_s" not in result["rows"][0]:
        rows = [[_model(r), _mb(r["weight_bytes"]), _seconds(r["rescale_s"]),
                 _seconds(r["numpy_multiply_s"]), _times(r["rescale_over_multiply"]),
                 _times(r["fold_total_over_multiply"])] for r in result["rows"]]
        return _table(["model", "weights", "rescale pass", "NumPy `w *= 1.0`, same bytes",
                       "rescale / multiply (target <= 1.5x)", "`fold()` / multiply"], rows)
    rows = [[_model(r), _mb(r["weight_bytes"]), _seconds(r["numpy_multiply_s"]),
             _seconds(r["rescale_s"]), _seconds(r["rescale_checks_s"]), _seconds(r["rescale_writes_s"]),
             _times(r["rescale_over_multiply"]), _times(r["rescale_writes_over_multiply"]),
             _times(r["fold_total_over_multiply"])] for r in result["rows"]]
    return _table(["model", "weights", "NumPy `w *= 1.0`, same bytes", "rescale pass",
                   "its checks (overflow read)", "its writes", "rescale / multiply (target <= 1.5x)",
                   "writes / multiply", "`fold()` / multiply"], rows)


def cpu_stages_markdown(result: dict) -> str:
    """Where the time goes: ``fold()`` by stage, and the floor by part (medians of each)."""
    rows = []
    for r in result["rows"]:
        phases, floor = r["fold_phases_s"], r["floor_parts_s"]
        rows.append([_model(r), _seconds(r["fold_call_s"])]
                    + [_seconds(phases[k]) for k in ("plan", "prepare", "rewrite", "rescale")]
                    + [_seconds(floor[k]) for k in ("visit", "data_access", "new_parameters",
                                                    "new_functions")])
    return _table(["model", "`fold()` call, wall", "its plan", "prepare", "rewrite", "rescale",
                   "floor: `visit`", "`data_ptr` each array", "new parameters", "new functions"],
                  rows)


def files_markdown(result: dict) -> str:
    """``fold_nnp`` of the demo's file, in one process, against copying the file; the whole
    command, and its peak resident memory against the parameters' bytes."""
    files = result["files"]
    durable = "copy_fsync_s" in files["rows"][0]   # results since the copy was also made durable
    rows = []
    for r in files["rows"]:
        stages = r["fold_nnp_stages_s"]
        write = _seconds(stages["write"])
        if "write_sync" in stages:
            write += f" (fsync {_seconds(stages['write_sync'])})"
        rows.append([r["file"], _mb(r["parameter_bytes"]), _seconds(r["fold_nnp_s"]),
                     " / ".join([_seconds(stages[k]) for k in ("read", "plan", "fold")] + [write]),
                     _seconds(r["copy_s"]), _times(r["fold_over_copy"])]
                    + ([_seconds(r["copy_fsync_s"]), _times(r["fold_over_copy_fsync"])] if durable
                       else [])
                    + [_seconds(r["command_s"]), f"{r['command_peak_rss_bytes'] / 1e6:.0f} MB",
                       _times(r["command_peak_rss_over_parameters"]),
                       _times(r["command_peak_rss_above_imports_over_parameters"])])
    table = _table([f"{files['model']}", "parameters", "`fold_nnp()`", "read / plan / fold / write",
                    f"`{files['copy']}`", "`fold_nnp()` / copy (target <= 5x, goal 3x)"]
                   + (["copy + fsync (as bnfold writes)", "`fold_nnp()` / (copy + fsync)"] if durable
                      else [])
                   + ["`bnfold fold` command", "its peak RSS",
                      "peak RSS / parameters (target <= 1.5x)",
                      "(peak RSS - imports' peak) / parameters"],
                   rows)
    return (table + f"\n\nPython start + `{files['imports']['cli']}`: "
            f"{_seconds(files['import_cli_s'])}; with what a fold imports (NNabla): "
            f"{_seconds(files['import_fold_s'])}, peak RSS "
            f"{files['import_fold_peak_rss_bytes'] / 1e6:.0f} MB.")


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
        if _legacy(result):
            return cpu_caption(result, path) + "\n\n" + cpu_markdown(result)
        return "\n\n".join([cpu_caption(result, path), cpu_markdown(result),
                            cpu_memory_markdown(result), cpu_stages_markdown(result),
                            files_markdown(result)])
    return "\n\n".join([gpu_caption(result, path), gpu_markdown(result), gpu_staged_markdown(result),
                        gpu_sweep_markdown(result)])


def tracked(folder: Path) -> Optional[Dict[str, str]]:
    """The results in ``folder`` that git tracks (committed, or added to be), as {file name: text},
    the text read from git's index rather than from disk: a ``make bench`` run that adds a file, or
    rewrites one on the day it was committed, changes nothing here until that file is added. None
    when git tracks nothing there (not a git checkout, or git missing)."""
    def git(*args):
        return subprocess.run(("git",) + args, cwd=folder, capture_output=True, text=True,
                              check=True, timeout=60).stdout
    try:
        entries = [e for e in git("ls-files", "--stage", "-z", "--", ".").split("\0") if e]
        found = {}
        for entry in entries:            # "<mode> <blob> <stage>\t<path>"
            meta, path = entry.split("\t", 1)
            if "/" not in path and path.endswith(".json"):
                found[path] = git("cat-file", "blob", meta.split()[1])
    except (OSError, subprocess.SubprocessError):
        return None
    return found or None


def newest(kind: str, names: Iterable[str]) -> Optional[str]:
    """The newest result of a kind (``cpu``, ``gpu``) among file ``names``: dates sort as text."""
    found = sorted((n for n in names if n.startswith(f"{kind}-") and n.endswith(".json")),
                   key=lambda n: n[:-len(".json")][-10:])
    return found[-1] if found else None


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python bench/tables.py RESULT.json")
    print(markdown(json.loads(Path(sys.argv[1]).read_text()), sys.argv[1]))
