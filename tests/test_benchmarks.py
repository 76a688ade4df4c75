"""The benchmark scripts run and write their results (a smoke test: no timing is asserted)."""

import json
import os
import subprocess
import sys

import pytest

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


def test_bench_ops_has_the_tuned_and_forced_gemm_variants():
    # the measured-dispatch rows (faststeal[auto], each C++ GEMM path) and the × best torch column
    import torch

    from benchmarks import bench_ops
    from faststeal import _ext
    from faststeal.ops.cpp_backend import GEMM_PATHS

    res = bench_ops.run("cpu", "smoke", ceil=bench_ops.ceilings("cpu", tiny=True),
                        log=lambda *a: None)
    rows = [r for r in res["rows"] if r["op"] == "ensemble_linear fwd" and "error" not in r]
    variants = {r["variant"] for r in rows}
    assert "faststeal[auto]" in variants
    if _ext.C is not None:
        # float32 shapes: every path but upcast (it would repeat bmm, so it gets no row)
        assert {f"faststeal[cpp:{p}]" for p in GEMM_PATHS} - variants == {"faststeal[cpp:upcast]"}
    assert all(r.get("x_vs_best_torch") for r in rows)
    assert torch.isfinite(torch.tensor([r["max_err"] for r in rows
                                        if r["variant"].startswith("faststeal")])).all()
    # max_pool2d: the C++ kernel computes exactly what F.max_pool2d computes (the reference)
    pool = {r["variant"]: r for r in res["rows"] if r["op"] == "max_pool2d fwd+bwd"}
    assert {"faststeal[auto]", "faststeal[reference]", "F.max_pool2d"} <= set(pool)
    if _ext.C is not None:
        assert pool["faststeal[cpp]"]["max_err"] == 0 and pool["faststeal[cpp]"]["median_ms"] > 0


@pytest.mark.filterwarnings("ignore:the mlp victim reaches only")  # a 1-epoch victim, on purpose
def test_bench_e2e_compare_runs_both_sides(monkeypatch, tmp_path):
    # steal() vs the plain loop on tiny settings: both sides report a wall time and a fidelity
    from benchmarks import bench_e2e

    monkeypatch.setenv("FASTSTEAL_CACHE", str(tmp_path))
    res = bench_e2e.compare("cpu", budget=120, epochs=1, rounds=1, archs=("mlp",), members=(2,),
                            precisions=("fp32", "bf16", "bf16-cast"), victim_epochs=1,
                            dataset="digits", victim_arch="mlp", log=lambda *a: None)
    kinds = {(r["who"], r["precision"]) for r in res["rows"]}
    assert kinds == {("faststeal", "fp32"), ("faststeal", "bf16"), ("faststeal", "bf16-cast"),
                     ("loop", "fp32"), ("floor", "fp32"), ("floor", "bf16")}
    runs = [r for r in res["rows"] if r["who"] != "floor"]
    assert all(r["wall_s"] > 0 and 0 <= r["fidelity"] <= 1 for r in runs)
    # the floor (the run's GEMMs alone + Adam) is below every whole run it bounds
    floors = {r["precision"]: r["wall_s"] for r in res["rows"] if r["who"] == "floor"}
    assert all(0 < floors[r["precision"].split("-")[0]] < r["wall_s"] for r in runs)
    import torch

    from faststeal import _ext
    if _ext.C is not None and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        # the bf16 weight copies (faststeal.master_weights) train bit-identically to the cast path
        fid = {r["precision"]: r["fidelity"] for r in runs if r["who"] == "faststeal"}
        assert fid["bf16"] == fid["bf16-cast"]
    md = bench_e2e.compare_markdown(res)
    assert "plain loop" in md and "GEMM+Adam floor[bf16]" in md
    with pytest.raises(ValueError, match="precisions must be among"):
        bench_e2e.compare("cpu", precisions=("fp32-cast",))


def test_bench_e2e_speedups_are_paired_per_round():
    # faststeal is 2x the loop in two of three rounds (the VM changes speed between rounds);
    # paired per round the median is 2x, the ratio of the medians would say 12/20 = 0.6x
    from benchmarks import bench_e2e

    def row(r, who, wall):
        return {"round": r, "who": who, "arch": "mlp", "S": 5, "precision": "fp32",
                "wall_s": wall, "fidelity": 0.9, "query_s": 1.0}

    rows = [row(0, "loop", 40.0), row(0, "faststeal", 20.0), row(1, "loop", 10.0),
            row(1, "faststeal", 5.0), row(2, "loop", 12.0), row(2, "faststeal", 40.0)]
    md = bench_e2e.compare_markdown({"rows": rows, "budget": 1, "epochs": 1, "rounds": 3,
                                     "dataset": "x"})
    line = next(ln for ln in md.splitlines() if "faststeal[fp32]" in ln)
    # loop+queries: 41/20, 11/5, 13/40; then each round's x loop
    assert line.endswith("| 2.00× | 2.05× | 2.00 / 2.00 / 0.30 |")
    loop_line = next(ln for ln in md.splitlines() if "| plain loop |" in ln)
    assert loop_line.endswith("| 1.00× | 1.08× | — |")  # 41/40, 11/10, 13/12: median 1.08


