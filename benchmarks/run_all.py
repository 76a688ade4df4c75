"""One entry point for every benchmark: ops, training/inference throughput, end-to-end comparison.

    python -m benchmarks.run_all                 full run on the default device (CPU: ~15 min)
    python -m benchmarks.run_all --quick         CPU, small grid, under ~2 minutes
    python -m benchmarks.run_all --gpu-quick     CUDA, GPU sizes, bounded to ~3 minutes
    python -m benchmarks.run_all --smoke         tiny sizes (the test suite's check that it runs)

Writes ``OUT/benchmarks.json`` (device name, torch/Triton versions, git commit, machine load, every
measurement) and ``OUT/benchmarks.md`` (the markdown tables, with speed-up columns and the target
checks), rewriting both after every section so an interrupted run keeps what it measured, and
prints the markdown. Copy the tables into ``docs/benchmarks.md`` with the hardware they came from.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Optional

import torch

from . import bench_e2e, bench_ops, bench_train, common

MODES = {
    # mode: (device type, ops preset, train preset, e2e preset or None, soft deadline s, threads)
    "full": dict(ops="{dev}", train="{dev}", e2e="default", deadline=None),
    "quick": dict(ops="cpu-quick", train="cpu-quick", e2e=None, deadline=150, device="cpu"),
    "gpu-quick": dict(ops="gpu-quick", train="gpu-quick", e2e="quick", deadline=170,
                      device="cuda"),
    "smoke": dict(ops="smoke", train="smoke", e2e="smoke", deadline=120, device="cpu", threads=1),
}


# ----------------------------------------------------------------------------- targets

def _find(rows, **kw) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in kw.items()) and "error" not in r]


def _target(tid: str, text: str, measured: Optional[float], threshold: float, unit: str,
            detail: str = "", higher_is_better: bool = True) -> dict[str, Any]:
    met = None if measured is None else (measured >= threshold if higher_is_better
                                         else measured <= threshold)
    return {"id": tid, "target": text, "measured": measured, "threshold": threshold,
            "unit": unit, "met": met, "detail": detail}


def check_targets(res: dict[str, Any], device_type: str) -> list[dict[str, Any]]:
    """The issue's speed targets, each a ratio measured in this run."""
    out: list[dict[str, Any]] = []
    train = res.get("train", {}).get("rows", [])
    ops_rows = res.get("ops", {}).get("rows", [])
    fs_train = ("faststeal", "faststeal+graph")

    def best_train(s, b, arch="mlp"):
        cands = [r for m in fs_train for r in _find(train, arch=arch, S=s, B=b, method=m)]
        return min(cands, key=lambda r: r["train_median_ms"], default=None)

    def best_op(op, **kw):
        cands = [r for r in _find(ops_rows, op=op, **kw) if r["variant"].startswith("faststeal[")
                 and r["variant"] != "faststeal[reference]"]
        return min(cands, key=lambda r: r["median_ms"], default=None)

    if device_type == "cpu":
        for b, need, extra in ((32, 2.5, None), (128, 1.2, 0.70), (1024, 1.0, None)):
            r = best_train(16, b)
            out.append(_target(f"cpu-mlp16-b{b}", f"S=16 MLP train step, batch {b}: ≥ {need}× the "
                               f"Python loop", r and r.get("train_x_vs_loop"), need, "×",
                               r and f"{r['train_median_ms']:.1f} ms"))
            if extra is not None:
                out.append(_target(f"cpu-mlp16-b{b}-gemm", f"S=16 MLP train step, batch {b}: ≥ "
                                   f"{100 * extra:.0f}% of the measured GEMM rate (torch.mm)",
                                   r and r.get("train_frac_gemm"), extra, "fraction",
                                   r and (f"{r['train_gflops']:.1f} GFLOP/s; "
                                          f"{100 * r.get('train_frac_best_gemm', 0):.0f}% of the "
                                          f"fastest GEMM library's rate")))
        r = best_op("member_stats", S=16, B=8192, C=10)
        out.append(_target("cpu-member-stats", "member_stats (C++) at S=16, B=8192, C=10: ≥ 3× "
                           "the eager composite", r and r.get("x_vs_composite"), 3.0, "×",
                           r and f"{r['variant']} {r['median_ms']:.3f} ms"))
        e2e = res.get("e2e")
        if e2e and e2e.get("target_s"):
            out.append(_target("cpu-e2e", "default five-method comparison ≤ 10 minutes",
                               e2e.get("wall_s"), e2e["target_s"], "s",
                               higher_is_better=False))
    else:
        r = best_train(16, 128)
        for ref, need in (("loop", 10.0), ("vmap", 2.0), ("vmap+compile", 1.0)):
            out.append(_target(f"gpu-mlp16-b128-vs-{ref}", f"S=16 MLP train step, batch 128: "
                               f"≥ {need}× {ref}" + (" (ahead of it)" if need == 1.0 else ""),
                               r and r.get(f"train_x_vs_{ref}"), need, "×",
                               r and f"{r['method']} {r['train_median_ms']:.3f} ms"))
        for row in (r_ for r_ in _find(ops_rows, op="member_stats", size="large")
                    if r_["variant"] == "faststeal[reference]"):
            best = best_op("member_stats", S=row["S"], B=row["B"], C=row["C"])
            out.append(_target(f"gpu-member-stats-B{row['B']}", f"member_stats at S={row['S']}, "
                               f"B={row['B']}, C={row['C']}: ≥ 70% of copy bandwidth",
                               best and best.get("frac_copy_bw"), 0.70, "fraction",
                               best and f"{best['variant']} {best['gbps']:.0f} GB/s"))
        for row in _find(ops_rows, op="ensemble_linear fwd", variant="torch.bmm only"):
            best = best_op("ensemble_linear fwd", shape=row["shape"])
            if row["size"] == "large":
                out.append(_target(f"gpu-linear-large-{row['dtype']}-S{row['S']}B{row['B']}",
                                   f"ensemble_linear fwd ({row['shape']}): ≥ 0.9× torch.bmm",
                                   best and best.get("x_vs_bmm"), 0.9, "×",
                                   best and f"{best['variant']} {best['median_ms']:.3f} ms"))
            else:
                out.append(_target(f"gpu-linear-small-S{row['S']}B{row['B']}K{row['K']}",
                                   f"ensemble_linear fwd ({row['shape']}): ≥ 1.5× the bmm + bias "
                                   f"+ activation + dropout composite",
                                   best and best.get("x_vs_composite"), 1.5, "×",
                                   best and f"{best['variant']} {best['median_ms']:.3f} ms"))
        for row in _find(ops_rows, op="bayes_linear fwd", variant="materialise + bmm"):
            best = best_op("bayes_linear fwd", shape=row["shape"])
            out.append(_target(f"gpu-bayes-S{row['S']}B{row['B']}", f"bayes_linear fwd "
                               f"({row['shape']}): faster than materialise + bmm",
                               best and best.get("x_vs_composite"), 1.0, "×",
                               best and f"{best['variant']} {best['median_ms']:.3f} ms"))
    return out


