"""Runners for the studies beyond the paper: active stealing, diversity-keeping ensembles and
defended victims. Each writes JSON, a markdown table and PNG figures into an output folder.

* :func:`run_active_study` — every query strategy (:mod:`faststeal.query`) through the active loop
  (:mod:`faststeal.active`) for several seeds; fidelity against budget of the retrained surrogate
  (query quality alone) and of the strategy's running surrogate, paired differences to ``random``,
  the scoring cost per round, and a timing of the fused ``member_stats`` pass against the eager
  reference on the whole pool.
* :func:`run_diversity_study` — the plain Deep Ensemble and every variant of
  :mod:`faststeal.methods.diverse` trained on the same random queries with the same seeds, epochs
  and batch size: V(t) on a probe set, fidelity, mean member fidelity, ensemble gain.
* :func:`run_defense_study` — every defence of :mod:`faststeal.defenses` in front of the same
  victim, the same random query indices, every method × seed; fidelity against the UNDEFENDED
  victim. With an active study in the same output folder, PRADA is also replayed on every
  strategy's recorded query stream (when would it have refused?).

Layout: ``OUT/<study>/cells/*.json`` holds one finished unit of work each (a strategy × seed, a
variant × seed, a defence × method × seed); a rerun with the same settings skips finished cells
(resume), different settings raise unless ``force=True``. After every cell the summary
(``results.json``, ``results.md``) is rewritten; figures at the end. Every file is written
atomically (temporary file + ``os.replace``).

Command line: ``python -m faststeal.studies {active,diversity,defense,all} --out runs/studies``
(``--help`` for the options; ``--quick`` for a smoke-test scale).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from .query import STRATEGIES

DIVERSITY_VARIANTS = ("deep-ensemble", "shared-batch-de", "bootstrap-ensemble", "hetero-ensemble",
                      "hparam-ensemble", "ncl-ensemble", "ncl-strong", "repulsive-ensemble")
#: label -> hyperparameters (``method`` picks the class when the label is not a method name).
#: ``shared-batch-de`` is the control for the penalised variants: NCL at strength 0, i.e. a Deep
#: Ensemble whose members share every batch (the penalties need the same inputs per member).
DIVERSITY_PARAMS: dict[str, dict[str, Any]] = {
    "shared-batch-de": {"method": "ncl-ensemble", "strength": 0.0},
    "hetero-ensemble": {"archs": ["mlp", "lenet"]},
    "ncl-ensemble": {"strength": 2.0},
    "ncl-strong": {"method": "ncl-ensemble", "strength": 8.0},
    "repulsive-ensemble": {"strength": 0.2},
}
DEFENSE_METHODS = ("baseline", "deep-ensemble", "mc-dropout", "bbb", "swag", "laplace")
DEFENSE_SETTINGS: dict[str, dict[str, Any]] = {
    "none": {}, "top1": {}, "rounding": {"decimals": 1}, "noise": {"sigma": 0.1},
    "reverse-sigmoid": {"beta": 1.0, "gamma": 0.1}, "prada": {"delta": 0.9}}


# ------------------------------------------------------------------------------ files

def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
    return path


def atomic_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write(path, json.dumps(obj, indent=1, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (tuple, set)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _save_fig(fig: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    os.replace(tmp, path)
    return path


class CellStore:
    """One JSON per finished cell under ``root/cells``; settings pinned in ``settings.json``.

    A rerun must have the same settings (their digest; ``victim_epochs`` is left out of it since
    the victim is pinned by its checkpoint instead) and the same victim checkpoint (``victim``:
    the file name of the cached victim). Otherwise ValueError, or with ``force`` the old cells
    are discarded: cells computed against different victims are never mixed.
    """

    def __init__(self, root: Path, settings: dict[str, Any], force: bool = False,
                 victim: Optional[str] = None) -> None:
        self.root = root
        self.cells_dir = root / "cells"

        def digest_of(d: dict[str, Any]) -> str:
            return hashlib.sha256(json.dumps(d, sort_keys=True, default=_json_default)
                                  .encode()).hexdigest()[:16]

        digest = digest_of({k: v for k, v in settings.items() if k != "victim_epochs"})
        # folders written before victims were pinned (victim_epochs was None there; their
        # victim is recorded from this run on)
        legacy = digest_of({**settings, "victim_epochs": None})
        meta = root / "settings.json"
        if meta.exists():
            old = json.loads(meta.read_text())
            problem = None
            if old.get("digest") not in (digest, legacy):
                problem = (f"different settings (digest {old.get('digest')} != {digest})")
            elif victim and old.get("victim") and old["victim"] != victim:
                problem = (f"another victim ({old['victim']}; this run's is {victim}: pin it "
                           "with --victim-epochs)")
            if problem:
                if not force:
                    raise ValueError(f"{root} holds cells of a study with {problem}; use another "
                                     "--out or force=True / --force to discard them")
                shutil.rmtree(self.cells_dir, ignore_errors=True)
            elif not victim:
                victim = old.get("victim")
        atomic_json(meta, {"digest": digest, "victim": victim, "settings": settings})
        self.cells_dir.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _name(key: str) -> str:
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in key) + ".json"

    def has(self, key: str) -> bool:
        return (self.cells_dir / self._name(key)).exists()

    def put(self, key: str, value: dict[str, Any]) -> None:
        atomic_json(self.cells_dir / self._name(key), {"key": key, **value})

    def all(self) -> list[dict[str, Any]]:
        return read_cells(self.root)


def read_cells(root: str | os.PathLike) -> list[dict[str, Any]]:
    """The finished cells of the study in ``root`` (no settings check)."""
    return [json.loads(p.read_text()) for p in sorted(Path(root, "cells").glob("*.json"))]


# ------------------------------------------------------------------------------ shared set-up

@dataclass
class Setup:
    """The experimenter's side: data, victim, evaluation tensors on the device."""

    splits: Any
    victim: torch.nn.Module
    victim_accuracy: float
    test_x: torch.Tensor
    test_y: torch.Tensor
    victim_probs: torch.Tensor
    victim_labels: torch.Tensor
    probe: torch.Tensor
    info: dict[str, Any]


