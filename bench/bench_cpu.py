"""CPU benchmark, one run (``make bench``): ``bnfold_gpu.fold(y, backend="numpy")`` on ResNet-50
(widths 32 to 128, 64x64 input) and on a deep ResNet (437 BNs), against

- NNabla's ``BatchNormalizationFoldingModifier`` (the converter; quadratic in the BNs, so on the deep
  network it runs once, stopped after --converter-timeout seconds);
- NNabla's API floor on the same graph: one ``visit`` collecting the functions, one
  ``Variable.data.data_ptr(dtype, cpu context)`` per array the plan touches (the cheapest accessor
  that reaches an array; a new ``Variable`` for each array the plan creates) and one new function per
  fold (``rewrite.call_like``: the layer's type and arguments, applied to its inputs): what a fold
  through NNabla's Python API costs at least, before it touches the weights;
- a NumPy in-place multiply over the folded weights (for the rescale pass);

and, for files, ``bnfold_gpu.fold_nnp`` of the demo's .nnp (HDF5 parameters; and the same model
saved with ``parameter.protobuf``, as NNabla's ONNX importer writes it) against ``shutil.copyfile`` of
the file, beside the interpreter start and imports, a whole ``bnfold fold`` command and its peak
resident memory. The measurements of a ratio are taken in turns in the same run; times are medians of
--repeats. Writes cpu-DATE.json (and with matplotlib its plot, cpu-DATE.png) under --out and prints
the README's tables."""
import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from statistics import median
from pathlib import Path

import numpy as np
import nnabla as nn
from nnabla.experimental.graph_converters import BatchNormalizationFoldingModifier, GraphConverter
from nnabla.utils.save import save
from nnabla_ext.cpu import context as cpu_context

import bnfold_gpu
from _results import readme_path, write_result
from tables import markdown, newest, tracked
from bnfold_gpu import rewrite
from bnfold_gpu.backends import numpy_backend
from bnfold_gpu.folding import prepare_arrays
from bnfold_gpu.graph import BN_TYPES, Graph
from bnfold_gpu.models import build_resnet50, randomize, resnet50
from bnfold_gpu.planner import plan as make_plan

SCOPE = "resnet50"
RESNET50 = (3, 4, 6, 3)
DEEP = (12, 24, 96, 12)     # 3 x 144 + 4 shortcuts + the stem: 437 BNs
RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"speedup_vs_converter": ">= 30", "fold_over_floor": "<= 1.5",
           "rescale_over_multiply": "<= 1.5", "file_fold_over_copy": "<= 5 (goal 3)",
           "command_peak_rss_over_parameters": "<= 1.5"}
FLOOR = ("one Variable.visit collecting the functions; Variable.data.data_ptr(dtype, cpu context) "
         "for each array the plan touches, a new Variable first for each it creates; one new "
         "function per fold (the layer's type and arguments, applied to its inputs, as "
         "bnfold_gpu.rewrite.call_like)")


@dataclass
class Model:
    """A ResNet's structure and parameter values; every timed run gets it rebuilt on new parameters
    (a fold and NNabla's converter change the graph and the parameters they fold)."""
    width: int
    size: int
    blocks: tuple
    values: dict     # full parameter name -> (array, need_grad)

    @classmethod
    def build(cls, width: int, size: int, blocks=RESNET50, seed: int = 0) -> "Model":
        """Random weights and BN statistics, as ``models.build_resnet50``, in a fresh scope."""
        nn.clear_parameters()
        with nn.parameter_scope(SCOPE):
            resnet50(nn.Variable((1, 3, size, size)), width, blocks=blocks)
            randomize(nn.get_parameters(grad_only=False), seed)
        values = {n: (v.d.copy(), v.need_grad)
                  for n, v in nn.get_parameters(grad_only=False).items()}
        nn.clear_parameters()
        return cls(width, size, tuple(blocks), values)

    @property
    def label(self) -> str:
        return f"ResNet-{3 * sum(self.blocks) + 2} width {self.width}, {self.size}x{self.size}"

    @property
    def parameter_bytes(self) -> int:
        return sum(a.nbytes for a, _ in self.values.values())

    def fresh(self) -> "nn.Variable":
        """The output of the model built anew, on new parameters holding its values."""
        nn.clear_parameters()
        for name, (values, need_grad) in self.values.items():
            nn.parameter.set_parameter(name, nn.Variable.from_numpy_array(values,
                                                                          need_grad=need_grad))
        x = nn.Variable((1, 3, self.size, self.size))
        with nn.parameter_scope(SCOPE):
            return resnet50(x, self.width, blocks=self.blocks)


