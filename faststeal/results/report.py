"""The comparison's tables and figures, rebuilt from its database (``faststeal report DIR``
dispatches here through :class:`faststeal.runs.comparison.ComparisonStudy`).

Exports: ``results.json`` (schema in the README), ``results.csv`` (one row per method and
metric), ``results.md`` (the comparison table), and the figures ``variance_curve.png`` (V(t) per
method, mean ± std over seeds), ``fidelity.png`` (fidelity per method with error bars) and
``fidelity_vs_members.png`` (Deep Ensemble fidelity against member count).
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from typing import Any, Optional

import numpy as np

from ..files import atomic_write
from .store import ResultStore

METRICS = ("fidelity", "accuracy", "mean_member_fidelity", "ensemble_gain", "gain_over_baseline",
           "kl", "variance", "mutual_info", "disagreement")


def _summary(values: list[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "n": int(len(arr))}


def _order(methods) -> list[str]:
    """The registry's order (the paper's methods first, then the variants), then the rest."""
    from ..methods import METHODS

    known = [m for m in METHODS if m in methods]
    return known + sorted(m for m in methods if m not in METHODS)


def aggregate(store: ResultStore) -> dict[str, Any]:
    """Per method: every metric as mean, std and n over seeds (gain over baseline paired by seed)."""
    main = store.cells("main")
    base = {c["seed"]: c["metrics"]["fidelity"] for c in main if c["method"] == "baseline"}
    per: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    hparams: dict[str, dict] = {}
    seconds: dict[str, list[float]] = defaultdict(list)
    for c in main:
        m = dict(c["metrics"])
        if c["seed"] in base:
            m["gain_over_baseline"] = m["fidelity"] - base[c["seed"]]
        for k in METRICS:
            if k in m and m[k] is not None:
                per[c["method"]][k].append(float(m[k]))
        hparams[c["method"]] = c["hparams"]
        seconds[c["method"]].append(c["seconds"])
    methods = {}
    for name in _order(per):
        methods[name] = {k: _summary(v) for k, v in per[name].items()}
        methods[name]["members"] = hparams[name].get("num_members")
        methods[name]["train_seconds"] = _summary(seconds[name])
        methods[name]["hparams"] = hparams[name]
    sweep: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in store.cells("sweep"):
        sweep[c["method"]][int(c["members"])].append(c["metrics"]["fidelity"])
    return {
        "config": store.get_meta("config"),
        "victim": store.get_meta("victim"),
        "queries": store.get_meta("queries"),
        "methods": methods,
        "member_sweep": {m: {str(s): _summary(v) for s, v in sorted(d.items())}
                         for m, d in sweep.items()},
    }


def _fmt(s: Optional[dict], pct: bool = True) -> str:
    if not s:
        return "–"
    if pct:
        return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"
    return f"{s['mean']:.3g} ± {s['std']:.2g}"


def markdown(summary: dict[str, Any]) -> str:
    v = summary.get("victim") or {}
    q = summary.get("queries") or {}
    lines = [
        "# faststeal comparison",
        "",
        f"Victim: `{v.get('arch')}` on `{v.get('dataset')}`, test accuracy "
        f"{100 * v.get('test_accuracy', float('nan')):.2f}%. Queries: {q.get('used')} of budget "
        f"{q.get('budget')} ({q.get('output_mode')} answers).",
        "",
        "Fidelity, accuracy, member fidelity and gains in % (mean ± std over seeds, n = seeds); "
        "variance V, mutual information (nats) and disagreement on the test set.",
        "",
        "| method | S | n | fidelity | accuracy | mean member fid. | ensemble gain | gain vs baseline"
        " | KL | V | MI | disagreement |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in summary["methods"].items():
        lines.append(
            f"| {name} | {m.get('members')} | {m['fidelity']['n']} | {_fmt(m.get('fidelity'))} | "
            f"{_fmt(m.get('accuracy'))} | {_fmt(m.get('mean_member_fidelity'))} | "
            f"{_fmt(m.get('ensemble_gain'))} | {_fmt(m.get('gain_over_baseline'))} | "
            f"{_fmt(m.get('kl'), False)} | {_fmt(m.get('variance'), False)} | "
            f"{_fmt(m.get('mutual_info'), False)} | {_fmt(m.get('disagreement'))} |")
    for method, d in summary.get("member_sweep", {}).items():
        lines += ["", f"Fidelity of `{method}` against member count S:", "",
                  "| S | n | fidelity |", "|---|---|---|"]
        for s, st in d.items():
            lines.append(f"| {s} | {st['n']} | {_fmt(st)} |")
    return "\n".join(lines) + "\n"


def write_csv(summary: dict[str, Any], path: str) -> None:
    import io

    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["method", "metric", "mean", "std", "n"])
    for name, m in summary["methods"].items():
        for k in METRICS:
            if k in m:
                w.writerow([name, k, m[k]["mean"], m[k]["std"], m[k]["n"]])
    for method, d in summary.get("member_sweep", {}).items():
        for s, st in d.items():
            w.writerow([f"{method}@S={s}", "fidelity", st["mean"], st["std"], st["n"]])
    atomic_write(path, buf.getvalue())


def plt_agg() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (ImportError without matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figures(store: ResultStore, summary: dict[str, Any], directory: str) -> list[str]:
    """Write the PNG figures; returns their paths (none when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    main = store.cells("main")
    # V(t) per method: mean ± std over seeds at each recorded iteration
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_method: dict[str, list[list[dict]]] = defaultdict(list)
    for c in main:
        by_method[c["method"]].append(store.trace(c["cell_id"]))
    for name in _order(by_method):
        traces = [t for t in by_method[name] if t]
        if not traces:
            continue
        its = sorted(set.intersection(*[{r["iteration"] for r in t} for t in traces]))
        if not its:
            continue
        vals = np.array([[next(r["variance"] for r in t if r["iteration"] == i) for i in its]
                         for t in traces], dtype=float)
        mean, std = vals.mean(0), vals.std(0)
        ax.plot(its, mean, label=f"{name} (n={len(traces)})")
        ax.fill_between(its, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("training iteration")
    ax.set_ylabel("prediction variance V (probe set)")
    ax.set_title("Member diversity over training (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(directory, "variance_curve.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    # fidelity per method with error bars
    methods = summary["methods"]
    if methods:
        fig, ax = plt.subplots(figsize=(7, 4))
        names = list(methods)
        means = [100 * methods[n]["fidelity"]["mean"] for n in names]
        stds = [100 * methods[n]["fidelity"]["std"] for n in names]
        ax.bar(names, means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
        lo = min(m - s for m, s in zip(means, stds))
        ax.set_ylim(max(0.0, lo - 3), min(100.0, max(m + s for m, s in zip(means, stds)) + 2))
        ax.set_ylabel("fidelity (%)")
        n = methods[names[0]]["fidelity"]["n"]
        ax.set_title(f"Fidelity per method (mean ± std, n={n} seeds)")
        fig.tight_layout()
        paths.append(os.path.join(directory, "fidelity.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    for method, d in summary.get("member_sweep", {}).items():
        fig, ax = plt.subplots(figsize=(5, 4))
        s = [int(k) for k in d]
        ax.errorbar(s, [100 * d[k]["mean"] for k in d], yerr=[100 * d[k]["std"] for k in d],
                    marker="o", capsize=4)
        ax.set_xlabel("members S")
        ax.set_ylabel("fidelity (%)")
        ax.set_xticks(s)
        ax.set_title(f"{method}: fidelity vs members (n={next(iter(d.values()))['n']})")
        fig.tight_layout()
        paths.append(os.path.join(directory, "fidelity_vs_members.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