def prepare(dataset: str = "fashion-mnist", victim_arch: str = "lenet", split_seed: int = 0,
            victim_fraction: float = 0.5, victim_epochs: Optional[int] = None,
            device: str = "cpu", cache_dir: Optional[str] = None, probe_size: int = 1000,
            max_test: Optional[int] = None, progress: bool = True) -> Setup:
    """Splits, the (cached) victim, its test-set outputs and a probe subset of the test set."""
    from .attack import victim_outputs
    from .data import make_splits
    from .victim import train_victim

    t0 = time.perf_counter()
    splits = make_splits(dataset, seed=split_seed, victim_fraction=victim_fraction,
                         max_test=max_test)
    vic = train_victim(splits, victim_arch, seed=split_seed, epochs=victim_epochs,
                       device=device, cache_dir=cache_dir, progress=progress)
    victim = vic.model.to(device).eval()
    test_x, test_y = splits.test.x.to(device), splits.test.y.to(device)
    vprobs = victim_outputs(victim, test_x)
    g = torch.Generator().manual_seed(split_seed + 2)
    probe = test_x[torch.randperm(len(test_x), generator=g)[:probe_size].to(device)]
    info = {"dataset": dataset, "victim_arch": victim_arch, "victim_test_accuracy":
            vic.test_accuracy, "victim_trained_now": vic.trained, "victim_checkpoint":
            os.path.basename(vic.cache_path) if vic.cache_path else None,
            "victim_epochs": victim_epochs, "split_seed": split_seed,
            "pool": len(splits.pool), "test": len(splits.test), "setup_seconds":
            time.perf_counter() - t0, **machine_info(device)}
    return Setup(splits, victim, vic.test_accuracy, test_x, test_y, vprobs, vprobs.argmax(-1),
                 probe, info)


def machine_info(device: str) -> dict[str, Any]:
    dev = torch.device(device)
    info = {"machine": platform.platform(), "processor": platform.processor() or
            platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": str(dev)}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _mean_std(vals: Iterable[float]) -> tuple[float, float, int]:
    v = [float(x) for x in vals if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return float("nan"), float("nan"), 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)


def _fmt(m: float, s: float, pct: bool = True, digits: int = 1) -> str:
    if math.isnan(m):
        return "—"
    k = 100.0 if pct else 1.0
    return f"{k * m:.{digits}f} ± {k * s:.{digits}f}"


def _bar(total: int, desc: str, progress: bool):
    from .progress import progress_bar
    return progress_bar(total=total, desc=desc, unit="cell", disable=not progress)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# ------------------------------------------------------------------------------ active study

def scoring_benchmark(members: int, rows: int, classes: int, device: str,
                      repeats: int = 10) -> dict[str, Any]:
    """Median seconds of one fused ``member_stats`` pass over (S, rows, C) logits vs the eager
    reference (``faststeal.ops.reference``), on ``device``; and the backend that ran."""
    from . import ops
    from .ops import dispatch, reference

    x = torch.randn(members, rows, classes, device=device)

    def timeit(fn) -> float:
        fn()
        _sync(device)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts))

    fused = timeit(lambda: ops.member_stats(x))
    eager = timeit(lambda: reference.member_stats_fwd(x, None))
    return {"shape": [members, rows, classes], "device": device,
            "backend": dispatch.resolve("member_stats", torch.device(device).type),
            "fused_seconds": fused, "reference_seconds": eager,
            "speedup": eager / fused if fused > 0 else float("nan")}