def _seconds(fn):
    gc.collect()          # the garbage of the previous run is not collected inside this one
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def api_floor(y, touched, created, layers) -> dict:
    """Seconds of NNabla's API floor (see ``FLOOR``) by part: ``touched`` (variable, dtype) of the
    arrays the plan reads or writes, ``created`` (shape, dtype) of those it creates, ``layers`` the
    function of each fold."""
    ctx = cpu_context()
    t0 = time.perf_counter()
    functions = []
    y.visit(functions.append)
    t1 = time.perf_counter()
    for var, dtype in touched:
        var.data.data_ptr(dtype, ctx)
    t2 = time.perf_counter()
    new = []
    for shape, dtype in created:
        var = nn.Variable(shape)
        var.data.data_ptr(dtype, ctx)
        new.append(var)
    t3 = time.perf_counter()
    made = [rewrite.call_like(f, f.inputs) for f in layers]
    t4 = time.perf_counter()
    del made, new
    return {"visit": t1 - t0, "data_access": t2 - t1, "new_parameters": t3 - t2,
            "new_functions": t4 - t3, "total": t4 - t0}


def time_floor_and_multiply(model: Model):
    """(floor parts, NumPy multiply over the folded weights, the rescale pass alone, bytes rescaled,
    BNs) on one fresh build of ``model``."""
    y = model.fresh()
    graph = Graph([y])
    p = make_plan(graph)
    variables = graph.variables_by_name()
    created_names = set(p.new_arrays)
    touched = [(variables[n], np.dtype(p.arrays[n][1])) for n in p.arrays
               if n not in p.intermediates and n not in created_names]
    created = [(tuple(p.arrays[n][0]), np.dtype(p.arrays[n][1])) for n in p.new_arrays]
    layers = [graph.functions[s.layer_index] for s in p.folds]
    _, floor = _seconds(lambda: api_floor(y, touched, created, layers))
    _, _, arrays = prepare_arrays(graph, p, "numpy")
    weights = [arrays[s.weight] for s in p.folds]

    def multiply():         # the memory floor: one pass over the same weight bytes
        for w in weights:
            np.multiply(w, np.float32(1.0), out=w)
    multiply_s, _ = _seconds(multiply)
    checks_s, job = _seconds(lambda: numpy_backend.prepare(p, arrays))  # checks, biases, overflow
    writes_s, _ = _seconds(job.commit)                                  # the writes alone
    bns = sum(t in BN_TYPES for t in graph.types)
    return floor, multiply_s, {"checks": checks_s, "writes": writes_s}, p.bytes_rescaled(), bns


def time_fold(model: Model, bns: int) -> dict:
    """``fold()``'s seconds by stage, and the call's own wall time ("call": the stages, and what
    the call does after them, such as freeing the replaced functions), on a fresh build of
    ``model``; every BN folds."""
    y = model.fresh()
    call, res = _seconds(lambda: bnfold_gpu.fold(y, backend="numpy"))
    assert len(res.plan.folded_bns) == bns and not res.skipped, res.plan.table()
    return dict(res.seconds, call=call)


class _Stopped(Exception):
    pass


