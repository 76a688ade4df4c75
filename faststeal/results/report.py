"""The comparison's tables and figures, rebuilt from its database (``faststeal report DIR``
dispatches here through :class:`faststeal.runs.comparison.ComparisonStudy`).

Exports: ``results.json`` (schema in the README), ``results.csv`` (one row per method and
metric), ``results.md`` (the comparison table), and the figures (each as PDF and PNG)
``variance_curve`` (V(t) per method, mean ± std over seeds), ``fidelity`` (fidelity per method,
per seed and mean ± std) and ``fidelity_vs_members`` (Deep Ensemble fidelity against member
count), drawn by :mod:`faststeal.results.figures`.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from typing import Any, Optional

import numpy as np

from ..files import atomic_write
from ..info import describe_code
from .store import ResultStore

METRICS = ("fidelity", "accuracy", "mean_member_fidelity", "ensemble_gain", "gain_over_baseline",
           "kl", "variance", "mutual_info", "disagreement", "ece_victim", "ece", "brier", "nll",
           "ood_auroc_entropy", "ood_auroc_mi", "ood_auroc_variance")


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
        "ood": store.get_meta("ood"),
        "machine": store.get_meta("run"),
        "methods": methods,
        "member_sweep": {m: {str(s): _summary(v) for s, v in sorted(d.items())}
                         for m, d in sweep.items()},
    }


def machine_line(summary: dict[str, Any]) -> str:
    """The "Machine: ..." line of a report, from the run's stored ``runs.runner.machine_info``."""
    m = summary.get("machine") or {}
    return (f"Machine: {m.get('gpu', m.get('processor'))}, torch {m.get('torch')}, "
            f"device {m.get('device')}; {describe_code(m)}")


def _fmt(s: Optional[dict], pct: bool = True) -> str:
    if not s:
        return "–"
    if pct:
        return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"
    return f"{s['mean']:.3g} ± {s['std']:.2g}"


def markdown(summary: dict[str, Any]) -> str:
    from ..models import surrogate_label

    v = summary.get("victim") or {}
    q = summary.get("queries") or {}
    surrogate = (summary.get("config") or {}).get("surrogate_arch")
    lines = [
        "# faststeal comparison",
        "",
        f"Victim: `{v.get('arch')}` on `{v.get('dataset')}`, test accuracy "
        f"{100 * v.get('test_accuracy', float('nan')):.2f}%. Queries: {q.get('used')} of budget "
        f"{q.get('budget')} ({q.get('output_mode')} answers)."
        + (f" Surrogate: `{surrogate_label(surrogate)}`." if surrogate else ""),
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
    ood = (summary.get("ood") or {}).get("dataset")
    lines += [
        "",
        "Uncertainty quality of the predictive p̄ on the test set: expected calibration error (15 "
        "bins, %) against the victim's labels and the true labels, Brier score and NLL (nats) "
        "against the true labels; AUROC (%) of telling "
        + (f"`{ood}` test images (out of distribution)" if ood else "out-of-distribution images")
        + " from the test set by predictive entropy, mutual information and variance"
        + ("" if ood else " (no OOD set in this run)") + ".",
        "",
        "| method | S | n | ECE (victim) | ECE (true) | Brier | NLL | AUROC entropy | AUROC MI "
        "| AUROC V |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in summary["methods"].items():
        lines.append(
            f"| {name} | {m.get('members')} | {m['fidelity']['n']} | {_fmt(m.get('ece_victim'))} "
            f"| {_fmt(m.get('ece'))} | {_fmt(m.get('brier'), False)} | "
            f"{_fmt(m.get('nll'), False)} | {_fmt(m.get('ood_auroc_entropy'))} | "
            f"{_fmt(m.get('ood_auroc_mi'))} | {_fmt(m.get('ood_auroc_variance'))} |")
    for method, d in summary.get("member_sweep", {}).items():
        lines += ["", f"Fidelity of `{method}` against member count S:", "",
                  "| S | n | fidelity |", "|---|---|---|"]
        for s, st in d.items():
            lines.append(f"| {s} | {st['n']} | {_fmt(st)} |")
    if summary.get("machine"):  # recorded when the run finished
        lines += ["", machine_line(summary) + "."]
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


def figures(store: ResultStore, summary: dict[str, Any], directory: str) -> list[str]:
    """Write the comparison's figures (PDF and PNG, :mod:`faststeal.results.figures`); returns
    their paths (none when matplotlib is missing)."""
    from . import figures as fig

    main = store.cells("main")
    traces: dict[str, list[list[dict]]] = defaultdict(list)
    fids: dict[str, list[float]] = defaultdict(list)
    for c in main:
        traces[c["method"]].append(store.trace(c["cell_id"]))
        fids[c["method"]].append(c["metrics"]["fidelity"])
    paths = fig.variance_curves({m: traces[m] for m in _order(traces)},
                                os.path.join(directory, "variance_curve"))
    if fids:
        paths += fig.fidelity_by_method({m: fids[m] for m in _order(fids)},
                                        os.path.join(directory, "fidelity"))
    sweep: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in store.cells("sweep"):
        sweep[c["method"]][int(c["members"])].append(c["metrics"]["fidelity"])
    for method, points in sweep.items():
        paths += fig.fidelity_vs_members(points, os.path.join(directory, "fidelity_vs_members"),
                                         method=method, baseline=fids.get("baseline"))
    return paths