def run_active_study(out: str | os.PathLike, *, strategies: Sequence[str] = STRATEGIES,
                     checkpoints: Sequence[int] = (500, 1000, 2000, 4000), seeds: int = 3,
                     method: str = "deep-ensemble", members: int = 5, arch: str = "mlp",
                     epochs: int = 10, min_steps: int = 0, round_epochs: int = 2,
                     round_size: Optional[int] = None,
                     seed_fraction: float = 0.1, batch_size: int = 128, lr: float = 1e-3,
                     candidates: Optional[int] = None, eval_seed_offset: int = 0,
                     output_mode: str = "label",
                     dataset: str = "fashion-mnist", victim_arch: str = "lenet",
                     victim_epochs: Optional[int] = None, device: str = "cpu",
                     cache_dir: Optional[str] = None, max_test: Optional[int] = None,
                     setup: Optional[Setup] = None, force: bool = False,
                     progress: bool = True) -> dict[str, Any]:
    """Every strategy × seed through the active loop; writes ``OUT/active/``."""
    from .active import ActiveConfig, run_active
    from .oracle import Oracle

    settings = dict(strategies=list(strategies), checkpoints=list(checkpoints), seeds=seeds,
                    method=method, members=members, arch=arch, epochs=epochs,
                    min_steps=min_steps, round_epochs=round_epochs, round_size=round_size,
                    seed_fraction=seed_fraction, batch_size=batch_size, lr=lr,
                    candidates=candidates, output_mode=output_mode, dataset=dataset,
                    victim_arch=victim_arch, victim_epochs=victim_epochs, max_test=max_test)
    if eval_seed_offset:  # only when set, so earlier runs' settings digests stay valid
        settings["eval_seed_offset"] = eval_seed_offset
    setup = setup or prepare(dataset, victim_arch, victim_epochs=victim_epochs, device=device,
                             cache_dir=cache_dir, max_test=max_test, progress=progress)
    root = Path(out) / "active"
    store = CellStore(root, settings, force, setup.info.get("victim_checkpoint"))
    pool_x = setup.splits.pool.x
    hp = {"members": members} if method != "baseline" else {}
    todo = [(s, k) for k in range(seeds) for s in strategies if not store.has(f"{s}_seed{k}")]
    bar = _bar(len(todo), "active study", progress)
    for strategy, seed in todo:
        oracle = Oracle(setup.victim, pool_x, int(checkpoints[-1]), output_mode=output_mode,
                        device=device)
        cfg = ActiveConfig(strategy=strategy,
                           strategy_params={} if candidates is None else {"candidates":
                                                                          candidates},
                           checkpoints=list(checkpoints), seed_fraction=seed_fraction,
                           round_size=round_size, method=method, arch=arch, hparams=hp,
                           epochs=epochs, min_steps=min_steps, round_epochs=round_epochs,
                           batch_size=batch_size,
                           lr=lr, seed=seed, eval_seed_offset=eval_seed_offset)
        res = run_active(oracle, cfg, test_x=setup.test_x, victim_labels=setup.victim_labels,
                         test_y=setup.test_y, device=device, progress=progress)
        res["strategy_params"] = res.pop("strategy")
        store.put(f"{strategy}_seed{seed}", {**res, "strategy": strategy, "seed": seed})
        bar.update(1)
        if res["checkpoints"]:
            last = res["checkpoints"][-1]["retrained"]["fidelity"]
            bar.set_postfix(strategy=strategy, seed=seed, fid=f"{last:.3f}")
        _active_summary(root, store, setup, settings, with_figures=False)
    bar.close()
    bench = scoring_benchmark(members if method != "baseline" else 1, len(pool_x),
                              setup.splits.num_classes, device)
    return _active_summary(root, store, setup, settings, with_figures=True, bench=bench)


def _active_summary(root: Path, store: CellStore, setup: Setup, settings: dict[str, Any],
                    with_figures: bool, bench: Optional[dict] = None) -> dict[str, Any]:
    cells = store.all()
    strategies = [s for s in settings["strategies"] if any(c["strategy"] == s for c in cells)]
    cps = settings["checkpoints"]

    def fid(strategy: str, which: str) -> dict[int, dict[int, float]]:
        out: dict[int, dict[int, float]] = {}
        for c in cells:
            if c["strategy"] != strategy:
                continue
            for cp in c["checkpoints"]:
                out.setdefault(cp["budget"], {})[c["seed"]] = cp[which]["fidelity"]
        return out

    table: dict[str, dict[str, Any]] = {}
    for s in strategies:
        table[s] = {}
        for which in ("retrained", "running"):
            f, base = fid(s, which), fid("random", which)
            rows = {}
            for b in cps:
                vals = f.get(b, {})
                m, sd, n = _mean_std(vals.values())
                paired = [vals[k] - base[b][k] for k in vals if b in base and k in base[b]]
                dm, dsd, dn = _mean_std(paired)
                rows[str(b)] = {"mean": m, "std": sd, "n": n, "delta_vs_random": dm,
                                "delta_std": dsd, "wins_vs_random": int(sum(d > 0 for d in paired)),
                                "paired": dn}
            table[s][which] = rows
    cost: dict[str, dict[str, float]] = {}
    for s in strategies:
        rounds = [r for c in cells if c["strategy"] == s for r in c["rounds"]]
        if not rounds:
            continue
        cost[s] = {k: float(np.mean([r.get(f"{k}_seconds", 0.0) for r in rounds]))
                   for k in ("forward", "stats", "features", "select", "total", "train")}
        cost[s]["candidates"] = 0.0 if s == "random" else float(np.mean([r["candidates"]
                                                                         for r in rounds]))
        cost[s]["rounds_per_run"] = len(rounds) / max(1, sum(c["strategy"] == s for c in cells))
    summary = {"study": "active", "settings": settings, "setup": setup.info, "fidelity": table,
               "cost_per_round": cost, "cells": len(cells),
               "seconds": {c["key"]: c["seconds"] for c in cells}}
    if bench is not None:
        summary["member_stats_benchmark"] = bench
    atomic_json(root / "results.json", summary)
    atomic_write(root / "results.md", _active_markdown(summary))
    if with_figures and cells:
        _active_figure(root, table, strategies, cps, settings)
    return summary