def time_converter(model: Model, timeout=None):
    """(seconds, stopped): NNabla's converter on a fresh build of ``model``, stopped (SIGALRM) after
    ``timeout`` seconds if given."""
    y = model.fresh()

    def stop(signum, frame):
        raise _Stopped
    previous = signal.signal(signal.SIGALRM, stop) if timeout else None
    gc.collect()
    t = time.perf_counter()
    try:
        if timeout:
            signal.setitimer(signal.ITIMER_REAL, timeout)
        with nn.parameter_scope(SCOPE):
            GraphConverter(BatchNormalizationFoldingModifier()).convert(y)
        return time.perf_counter() - t, False
    except _Stopped:
        return time.perf_counter() - t, True
    finally:
        if timeout:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def measure_model(model: Model, repeats: int, converter_repeats: bool, timeout: float) -> dict:
    """One row: each repeat takes the floor, the multiply, the rescale pass, ``fold()`` and (with
    ``converter_repeats``) the converter in turn; without, the converter runs once, at the end."""
    runs, conv = [], []
    for _ in range(repeats):
        floor, multiply, rescale, nbytes, bns = time_floor_and_multiply(model)
        runs.append((floor, multiply, rescale, time_fold(model, bns)))
        if converter_repeats:
            conv.append(time_converter(model)[0])
    stopped = False
    if not converter_repeats:
        seconds, stopped = time_converter(model, timeout)
        conv.append(seconds)
    floor = {k: median(r[0][k] for r in runs) for k in runs[0][0]}
    phases = {k: median(r[3][k] for r in runs) for k in runs[0][3]}
    call = phases.pop("call")
    multiply = median(r[1] for r in runs)
    checks, writes = (median(r[2][k] for r in runs) for k in ("checks", "writes"))
    rescale = median(r[2]["checks"] + r[2]["writes"] for r in runs)
    total = phases["total"]
    converter = median(conv[1:] or conv)
    row = {
        "model": model.label, "blocks": list(model.blocks), "width": model.width, "bns": bns,
        "weight_bytes": nbytes, "parameter_bytes": model.parameter_bytes,
        "nnabla_converter_s": converter, "nnabla_converter_first_s": conv[0],
        "nnabla_converter_runs": len(conv),
        "nnabla_converter_stopped_after_s": timeout if stopped else None,
        "fold_total_s": total, "fold_phases_s": phases, "fold_call_s": call,
        "floor_s": floor["total"], "floor_parts_s": {k: v for k, v in floor.items() if k != "total"},
        "rescale_s": rescale, "rescale_checks_s": checks, "rescale_writes_s": writes,
        "numpy_multiply_s": multiply,
        "speedup_vs_converter": converter / total,
        "fold_over_floor": total / floor["total"],
        "fold_over_floor_plus_multiply": total / (floor["total"] + multiply),
        "fold_total_over_multiply": total / multiply,
        "rescale_over_multiply": rescale / multiply,
        "rescale_writes_over_multiply": writes / multiply,
    }
    if converter_repeats:   # the names of earlier results
        row["nnabla_converter_warm_s"] = converter
        row["speedup_vs_converter_warm"] = converter / total
    return row


def accessor_microseconds(n: int = 2000) -> dict:
    """Microseconds per call of NNabla's accessors of a parameter's host array (fastest of 5 x n)."""
    var = nn.Variable.from_numpy_array(np.ones((64, 64, 3, 3), np.float32))
    ctx = cpu_context()
    calls = {"Variable.data.data_ptr(dtype, ctx)": lambda: var.data.data_ptr(np.float32, ctx),
             "Variable.d": lambda: var.d,
             "NdArray.get_data('r')": lambda: var.data.get_data("r")}
    out = {}
    for name, fn in calls.items():
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                fn()
            best = min(best, (time.perf_counter() - t) / n)
        out[name] = best * 1e6
    return out


# -- files ------------------------------------------------------------------------------------------
def save_files(folder: Path, width: int, size: int):
    """(HDF5 .nnp, protobuf .nnp, their parameters' bytes): the demo's model, saved by the demo
    (``python -m bnfold_gpu.demo --save``), and the same model with ``parameter.protobuf``."""
    h5, pb = folder / "resnet50.nnp", folder / "resnet50-protobuf.nnp"
    subprocess.run([sys.executable, "-m", "bnfold_gpu.demo", "--save", str(h5),
                    "--width", str(width), "--size", str(size)],
                   check=True, capture_output=True, timeout=600)
    nn.clear_parameters()
    x, y = build_resnet50(width, size)
    with nn.parameter_scope(SCOPE):
        # the contents demo.save_model writes
        save(str(pb), {"networks": [{"name": "resnet50", "batch_size": 1, "outputs": {"y": y},
                                     "names": {"x": x}}],
                       "executors": [{"name": "runtime", "network": "resnet50", "data": ["x"],
                                      "output": ["y"]}]},
             parameter_format=".protobuf")
        nbytes = sum(v.d.nbytes for v in nn.get_parameters(grad_only=False).values())
    nn.clear_parameters()
    return h5, pb, nbytes


# Linux counts the parent's resident memory at the fork (and, with vfork, its peak) in a child's
# ru_maxrss: each command is started by a small Python of its own, which reports the command's.
_LAUNCHER = """import json, os, subprocess, sys, time
t = time.perf_counter()
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(json.dumps([time.perf_counter() - t, os.waitstatus_to_exitcode(status), usage.ru_maxrss]))
"""


