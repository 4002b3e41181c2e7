"""The GPU benchmark script runs end to end (on the emulated device), so a session lent a GPU spends
its time measuring, not debugging the script."""
import json
import sys
from pathlib import Path

from bnfold_gpu.backends import cupy_backend

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_runs_on_the_emulated_device(host, monkeypatch, tmp_path, capsys):
    import fake_cupy
    fake = fake_cupy.make(host)
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
                                      "--numpy-max-gb", "0.003", "--unroll-gb", "0.001",
                                      "--unrolls", "1,4"])
    assert bench_gpu.main() == 0
    out = capsys.readouterr().out
    assert "0 failures" in out and "skipped" in out
    result = json.loads(next(tmp_path.glob("gpu-*.json")).read_text())
    rows = result["rows"]
    assert result["correctness"]["failures"] == [] and result["correctness"]["folds_checked"] > 30
    assert rows[0]["fold_gbps"] > 0 and "speedup_vs_numpy" in rows[0]
    assert "speedup_vs_numpy" not in rows[1] and "skipped" in rows[2]
    sweep = result["unroll_sweep"]
    assert [(r["dtype"], r["unroll"]) for r in sweep] == [("float32", 1), ("float32", 4),
                                                          ("float16", 1), ("float16", 4)]
    assert all(r["matches_default_build"] and r["weight_kernel_gbps"] > 0 for r in sweep)
