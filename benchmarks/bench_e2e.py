"""Wall time of the full five-method stealing comparison, with its breakdown.

Runs :func:`faststeal.runs.run_comparison` for a preset (``default``: the README's main job;
the target is ≤ 10 minutes on a 2-core CPU) in a fresh folder with a fresh victim cache, so the
victim is trained, not loaded, and reports: data loading, victim training, querying, each
method's training and evaluation (summed over seeds), the member sweep, and the rest (report
writing, probes, bookkeeping).

    python -m benchmarks.bench_e2e [--preset default|quick] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections import defaultdict
from typing import Any, Optional

import torch

from . import common

PRESETS: dict[str, dict[str, Any]] = {
    # name -> (experiment preset, overrides)
    "smoke": dict(preset="quick", overrides=dict(dataset="digits", budget=200, epochs=1, seeds=1,
                                                 victim_epochs=1, member_sweep=(), probe_size=64,
                                                 methods=("baseline", "deep-ensemble"))),
    "quick": dict(preset="quick", overrides={}),
    "default": dict(preset="default", overrides={}),
}

TARGET_S = 600.0  # the default comparison must finish in 10 minutes on the 2-core CPU


def run(device="cpu", preset: str = "default", log=print,
        keep: Optional[str] = None) -> dict[str, Any]:
    from faststeal.runs import Config, run_comparison
    from faststeal.results import ResultStore

    spec = PRESETS[preset]
    overrides = dict(spec["overrides"])
    fallback = None
    if overrides.get("dataset", "fashion-mnist") == "fashion-mnist":
        try:  # GPU machines may lack the dataset files (no download there): fall back to digits
            from faststeal.data.registry import load_raw
            load_raw("fashion-mnist")
        except Exception as exc:
            fallback = f"fashion-mnist unavailable ({common.short_error(exc, 100)}); used digits"
            overrides["dataset"] = "digits"
            log(f"  e2e: {fallback}")
    tmp = tempfile.mkdtemp(prefix="faststeal-e2e-")
    out = keep or os.path.join(tmp, "run")
    try:
        cfg = Config.from_preset(spec["preset"], out=out, cache_dir=os.path.join(tmp, "cache"),
                                 device=str(device), **overrides)
        cfg.progress = False
        cfg.force = True
        t0 = time.perf_counter()
        summary = run_comparison(cfg)
        wall = time.perf_counter() - t0
        store = ResultStore(out)
        try:
            cells = store.cells()
        finally:
            store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    timing = summary.get("timing", {})
    methods: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    sweep = {"train_s": 0.0, "eval_s": 0.0, "cells": 0}
    for c in cells:
        m = c["metrics"]
        if c["kind"] == "main":
            d = methods[c["method"]]
            d["train_s"] += float(m.get("train_seconds", c["seconds"]))
            d["eval_s"] += float(m.get("eval_seconds", 0.0))
            d["cells"] += 1
            d.setdefault("fidelity_sum", 0.0)
            d["fidelity_sum"] += float(m.get("fidelity", float("nan")))
        elif c["seconds"] > 0:  # a sweep cell identical to a main cell is stored with 0 s
            sweep["train_s"] += float(m.get("train_seconds", c["seconds"]))
            sweep["eval_s"] += float(m.get("eval_seconds", 0.0))
            sweep["cells"] += 1
        else:
            sweep["reused"] = sweep.get("reused", 0) + 1
    per_method = {}
    for name, d in methods.items():
        per_method[name] = {"train_s": d["train_s"], "eval_s": d["eval_s"],
                            "cells": int(d["cells"]),
                            "fidelity": d["fidelity_sum"] / max(1, d["cells"])}
    accounted = (timing.get("data_s", 0) + timing.get("victim_s", 0) + timing.get("query_s", 0)
                 + sum(v["train_s"] + v["eval_s"] for v in per_method.values())
                 + sweep["train_s"] + sweep["eval_s"])
    res = {"preset": preset, "experiment_preset": spec["preset"], "overrides": overrides,
           "dataset_fallback": fallback,
           "device": str(device), "wall_s": wall, "data_s": timing.get("data_s"),
           "victim_s": timing.get("victim_s"), "query_s": timing.get("query_s"),
           "methods": per_method, "sweep": sweep, "other_s": wall - accounted,
           "target_s": TARGET_S if spec["preset"] == "default" and not fallback else None}
    log(f"  e2e {preset}: {wall:.1f} s wall")
    return res


def markdown(res: dict[str, Any]) -> str:
    lines = [f"Preset `{res['experiment_preset']}`"
             + (f" with {res['overrides']}" if res["overrides"] else "")
             + f" on {res['device']}: **{res['wall_s']:.1f} s** wall"
             + (f" (target ≤ {res['target_s']:.0f} s)" if res.get("target_s") else "") + ".", ""]
    rows = [["data loading", res["data_s"], ""], ["victim training", res["victim_s"], ""],
            ["querying", res["query_s"], ""]]
    for name, d in res["methods"].items():
        rows.append([f"{name}: training ({d['cells']} seed(s))", d["train_s"],
                     f"fidelity {100 * d['fidelity']:.1f}%"])
        rows.append([f"{name}: evaluation", d["eval_s"], ""])
    if res["sweep"]["cells"]:
        rows.append([f"member sweep ({res['sweep']['cells']} cells): training",
                     res["sweep"]["train_s"], ""])
        rows.append(["member sweep: evaluation", res["sweep"]["eval_s"], ""])
    rows.append(["other (reports, probes, bookkeeping)", res["other_s"], ""])
    body = [[r[0], common.fmt(r[1]), f"{100 * (r[1] or 0) / res['wall_s']:.0f}%", r[2]]
            for r in rows]
    lines.append(common.markdown_table(["stage", "seconds", "share", "note"], body))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", choices=tuple(PRESETS), default="default")
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep", default=None, metavar="DIR",
                    help="run in DIR (must not exist) and keep its results; default: a temp folder")
    args = ap.parse_args(argv)
    if args.keep and os.path.exists(args.keep):
        ap.error(f"--keep {args.keep!r} exists; give a new folder (the run must start fresh)")
    dev = torch.device(args.device)
    res = run(dev, args.preset, keep=args.keep)
    res["meta"] = common.env_metadata(dev)
    print(markdown(res))
    if args.json:
        common.write_json(args.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