def run_child(cmd):
    """(wall seconds, peak resident bytes) of ``cmd`` in a fresh process, started by a launcher
    whose own memory (about 10 MB) is all that can mix into the peak."""
    r = subprocess.run([sys.executable, "-c", _LAUNCHER] + list(cmd), capture_output=True,
                       text=True, timeout=600)
    seconds, status, maxrss = json.loads(r.stdout.splitlines()[-1]) if r.returncode == 0 \
        else (0, r.returncode, 0)
    if status:
        raise RuntimeError(f"{' '.join(cmd)} exited {status}: {r.stderr[-2000:]}")
    return seconds, maxrss * 1024    # Linux counts kilobytes


def bnfold_command():
    script = Path(sys.executable).with_name("bnfold")
    return [str(script)] if script.exists() else [sys.executable, "-m", "bnfold_gpu"]


def time_file(src: Path, folder: Path, repeats: int, command_repeats: int) -> dict:
    """``fold_nnp`` in this process (after one untimed call: imports excluded) and
    ``shutil.copyfile`` of ``src``, in turns; then whole ``bnfold fold`` commands."""
    dst, copy = folder / "folded.nnp", folder / "copy.nnp"
    bnfold_gpu.fold_nnp(src, dst, backend="numpy")

    def durable_copy():     # as bnfold writes its output: the copy flushed to disk
        shutil.copyfile(src, copy)
        with open(copy, "rb+") as fh:
            os.fsync(fh.fileno())
    folds, copies, durable = [], [], []
    for _ in range(repeats):
        _, report = _seconds(lambda: bnfold_gpu.fold_nnp(src, dst, backend="numpy"))
        folds.append(report.seconds)
        copies.append(_seconds(lambda: shutil.copyfile(src, copy))[0])
        durable.append(_seconds(durable_copy)[0])
    commands = [run_child(bnfold_command() + ["fold", str(src), "-o", str(dst), "--backend",
                                              "numpy", "--quiet"])
                for _ in range(command_repeats)]
    stages = {k: median(s[k] for s in folds) for k in folds[0]}
    return {"file_bytes": src.stat().st_size, "fold_nnp_s": stages["total"],
            "fold_nnp_stages_s": stages, "copy_s": median(copies),
            "fold_over_copy": stages["total"] / median(copies),
            "copy_fsync_s": median(durable), "fold_over_copy_fsync": stages["total"] / median(durable),
            "command_s": median(c[0] for c in commands),
            "command_peak_rss_bytes": max(c[1] for c in commands)}


def measure_files(width: int, size: int, repeats: int, command_repeats: int) -> dict:
    imports = {"cli": "import bnfold_gpu.cli",
               "fold": "import bnfold_gpu.cli, bnfold_gpu.nnp_fold, bnfold_gpu.nnp, "
                       "bnfold_gpu.folding"}
    starts = {k: [run_child([sys.executable, "-c", code]) for _ in range(command_repeats)]
              for k, code in imports.items()}
    with tempfile.TemporaryDirectory(prefix="bnfold-bench-") as tmp:
        folder = Path(tmp)
        h5, pb, nbytes = save_files(folder, width, size)
        rows = []
        for label, src in (("HDF5 parameters (parameter.h5)", h5),
                           ("protobuf parameters (parameter.protobuf)", pb)):
            row = {"file": label, "parameter_bytes": nbytes}
            row.update(time_file(src, folder, repeats, command_repeats))
            rows.append(row)
    fold_imports = starts["fold"]
    imports_rss = max(s[1] for s in fold_imports)
    for row in rows:
        row["command_peak_rss_over_parameters"] = row["command_peak_rss_bytes"] / nbytes
        row["command_peak_rss_above_imports_over_parameters"] = \
            (row["command_peak_rss_bytes"] - imports_rss) / nbytes
    return {
        "model": f"the demo's ResNet-50, width {width}, {size}x{size}",
        "copy": "shutil.copyfile", "command": " ".join(["bnfold", "fold", "IN.nnp", "-o", "OUT.nnp",
                                                        "--backend", "numpy", "--quiet"]),
        "imports": imports,
        "peak_rss": "ru_maxrss (wait4) of the command, started by a small Python launcher, not by "
                    "the benchmark's process, whose own memory Linux would count in",
        "import_cli_s": median(s[0] for s in starts["cli"]),
        "import_fold_s": median(s[0] for s in fold_imports),
        "import_fold_peak_rss_bytes": imports_rss,
        "rows": rows,
    }


# -- the run ----------------------------------------------------------------------------------------
def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def committed_gpu_result():
    """(result, its path as the README links it) of the newest GPU result git tracks under
    bench/results/ (outside a git checkout, the newest there), or (None, None)."""
    found = tracked(RESULTS)
    if found is None:
        found = {p.name: p.read_text() for p in RESULTS.glob("gpu-*.json")}
    name = newest("gpu", found)
    return (json.loads(found[name]), f"bench/results/{name}") if name else (None, None)