def _active_markdown(s: dict[str, Any]) -> str:
    st, info = s["settings"], s["setup"]
    lines = [f"# Active stealing: fidelity vs budget ({st['dataset']}, victim {st['victim_arch']} "
             f"{100 * info['victim_test_accuracy']:.2f}% test acc., surrogate {st['method']} "
             f"S={st['members']} {st['arch']}, {st['output_mode']} answers)", "",
             f"Seeds per cell: {st['seeds']}; mean ± std (sample std) of test-set fidelity in %. "
             "Δ = paired difference to `random` (same seed: same seed set, same initialisation), "
             "wins = seeds where the strategy beat random.", ""]
    cps = [str(b) for b in st["checkpoints"]]
    off = st.get("eval_seed_offset", 0)
    init = (f"another initialisation (seed + {off})" if off
            else "the same initialisation")
    for which, title in (("retrained", f"Retrained from {init} on exactly the queried set "
                          "(query quality alone)"),
                         ("running", "The strategy's own running surrogate")):
        lines += [f"## {title}", "", "| strategy | " + " | ".join(cps) + " |",
                  "|---|" + "---|" * len(cps)]
        for strat, rows in s["fidelity"].items():
            cells = []
            for b in cps:
                r = rows[which][b]
                txt = _fmt(r["mean"], r["std"])
                if strat != "random" and r["paired"]:
                    txt += (f" (Δ {100 * r['delta_vs_random']:+.1f}, "
                            f"{r['wins_vs_random']}/{r['paired']})")
                cells.append(txt)
            lines.append(f"| {strat} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Selection cost per round (mean seconds)", "",
              "| strategy | candidates | forward | member_stats | features | k-center/top-k | "
              "selection total | surrogate training |", "|---|---|---|---|---|---|---|---|"]
    for strat, c in s["cost_per_round"].items():
        lines.append(f"| {strat} | {c['candidates']:.0f} | {c['forward']:.3f} | {c['stats']:.4f} "
                     f"| {c['features']:.3f} | {c['select']:.3f} | {c['total']:.3f} | "
                     f"{c['train']:.2f} |")
    if "member_stats_benchmark" in s:
        b = s["member_stats_benchmark"]
        lines += ["", f"Fused `member_stats` on the whole pool {tuple(b['shape'])} on "
                  f"{b['device']} "
                  f"(backend `{b['backend']}`): {1e3 * b['fused_seconds']:.2f} ms vs the eager "
                  f"reference {1e3 * b['reference_seconds']:.2f} ms ({b['speedup']:.1f}×)."]
    lines += ["", f"Machine: {info.get('gpu', info['processor'])}, torch {info['torch']}, "
              f"device {info['device']}; total cell time {sum(s['seconds'].values()):.0f} s."]
    return "\n".join(lines) + "\n"


def _active_figure(root: Path, table: dict, strategies: list[str], cps: list[int],
                   settings: dict[str, Any]) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, which, title in ((axes[0], "retrained", "retrained on the queried set"),
                             (axes[1], "running", "running surrogate")):
        for s in strategies:
            rows = table[s][which]
            m = np.array([rows[str(b)]["mean"] for b in cps]) * 100
            sd = np.array([rows[str(b)]["std"] for b in cps]) * 100
            style = dict(lw=2.4, color="black") if s == "random" else dict(lw=1.4)
            (line,) = ax.plot(cps, m, marker="o", ms=3, label=s, **style)
            ax.fill_between(cps, m - sd, m + sd, alpha=0.12, color=line.get_color())
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(cps)
        ax.set_xticklabels([str(b) for b in cps])
        ax.set_xlabel("queries (budget)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fidelity to the victim (%)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Active stealing, {settings['dataset']}: mean ± std over "
                 f"{settings['seeds']} seeds", fontsize=10)
    _save_fig(fig, root / "fidelity_vs_budget.png")
    plt.close(fig)


# ------------------------------------------------------------------------------ diversity study

def run_diversity_study(out: str | os.PathLike, *, variants: Sequence[str] = DIVERSITY_VARIANTS,
                        variant_params: Optional[dict[str, dict]] = None, budget: int = 2000,
                        seeds: int = 3, members: int = 5, arch: str = "mlp", epochs: int = 10,
                        batch_size: int = 128, lr: float = 1e-3, record_every: int = 10,
                        output_mode: str = "label", dataset: str = "fashion-mnist",
                        victim_arch: str = "lenet", victim_epochs: Optional[int] = None,
                        device: str = "cpu", cache_dir: Optional[str] = None,
                        max_test: Optional[int] = None, probe_size: int = 1000,
                        setup: Optional[Setup] = None, force: bool = False,
                        progress: bool = True) -> dict[str, Any]:
    """The Deep Ensemble and each diversity-keeping variant on the same random queries."""
    from .active import evaluate_surrogate, make_method
    from .attack import query as ask, random_queries
    from .oracle import Oracle

    variant_params = {k: dict(v) for k, v in {**DIVERSITY_PARAMS, **(variant_params or {})}.items()
                      if k in variants}
    settings = dict(variants=list(variants), variant_params=variant_params, budget=budget,
                    seeds=seeds, members=members, arch=arch, epochs=epochs,
                    batch_size=batch_size, lr=lr, record_every=record_every,
                    output_mode=output_mode, dataset=dataset, victim_arch=victim_arch,
                    victim_epochs=victim_epochs, max_test=max_test, probe_size=probe_size)
    setup = setup or prepare(dataset, victim_arch, victim_epochs=victim_epochs, device=device,
                             cache_dir=cache_dir, max_test=max_test, probe_size=probe_size,
                             progress=progress)
    root = Path(out) / "diversity"
    store = CellStore(root, settings, force, setup.info.get("victim_checkpoint"))
    oracle = Oracle(setup.victim, setup.splits.pool.x, budget, output_mode=output_mode,
                    device=device)
    idx = random_queries(len(setup.splits.pool), budget, 1)
    targets, _ = ask(oracle, idx, progress=False)
    x, y = setup.splits.pool.x[idx].to(device), targets.to(device)
    probe = setup.probe[:probe_size]
    todo = [(v, k) for k in range(seeds) for v in variants if not store.has(f"{v}_seed{k}")]
    bar = _bar(len(todo), "diversity study", progress)
    for variant, seed in todo:
        hp = {"members": members, **variant_params.get(variant, {})}
        method = hp.pop("method", variant)
        t0 = time.perf_counter()
        m = make_method(method, arch, tuple(x.shape[1:]), setup.splits.num_classes, seed=seed,
                        device=device, **hp)
        m.fit(x, y, epochs=epochs, batch_size=batch_size, lr=lr, probe=probe,
              record_every=record_every, progress=False)
        _sync(device)
        train_s = time.perf_counter() - t0
        metrics = evaluate_surrogate(m, setup.test_x, setup.victim_labels, setup.test_y)
        store.put(f"{variant}_seed{seed}", {"variant": variant, "method": method, "seed": seed,
                                            "metrics": metrics,
                                            "trace": m.trace, "hparams": m.hparams(),
                                            "train_seconds": train_s})
        bar.update(1)
        bar.set_postfix(variant=variant, fid=f"{metrics['fidelity']:.3f}",
                        V=f"{metrics['variance']:.1e}")
        _diversity_summary(root, store, setup, settings, with_figures=False)
    bar.close()
    return _diversity_summary(root, store, setup, settings, with_figures=True)


