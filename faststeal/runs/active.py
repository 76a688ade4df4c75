"""Active stealing (``faststeal study active``): does choosing queries with the surrogate's own
uncertainty beat random queries when both are trained the same way?

Cells: strategy × seed (``<strategy>/seed=<k>``), each one run of
:func:`faststeal.active.run_active` with its own oracle whose budget is the last milestone and
whose answers are journaled in ``OUT/answers/<strategy>__seed=<k>.journal``. The
row stores the last milestone's retrained metrics; the payload keeps every milestone (retrained
and running surrogate), the rounds' selection costs and the queried stream (pool indices in query
order, which the defence study's PRADA replay reads). A killed cell resumes from the start of its
last round (the loop's state in ``OUT/checkpoints/``) and the fit in progress from its last epoch;
the images it asks again come from its journal, free. The table: fidelity per strategy and
milestone, mean ± std over seeds, with the paired difference to ``random`` (same seed: same seed
set, same initialisation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from ..query import STRATEGIES
from ..results.report import machine_line
from .runner import (Cell, Run, Study, StudySettings, check_surrogate_fits, fmt, mean_std,
                     register)


@dataclass
class ActiveSettings(StudySettings):
    """strategies: :data:`faststeal.query.STRATEGIES` names; milestones: budgets at which the
    surrogates are evaluated (ascending, the last is spent); method: the surrogate (S =
    ``members``); epochs / min_steps / round_epochs / round_size / seed_fraction / candidates /
    eval_seed_offset: see :class:`faststeal.active.ActiveConfig`."""

    strategies: Sequence[str] = STRATEGIES
    milestones: Sequence[int] = (500, 1000, 2000, 4000)
    method: str = "deep-ensemble"
    min_steps: int = 0
    round_epochs: int = 2
    round_size: Optional[int] = None
    seed_fraction: float = 0.1
    candidates: Optional[int] = None
    eval_seed_offset: int = 0
    out: str = "runs/active"

    QUICK = {**StudySettings.QUICK, "milestones": (100, 300), "min_steps": 100}

    def validate(self) -> "ActiveSettings":
        from ..methods import check_hparams
        from ..query import make_strategy

        super().validate()
        if isinstance(self.strategies, str) or not self.strategies:
            raise ValueError(f"strategies must be a non-empty list of names, got "
                             f"{self.strategies!r}")
        for s in self.strategies:
            make_strategy(s)
        check_hparams(self.method, self.members_for(self.method), self.arch)
        for s in self.strategies:
            self.active_config(s, 0).validate(max(int(m) for m in self.milestones)
                                              if self.milestones else 1)
        if self.candidates is not None:
            make_strategy("bald", candidates=self.candidates)
        return self

    def active_config(self, strategy: str, seed: int) -> Any:
        from ..active import ActiveConfig

        return ActiveConfig(
            strategy=strategy, strategy_params={} if self.candidates is None or
            strategy == "random" else {"candidates": self.candidates},
            milestones=list(self.milestones), seed_fraction=self.seed_fraction,
            round_size=self.round_size, method=self.method, arch=self.arch,
            hparams=self.members_for(self.method), epochs=self.epochs, min_steps=self.min_steps,
            round_epochs=self.round_epochs, batch_size=self.batch_size, lr=self.lr, seed=seed,
            eval_seed_offset=self.eval_seed_offset)


@register
class ActiveStudy(Study):
    name = "active"
    settings: ActiveSettings

    def check_splits(self, splits: Any) -> None:
        last = int(self.settings.milestones[-1])
        if last > len(splits.pool):
            raise ValueError(f"the last milestone ({last}) is larger than the attacker pool "
                             f"({len(splits.pool)} images)")
        check_surrogate_fits(self.settings.arch, splits)

    def cells(self, run: Run) -> list[Cell]:
        s = self.settings
        return [Cell(f"{strategy}/seed={seed}", "active", s.method, seed,
                     s.members_for(s.method).get("members"), {"strategy": strategy})
                for seed in range(s.seeds) for strategy in s.strategies]

    def run_cell(self, run: Run, cell: Cell, checkpoint: str) -> dict[str, Any]:
        from ..active import run_active
        from ..models import asdict_keyed

        s, setup = self.settings, run.setup
        config = s.active_config(cell.params["strategy"], cell.seed)
        # one journal per cell (OUT/answers/<strategy>__seed=<k>.journal), keyed by the loop's
        # settings: its queries depend on all of them
        oracle = run.oracle(setup.victim, int(s.milestones[-1]), name=cell.key,
                            key={"loop": json.loads(json.dumps(asdict_keyed(config, "arch")))},
                            output_mode=s.output_mode)
        res = run_active(oracle, config, test_x=setup.test_x, victim_labels=setup.victim_labels,
                         test_y=setup.test_y, device=run.device, progress=run.progress,
                         checkpoint=checkpoint)
        last = (res["milestones"][-1]["retrained"] if res["milestones"]
                else {"fidelity": float("nan")})
        payload = {"strategy": cell.params["strategy"], "strategy_params": res["strategy"],
                   **{k: res[k] for k in ("milestones", "rounds", "queried", "used", "budget",
                                          "refused_at")}}
        return {"metrics": last, "hparams": res["config"], "seconds": res["seconds"],
                "payload": payload}

    def describe(self, cell: Cell, result: dict[str, Any]) -> str:
        return (f"active {cell.params['strategy']} (seed {cell.seed}): retrained fidelity "
                f"{100 * result['metrics']['fidelity']:.2f}% at {result['payload']['used']} "
                f"queries [{result['seconds']:.1f}s]")

    # ------------------------------------------------------------------ report
    @classmethod
    def summarise(cls, store: Any) -> dict[str, Any]:
        st = store.get_meta("config") or {}
        cells = store.cells("active")
        strategies = [s for s in st.get("strategies", [])
                      if any(c["payload"]["strategy"] == s for c in cells)]
        cps = [int(b) for b in st.get("milestones", [])]

        def fid(strategy: str, which: str) -> dict[int, dict[int, float]]:
            out: dict[int, dict[int, float]] = {}
            for c in cells:
                if c["payload"]["strategy"] == strategy:
                    for cp in c["payload"]["milestones"]:
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
                    paired = [vals[k] - base[b][k] for k in vals if b in base and k in base[b]]
                    d = mean_std(paired)
                    rows[str(b)] = {**mean_std(list(vals.values())),
                                    "delta_vs_random": d["mean"], "delta_std": d["std"],
                                    "wins_vs_random": int(sum(x > 0 for x in paired)),
                                    "paired": d["n"]}
                table[s][which] = rows
        cost: dict[str, dict[str, float]] = {}
        for s in strategies:
            rounds = [r for c in cells if c["payload"]["strategy"] == s
                      for r in c["payload"]["rounds"]]
            if not rounds:
                continue
            cost[s] = {k: float(np.mean([r.get(f"{k}_seconds", 0.0) for r in rounds]))
                       for k in ("forward", "stats", "features", "select", "total", "train")}
            cost[s]["candidates"] = (0.0 if s == "random"
                                     else float(np.mean([r["candidates"] for r in rounds])))
            cost[s]["rounds_per_run"] = len(rounds) / max(
                1, sum(c["payload"]["strategy"] == s for c in cells))
        return {"study": "active", "settings": st, "victim": store.get_meta("victim"),
                "machine": store.get_meta("run"), "fidelity": table, "cost_per_round": cost,
                "cells": len(cells), "seconds": {c["cell_id"]: c["seconds"] for c in cells}}

    @classmethod
    def markdown(cls, s: dict[str, Any]) -> str:
        from ..models import surrogate_label

        st, v = s["settings"], s.get("victim") or {}
        lines = [f"# Active stealing: fidelity vs budget ({st.get('dataset')}, victim "
                 f"{st.get('victim_arch')} {100 * v.get('test_accuracy', float('nan')):.2f}% "
                 f"test acc., surrogate {st.get('method')} S={st.get('members')} "
                 f"{surrogate_label(st.get('arch'))}, {st.get('output_mode')} answers)", "",
                 f"Seeds per cell: {st.get('seeds')}; mean ± std (sample std, shown when n > 1) "
                 "of test-set fidelity in %. Δ = paired difference to `random` (same seed: same "
                 "seed set, same initialisation), wins = seeds where the strategy beat random.",
                 ""]
        cps = [str(b) for b in st.get("milestones", [])]
        off = st.get("eval_seed_offset", 0)
        init = f"another initialisation (seed + {off})" if off else "the same initialisation"
        for which, title in (("retrained", f"Retrained from {init} on exactly the queried set "
                              "(query quality alone)"),
                             ("running", "The strategy's own running surrogate")):
            lines += [f"## {title}", "", "| strategy | " + " | ".join(cps) + " |",
                      "|---|" + "---|" * len(cps)]
            for strat, rows in s["fidelity"].items():
                cells = []
                for b in cps:
                    r = rows[which][b]
                    txt = fmt(r, digits=1)
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
            lines.append(f"| {strat} | {c['candidates']:.0f} | {c['forward']:.3f} | "
                         f"{c['stats']:.4f} | {c['features']:.3f} | {c['select']:.3f} | "
                         f"{c['total']:.3f} | {c['train']:.2f} |")
        lines += ["", f"{machine_line(s)}; total cell time {sum(s['seconds'].values()):.0f} s."]
        return "\n".join(lines) + "\n"

    @classmethod
    def figures(cls, store: Any, summary: dict[str, Any], directory: str) -> list[str]:
        if not summary["fidelity"]:
            return []
        return _figure(directory, summary["fidelity"], list(summary["fidelity"]),
                       [int(b) for b in summary["settings"]["milestones"]], summary["settings"])


def _figure(directory: str, table: dict, strategies: list[str], cps: list[int],
            settings: dict[str, Any]) -> list[str]:
    import os

    from ..results import figures

    return figures.active_fidelity_vs_budget(table, strategies, cps,
                                             os.path.join(directory, "fidelity_vs_budget"),
                                             dataset=settings["dataset"])
