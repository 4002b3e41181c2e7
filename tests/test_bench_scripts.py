"""The GPU benchmark script runs end to end (on the emulated device), so that a run on a GPU goes to
measuring, not to debugging the script; the README's benchmark tables are the committed results."""
import json
import sys
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


def test_readme_shows_the_newest_committed_results():
    """The README's tables are rendered from the newest JSON under bench/results/ (bench/tables.py);
    until a GPU result is committed, the README says the kernels have not run on real hardware."""
    readme = (ROOT / "README.md").read_text()
    results = ROOT / "bench" / "results"
    cpu = tables.newest("cpu", results)
    assert tables.markdown(json.loads(cpu.read_text()), f"bench/results/{cpu.name}") in readme
    gpu = tables.newest("gpu", results)
    if gpu is None:
        assert "not yet run on real hardware" in readme
    else:
        result = json.loads(gpu.read_text())
        assert tables.markdown(result, f"bench/results/{gpu.name}") in readme
        assert "not yet run on real hardware" not in readme and not result["correctness"]["failures"]


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