def _diversity_summary(root: Path, store: CellStore, setup: Setup, settings: dict[str, Any],
                       with_figures: bool) -> dict[str, Any]:
    cells = store.all()
    variants = [v for v in settings["variants"] if any(c["variant"] == v for c in cells)]
    keys = ("fidelity", "accuracy", "mean_member_fidelity", "ensemble_gain", "variance",
            "mutual_info", "disagreement")
    base = {c["seed"]: c for c in cells if c["variant"] == "deep-ensemble"}
    table: dict[str, dict[str, Any]] = {}
    for v in variants:
        cs = [c for c in cells if c["variant"] == v]
        row: dict[str, Any] = {k: _mean_std(c["metrics"][k] for c in cs)[:2] for k in keys}
        vpeak = [max(t["variance"] for t in c["trace"]) for c in cs]
        vfinal = [c["trace"][-1]["variance"] for c in cs]
        row["v_peak"] = _mean_std(vpeak)[:2]
        row["v_final_over_peak"] = _mean_std(f / p if p > 0 else float("nan")
                                             for f, p in zip(vfinal, vpeak, strict=True))[:2]
        paired = [c["metrics"]["fidelity"] - base[c["seed"]]["metrics"]["fidelity"]
                  for c in cs if c["seed"] in base]
        row["delta_fidelity_vs_de"] = _mean_std(paired)[:2]
        row["wins_vs_de"] = [int(sum(d > 0 for d in paired)), len(paired)]
        pv = [c["metrics"]["variance"] / base[c["seed"]]["metrics"]["variance"]
              for c in cs if c["seed"] in base and base[c["seed"]]["metrics"]["variance"] > 0]
        row["v_ratio_vs_de"] = _mean_std(pv)[:2]
        row["train_seconds"] = _mean_std(c["train_seconds"] for c in cs)[:2]
        row["n"] = len(cs)
        table[v] = row
    summary = {"study": "diversity", "settings": settings, "setup": setup.info, "table": table,
               "cells": len(cells)}
    atomic_json(root / "results.json", summary)
    atomic_write(root / "results.md", _diversity_markdown(summary))
    if with_figures and cells:
        _diversity_figure(root, cells, variants, settings)
    return summary


