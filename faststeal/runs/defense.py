"""Defended victims (``faststeal study defense``): what do the usual oracle defences cost each
method?

Every defence of :mod:`faststeal.defenses` stands in front of the same victim and answers the
same random query indices (asked once per defence in :meth:`DefenseStudy.begin`, until done or
refused); every method × seed trains on what that defence answered. Fidelity is measured against
the UNDEFENDED victim. Cells: ``<defence>/<method>/seed=<k>`` with per-epoch training
checkpoints. With ``replay_from`` (the folder of an active study) PRADA is also replayed on every
strategy's recorded query stream: when would it have refused?
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..methods import PAPER_METHODS
from ..results.report import machine_line
from .runner import (Cell, Run, Study, StudySettings, check_surrogate_fits, fmt, mean_std,
                     register)

#: defence name -> parameters (every defence of faststeal.defenses, and no defence)
DEFENSE_SETTINGS: dict[str, dict[str, Any]] = {
    "none": {}, "top1": {}, "rounding": {"decimals": 1}, "noise": {"sigma": 0.1},
    "reverse-sigmoid": {"beta": 1.0, "gamma": 0.1}, "prada": {"delta": 0.9}}


@dataclass
class DefenseSettings(StudySettings):
    """defenses: name -> parameters (default :data:`DEFENSE_SETTINGS`); methods: registered
    method names (default: the paper's); budget: random queries per defence; replay_from: an
    active study's run folder whose query streams PRADA replays (not hashed: the replay is
    recomputed on every run)."""

    defenses: dict = field(default_factory=lambda: {k: dict(v)
                                                    for k, v in DEFENSE_SETTINGS.items()})
    methods: tuple = PAPER_METHODS
    budget: int = 2000
    seeds: int = 2
    output_mode: str = "probs"
    replay_from: Optional[str] = None
    out: str = "runs/defense"

    RUN_FIELDS = StudySettings.RUN_FIELDS + ("replay_from",)
    QUICK = {**StudySettings.QUICK, "budget": 300}

    @staticmethod
    def named(field_name: str, text: str) -> dict[str, dict[str, Any]]:
        """``--defenses none,noise``: the named defences with their default parameters."""
        names = [n.strip() for n in text.split(",") if n.strip()]
        return {n: dict(DEFENSE_SETTINGS.get(n, {})) for n in names}

    def validate(self) -> "DefenseSettings":
        from ..checks import positive_int
        from ..defenses import OUTPUT_DEFENSES, build_defense
        from ..methods import check_hparams

        super().validate()
        positive_int("budget", self.budget)
        if not isinstance(self.defenses, dict) or not self.defenses:
            raise ValueError(f"defenses must be a non-empty dict of name -> parameters, got "
                             f"{self.defenses!r}")
        for name, params in self.defenses.items():
            build_defense(name, **params)
            if name in OUTPUT_DEFENSES and self.output_mode == "logits":
                raise ValueError(f"defense {name!r} post-processes probabilities; use "
                                 "output_mode 'probs', 'topk' or 'label', not 'logits'")
        if isinstance(self.methods, str) or not self.methods:
            raise ValueError(f"methods must be a non-empty list, got {self.methods!r}")
        for m in self.methods:
            check_hparams(m, self.members_for(m), self.arch)
        if self.replay_from is not None and not os.path.exists(
                os.path.join(self.replay_from, "results.sqlite")):
            raise ValueError(f"replay_from {self.replay_from!r} holds no results.sqlite (the "
                             "folder of an active study)")
        return self


@register
class DefenseStudy(Study):
    name = "defense"
    settings: DefenseSettings

    def check_splits(self, splits: Any) -> None:
        if self.settings.budget > len(splits.pool):
            raise ValueError(f"budget ({self.settings.budget}) is larger than the attacker pool "
                             f"({len(splits.pool)} images)")
        check_surrogate_fits(self.settings.arch, splits)

    def begin(self, run: Run) -> None:
        """Ask the same random indices through every defence (rank 0, one answer journal per
        defence in ``OUT/answers/``, the answers broadcast to every rank); record what each
        answered; replay PRADA on active-study streams."""
        from .. import distributed
        from ..attack import random_queries
        from ..defenses import build_defense, query_until_refused

        s, setup = self.settings, run.setup
        pool_x = setup.splits.pool.x
        idx_all = random_queries(len(pool_x), s.budget, 1)
        answered = {}
        for name, params in s.defenses.items():
            idx = targets = counts = None
            if run.is_main:
                defense = build_defense(name, **params)
                vic, kind = defense.wrap_victim(setup.victim)
                oracle = defense.wrap_oracle(run.oracle(
                    vic, s.budget, name=name, key={"defense": defense.name,
                                                   "defense_params": defense.params()},
                    output_mode=s.output_mode, victim_outputs=kind,
                    probs_atol=defense.probs_atol(setup.num_classes)))
                idx, targets, refused = query_until_refused(oracle, idx_all, batch_size=100)
                counts = torch.tensor([int(oracle.used), int(refused)])
            idx = distributed.broadcast_tensor(run.ctx, idx).cpu()
            targets = distributed.broadcast_tensor(run.ctx, targets).cpu()
            charged, refused = distributed.broadcast_tensor(run.ctx, counts).tolist()
            with torch.no_grad():
                true = (setup.victim(pool_x[idx].to(run.device)).argmax(-1).cpu() if len(idx)
                        else idx)
            shown = targets.argmax(-1) if targets.dtype.is_floating_point else targets
            answered[name] = {"answered": int(len(idx)), "charged": int(charged),
                              "refused": bool(refused),
                              "label_agreement": float((shown == true).float().mean())
                              if len(idx) else float("nan")}
            run.state[name] = (pool_x[idx].to(run.device), targets.to(run.device))
        run.state["answered"] = answered
        if run.is_main:
            run.store.set_meta("answered", answered)
            if s.replay_from is not None:
                from ..results import ResultStore

                src = ResultStore(s.replay_from)
                try:
                    streams = {c["cell_id"]: c["payload"]["queried"]
                               for c in src.cells("active")}
                finally:
                    src.close()
                run.store.set_meta("prada_replay", prada_replay(
                    streams, pool_x, setup.victim, device=run.device,
                    **s.defenses.get("prada", {})))

    def cells(self, run: Run) -> list[Cell]:
        s = self.settings
        return [Cell(f"{d}/{m}/seed={k}", "defense", m, k, s.members_for(m).get("members"),
                     {"defense": d}) for d in s.defenses for k in range(s.seeds)
                for m in s.methods]

    def run_cell(self, run: Run, cell: Cell, checkpoint: str) -> dict[str, Any]:
        from ..attack import train_and_evaluate

        s, setup = self.settings, run.setup
        d = cell.params["defense"]
        x, targets = run.state[d]
        payload = {"defense": d, **run.state["answered"][d]}
        if len(x) < 2:  # refused (almost) at once: nothing to train on
            return {"metrics": {"fidelity": float("nan")}, "hparams": {}, "seconds": 0.0,
                    "payload": payload}
        r = train_and_evaluate(cell.method, s.arch, x, targets, test_x=setup.test_x,
                               test_y=setup.test_y, victim_labels=setup.victim_labels,
                               victim_probs=setup.victim_probs, num_classes=setup.num_classes,
                               seed=cell.seed, epochs=s.epochs, batch_size=s.batch_size,
                               lr=s.lr, device=run.device, hparams=s.members_for(cell.method),
                               progress=False, checkpoint=checkpoint)
        return {"metrics": r["metrics"], "hparams": r["hparams"], "seconds": r["seconds"],
                "members": r["hparams"]["num_members"], "payload": payload}

    def describe(self, cell: Cell, result: dict[str, Any]) -> str:
        return (f"defense {cell.params['defense']}, {cell.method} (seed {cell.seed}): fidelity "
                f"{100 * result['metrics']['fidelity']:.2f}% [{result['seconds']:.1f}s]")

    # ------------------------------------------------------------------ report
    @classmethod
    def summarise(cls, store: Any) -> dict[str, Any]:
        st = store.get_meta("config") or {}
        cells = store.cells("defense")
        by = lambda c: c["payload"]["defense"]  # noqa: E731
        defenses = [d for d in st.get("defenses", {}) if any(by(c) == d for c in cells)]
        methods = [m for m in st.get("methods", []) if any(c["method"] == m for c in cells)]
        table: dict[str, dict[str, Any]] = {}
        for d in defenses:
            cs = [c for c in cells if by(c) == d]
            p = cs[0]["payload"]
            row: dict[str, Any] = {"answered": p["answered"], "refused": p["refused"],
                                   "label_agreement": p["label_agreement"], "methods": {}}
            for m in methods:
                mc = [c for c in cs if c["method"] == m]
                if not mc:
                    continue
                base = {c["seed"]: c["metrics"]["fidelity"] for c in cells
                        if by(c) == "none" and c["method"] == m}
                row["methods"][m] = {
                    "fidelity": mean_std([c["metrics"]["fidelity"] for c in mc]),
                    "delta_vs_none": mean_std([c["metrics"]["fidelity"] - base[c["seed"]]
                                               for c in mc if c["seed"] in base]),
                    "kl": mean_std([c["metrics"].get("kl") for c in mc])}
            table[d] = row
        summary = {"study": "defense", "settings": st, "victim": store.get_meta("victim"),
                   "machine": store.get_meta("run"), "table": table, "cells": len(cells)}
        replay = store.get_meta("prada_replay")
        if replay is not None:
            summary["prada_replay"] = replay
        return summary

    @classmethod
    def markdown(cls, s: dict[str, Any]) -> str:
        from ..models import surrogate_label

        st, v = s["settings"], s.get("victim") or {}
        methods = st.get("methods", [])
        lines = [f"# Defended victims ({st.get('dataset')}, victim {st.get('victim_arch')} "
                 f"{100 * v.get('test_accuracy', float('nan')):.2f}%, {st.get('budget')} random "
                 f"queries, `{st.get('output_mode')}` answers, surrogates "
                 f"{surrogate_label(st.get('arch'))})", "",
                 f"Fidelity (%) to the UNDEFENDED victim, mean ± std over {st.get('seeds')} "
                 "seed(s) (std shown when n > 1); Δ = paired difference to the same method "
                 "without a defence. `answered`: images answered before any refusal; `label agr.`: share "
                 "of answers whose top class is the victim's true top class.", "",
                 "| defence (params) | answered | label agr. | " + " | ".join(methods) + " |",
                 "|---|---|---|" + "---|" * len(methods)]
        for d, r in s["table"].items():
            cells = []
            for m in methods:
                x = r["methods"].get(m)
                if x is None:
                    cells.append("—")
                    continue
                txt = fmt(x["fidelity"], digits=1)
                if d != "none" and x["delta_vs_none"]["n"]:
                    txt += f" (Δ {100 * x['delta_vs_none']['mean']:+.1f})"
                cells.append(txt)
            params = json.dumps(st["defenses"][d]) if st["defenses"][d] else ""
            lines.append(f"| {d} {params} | {r['answered']}"
                         f"{' (refused)' if r['refused'] else ''} | "
                         f"{100 * r['label_agreement']:.1f}% | " + " | ".join(cells) + " |")
        if "prada_replay" in s:
            lines += ["", "## PRADA on the active study's query streams", "",
                      "| stream (strategy/seed) | flagged | after queries | min W | last W |",
                      "|---|---|---|---|---|"]

            def w(x: Optional[float]) -> str:
                return "—" if x is None else f"{x:.3f}"

            for k, r in s["prada_replay"].items():
                lines.append(f"| {k} | {'yes' if r['flagged'] else 'no'} | "
                             f"{r['flagged_at'] if r['flagged_at'] is not None else '—'} | "
                             f"{w(r['min_w'])} | {w(r['last_w'])} |")
        lines += ["", machine_line(s) + "."]
        return "\n".join(lines) + "\n"

    @classmethod
    def figures(cls, store: Any, summary: dict[str, Any], directory: str) -> list[str]:
        if not summary["table"]:
            return []
        methods = [m for m in summary["settings"]["methods"]
                   if any(m in r["methods"] for r in summary["table"].values())]
        return _figure(directory, summary["table"], list(summary["table"]), methods,
                       summary["settings"])


def prada_replay(streams: dict[str, list[int]], pool_x: torch.Tensor, victim: torch.nn.Module,
                 device: str = "cpu", **params: Any) -> dict[str, dict[str, Any]]:
    """Feed recorded query streams (pool indices in query order) through a fresh PRADA detector
    each; returns per stream: flagged?, after how many queries, min and last W."""
    from ..attack import victim_outputs
    from ..defenses import PradaDetector

    out = {}
    for name, order in streams.items():
        idx = torch.as_tensor(order, dtype=torch.long)
        x = pool_x[idx]
        labels = victim_outputs(victim, x.to(device)).argmax(-1).cpu()
        det = PradaDetector(**params)
        flagged_at = None
        for start in range(0, len(idx), 100):
            if det.observe(x[start:start + 100], labels[start:start + 100]):
                flagged_at = next(q for q, _, w in det.history if w < det.delta)
                break
        ws = [w for _, _, w in det.history]
        out[name] = {"flagged": det.flagged, "flagged_at": flagged_at, "queries": len(idx),
                     "min_w": min(ws) if ws else None, "last_w": ws[-1] if ws else None}
    return out


def _figure(directory: str, table: dict, defenses: list[str], methods: list[str],
            settings: dict[str, Any]) -> list[str]:
    from ..results import figures

    return figures.defense_fidelity(table, defenses, methods,
                                    os.path.join(directory, "fidelity_by_defense"),
                                    title=f"Defences, {settings['dataset']}, {settings['budget']} "
                                          f"random '{settings['output_mode']}' queries")
