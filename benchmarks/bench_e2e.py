"""Wall time of the full five-method stealing comparison, with its breakdown; and (``--compare``)
faststeal's whole ``steal()`` against the plain PyTorch loop a user would write.

Runs :func:`faststeal.runs.run_comparison` for a preset (``default``: the README's main job;
the target is ≤ 10 minutes on a 2-core CPU) in a fresh folder with a fresh victim cache, so the
victim is trained, not loaded, and reports: data loading, victim training, querying, each
method's training and evaluation (summed over seeds), the member sweep, and the rest (report
writing, probes, bookkeeping).

    python -m benchmarks.bench_e2e [--preset default|quick] [--device cpu] [--json out.json]

``--compare`` (the end-to-end comparison of docs/benchmarks.md): on Fashion-MNIST (digits where it
is missing) with a lenet victim, for each surrogate arch (mlp, lenet) and member count (S=5, 16)
and precision, ``faststeal.steal(victim, pool, test, budget, methods=["deep-ensemble"])`` —
querying, training, prediction and metrics, everything a user waits for — against the same S zoo
models trained one after another in a plain loop (``torch.optim.Adam``, batch 128, same epochs)
on the same queried images and labels, then evaluated as an ensemble (mean softmax). Configs
run interleaved over ``--rounds`` rounds (faststeal first in even rounds, the loop first in odd
ones); each reports its wall time and fidelity; the loop is timed without its victim queries
(``loop``) and with them (``loop+queries``, the oracle's time measured once per round); each × is
the loop's wall over the config's within one round, median over rounds (this VM changes speed
by up to 5x between rounds; the last column lists the rounds' × loop). For
all-Linear surrogates (mlp) each round also measures the GEMM+Adam floor of the run (see
``_gemm_adam_floor``): the run's matrix products alone plus the float32 Adam, whose × loop bounds
what an implementation on ATen's GEMMs with a float32 optimiser could reach on this host.
``--precision bf16-cast`` adds the bf16 run with the weights' bfloat16 copies off
(``FASTSTEAL_BF16_COPIES=0``: faststeal.master_weights), the cast path, in the same rounds.

    python -m benchmarks.bench_e2e --compare [--budget 10000] [--epochs 10] [--rounds 2]
        [--archs mlp,lenet] [--members 5,16] [--precision fp32,bf16] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections import defaultdict
from typing import Any, Optional
from unittest import mock

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

#: --compare: the batch size of steal(), the plain loop and the floor
BATCH_SIZE = 128

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


# ----------------------------------------------------------------------------- --compare

def _victim_and_data(device, epochs: Optional[int], dataset: str = "fashion-mnist",
                     victim_arch: str = "lenet", log=print):
    from faststeal.data.splits import make_splits
    from faststeal.victim import train_victim

    try:
        splits = make_splits(dataset, seed=0)
    except Exception as exc:  # no dataset files on this machine
        log(f"  compare: {dataset} unavailable ({common.short_error(exc, 100)}); digits")
        splits = make_splits("digits", seed=0)
    vic = train_victim(splits, victim_arch, seed=0, epochs=epochs, device=device, progress=False)
    log(f"  compare: victim {victim_arch} {100 * vic.test_accuracy:.1f}% on {splits.name} "
        f"({'trained' if vic.trained else 'cached'})")
    return splits, vic.model


def _plain_loop(arch: str, members: int, x, y, test_x, vlabels, epochs: int, batch_size: int,
                lr: float, seed: int) -> tuple[float, float]:
    """S zoo models trained one after another (a plain Adam loop); (seconds, fidelity)."""
    import torch.nn.functional as F

    from faststeal.models import build_model

    t0 = time.perf_counter()
    probs = 0.0
    n = x.shape[0]
    for m_i in range(members):
        torch.manual_seed(seed * 1000 + m_i)
        model = build_model(arch, tuple(x.shape[1:]), int(vlabels.max()) + 1).to(x.device)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(n, device=x.device)
            for i in range(0, n, batch_size):
                b = perm[i:i + batch_size]
                if b.numel() < 2:
                    continue
                loss = F.cross_entropy(model(x[b]), y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            probs = probs + torch.cat([model(test_x[i:i + 1024]).softmax(-1)
                                       for i in range(0, len(test_x), 1024)])
    wall = time.perf_counter() - t0
    fid = float((probs.argmax(-1) == vlabels).float().mean())
    return wall, fid


def _gemm_adam_floor(arch: str, members: int, precision: str, in_shape, classes: int,
                     rows: int, epochs: int, batch_size: int, device) -> Optional[float]:
    """A floor, in seconds, for training an S-member ``arch`` ensemble ``epochs`` times over
    ``rows`` examples on this host with ATen's GEMMs: per step, each layer's products alone —
    the forward, dW, and dX for every layer but the first; no bias, activation, loss, autograd
    or casts — each at the fastest of three routes (one ``torch.bmm`` over the stacked views,
    one ``torch.bmm`` after making its operands contiguous, copies included, and one
    ``torch.mm`` per member; for bf16 a fourth, one float32 ``torch.bmm`` of float32 copies,
    casts included, as faststeal's ``cpp:upcast`` does where the CPU lacks bfloat16
    arithmetic), in the run's compute dtype and the stacked (S, N, K) weight layout; a bf16
    route whose first call takes over 4x (and 50 ms more than) the best time so far is not
    timed further; plus the float32 fused Adam over the S members' parameters (the master
    weights the issue's rules keep); every time the fastest measured. The steps are those of the
    plain loop (and ``Method.fit``): ``rows // batch_size`` full batches and the remainder when
    it has at least 2 rows. Everything else costs nothing here, so ``loop wall / floor`` bounds
    what an implementation on these GEMMs and a float32 optimiser could gain over the loop. None
    unless every module with parameters is an ``nn.Linear`` (convolutions, norms ... have no
    such floor here).
    """
    from faststeal.models import build_model
    from faststeal.train_step import PRECISIONS

    model = build_model(arch, tuple(in_shape), classes)
    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    if not owners or not all(isinstance(m, torch.nn.Linear) for m in owners):
        return None
    dtype = PRECISIONS[precision] or torch.float32
    s = members

    def fastest(a, b) -> float:  # ms of the fastest route for the (S, M, K) @ (S, K, N) product
        routes = [lambda: torch.bmm(a, b), lambda: torch.bmm(a.contiguous(), b.contiguous()),
                  lambda: [torch.mm(a[i], b[i]) for i in range(s)]]
        if dtype != torch.float32:
            routes.insert(0, lambda: torch.bmm(a.float(), b.float()).to(dtype))
        best = float("inf")
        for f in routes:
            t0 = time.perf_counter()
            f()
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)
            once = (time.perf_counter() - t0) * 1e3
            # a bf16 route far slower than the best (ATen's fallback GEMM on a CPU without bf16
            # arithmetic: seconds) is not worth timing; float32 routes are all timed
            if dtype == torch.float32 or once <= 4 * best or once - best < 50.0:
                best = min(best, once, common.bench(f, device, min_run_time=0.05).min_ms)
        return best

    def step_gemms_ms(bsz: int) -> float:
        total = 0.0
        for i, lin in enumerate(owners):
            k, n = lin.in_features, lin.out_features
            x = torch.randn(s, bsz, k, device=device, dtype=dtype)
            w = torch.randn(s, n, k, device=device, dtype=dtype)
            dy = torch.randn(s, bsz, n, device=device, dtype=dtype)
            total += fastest(x, w.mT) + fastest(dy.mT, x)  # forward, dW
            if i > 0:
                total += fastest(dy, w)  # dX
        return total

    params = [torch.randn(s, *p.shape, device=device) for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.Adam(params, lr=1e-3, fused=True)
    adam_ms = common.bench(opt.step, device, min_run_time=0.1).min_ms
    full, rest = divmod(rows, batch_size)
    ms = full * (step_gemms_ms(batch_size) + adam_ms)
    if rest >= 2:
        ms += step_gemms_ms(rest) + adam_ms
    return ms * epochs / 1e3


def compare(device="cpu", budget: int = 10000, epochs: int = 10, rounds: int = 2,
            archs=("mlp", "lenet"), members=(5, 16), precisions=("fp32",),
            victim_epochs: Optional[int] = None, dataset: str = "fashion-mnist",
            victim_arch: str = "lenet", log=print) -> dict[str, Any]:
    """faststeal.steal (Deep Ensemble) vs the plain loop, interleaved; see the module docstring."""
    import faststeal
    from faststeal import master_weights
    from faststeal.attack import random_queries
    from faststeal.train_step import PRECISIONS

    allowed = (*PRECISIONS, "bf16-cast")
    bad = [p for p in precisions if p not in allowed]
    if bad:
        raise ValueError(f"precisions must be among {allowed}, got {bad}")
    device = torch.device(device)
    splits, victim = _victim_and_data(device, victim_epochs, dataset, victim_arch, log)
    pool_x, test_x = splits.pool.x, splits.test.x.to(device)
    idx = random_queries(len(pool_x), budget, 0)  # steal()'s own queries (query_seed 0)
    with torch.no_grad():
        vlabels = torch.cat([victim(test_x[i:i + 1024]).argmax(-1)
                             for i in range(0, len(test_x), 1024)])
    rows: list[dict[str, Any]] = []
    configs = [(a, s, p) for a in archs for s in members for p in precisions]
    for r in range(rounds):
        t0 = time.perf_counter()
        with torch.no_grad():
            qx = pool_x[idx].to(device)
            qy = torch.cat([victim(qx[i:i + 1024]).argmax(-1) for i in range(0, len(qx), 1024)])
        query_s = time.perf_counter() - t0
        for arch, s, prec in configs:
            floor = None if prec == "bf16-cast" else _gemm_adam_floor(
                arch, s, prec, qx.shape[1:], int(vlabels.max()) + 1, len(qx), epochs, BATCH_SIZE,
                device)
            if floor is not None:
                rows.append({"round": r, "who": "floor", "arch": arch, "S": s,
                             "precision": prec, "wall_s": floor, "fidelity": None})
                log(f"  round {r} {arch} S={s} GEMM+Adam floor[{prec}] {floor:.1f} s")
            order = ("faststeal", "loop") if r % 2 == 0 else ("loop", "faststeal")
            for who in order:
                if who == "loop" and prec != "fp32":
                    continue  # the plain loop is the fp32 baseline
                if who == "faststeal":
                    cast = {master_weights.ENV: "0"} if prec == "bf16-cast" else {}
                    t0 = time.perf_counter()
                    with mock.patch.dict(os.environ, cast):
                        out = faststeal.steal(victim, pool_x, (splits.test.x, splits.test.y),
                                              budget, methods=["deep-ensemble"],
                                              surrogate_arch=arch, epochs=epochs,
                                              batch_size=BATCH_SIZE, device=str(device),
                                              progress=False,
                                              method_params={"deep-ensemble": {"members": s}},
                                              precision=prec.split("-")[0])
                    wall = time.perf_counter() - t0
                    fid = out["results"]["deep-ensemble"][0]["fidelity"]
                    rows.append({"round": r, "who": "faststeal", "arch": arch, "S": s,
                                 "precision": prec, "wall_s": wall, "fidelity": fid})
                else:
                    wall, fid = _plain_loop(arch, s, qx, qy, test_x, vlabels, epochs, BATCH_SIZE,
                                            1e-3, seed=r)
                    rows.append({"round": r, "who": "loop", "arch": arch, "S": s,
                                 "precision": "fp32", "wall_s": wall, "fidelity": fid,
                                 "query_s": query_s})
                last = rows[-1]
                log(f"  round {r} {arch} S={s} {last['who']}[{last['precision']}] "
                    f"{last['wall_s']:.1f} s, fidelity {100 * last['fidelity']:.2f}%")
    return {"budget": budget, "epochs": epochs, "rounds": rounds, "rows": rows,
            "dataset": splits.name}


def compare_markdown(res: dict[str, Any]) -> str:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in res["rows"]:
        groups[(row["arch"], row["S"], row["who"], row["precision"])].append(row)

    def paired(loop: list[dict], rows: list[dict], queries: bool) -> Optional[float]:
        # the loop's wall over this run's, within each round (the VM's speed changes between
        # rounds by up to 5x), then the median over rounds: common.paired_ratio
        ref = {r["round"]: r["wall_s"] + (r["query_s"] if queries else 0.0) for r in loop}
        this = {r["round"]: r["wall_s"] for r in rows}
        both = sorted(set(ref) & set(this))
        if not both:
            return None
        return common.paired_ratio({"round_ms": [ref[k] for k in both]},
                                   {"round_ms": [this[k] for k in both]})

    def per_round(loop: list[dict], rows: list[dict]) -> str:
        # the paired ratios the median is taken over, in round order: this VM's spread
        ref = {r["round"]: r["wall_s"] for r in loop}
        xs = [ref[r["round"]] / r["wall_s"] for r in sorted(rows, key=lambda r: r["round"])
              if r["round"] in ref and r["wall_s"] > 0]
        return " / ".join(f"{x:.2f}" for x in xs) or "—"

    head = ["surrogate", "S", "run", "wall s (min–max)", "fidelity % (mean)", "× loop",
            "× loop+queries", "× loop per round"]
    body = []
    for (arch, s, who, prec), rs in sorted(groups.items()):
        walls = [r["wall_s"] for r in rs]
        loop = groups.get((arch, s, "loop", "fp32"), [])
        label = {"faststeal": f"faststeal[{prec}]", "floor": f"GEMM+Adam floor[{prec}]"}
        # (loop + queries) / floor would compare a run with queries to one without
        x, xq = paired(loop, rs, False), None if who == "floor" else paired(loop, rs, True)
        body.append([arch, s, label.get(who, "plain loop"),
                     f"{min(walls):.1f}–{max(walls):.1f}",
                     "—" if who == "floor" else
                     f"{100 * sum(r['fidelity'] for r in rs) / len(rs):.2f}",
                     common.fmt_x(x) if x else "—", common.fmt_x(xq) if xq else "—",
                     "—" if who == "loop" else per_round(loop, rs)])
    return (f"`steal()` Deep Ensemble vs the plain loop, {res['dataset']}, budget {res['budget']}, "
            f"{res['epochs']} epochs, {res['rounds']} interleaved round(s) (× = the loop's wall / "
            f"this run's wall in the same round, median over rounds; a GEMM+Adam floor row is the "
            f"time the run's matrix products alone (each at its fastest ATen route) and the "
            f"float32 fused Adam take, so its × bounds what an implementation on ATen's GEMMs "
            f"with a float32 optimiser could reach):\n\n"
            + common.markdown_table(head, body))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compare", action="store_true",
                    help="steal() vs the plain loop (see above) instead of the comparison preset")
    ap.add_argument("--budget", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--archs", default="mlp,lenet")
    ap.add_argument("--members", default="5,16")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--preset", choices=tuple(PRESETS), default="default")
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep", default=None, metavar="DIR",
                    help="run in DIR (must not exist) and keep its results; default: a temp folder")
    args = ap.parse_args(argv)
    if args.keep and os.path.exists(args.keep):
        ap.error(f"--keep {args.keep!r} exists; give a new folder (the run must start fresh)")
    dev = torch.device(args.device)
    if args.compare:
        res = compare(dev, args.budget, args.epochs, args.rounds, tuple(args.archs.split(",")),
                      tuple(int(v) for v in args.members.split(",")),
                      tuple(args.precision.split(",")))
        res["meta"] = common.env_metadata(dev)
        print(compare_markdown(res))
        if args.json:
            common.write_json(args.json, res)
        return 0
    res = run(dev, args.preset, keep=args.keep)
    res["meta"] = common.env_metadata(dev)
    print(markdown(res))
    if args.json:
        common.write_json(args.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