def _diversity_markdown(s: dict[str, Any]) -> str:
    st, info = s["settings"], s["setup"]
    lines = [f"# Diversity-keeping ensembles ({st['dataset']}, victim {st['victim_arch']} "
             f"{100 * info['victim_test_accuracy']:.2f}%, {st['budget']} random "
             f"{st['output_mode']} "
             f"queries, S={st['members']} {st['arch']} members, {st['epochs']} epochs)", "",
             f"Mean ± std over {st['seeds']} seeds (same seeds and queried set for every variant). "
             "Fidelity, mean member fidelity and ensemble gain in %; V = mean_x mean_c Var_s "
             "p_s(c|x) on the test set; V/V(DE) is the paired ratio to the plain Deep Ensemble; "
             "V final/peak from the probe-set trace.", "",
             "| variant | fidelity | Δ vs DE (wins) | mean member fid. | ensemble gain | V | "
             "V / V(DE) | V final/peak | MI | disagreement | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for v, r in s["table"].items():
        d, wins = r["delta_fidelity_vs_de"], r["wins_vs_de"]
        delta = ("—" if v == "deep-ensemble"
                 else f"{100 * d[0]:+.2f} ± {100 * d[1]:.2f} ({wins[0]}/{wins[1]})")
        lines.append(
            f"| {v} | {_fmt(*r['fidelity'], digits=2)} | {delta} | "
            f"{_fmt(*r['mean_member_fidelity'], digits=2)} | "
            f"{_fmt(*r['ensemble_gain'], digits=2)} | "
            f"{r['variance'][0]:.2e} | {r['v_ratio_vs_de'][0]:.2f} | "
            f"{r['v_final_over_peak'][0]:.2f} | {r['mutual_info'][0]:.3f} | "
            f"{100 * r['disagreement'][0]:.2f}% | {r['train_seconds'][0]:.1f} |")
    lines += ["", "Settings per variant: " + json.dumps(st["variant_params"]), "",
              f"Machine: {info.get('gpu', info['processor'])}, torch {info['torch']}, "
              f"device {info['device']}."]
    return "\n".join(lines) + "\n"


def _diversity_figure(root: Path, cells: list[dict], variants: list[str],
                      settings: dict[str, Any]) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.2),
                             gridspec_kw={"width_ratios": [1.6, 1], "wspace": 0.45})
    ax = axes[0]
    for v in variants:
        cs = [c for c in cells if c["variant"] == v]
        its = [t["iteration"] for t in cs[0]["trace"]]
        vals = np.array([[t["variance"] for t in c["trace"]] for c in cs
                         if len(c["trace"]) == len(its)])
        m, sd = vals.mean(0), vals.std(0, ddof=1) if len(vals) > 1 else np.zeros(len(its))
        style = dict(lw=2.4, color="black") if v == "deep-ensemble" else dict(lw=1.4)
        (line,) = ax.plot(its, m, label=v, **style)
        ax.fill_between(its, np.maximum(m - sd, 1e-12), m + sd, alpha=0.12,
                        color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel("training iteration")
    ax.set_ylabel("prediction variance V (probe set)")
    ax.set_title("V(t): members' diversity over training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    means, stds = [], []
    for v in variants:
        m, s, _ = _mean_std(c["metrics"]["fidelity"] for c in cells if c["variant"] == v)
        means.append(100 * m)
        stds.append(100 * s)
    ax.barh(range(len(variants)), means, xerr=stds, color="tab:blue", alpha=0.7)
    ax.set_yticks(range(len(variants)))
    ax.set_yticklabels(variants, fontsize=8)
    lo = min(means) - 3 * max(max(stds), 0.5)
    ax.set_xlim(lo, max(m + s for m, s in zip(means, stds, strict=True)) + 1)
    ax.set_xlabel("fidelity (%)")
    ax.set_title("fidelity (mean ± std)")
    fig.suptitle(f"Diversity study, {settings['dataset']}, {settings['budget']} queries, "
                 f"{settings['seeds']} seeds", fontsize=10)
    _save_fig(fig, root / "variance_over_training.png")
    plt.close(fig)


# ------------------------------------------------------------------------------ defence study

def prada_replay(streams: dict[str, list[int]], pool_x: torch.Tensor, victim: torch.nn.Module,
                 device: str = "cpu", **params: Any) -> dict[str, dict[str, Any]]:
    """Feed recorded query streams (pool indices in query order) through a fresh PRADA detector
    each; returns per stream: flagged?, after how many queries, min and last W."""
    from .attack import victim_outputs
    from .defenses import PradaDetector

    out = {}
    for name, order in streams.items():
        idx = torch.as_tensor(order, dtype=torch.long)
        x = pool_x[idx]
        labels = victim_outputs(victim, x.to(device)).argmax(-1).cpu()
        det = PradaDetector(**params)
        flagged_at = None
        for start in range(0, len(idx), 100):
            if det.observe(x[start:start + 100], labels[start:start + 100]) and flagged_at is None:
                flagged_at = next(q for q, _, w in det.history if w < det.delta)
                break
        ws = [w for _, _, w in det.history]
        out[name] = {"flagged": det.flagged, "flagged_at": flagged_at, "queries": len(idx),
                     "min_w": min(ws) if ws else None, "last_w": ws[-1] if ws else None}
    return out


def run_defense_study(out: str | os.PathLike, *,
                      defenses: Optional[dict[str, dict[str, Any]]] = None,
                      methods: Sequence[str] = DEFENSE_METHODS, budget: int = 2000,
                      seeds: int = 2, members: int = 5, arch: str = "mlp", epochs: int = 10,
                      batch_size: int = 128, lr: float = 1e-3, output_mode: str = "probs",
                      dataset: str = "fashion-mnist", victim_arch: str = "lenet",
                      victim_epochs: Optional[int] = None, device: str = "cpu",
                      cache_dir: Optional[str] = None, max_test: Optional[int] = None,
                      setup: Optional[Setup] = None, force: bool = False, replay: bool = True,
                      progress: bool = True) -> dict[str, Any]:
    """Every defence × method × seed on the same random query indices; writes ``OUT/defense/``.

    replay: also replay PRADA on the query streams of ``OUT/active`` (CPU work, ~2 s per
    4,000-query stream), when that study's cells exist.
    """
    from .attack import random_queries, train_and_evaluate
    from .defenses import build_defense, query_until_refused
    from .oracle import Oracle

    defenses = {k: dict(v) for k, v in (defenses or DEFENSE_SETTINGS).items()}
    settings = dict(defenses=defenses, methods=list(methods), budget=budget, seeds=seeds,
                    members=members, arch=arch, epochs=epochs, batch_size=batch_size, lr=lr,
                    output_mode=output_mode, dataset=dataset, victim_arch=victim_arch,
                    victim_epochs=victim_epochs, max_test=max_test)
    setup = setup or prepare(dataset, victim_arch, victim_epochs=victim_epochs, device=device,
                             cache_dir=cache_dir, max_test=max_test, progress=progress)
    root = Path(out) / "defense"
    store = CellStore(root, settings, force, setup.info.get("victim_checkpoint"))
    pool_x = setup.splits.pool.x
    idx_all = random_queries(len(pool_x), budget, 1)
    todo = [(d, m, k) for d in defenses for k in range(seeds) for m in methods
            if not store.has(f"{d}_{m}_seed{k}")]
    bar = _bar(len(todo), "defense study", progress)
    answered: dict[str, Any] = {}
    for d_name in dict.fromkeys(d for d, _, _ in todo):
        defense = build_defense(d_name, **defenses[d_name])
        vic, kind = defense.wrap_victim(setup.victim)
        oracle = defense.wrap_oracle(Oracle(vic, pool_x, budget, output_mode=output_mode,
                                            device=device, victim_outputs=kind))
        idx, targets, refused = query_until_refused(oracle, idx_all, batch_size=100)
        with torch.no_grad():
            true = setup.victim(pool_x[idx].to(device)).argmax(-1).cpu() if len(idx) else idx
        shown = targets.argmax(-1) if targets.dtype.is_floating_point else targets
        answered[d_name] = {"answered": int(len(idx)), "charged": int(oracle.used),
                            "refused": bool(refused),
                            "label_agreement": float((shown == true).float().mean())
                            if len(idx) else float("nan")}
        x = pool_x[idx].to(device)
        for _, method, seed in [t for t in todo if t[0] == d_name]:
            if len(idx) < 2:
                metrics = {"fidelity": float("nan")}
                secs = 0.0
            else:
                hp = {"members": members} if method in ("deep-ensemble",) else {}
                r = train_and_evaluate(method, arch, x, targets.to(device), test_x=setup.test_x,
                                       test_y=setup.test_y, victim_labels=setup.victim_labels,
                                       victim_probs=setup.victim_probs,
                                       num_classes=setup.splits.num_classes, seed=seed,
                                       epochs=epochs, batch_size=batch_size, lr=lr,
                                       device=device, hparams=hp, progress=False)
                metrics, secs = r["metrics"], r["seconds"]
            store.put(f"{d_name}_{method}_seed{seed}",
                      {"defense": d_name, "method": method, "seed": seed, "metrics": metrics,
                       "train_seconds": secs, **answered[d_name]})
            bar.update(1)
            bar.set_postfix(defense=d_name, method=method, fid=f"{metrics['fidelity']:.3f}")
            _defense_summary(root, store, setup, settings, with_figures=False, out=Path(out))
    bar.close()
    return _defense_summary(root, store, setup, settings, with_figures=True, out=Path(out),
                            device=device, replay=replay)


def _defense_summary(root: Path, store: CellStore, setup: Setup, settings: dict[str, Any],
                     with_figures: bool, out: Path, device: str = "cpu",
                     replay: bool = False) -> dict[str, Any]:
    cells = store.all()
    defenses = [d for d in settings["defenses"] if any(c["defense"] == d for c in cells)]
    methods = [m for m in settings["methods"] if any(c["method"] == m for c in cells)]
    table: dict[str, dict[str, Any]] = {}
    for d in defenses:
        cs = [c for c in cells if c["defense"] == d]
        row: dict[str, Any] = {"answered": cs[0]["answered"], "refused": cs[0]["refused"],
                               "label_agreement": cs[0]["label_agreement"], "methods": {}}
        for m in methods:
            mc = [c for c in cs if c["method"] == m]
            base = {c["seed"]: c["metrics"]["fidelity"] for c in cells
                    if c["defense"] == "none" and c["method"] == m}
            f = _mean_std(c["metrics"]["fidelity"] for c in mc)
            delta = _mean_std(c["metrics"]["fidelity"] - base[c["seed"]] for c in mc
                              if c["seed"] in base)
            kl = _mean_std(c["metrics"].get("kl", float("nan")) for c in mc)
            row["methods"][m] = {"fidelity": f[:2], "delta_vs_none": delta[:2], "n": f[2],
                                 "kl": kl[:2]}
        table[d] = row
    summary: dict[str, Any] = {"study": "defense", "settings": settings, "setup": setup.info,
                               "table": table, "cells": len(cells)}
    active_json = out / "active" / "results.json"
    if replay and active_json.exists():
        streams = {c["key"]: c["queried"] for c in read_cells(out / "active")}
        params = settings["defenses"].get("prada", {})
        summary["prada_replay"] = prada_replay(streams, setup.splits.pool.x, setup.victim,
                                               device=device, **params)
    atomic_json(root / "results.json", summary)
    atomic_write(root / "results.md", _defense_markdown(summary))
    if with_figures and cells:
        _defense_figure(root, table, defenses, methods, settings)
    return summary


def _defense_markdown(s: dict[str, Any]) -> str:
    st, info = s["settings"], s["setup"]
    methods = st["methods"]
    lines = [f"# Defended victims ({st['dataset']}, victim {st['victim_arch']} "
             f"{100 * info['victim_test_accuracy']:.2f}%, {st['budget']} random queries, "
             f"`{st['output_mode']}` answers, surrogates {st['arch']})", "",
             f"Fidelity (%) to the UNDEFENDED victim, mean ± std over {st['seeds']} seeds; "
             "Δ = paired difference to the same method without a defence. `answered`: images "
             "answered before any refusal; `label agr.`: share of answers whose top class is the "
             "victim's true top class.", "",
             "| defence (params) | answered | label agr. | " + " | ".join(methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]
    for d, r in s["table"].items():
        cells = []
        for m in methods:
            x = r["methods"].get(m)
            if x is None:
                cells.append("—")
                continue
            txt = _fmt(*x["fidelity"])
            if d != "none" and not math.isnan(x["delta_vs_none"][0]):
                txt += f" (Δ {100 * x['delta_vs_none'][0]:+.1f})"
            cells.append(txt)
        params = json.dumps(st["defenses"][d]) if st["defenses"][d] else ""
        lines.append(f"| {d} {params} | {r['answered']}{' (refused)' if r['refused'] else ''} | "
                     f"{100 * r['label_agreement']:.1f}% | " + " | ".join(cells) + " |")
    if "prada_replay" in s:
        lines += ["", "## PRADA on the active study's query streams", "",
                  "| stream (strategy_seed) | flagged | after queries | min W | last W |",
                  "|---|---|---|---|---|"]
        def fmt(v: Optional[float]) -> str:
            return "—" if v is None else f"{v:.3f}"

        for k, r in s["prada_replay"].items():
            lines.append(f"| {k} | {'yes' if r['flagged'] else 'no'} | "
                         f"{r['flagged_at'] if r['flagged_at'] is not None else '—'} | "
                         f"{fmt(r['min_w'])} | {fmt(r['last_w'])} |")
    lines += ["", f"Machine: {info.get('gpu', info['processor'])}, torch {info['torch']}, "
              f"device {info['device']}."]
    return "\n".join(lines) + "\n"


def _defense_figure(root: Path, table: dict, defenses: list[str], methods: list[str],
                    settings: dict[str, Any]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 4.2))
    width = 0.8 / max(1, len(defenses))
    for i, d in enumerate(defenses):
        m = [100 * table[d]["methods"].get(x, {"fidelity": (np.nan, 0)})["fidelity"][0]
             for x in methods]
        s = [100 * table[d]["methods"].get(x, {"fidelity": (np.nan, 0)})["fidelity"][1]
             for x in methods]
        ax.bar(np.arange(len(methods)) + (i - (len(defenses) - 1) / 2) * width, m, width,
               yerr=s, label=d, capsize=2)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods)
    finite = [100 * table[d]["methods"][x]["fidelity"][0] for d in defenses for x in methods
              if x in table[d]["methods"] and not math.isnan(table[d]["methods"][x]["fidelity"][0])]
    if finite:
        ax.set_ylim(max(0, min(finite) - 5), min(100, max(finite) + 3))
    ax.set_ylabel("fidelity to the undefended victim (%)")
    ax.legend(fontsize=8, ncol=3)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"Defences, {settings['dataset']}, {settings['budget']} random "
                 f"`{settings['output_mode']}` queries, mean ± std over {settings['seeds']} seeds",
                 fontsize=10)
    _save_fig(fig, root / "fidelity_by_defense.png")
    plt.close(fig)