def write_plot(result: dict, png: Path):
    try:
        import plot
    except ImportError as e:
        print(f"no plot: {e} (`make bench` installs the bench extra, matplotlib)", file=sys.stderr)
        return None
    gpu, gpu_path = committed_gpu_result()
    plot.render(result, png, gpu, gpu_path)
    return png


def _ints(text):
    return tuple(int(v) for v in text.split(","))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--size", type=int, default=64, help="input height and width")
    ap.add_argument("--widths", type=_ints, default=(32, 64, 96, 128), help="ResNet-50 widths")
    ap.add_argument("--deep-width", type=int, default=64)
    ap.add_argument("--deep-blocks", type=_ints, default=DEEP, help="bottleneck blocks per stage")
    ap.add_argument("--converter-timeout", type=float, default=180.0,
                    help="seconds after which NNabla's converter is stopped on the deep network")
    ap.add_argument("--file-width", type=int, default=64, help="width of the demo's .nnp")
    ap.add_argument("--command-repeats", type=int, default=3,
                    help="runs of each command (interpreter starts, `bnfold fold`)")
    ap.add_argument("--no-plot", action="store_true", help="write no PNG")
    ap.add_argument("--quick", action="store_true",
                    help="tiny models, one repeat: checks the script, measures nothing worth keeping")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.size, args.widths, args.deep_width = 1, 16, (4,), 4
        args.deep_blocks, args.file_width, args.command_repeats = (1, 1, 2, 1), 4, 1
    from bnfold_gpu.cli import quiet_nnabla_info
    quiet_nnabla_info()
    started = time.perf_counter()
    warm_up = Model.build(4, 16)     # what a first call in the process does once, not timed
    time_fold(warm_up, time_floor_and_multiply(warm_up)[-1])
    rows = []
    for width in args.widths:
        rows.append(measure_model(Model.build(width, args.size), args.repeats, True, None))
        print(f"{rows[-1]['model']}: measured", file=sys.stderr)
    deep = Model.build(args.deep_width, args.size, args.deep_blocks)
    rows.append(measure_model(deep, args.repeats, False, args.converter_timeout))
    del deep
    files = measure_files(args.file_width, args.size, args.repeats, args.command_repeats)
    result = {
        "benchmark": "cpu", "date": datetime.date.today().isoformat(),
        "device": f"{cpu_name()}, {os.cpu_count()} cores",
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "nnabla": nn.__version__, "bnfold_gpu": bnfold_gpu.__version__},
        "repeats": args.repeats, "targets": TARGETS, "floor": FLOOR,
        "accessor_us": accessor_microseconds(200 if args.quick else 2000),
        "rows": rows, "files": files,
        "bench_s": time.perf_counter() - started,
    }
    out = write_result(result, args.out, f"cpu-{result['date']}.json")
    png = None if args.no_plot else write_plot(result, out.with_suffix(".png"))
    print(f"{result['device']}; numpy {np.__version__}, nnabla {nn.__version__}")
    print(f"{'model':34} {'MB':>6} {'converter':>10} {'fold':>9} {'speedup':>8} {'floor':>9} "
          f"{'fold/floor':>10} {'rescale/mul':>11}")
    for r in rows:
        print(f"{r['model']:34} {r['weight_bytes'] / 1e6:6.1f} {r['nnabla_converter_s']:9.3f}s "
              f"{r['fold_total_s'] * 1e3:7.1f}ms {r['speedup_vs_converter']:7.1f}x "
              f"{r['floor_s'] * 1e3:7.1f}ms {r['fold_over_floor']:9.2f}x "
              f"{r['rescale_over_multiply']:10.2f}x")
    for r in files["rows"]:
        print(f"{r['file']:42} fold_nnp {r['fold_nnp_s']:.3f}s copy {r['copy_s']:.3f}s "
              f"({r['fold_over_copy']:.1f}x); command {r['command_s']:.2f}s, peak RSS "
              f"{r['command_peak_rss_bytes'] / 1e6:.0f} MB "
              f"({r['command_peak_rss_over_parameters']:.2f}x)")
    print(f"written to {out}" + (f" and {png}" if png else "") + "\n\nFor the README:\n")
    print(markdown(result, readme_path(out)))
    return result


if __name__ == "__main__":
    main()
