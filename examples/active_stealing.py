"""Active stealing, end to end: a victim, a budgeted (optionally defended) oracle, and query
strategies compared against random at the same budgets.

    python examples/active_stealing.py            # random vs bald vs mix at two milestones
    python examples/active_stealing.py --strategies random,kcenter --milestones 200,500,1000
    python examples/active_stealing.py --defense noise --output-mode probs
    python examples/active_stealing.py --defense prada            # PRADA may refuse mid-way

Every strategy gets the same seed set and the same surrogate initialisation; at each milestone a
surrogate retrained on exactly the queried set measures the queries' quality. Small by default
(minutes on a 2-core CPU); ``faststeal study active --help`` runs the full study (seeds, resume,
tables, figures).
"""

from __future__ import annotations

import argparse
import time

import torch

from faststeal.active import ActiveConfig, run_active
from faststeal.attack import victim_outputs
from faststeal.data import make_splits
from faststeal.defenses import DEFENSES, build_defense
from faststeal.oracle import Oracle
from faststeal.query import STRATEGIES
from faststeal.victim import train_victim


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--strategies", default="random,bald,mix",
                   help=f"comma-separated, from {', '.join(STRATEGIES)}")
    p.add_argument("--milestones", default="200,500", help="budgets at which to evaluate")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--min-steps", type=int, default=100)
    p.add_argument("--candidates", type=int, default=3000,
                   help="unqueried images scored per round (None-like: 0 = the whole pool)")
    p.add_argument("--output-mode", default="label", choices=("label", "topk", "probs"))
    p.add_argument("--defense", default="none", choices=DEFENSES)
    p.add_argument("--victim-arch", default="lenet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()

    splits = make_splits("fashion-mnist", max_test=2000)
    vic = train_victim(splits, a.victim_arch, device=a.device)
    print(f"victim {a.victim_arch}: {100 * vic.test_accuracy:.2f}% test accuracy")
    test_x, test_y = splits.test.x.to(a.device), splits.test.y.to(a.device)
    victim_labels = victim_outputs(vic.model, test_x).argmax(-1)
    milestones = [int(c) for c in a.milestones.split(",")]
    rows = {}
    for strategy in a.strategies.split(","):
        defense = build_defense(a.defense)  # a fresh one per strategy: same noise stream
        victim, kind = defense.wrap_victim(vic.model)
        oracle = defense.wrap_oracle(Oracle(
            victim, splits.pool.x, milestones[-1], output_mode=a.output_mode, device=a.device,
            victim_outputs=kind, probs_atol=defense.probs_atol(splits.num_classes)))
        cfg = ActiveConfig(strategy=strategy, milestones=milestones, epochs=a.epochs,
                           min_steps=a.min_steps, hparams={"members": a.members}, seed=a.seed,
                           strategy_params={"candidates": a.candidates or None})
        t0 = time.perf_counter()
        res = run_active(oracle, cfg, test_x=test_x, victim_labels=victim_labels,
                         test_y=test_y, device=a.device)
        rows[strategy] = res
        refused = f", refused at {res['refused_at']}" if res["refused_at"] is not None else ""
        print(f"{strategy}: {res['used']} queries in {time.perf_counter() - t0:.0f}s{refused}")

    print(f"\nfidelity (%) of the surrogate retrained on the queried set / running surrogate"
          f" (defence: {a.defense}, answers: {a.output_mode})")
    print("strategy      " + "".join(f"{b:>16}" for b in milestones))
    for strategy, res in rows.items():
        by_budget = {c["budget"]: c for c in res["milestones"]}
        cells = [f"{100 * by_budget[b]['retrained']['fidelity']:6.1f} / "
                 f"{100 * by_budget[b]['running']['fidelity']:5.1f}" if b in by_budget
                 else f"{'—':>14}" for b in milestones]
        print(f"{strategy:<14}" + "".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()