def test_gemm_adam_floor_times_the_runs_products(monkeypatch):
    # the zoo mlp (784-512-256-10), S=2, 9 rows in batches of 4: two full steps; the 1-row rest
    # is skipped as the loop skips it. Every product the floor times: forward and dW of each
    # layer, dX of all but the first, at batch 4 only
    import torch

    from benchmarks import bench_e2e

    seen = set()
    bmm = torch.bmm

    def rec_bmm(a, b):
        seen.add((tuple(a.shape), tuple(b.shape)))
        return bmm(a, b)

    monkeypatch.setattr(torch, "bmm", rec_bmm)
    assert bench_e2e._gemm_adam_floor("lenet", 2, "fp32", (1, 28, 28), 10, 9, 1, 4, "cpu") is None
    t9 = bench_e2e._gemm_adam_floor("mlp", 2, "fp32", (1, 28, 28), 10, 9, 1, 4, "cpu")
    want = set()
    for i, (k, n) in enumerate([(784, 512), (512, 256), (256, 10)]):
        want |= {((2, 4, k), (2, k, n)), ((2, n, 4), (2, 4, k))}
        if i > 0:
            want.add(((2, 4, n), (2, n, k)))
    assert seen == want
    # a 2-row rest is one more (smaller) step; more epochs, proportionally more
    seen.clear()
    t10 = bench_e2e._gemm_adam_floor("mlp", 2, "fp32", (1, 28, 28), 10, 10, 1, 4, "cpu")
    assert ((2, 2, 784), (2, 784, 512)) in seen and t10 > 0 and t9 > 0
    # bf16: the same products, in bfloat16 and (the fourth route) as float32 of float32 copies
    seen.clear()
    dtypes = set()

    def rec_bmm_dtype(a, b):
        dtypes.add(a.dtype)
        return rec_bmm(a, b)

    monkeypatch.setattr(torch, "bmm", rec_bmm_dtype)
    assert bench_e2e._gemm_adam_floor("mlp", 2, "bf16", (1, 28, 28), 10, 9, 1, 4, "cpu") > 0
    assert seen == want and dtypes == {torch.bfloat16, torch.float32}
    monkeypatch.setattr(torch, "bmm", bmm)
    assert bench_e2e._gemm_adam_floor("mlp", 2, "fp32", (1, 28, 28), 10, 8, 20, 4, "cpu") > \
        bench_e2e._gemm_adam_floor("mlp", 2, "fp32", (1, 28, 28), 10, 8, 1, 4, "cpu")


def test_user_model_benchmark_smoke():
    """bench_train --user-models: stack, loop and vmap rows for a user CNN (no timing asserted)."""
    from benchmarks import bench_train

    res = bench_train.run_user_models("cpu", "smoke", min_run_time=0.01, log=lambda *_: None)
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"stack", "loop", "vmap"}
    assert all(r["median_ms"] > 0 for r in rows.values())
    assert "functional-cnn" in bench_train.user_markdown(res)


def test_forced_layout_variants_run_that_layout(monkeypatch):
    """bench_train's ``stack-nchw`` / ``stack-nhwc`` variants train in the forced layout (the
    first conv of the functional CNN writes NHWC only in the second) and leave the
    environment as it was."""
    import torch

    from benchmarks import bench_train
    from faststeal.nn.stack import LAYOUT_ENV

    monkeypatch.delenv(LAYOUT_ENV, raising=False)
    for variant, nhwc in (("stack-nchw", False), ("stack-nhwc", True)):
        step = bench_train.user_model_step(variant, "functional-cnn", 2, 4, torch.device("cpu"))
        seen = []
        conv_forward = step.model.body.conv1.forward

        def forward(inp, conv_forward=conv_forward, seen=seen):  # not a hook: hooks force NCHW
            out = conv_forward(inp)
            seen.append(out.is_contiguous(memory_format=torch.channels_last)
                        and not out.is_contiguous())
            return out
        step.model.body.conv1.forward = forward
        before = [p.detach().clone() for p in step.model.parameters()]
        step()
        assert seen == [nhwc] and LAYOUT_ENV not in os.environ
        assert all(not torch.equal(p, q) for p, q in zip(step.model.parameters(), before))


def test_paired_ratio_compares_within_rounds():
    # the machine is 4x slower in round 2: the ratio of medians would mix a fast spell of one
    # variant with a slow spell of the other, the per-round ratio does not
    from benchmarks.common import paired_ratio

    slow = {"median_ms": 8.0, "round_ms": [2.0, 8.0, 8.0]}
    fast = {"median_ms": 1.0, "round_ms": [1.0, 1.0, 4.0]}  # rounds 2 and 3 hit different spells
    assert paired_ratio(slow, fast) == pytest.approx(2.0)  # per round 2, 8, 2 (medians: 8)
    # a list of baselines: each round's fastest of them
    other = {"median_ms": 3.0, "round_ms": [1.5, 3.0, 12.0]}
    assert paired_ratio([slow, other], fast) == pytest.approx(2.0)  # per round 1.5, 3, 2
    # prefixed keys (bench_train's train_/infer_ rows)
    assert paired_ratio({"train_median_ms": 6.0, "train_round_ms": [6.0]},
                        {"train_median_ms": 2.0, "train_round_ms": [3.0]}, "train_") == 2.0
    # no per-round times (CUDA) or unequal round counts: the ratio of the medians
    assert paired_ratio({"median_ms": 6.0}, {"median_ms": 3.0}) == 2.0
    assert paired_ratio({"median_ms": 6.0, "round_ms": [6.0, 6.0]},
                        {"median_ms": 2.0, "round_ms": [2.0]}) == 3.0
    assert paired_ratio(None, fast) is None and paired_ratio(slow, None) is None


def test_bench_many_keeps_one_median_per_round():
    from benchmarks.common import bench_many

    res = bench_many({"a": lambda: sum(range(100)), "b": lambda: sum(range(200))}, "cpu",
                     min_run_time=0.03, rounds=3)
    for t in res.values():
        assert len(t.round_ms) == 3 and all(v > 0 for v in t.round_ms)
        assert min(t.round_ms) >= t.min_ms