# ------------------------------------------------------------------------------ command line

def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m faststeal.studies",
                                description="Run the active / diversity / defence studies.")
    p.add_argument("study", choices=("active", "diversity", "defense", "all"))
    p.add_argument("--out", default="runs/studies")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--victim-arch", default="lenet")
    p.add_argument("--victim-epochs", type=int, default=None,
                   help="pin the victim's training epochs (default: faststeal.victim's default)")
    p.add_argument("--arch", default="mlp", help="surrogate architecture")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--checkpoints", default="500,1000,2000,4000",
                   help="active study: comma-separated budgets (the last is spent)")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--round-size", type=int, default=None)
    p.add_argument("--round-epochs", type=int, default=2)
    p.add_argument("--min-steps", type=int, default=0,
                   help="active study: at least this many steps per from-scratch fit")
    p.add_argument("--candidates", type=int, default=None)
    p.add_argument("--eval-seed-offset", type=int, default=0,
                   help="active study: initialise the retrained surrogate with seed + this")
    p.add_argument("--budget", type=int, default=2000, help="diversity / defence studies")
    p.add_argument("--defense-budget", type=int, default=None)
    p.add_argument("--variants", default=",".join(DIVERSITY_VARIANTS))
    p.add_argument("--methods", default=",".join(DEFENSE_METHODS))
    p.add_argument("--defense-seeds", type=int, default=2)
    p.add_argument("--max-test", type=int, default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--quick", action="store_true", help="smoke-test scale (minutes on a CPU)")
    p.add_argument("--force", action="store_true")
    p.add_argument("--no-replay", action="store_true",
                   help="defence study: skip the PRADA replay of the active study's streams")
    p.add_argument("--defense-epochs", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.seeds, a.epochs, a.checkpoints, a.budget, a.defense_seeds = 1, 2, "100,300", 300, 1
        a.max_test = a.max_test or 1000
        a.members = min(a.members, 3)
    progress = not a.no_progress
    t0 = time.perf_counter()
    setup = prepare(a.dataset, a.victim_arch, victim_epochs=a.victim_epochs, device=a.device,
                    cache_dir=a.cache_dir, max_test=a.max_test, progress=progress)
    print(f"[studies] victim {a.victim_arch}: {100 * setup.victim_accuracy:.2f}% test accuracy; "
          f"setup {setup.info['setup_seconds']:.1f}s", flush=True)
    common = dict(seeds=a.seeds, members=a.members, arch=a.arch, epochs=a.epochs,
                  dataset=a.dataset, victim_arch=a.victim_arch, victim_epochs=a.victim_epochs,
                  device=a.device,
                  max_test=a.max_test, setup=setup, force=a.force, progress=progress)
    timing = {}
    if a.study in ("active", "all"):
        t = time.perf_counter()
        run_active_study(a.out, strategies=a.strategies.split(","),
                         checkpoints=[int(c) for c in a.checkpoints.split(",")],
                         round_size=a.round_size, round_epochs=a.round_epochs,
                         min_steps=a.min_steps, eval_seed_offset=a.eval_seed_offset,
                         candidates=a.candidates, **common)
        timing["active_s"] = time.perf_counter() - t
    if a.study in ("diversity", "all"):
        t = time.perf_counter()
        run_diversity_study(a.out, variants=a.variants.split(","), budget=a.budget, **common)
        timing["diversity_s"] = time.perf_counter() - t
    if a.study in ("defense", "all"):
        t = time.perf_counter()
        run_defense_study(a.out, methods=a.methods.split(","),
                          budget=a.defense_budget or a.budget,
                          replay=not a.no_replay,
                          **{**common, "seeds": a.defense_seeds,
                             "epochs": a.defense_epochs or a.epochs})
        timing["defense_s"] = time.perf_counter() - t
    timing["total_s"] = time.perf_counter() - t0
    atomic_json(Path(a.out) / f"timing_{a.study}.json", {**timing, **machine_info(a.device)})
    print(f"[studies] done in {timing['total_s']:.0f}s: {json.dumps(timing)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
