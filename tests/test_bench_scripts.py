"""The GPU benchmark script runs end to end (on the emulated device), so that a run on a GPU goes to
measuring, not to debugging the script; the README's benchmark tables are the committed results."""
import json
import sys
import warnings
from pathlib import Path

import pytest

from bnfold_gpu.backends import cupy_backend

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import tables  # noqa: E402
sys.path.pop(0)


def test_bench_gpu_runs_on_the_emulated_device(host, monkeypatch, tmp_path, capsys):
    import fake_cupy
    from conftest import build_host

    def build(defines):   # the kernels' host code built as the benchmark's -D options ask
        d = tmp_path / "_".join(defines)
        d.mkdir()
        return build_host(d, defines)

    fake = fake_cupy.make(host, build)
    monkeypatch.setattr(cupy_backend, "cupy", fake)
    monkeypatch.setattr(cupy_backend, "_MODULES", {})
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_gpu
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(bench_gpu, "cp", fake)
    monkeypatch.setattr(sys, "argv", ["bench_gpu.py", "--out", str(tmp_path) + "/",
                                      "--sizes-gb", "0.002,0.004,100", "--repeats", "2",
                                      "--numpy-max-gb", "0.003", "--sweep-gb", "0.01",
                                      "--builds", "4x4,64x8"])
    assert bench_gpu.main() == 0
    out = capsys.readouterr().out
    assert "0 failures" in out and "skipped" in out
    result = json.loads(next(tmp_path.glob("gpu-*.json")).read_text())
    rows = result["rows"]
    assert result["correctness"]["failures"] == [] and result["correctness"]["folds_checked"] > 30
    assert rows[0]["fold_gbps"] > 0 and "speedup_vs_numpy" in rows[0]
    assert rows[0]["host_staged_gbps"] > 0 and rows[0]["host_staged_pageable_gbps"] > 0
    assert "page-locked" in out
    assert "speedup_vs_numpy" not in rows[1] and "skipped" in rows[2]
    sweep = result["build_sweep"]
    assert [(r["dtype"], r["per_thread"], r["unroll"]) for r in sweep] == [
        ("float32", 4, 4), ("float32", 64, 8), ("float16", 4, 4), ("float16", 64, 8)]
    assert all(r["matches_default_build"] and r["weight_kernel_gbps"] > 0 for r in sweep)
    printed = out[out.index("For the README:"):]
    table = tables.gpu_markdown(result)
    assert table in printed and tables.gpu_sweep_markdown(result) in printed
    assert len(table.splitlines()) == 2 + 3 and "| 100 GB | skipped: needs 220 GB" in table


@pytest.fixture(scope="module")
def quick_cpu_run(tmp_path_factory):
    """bench_cpu.py --quick (tiny models, one repeat), run once: (the result it wrote, what it
    printed). Its timings mean nothing; its fields and tables are what a `make bench` run has."""
    import contextlib
    import io
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_cpu
    finally:
        sys.path.pop(0)
    out = tmp_path_factory.mktemp("bench_cpu")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        bench_cpu.main(["--quick", "--no-plot", "--out", str(out) + "/"])
    assert not list(out.glob("*.png"))
    return json.loads(next(out.glob("cpu-*.json")).read_text()), printed.getvalue()


def test_bench_cpu_records_the_floor_the_converter_and_the_files(quick_cpu_run):
    """One run records, with its device and versions: per model fold() against NNabla's converter
    and NNabla's API floor, the rescale pass against a NumPy multiply; per file format fold_nnp()
    against a copy, the whole command and its peak memory; and prints the tables it renders."""
    result, printed = quick_cpu_run
    assert result["benchmark"] == "cpu" and result["device"] and result["versions"]["nnabla"]
    rows = result["rows"]
    assert [r["model"] for r in rows] == ["ResNet-50 width 4, 16x16", "ResNet-17 width 4, 16x16"]
    assert [r["bns"] for r in rows] == [53, 3 * 5 + 4 + 1]
    for r in rows:
        assert set(r["fold_phases_s"]) == {"plan", "prepare", "rewrite", "rescale", "total"}
        assert set(r["floor_parts_s"]) == {"visit", "data_access", "new_parameters", "new_functions"}
        assert r["floor_s"] > 0 and r["nnabla_converter_s"] > 0 and r["numpy_multiply_s"] > 0
        assert r["fold_call_s"] >= r["fold_total_s"] > 0
        assert r["weight_bytes"] < r["parameter_bytes"]
        for key in ("speedup_vs_converter", "fold_over_floor", "fold_over_floor_plus_multiply",
                    "rescale_over_multiply", "fold_total_over_multiply",
                    "rescale_writes_over_multiply"):
            assert r[key] > 0, key
        assert r["rescale_s"] >= r["rescale_writes_s"] > 0 and r["rescale_checks_s"] > 0
    assert rows[-1]["nnabla_converter_runs"] == 1
    assert rows[-1]["nnabla_converter_stopped_after_s"] is None
    assert "Variable.data.data_ptr(dtype, ctx)" in result["accessor_us"]
    files = result["files"]
    assert files["copy"] == "shutil.copyfile" and files["import_cli_s"] > 0
    assert files["import_fold_peak_rss_bytes"] > 0
    assert [f["file"].split()[0] for f in files["rows"]] == ["HDF5", "protobuf"]
    for f in files["rows"]:
        assert set(f["fold_nnp_stages_s"]) >= {"read", "plan", "fold", "write", "total"}
        assert f["fold_over_copy"] > 0 and f["command_s"] > 0
        assert f["copy_fsync_s"] > 0 and f["fold_over_copy_fsync"] > 0
        assert 0 < f["fold_nnp_stages_s"]["write_sync"] < f["fold_nnp_stages_s"]["write"]
        assert f["command_peak_rss_bytes"] > f["parameter_bytes"] > 0
        assert 0 < f["command_peak_rss_above_imports_over_parameters"] < \
            f["command_peak_rss_over_parameters"]
    rendered = tables.markdown(result, "bench/results/cpu-X.json")
    assert rendered.split("\n\n", 1)[1] in printed                # all but the caption's link
    assert rendered.count("\n| --- ") == 4          # floor, memory, stages, files
    assert "| ResNet-17, width 4 | 20 |" in rendered and "(once)" in rendered
    assert "| protobuf parameters (parameter.protobuf) |" in rendered


