"""Diversity-keeping ensembles (``faststeal study diversity``): if we force members apart, does
fidelity follow?

The plain Deep Ensemble and every variant of :mod:`faststeal.methods.diverse` train on the SAME
random queries (asked once, in :meth:`DiversityStudy.begin`) with the same seeds, epochs and batch
size. Cells: variant × seed (``<variant>/seed=<k>``), each with its diversity trace V(t) on the
probe set and per-epoch training checkpoints (a killed cell resumes from its last epoch). The
table: fidelity, the paired difference to the Deep Ensemble, mean member fidelity, ensemble gain,
V and its ratio to the Deep Ensemble's, V's final/peak ratio over training.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..results.report import machine_line
from .runner import (Cell, Run, Study, StudySettings, check_surrogate_fits, fmt, mean_std,
                     register)

#: the variants in table order: the reference, its shared-batch control, then the variants
VARIANTS = ("deep-ensemble", "shared-batch-de", "bootstrap-ensemble", "hetero-ensemble",
            "hparam-ensemble", "ncl-ensemble", "ncl-strong", "repulsive-ensemble")
#: label -> hyperparameters (``method`` picks the class when the label is not a method name).
#: ``shared-batch-de`` is the control for the penalised variants: NCL at strength 0, i.e. a Deep
#: Ensemble whose members share every batch (the penalties need the same inputs per member).
VARIANT_PARAMS: dict[str, dict[str, Any]] = {
    "shared-batch-de": {"method": "ncl-ensemble", "strength": 0.0},
    "hetero-ensemble": {"archs": ["mlp", "lenet"]},
    "ncl-ensemble": {"strength": 2.0},
    "ncl-strong": {"method": "ncl-ensemble", "strength": 8.0},
    "repulsive-ensemble": {"strength": 0.2},
}


@dataclass
class DiversitySettings(StudySettings):
    """variants: labels of :data:`VARIANTS` (or any method name); variant_params: overrides of
    :data:`VARIANT_PARAMS` per label; budget: random queries shared by every variant;
    record_every: optimizer steps between two points of the V(t) trace (None:
    :func:`faststeal.attack.trace_interval`, about 50 points per fit)."""

    variants: tuple = VARIANTS
    variant_params: dict = field(default_factory=dict)
    budget: int = 2000
    record_every: Optional[int] = None
    out: str = "runs/diversity"

    QUICK = {**StudySettings.QUICK, "budget": 300, "record_every": 1}

    def validate(self) -> "DiversitySettings":
        from ..checks import positive_int
        from ..methods import check_hparams

        super().validate()
        positive_int("budget", self.budget)
        if self.record_every is not None:
            positive_int("record_every", self.record_every)
        if isinstance(self.variants, str) or not self.variants:
            raise ValueError(f"variants must be a non-empty list, got {self.variants!r}")
        if not isinstance(self.variant_params, dict):
            raise TypeError("variant_params must be a dict of per-variant dicts")
        for v in self.variants:
            method, hp = self.method_of(v)
            check_hparams(method, hp, self.arch)
        return self

    def method_of(self, variant: str) -> tuple[str, dict[str, Any]]:
        """(method name, hyperparameters) of a variant label."""
        from ..methods import METHODS

        hp = {**VARIANT_PARAMS.get(variant, {}), **self.variant_params.get(variant, {})}
        method = hp.pop("method", variant)
        if method not in METHODS:
            raise ValueError(f"variant {variant!r} is neither a method nor one of "
                             f"{tuple(VARIANT_PARAMS)} (valid methods: {', '.join(METHODS)})")
        return method, {**self.members_for(method), **hp}


@register
class DiversityStudy(Study):
    name = "diversity"
    settings: DiversitySettings

    def check_splits(self, splits: Any) -> None:
        if self.settings.budget > len(splits.pool):
            raise ValueError(f"budget ({self.settings.budget}) is larger than the attacker pool "
                             f"({len(splits.pool)} images)")
        check_surrogate_fits(self.settings.arch, splits)

    def begin(self, run: Run) -> None:
        """Ask the random queries once (rank 0, journaled in OUT/answers.journal) and broadcast
        the answers."""
        from .. import distributed
        from ..attack import query_oracle, random_queries

        s, setup = self.settings, run.setup
        idx = random_queries(len(setup.splits.pool), s.budget, 1)
        targets = None
        if run.is_main:
            oracle = run.oracle(setup.victim, s.budget, output_mode=s.output_mode)
            targets, _ = query_oracle(oracle, idx, progress=False)
        targets = distributed.broadcast_tensor(run.ctx, targets)
        run.state["x"] = setup.splits.pool.x[idx].to(run.device)
        run.state["y"] = targets.to(run.device)

    def cells(self, run: Run) -> list[Cell]:
        s = self.settings
        out = []
        for seed in range(s.seeds):
            for v in s.variants:
                method, hp = s.method_of(v)
                out.append(Cell(f"{v}/seed={seed}", "diversity", method, seed,
                                hp.get("members"), {"variant": v, "hparams": hp}))
        return out

    def run_cell(self, run: Run, cell: Cell, checkpoint: str) -> dict[str, Any]:
        from ..active import evaluate_surrogate
        from ..attack import trace_interval
        from ..methods import build_method

        s, setup, x = self.settings, run.setup, run.state["x"]
        t0 = time.perf_counter()
        m = build_method(cell.method, s.arch, tuple(x.shape[1:]), setup.num_classes,
                         seed=cell.seed, device=run.device, **cell.params["hparams"])
        m.fit(x, run.state["y"], epochs=s.epochs, batch_size=s.batch_size, lr=s.lr,
              probe=setup.probe, progress=False,
              record_every=s.record_every or trace_interval(len(x), s.batch_size, s.epochs),
              checkpoint=checkpoint if m.supports_checkpoint else None)
        if torch.device(run.device).type == "cuda":
            torch.cuda.synchronize()
        train_s = time.perf_counter() - t0
        metrics = evaluate_surrogate(m, setup.test_x, setup.victim_labels, setup.test_y)
        return {"metrics": metrics, "trace": m.trace, "hparams": m.hparams(),
                "seconds": train_s, "members": m.num_members,
                "payload": {"variant": cell.params["variant"]}}

    def describe(self, cell: Cell, result: dict[str, Any]) -> str:
        m = result["metrics"]
        return (f"diversity {cell.params['variant']} (seed {cell.seed}): fidelity "
                f"{100 * m['fidelity']:.2f}%, V {m['variance']:.2e} [{result['seconds']:.1f}s]")

    # ------------------------------------------------------------------ report
    @classmethod
    def summarise(cls, store: Any) -> dict[str, Any]:
        st = store.get_meta("config") or {}
        cells = store.cells("diversity")
        for c in cells:
            c["trace"] = store.trace(c["cell_id"])
        variants = [v for v in st.get("variants", [])
                    if any(c["payload"]["variant"] == v for c in cells)]
        keys = ("fidelity", "accuracy", "mean_member_fidelity", "ensemble_gain", "variance",
                "mutual_info", "disagreement")
        base = {c["seed"]: c for c in cells if c["payload"]["variant"] == "deep-ensemble"}
        table: dict[str, dict[str, Any]] = {}
        for v in variants:
            cs = [c for c in cells if c["payload"]["variant"] == v]
            row: dict[str, Any] = {k: mean_std([c["metrics"][k] for c in cs]) for k in keys}
            vpeak = [max(t["variance"] for t in c["trace"]) for c in cs if c["trace"]]
            vfinal = [c["trace"][-1]["variance"] for c in cs if c["trace"]]
            row["v_peak"] = mean_std(vpeak)
            row["v_final_over_peak"] = mean_std([f / p if p > 0 else float("nan")
                                                 for f, p in zip(vfinal, vpeak)])
            paired = [c["metrics"]["fidelity"] - base[c["seed"]]["metrics"]["fidelity"]
                      for c in cs if c["seed"] in base]
            row["delta_fidelity_vs_de"] = mean_std(paired)
            row["wins_vs_de"] = [int(sum(d > 0 for d in paired)), len(paired)]
            row["v_ratio_vs_de"] = mean_std(
                [c["metrics"]["variance"] / base[c["seed"]]["metrics"]["variance"]
                 for c in cs if c["seed"] in base and base[c["seed"]]["metrics"]["variance"] > 0])
            row["train_seconds"] = mean_std([c["seconds"] for c in cs])
            row["n"] = len(cs)
            table[v] = row
        return {"study": "diversity", "settings": st, "victim": store.get_meta("victim"),
                "machine": store.get_meta("run"), "table": table, "cells": len(cells)}

    @classmethod
    def markdown(cls, s: dict[str, Any]) -> str:
        from ..models import surrogate_label

        st, v = s["settings"], s.get("victim") or {}
        lines = [f"# Diversity-keeping ensembles ({st.get('dataset')}, victim "
                 f"{st.get('victim_arch')} {100 * v.get('test_accuracy', float('nan')):.2f}%, "
                 f"{st.get('budget')} random {st.get('output_mode')} queries, "
                 f"S={st.get('members')} {surrogate_label(st.get('arch'))} members, "
                 f"{st.get('epochs')} epochs)", "",
                 f"Mean ± std over {st.get('seeds')} seed(s) (std shown when n > 1; same seeds and "
                 "queried set for every variant). Fidelity, mean member fidelity and ensemble "
                 "gain in %; V = mean_x mean_c Var_s p_s(c|x) on the test set; V/V(DE) is the "
                 "paired ratio to the plain Deep Ensemble; V final/peak from the probe-set "
                 "trace.", "",
                 "| variant | fidelity | Δ vs DE (wins) | mean member fid. | ensemble gain | V | "
                 "V / V(DE) | V final/peak | MI | disagreement | train s |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in s["table"].items():
            d, wins = r["delta_fidelity_vs_de"], r["wins_vs_de"]
            delta = ("—" if name == "deep-ensemble" or not d["n"]
                     else f"{100 * d['mean']:+.2f}"
                     + (f" ± {100 * d['std']:.2f}" if d["n"] > 1 else "")
                     + f" ({wins[0]}/{wins[1]})")
            lines.append(
                f"| {name} | {fmt(r['fidelity'])} | {delta} | "
                f"{fmt(r['mean_member_fidelity'])} | {fmt(r['ensemble_gain'])} | "
                f"{r['variance']['mean']:.2e} | {r['v_ratio_vs_de']['mean']:.2f} | "
                f"{r['v_final_over_peak']['mean']:.2f} | {r['mutual_info']['mean']:.3f} | "
                f"{100 * r['disagreement']['mean']:.2f}% | {r['train_seconds']['mean']:.1f} |")
        over = st.get("variant_params") or {}
        params = {name: {**VARIANT_PARAMS.get(name, {}), **over.get(name, {})}
                  for name in st.get("variants", [])}
        lines += ["", "Settings per variant: " + json.dumps({k: v for k, v in params.items()
                                                             if v}), "",
                  machine_line(s) + "."]
        return "\n".join(lines) + "\n"

    @classmethod
    def figures(cls, store: Any, summary: dict[str, Any], directory: str) -> list[str]:
        cells = store.cells("diversity")
        if not cells:
            return []
        for c in cells:
            c["trace"] = store.trace(c["cell_id"])
        return _figure(directory, cells, list(summary["table"]), summary["settings"])


def _figure(directory: str, cells: list[dict], variants: list[str],
            settings: dict[str, Any]) -> list[str]:
    import os

    from ..models import surrogate_label
    from ..results import figures

    def of(v: str) -> list[dict]:
        return [c for c in cells if c["payload"]["variant"] == v]

    return figures.diversity({v: [c["trace"] for c in of(v)] for v in variants},
                             {v: [c["metrics"]["fidelity"] for c in of(v)] for v in variants},
                             os.path.join(directory, "variance_over_training"),
                             title=f"Diversity study, {settings['dataset']}, {settings['budget']} "
                                   f"queries, S = {settings['members']} "
                                   f"{surrogate_label(settings['arch'])} members")