def targets_markdown(targets: list[dict[str, Any]]) -> str:
    def show(t):
        v = t["measured"]
        if v is None:
            return "not measured"
        if t["unit"] == "fraction":
            return f"{100 * v:.0f}%"
        if t["unit"] == "s":
            return f"{v:.0f} s"
        return f"{v:.2f}×"

    body = [[t["target"], show(t), {True: "met", False: "**missed**", None: "—"}[t["met"]],
             t["detail"] or ""] for t in targets]
    return common.markdown_table(["target", "measured", "status", "detail"], body)


# ----------------------------------------------------------------------------- report

def markdown(res: dict[str, Any]) -> str:
    meta = res["meta"]
    lines = [f"# faststeal benchmarks ({res['mode']})", "",
             f"- device: **{meta['device_name']}** ({meta['device']}); CPU {meta['cpu']}, "
             f"{meta['cpu_count']} cores, torch threads {meta['torch_threads']}",
             f"- torch {meta['torch']} (CUDA {meta['torch_cuda']}), Triton {meta['triton']}, "
             f"Python {meta['python']}; extension: {meta.get('extension')}",
             f"- commit {meta['git']['commit']}" + (" (+ uncommitted changes)"
                                                     if meta['git'].get('dirty') else ""),
             f"- {meta['timestamp']}; load average at start {meta['loadavg_start']}, at end "
             f"{res.get('loadavg_end')}; total {res.get('elapsed_s', 0):.0f} s", ""]
    if res.get("targets"):
        lines += ["## Targets", "", targets_markdown(res["targets"]), ""]
        if meta["device"] == "cpu" and meta["torch_threads"] != 2:
            lines += [f"(The CPU targets are stated for 2 cores; this run used "
                      f"{meta['torch_threads']} thread(s).)", ""]
    if "ops" in res:
        lines += ["## Ops", "", bench_ops.markdown(res["ops"], meta["device"]), ""]
    if "train" in res:
        lines += ["## Training step and inference", "", bench_train.markdown(res["train"]), ""]
    if "e2e" in res:
        lines += ["## End-to-end comparison", "",
                  bench_e2e.markdown(res["e2e"]) if "wall_s" in res["e2e"]
                  else f"not run: {res['e2e'].get('error')}", ""]
    for section, err in res.get("errors", {}).items():
        lines.append(f"- section `{section}` failed: {err}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="CPU, small grid, < ~2 minutes")
    g.add_argument("--gpu-quick", action="store_true", help="CUDA, GPU sizes, ~3 minutes")
    g.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (for tests)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: the mode's, else cuda "
                                                   "when available)")
    ap.add_argument("--only", default="ops,train,e2e", help="comma-separated sections to run")
    ap.add_argument("--e2e", default=None, choices=tuple(bench_e2e.PRESETS) + ("none",),
                    help="end-to-end preset (default: the mode's)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="soft time budget in seconds (remaining cases are skipped)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default="runs/benchmarks", help="folder for benchmarks.json/.md")
    args = ap.parse_args(argv)

    mode = "quick" if args.quick else "gpu-quick" if args.gpu_quick else \
        "smoke" if args.smoke else "full"
    cfg = MODES[mode]
    device = torch.device(args.device or cfg.get("device")
                          or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("run_all: CUDA requested but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    threads = args.threads or cfg.get("threads")
    if threads:
        torch.set_num_threads(threads)
    dev = device.type
    ops_preset = cfg["ops"].format(dev=dev)
    train_preset = cfg["train"].format(dev=dev)
    e2e_preset = args.e2e if args.e2e is not None else cfg["e2e"]
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    if e2e_preset in (None, "none") and "e2e" in sections:
        sections.remove("e2e")
    deadline = common.Deadline(args.deadline if args.deadline is not None else cfg["deadline"])
    json_path = os.path.join(args.out, "benchmarks.json")
    md_path = os.path.join(args.out, "benchmarks.md")
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(msg, flush=True)

    res: dict[str, Any] = {"mode": mode, "presets": {"ops": ops_preset, "train": train_preset,
                                                       "e2e": e2e_preset},
                           "meta": common.env_metadata(device), "errors": {}}

    def save() -> None:
        res["elapsed_s"] = time.perf_counter() - t_start
        res["loadavg_end"] = common.loadavg()
        res["targets"] = check_targets(res, dev)
        common.write_json(json_path, res)
        from faststeal.files import atomic_write

        atomic_write(md_path, markdown(res) + "\n")

    log(f"[run_all] mode {mode} on {res['meta']['device_name']} ({device}); sections {sections}; "
        f"load {res['meta']['loadavg_start']}")
    try:
        ceil = bench_ops.ceilings(device, quick=mode != "full", tiny=mode == "smoke")
    except Exception as exc:
        res["errors"]["ceilings"] = common.short_error(exc)
        ceil = None
    res["ceilings"] = ceil
    if ceil:
        log(f"[run_all] copy {ceil['copy']['gbps']:.1f} GB/s; GEMM " + ", ".join(
            f"{k} {v['gflops']:.0f} GFLOP/s" for k, v in ceil["gemm"].items()))
    save()
    def share(section: str) -> common.Deadline:
        # each section gets its share of the time left, so a slow (loaded) machine still
        # reaches the training targets instead of spending the whole budget on the ops grid
        left = deadline.left()
        if left == float("inf"):
            return common.Deadline(None)
        weights = ({"ops": 0.4, "train": 0.45, "e2e": 0.15} if dev == "cuda"  # Triton compiles
                   else {"ops": 0.3, "train": 0.5, "e2e": 0.2})
        rest = sections[sections.index(section):]
        return common.Deadline(max(0.0, left * weights[section] / sum(weights[x] for x in rest)))

    if "ops" in sections:
        log(f"[run_all] ops ({ops_preset})")
        try:
            res["ops"] = bench_ops.run(device, ops_preset, ceil=ceil, deadline=share("ops"),
                                       log=log)
        except Exception as exc:
            res["errors"]["ops"] = common.short_error(exc, 400)
            log(f"[run_all] ops failed: {res['errors']['ops']}")
        save()
    if "train" in sections:
        log(f"[run_all] train ({train_preset})")
        try:
            res["train"] = bench_train.run(device, train_preset,
                                           gemm=ceil["gemm"]["float32"] if ceil else None,
                                           deadline=share("train"), log=log)
        except Exception as exc:
            res["errors"]["train"] = common.short_error(exc, 400)
            log(f"[run_all] train failed: {res['errors']['train']}")
        save()
    if "e2e" in sections:
        if deadline.expired():
            res["e2e"] = {"error": "skipped: time budget spent"}
        else:
            log(f"[run_all] e2e ({e2e_preset})")
            try:
                res["e2e"] = bench_e2e.run(device, e2e_preset, log=log)
            except Exception as exc:
                res["e2e"] = {"error": common.short_error(exc, 400)}
                log(f"[run_all] e2e failed: {res['e2e']['error']}")
        save()
    save()
    print(markdown(res))
    print(f"\n[run_all] wrote {json_path} and {md_path} in {res['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
