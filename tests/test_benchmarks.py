"""The benchmark scripts run and write their results (a smoke test: no timing is asserted)."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_all_smoke_writes_json_and_markdown(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run_all", "--smoke", "--device", "cpu",
         "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "benchmarks.json").read_text())
    meta = res["meta"]
    for key in ("device_name", "torch", "triton", "git", "cpu_count", "loadavg_start"):
        assert key in meta, key
    assert res["ceilings"]["gemm"]["float32"]["gflops"] > 0
    ops_rows = [r for r in res["ops"]["rows"] if "error" not in r]
    assert {r["op"].split()[0] for r in ops_rows} >= {
        "ensemble_linear", "bayes_linear", "member_stats", "ensemble_cross_entropy"}
    assert any(r["variant"] == "faststeal[reference]" for r in ops_rows)
    train_rows = [r for r in res["train"]["rows"] if "error" not in r]
    assert {r["method"] for r in train_rows} >= {"loop", "vmap", "faststeal[reference]",
                                                  "faststeal"}
    assert all(r["train_median_ms"] > 0 and r["train_samples_per_s"] > 0 for r in train_rows)
    assert "e2e" in res and isinstance(res["targets"], list)
    md = (tmp_path / "benchmarks.md").read_text()
    assert "## Ops" in md and "## Training step and inference" in md and "× loop" in md


def test_user_model_benchmark_smoke():
    """bench_train --user-models: stack, loop and vmap rows for a user CNN (no timing asserted)."""
    from benchmarks import bench_train

    res = bench_train.run_user_models("cpu", "smoke", min_run_time=0.01, log=lambda *_: None)
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"stack", "loop", "vmap"}
    assert all(r["median_ms"] > 0 for r in rows.values())
    assert "functional-cnn" in bench_train.user_markdown(res)