def test_a_converter_stopped_at_its_timeout_is_a_bound(quick_cpu_run):
    result = json.loads(json.dumps(quick_cpu_run[0]))
    deep = result["rows"][-1]
    deep["nnabla_converter_stopped_after_s"] = 180.0
    deep["nnabla_converter_s"], deep["speedup_vs_converter"] = 180.2, 42.0
    assert "| > 180 s (stopped) |" in tables.cpu_markdown(result)
    assert "| >= 42x |" in tables.cpu_markdown(result)


def test_the_plot_renders_from_the_json(quick_cpu_run, tmp_path):
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import plot
    finally:
        sys.path.pop(0)
    folder = ROOT / "bench" / "results"
    name = tables.newest("gpu", [p.name for p in folder.glob("gpu-*.json")])
    gpu = json.loads((folder / name).read_text()) if name else None
    png = plot.render(quick_cpu_run[0], tmp_path / "cpu.png", gpu, f"bench/results/{name}")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readme_shows_the_newest_committed_results():
    """The README's tables are rendered from the newest JSON under bench/results/ that git tracks
    (bench/tables.py), so that a `make bench` run, which writes a new one, does not fail this test;
    until a GPU result is committed, the README says the kernels have not run on real hardware."""
    readme = (ROOT / "README.md").read_text()
    folder = ROOT / "bench" / "results"
    results = tables.tracked(folder)
    if results is None:
        warnings.warn("bench/results/ is not in a git checkout: the README is compared with the "
                      "newest results on disk, committed or not")
        results = {p.name: p.read_text() for p in folder.glob("*.json")}
    cpu = tables.newest("cpu", results)
    assert cpu is not None, "no CPU benchmark result is committed under bench/results/"
    assert tables.markdown(json.loads(results[cpu]), f"bench/results/{cpu}") in readme
    gpu = tables.newest("gpu", results)
    if gpu is None:
        assert "not yet run on real hardware" in readme
    else:
        result = json.loads(results[gpu])
        assert tables.markdown(result, f"bench/results/{gpu}") in readme
        assert "not yet run on real hardware" not in readme and not result["correctness"]["failures"]


def test_only_results_git_tracks_count(tmp_path):
    """A result that `make bench` wrote and nobody added, or a tracked one rewritten on disk, is not
    what the README is checked against; outside a git checkout there is nothing tracked to say."""
    import shutil
    import subprocess
    if shutil.which("git") is None:
        pytest.fail("git is needed to check which benchmark results are committed")
    folder = tmp_path / "bench" / "results"
    folder.mkdir(parents=True)
    assert tables.tracked(folder) is None
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (folder / "cpu-2026-01-02.json").write_text('{"committed": true}\n')
    (folder / "gpu-NVIDIA-H100-2026-01-01.json").write_text('{"gpu": true}\n')
    subprocess.run(["git", "add", "bench"], cwd=tmp_path, check=True)
    (folder / "cpu-2026-01-02.json").write_text('{"committed": false}\n')   # rewritten that day
    (folder / "cpu-2026-12-31.json").write_text('{"new": true}\n')           # a later run
    found = tables.tracked(folder)
    assert sorted(found) == ["cpu-2026-01-02.json", "gpu-NVIDIA-H100-2026-01-01.json"]
    assert tables.newest("cpu", found) == "cpu-2026-01-02.json"
    assert json.loads(found["cpu-2026-01-02.json"]) == {"committed": True}
    assert tables.newest("gpu", found) == "gpu-NVIDIA-H100-2026-01-01.json"
    assert tables.newest("cpu", [p.name for p in folder.iterdir()]) == "cpu-2026-12-31.json"


def test_call_overhead_runs_without_a_gpu(capsys):
    pytest.importorskip("cupy")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import call_overhead
    finally:
        sys.path.pop(0)
    before = cupy_backend.cupy
    rows = call_overhead.main(["--sizes-gb", "0.05", "--repeats", "2"])
    assert cupy_backend.cupy is before                     # the stand-ins are put back
    assert [r[0] for r in rows] == ["0.05 GB of float32 weights", "every layout, random dtypes"]
    assert all(r[1] > 1 and r[2]["call"] > r[2]["checks"] > 0 for r in rows)
    assert "microseconds per layer" in capsys.readouterr().out


def test_gpu_check_stops_where_no_gpu_answers(tmp_path):
    """bench/gpu_check.sh runs every GPU step in one go; without a device it says so and stops."""
    import os
    import subprocess
    stub = tmp_path / "bin" / "nvidia-smi"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no driver' >&2\nexit 9\n")
    stub.chmod(0o755)
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "out")],
                       env={**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "no usable GPU here: nothing else run" in r.stdout
    assert "no driver" in (tmp_path / "out" / "gpu-versions.log").read_text()
