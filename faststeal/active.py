"""The active-stealing loop and its evaluation protocol at budget milestones.

Loop (:func:`run_active`): query a random *seed set* (``seed_fraction`` of the budget), then
repeat rounds of **train → select → query** until the oracle's budget is spent:

1. train the strategy's *running surrogate* on everything queried so far (warm start: it keeps its
   weights from the previous round and trains ``round_epochs`` more epochs; cold: rebuilt from the
   same initialisation and trained ``epochs`` epochs);
2. the strategy (:mod:`faststeal.query`) picks ``k = min(round_size, remaining budget, images to
   the next milestone)`` not-yet-queried pool images, scoring the pool with the running surrogate;
3. the oracle answers them.

Budget. The budget is the oracle's (``oracle.budget``); a round never asks for more images than
``oracle.remaining`` and never re-asks an answered image, so no strategy can query past it (the
oracle would refuse a batch that did — a test checks this for every strategy over random budgets,
seed and round sizes). A defence that refuses to answer
(:class:`faststeal.defenses.QueryRefusedError`) ends the loop early; the result records where.

Milestones (the protocol of mebench's retrain-from-scratch evaluation). At each budget
milestone (e.g. 1k, 2k, 5k ...), two surrogates are evaluated on the test set:

* ``retrained`` — a fresh surrogate built with the SAME seed (hence the same initialisation and
  data order generator for every strategy) and trained ``epochs`` epochs on exactly the queried
  set. Strategies are then compared on the quality of their queries alone; with ``random`` this is
  the strong, equally trained baseline.
* ``running`` — the strategy's own running surrogate (what an attacker running the loop has).

The seed set is the same for every strategy with the same ``seed`` (it is drawn before the
strategy acts), so curves differ only from the first selected round on.

Resume (``run_active(..., checkpoint=PATH)``, with an oracle that journals its answers): the
loop's state — everything queried and its answers, the rounds and milestones so far, the running
surrogate, the selection RNG — is saved to PATH at the start of every round, and every fit writes
per-epoch checkpoints next to it (``Method.fit(checkpoint=...)``: ``<stem>.running<ext>``,
``<stem>.retrained<ext>``). A rerun with the same arguments goes on from the last round (the fit
in progress from its last epoch); images the killed run had asked in that round come back from
the oracle's journal free. The result is the one of an uninterrupted run (timings aside).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from . import metrics
from .checks import positive_int
from .methods import build_method
from .methods import checkpoint as fit_checkpoint
from .models.surrogate import SurrogateLike, asdict_keyed
from .query import Strategy, make_strategy

MethodFactory = Callable[[int], Any]


@dataclass
class ActiveConfig:
    """Settings of one active-stealing run (validated by :meth:`validate`).

    strategy / strategy_params: see :class:`faststeal.query.Strategy`.
    milestones: budgets at which surrogates are evaluated (ascending; the last is the budget the
        loop spends; default: the oracle's whole budget). (Not training checkpoints: those are
        :mod:`faststeal.methods.checkpoint`.)
    seed_fraction / seed_size: size of the random seed set (``seed_size`` wins when given);
        clipped to the first milestone.
    round_size: images per selection round (default: the seed set's size).
    method / arch / hparams: the surrogate (a :data:`faststeal.methods.METHODS` name; ``arch``:
        anything :func:`faststeal.models.resolve_surrogate` takes); eval_method: the retrained
        surrogate's method (default: ``method``).
    epochs: training epochs of the retrained surrogate (and of a cold-started running one);
        min_steps: but at least this many optimizer steps (more epochs on small sets, so that
        a 500-image milestone is not judged on a barely trained surrogate; the same for every
        strategy at a milestone since the set sizes are equal);
        round_epochs: epochs the warm-started running surrogate trains per round.
    seed: one seed for the seed set, the selection RNG, and every surrogate's initialisation.
    eval_seed_offset: the retrained surrogate is built with ``seed + eval_seed_offset`` (0: the
        running surrogate's own initialisation; another value checks that a query set chosen by
        one network also serves a differently initialised one).
    """

    strategy: str = "random"
    strategy_params: dict = field(default_factory=dict)
    milestones: Optional[Sequence[int]] = None
    seed_fraction: float = 0.1
    seed_size: Optional[int] = None
    round_size: Optional[int] = None
    method: str = "deep-ensemble"
    eval_method: Optional[str] = None
    arch: SurrogateLike = "mlp"
    hparams: dict = field(default_factory=dict)
    epochs: int = 5
    min_steps: int = 0
    round_epochs: int = 2
    warm_start: bool = True
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    eval_seed_offset: int = 0

    def validate(self, budget: int) -> "ActiveConfig":
        make_strategy(self.strategy, **self.strategy_params)  # raises on a bad strategy
        for name in ("epochs", "round_epochs", "batch_size"):
            positive_int(name, getattr(self, name))
        if self.milestones is not None:
            cps = [int(c) for c in self.milestones]
            if not cps:
                raise ValueError("milestones must name at least one budget")
            for c in cps:
                positive_int("milestone", c)
            if sorted(set(cps)) != cps:
                raise ValueError(f"milestones must be strictly ascending, got {cps}")
            if cps[-1] > budget:
                raise ValueError(f"the last milestone ({cps[-1]}) exceeds the oracle's budget "
                                 f"({budget})")
        if not 0.0 < self.seed_fraction <= 1.0:
            raise ValueError(f"seed_fraction must be in (0, 1], got {self.seed_fraction}")
        positive_int("seed_size", self.seed_size, allow_none=True)
        positive_int("round_size", self.round_size, allow_none=True)
        positive_int("min_steps", self.min_steps, minimum=0)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a positive float, got {self.lr!r}")
        positive_int("seed", self.seed, minimum=0)
        return self

    def epochs_for(self, n: int) -> int:
        """Epochs of a from-scratch fit on ``n`` images: ``epochs``, raised to ``min_steps``."""
        steps_per_epoch = max(1, math.ceil(n / self.batch_size))
        return max(self.epochs, math.ceil(self.min_steps / steps_per_epoch))

    def plan(self, budget: int) -> tuple[list[int], int, int]:
        """(milestones, seed set size, round size) for an oracle with ``budget``."""
        cps = [int(c) for c in self.milestones] if self.milestones is not None else [budget]
        seed_n = self.seed_size if self.seed_size is not None else max(
            1, int(round(self.seed_fraction * cps[-1])))
        seed_n = min(seed_n, cps[0])
        round_n = self.round_size if self.round_size is not None else seed_n
        return cps, seed_n, round_n


def evaluate_surrogate(method: Any, test_x: Tensor, victim_labels: Tensor, test_y: Tensor,
                       victim_probs: Optional[Tensor] = None,
                       who: str = "surrogate") -> dict[str, float]:
    """:func:`faststeal.metrics.evaluate` of a fitted surrogate on the test set; NaN/inf
    predictions raise :class:`faststeal.metrics.NonFiniteError` naming ``who``."""
    members = method.predict_members(test_x)
    return metrics.evaluate(members, victim_labels.to(members.device), test_y.to(members.device),
                            mean_probs=method.predict_proba(test_x),
                            victim_probs=None if victim_probs is None
                            else victim_probs.to(members.device), who=who)


def run_active(oracle: Any, config: ActiveConfig, *, test_x: Tensor, victim_labels: Tensor,
               test_y: Tensor, victim_probs: Optional[Tensor] = None, device: Any = "cpu",
               method_factory: Optional[MethodFactory] = None,
               eval_factory: Optional[MethodFactory] = None,
               progress: bool = True,
               checkpoint: "str | os.PathLike | None" = None) -> dict[str, Any]:
    """Run one strategy's active loop against ``oracle`` and evaluate it at every milestone.

    oracle: a :class:`faststeal.oracle.Oracle` (or a defence wrapper of one) whose ``pool_x`` is
        the attacker's pool; it must not have been queried before (its budget is the loop's),
        except through its journal by an earlier run of this same loop (answered free).
    test_x / victim_labels / test_y (/ victim_probs): the experimenter's evaluation set.
    method_factory(seed) / eval_factory(seed): override how the running / retrained surrogates are
        built (default: :func:`faststeal.methods.build_method` from ``config``).
    checkpoint: a file path for the loop's state (see the module docstring); needs a plain
        ``Oracle`` with a journal (the answers must outlive a kill too; a defence wrapper keeps
        state the checkpoint does not hold). A state of another loop raises
        :class:`faststeal.methods.checkpoint.CheckpointError`. The file is kept when the loop
        returns (delete it once the result is stored); the fit checkpoints are deleted.

    Returns a JSON-ready dict: ``config``, ``strategy``, ``milestones`` (per milestone:
    ``budget``, ``used``, ``retrained`` and ``running`` metrics, seconds), ``rounds`` (per round:
    ``used`` before it, ``k``, selection seconds split into forward/stats/features/select, the
    running surrogate's training seconds, the number of candidates scored), ``queried`` (pool
    indices in query order), ``used``, ``refused_at`` (oracle.used when a defence refused, else
    None) and ``seconds``.
    """
    from .defenses import QueryRefusedError
    from .oracle import Oracle

    journaled = getattr(oracle, "journal_path", None) is not None
    if oracle.used != 0 and not journaled:
        raise ValueError(f"the oracle has already charged {oracle.used} images; run_active needs "
                         "a fresh oracle (its budget is the loop's)")
    ckpt = fit_checkpoint.as_path(checkpoint)
    if ckpt is not None and not (isinstance(oracle, Oracle) and journaled):
        raise ValueError("checkpoint needs a faststeal.oracle.Oracle with a journal (Oracle(..., "
                         "journal=PATH)): the answers must survive a kill too, and a defence "
                         f"wrapper keeps state a checkpoint does not hold; got {oracle!r}")
    budget = int(oracle.budget)
    config.validate(budget)
    cps, seed_n, round_n = config.plan(budget)
    strategy: Strategy = make_strategy(config.strategy, **config.strategy_params)
    pool_x: Tensor = oracle.pool_x
    n_pool = int(pool_x.shape[0])
    if cps[-1] > n_pool:
        raise ValueError(f"the budget to spend ({cps[-1]}) exceeds the pool ({n_pool} images)")
    input_shape = tuple(pool_x.shape[1:])

    def num_classes() -> int:  # known to the oracle after its first answer
        c = oracle_num_classes(oracle)
        return c if c is not None else int(victim_labels.max().item()) + 1

    def default_factory(name: str) -> MethodFactory:
        return lambda seed: build_method(name, config.arch, input_shape, num_classes(),
                                         seed=seed, device=device, **config.hparams)

    method_factory = method_factory or default_factory(config.method)
    eval_factory = eval_factory or default_factory(config.eval_method or config.method)
    fit_kw = dict(batch_size=config.batch_size, lr=config.lr, progress=False)
    t_start = time.perf_counter()
    gen = torch.Generator().manual_seed(config.seed)
    # the fits' per-epoch checkpoints; they exist only while the loop state at ``ckpt`` is the
    # one just before their round (deleted before every save of the state and at the end), so
    # a rerun never finds a fit checkpoint of another round
    if ckpt is not None:
        root, ext = os.path.splitext(ckpt)
        fit_ckpts = {"running": f"{root}.running{ext}", "retrained": f"{root}.retrained{ext}"}
    else:
        fit_ckpts = {"running": None, "retrained": None}

    def ckpt_kw(method: Any, which: str) -> dict[str, Any]:
        path = fit_ckpts[which]
        return {"checkpoint": path} if path and method.supports_checkpoint else {}

    def remove_fit_ckpts() -> None:
        for path in fit_ckpts.values():
            if path is not None and os.path.exists(path):
                os.remove(path)

    queried: list[Tensor] = []
    targets: list[Tensor] = []
    labeled_mask = torch.zeros(n_pool, dtype=torch.bool)
    rounds: list[dict[str, Any]] = []
    milestones: list[dict[str, Any]] = []
    refused_at: Optional[int] = None
    running = None
    config_dict = _jsonable(asdict_keyed(config, "arch"))  # a user model as its fingerprint
    fingerprint = {"kind": "active-loop", "config": config_dict, "budget": budget,
                   "output_mode": getattr(oracle, "output_mode", None),
                   "device": torch.device(device).type, "pool": fit_checkpoint.digest(pool_x),
                   "test_x": fit_checkpoint.digest(test_x), "test_y": fit_checkpoint.digest(test_y),
                   "victim_labels": fit_checkpoint.digest(victim_labels),
                   "victim_probs": fit_checkpoint.digest(victim_probs)}
    saved = None
    if ckpt is not None and os.path.exists(ckpt):
        saved = fit_checkpoint.load(ckpt)
        fit_checkpoint.check_fingerprint(ckpt, saved.get("fingerprint"), fingerprint)
        try:
            queried, targets = [saved["queried"]], [saved["targets"]]
            labeled_mask[saved["queried"]] = True
            rounds, milestones = list(saved["rounds"]), list(saved["milestones"])
            gen.set_state(saved["gen"])
            if saved["running"] is not None:
                running = method_factory(config.seed)
                running.load_state_dict(saved["running"])
            t_start -= float(saved["elapsed"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise fit_checkpoint.CheckpointError(
                f"checkpoint {ckpt} could not be restored ({type(exc).__name__}: {exc}); delete "
                "it to start the loop again") from exc

    def save_state() -> None:
        remove_fit_ckpts()  # first: a kill between the two must not leave them
        fit_checkpoint.save(ckpt, {
            "fingerprint": fingerprint, "queried": torch.cat(queried),
            "targets": torch.cat(targets).cpu(), "rounds": rounds, "milestones": milestones,
            "gen": gen.get_state(), "elapsed": time.perf_counter() - t_start,
            "running": None if running is None else running.state_dict()})

    def ask(idx: Tensor) -> bool:
        """Query ``idx``; False if a defence refused (nothing is recorded then)."""
        nonlocal refused_at
        left = budget - int(labeled_mask.sum())
        if int(idx.numel()) > left:  # defensive: the plan never does this
            raise RuntimeError(f"internal error: {idx.numel()} images asked with {left} left")
        try:
            answers = oracle.query(idx)
        except QueryRefusedError:
            refused_at = int(oracle.used)
            return False
        queried.append(answers.indices.clone())
        targets.append(oracle.targets(answers))
        labeled_mask[answers.indices] = True
        return True

    def current() -> tuple[Tensor, Tensor]:
        idx = torch.cat(queried)
        return pool_x[idx], torch.cat(targets)

    from .progress import progress_bar

    bar = progress_bar(total=cps[-1], desc=f"active:{strategy.name}", unit="q",
                       disable=not progress, leave=False)
    if saved is None:
        # the seed set: the same for every strategy given the seed
        seed_idx = torch.randperm(n_pool, generator=torch.Generator().manual_seed(
            config.seed * 7919 + 1))[:seed_n]
        ok = ask(seed_idx)
    else:
        ok = True
    bar.update(int(labeled_mask.sum()))
    next_cp: Optional[int] = cps[len(milestones)]  # the state is saved with ok: none refused
    just_restored = saved is not None
    while ok:
        if ckpt is not None and not just_restored:
            save_state()
        just_restored = False
        used = int(labeled_mask.sum())
        x_l, y_l = current()
        # 1. the running surrogate on everything queried so far
        t0 = time.perf_counter()
        if running is None or not config.warm_start:
            running = method_factory(config.seed)
            running.fit(x_l, y_l, epochs=config.epochs_for(used), **fit_kw,
                        **ckpt_kw(running, "running"))
        else:
            running.fit(x_l, y_l, epochs=config.round_epochs, **fit_kw,
                        **ckpt_kw(running, "running"))
        train_s = time.perf_counter() - t0
        if used == next_cp:
            milestones.append(_evaluate_at_milestone(
                used, running, eval_factory, config, x_l, y_l, test_x, victim_labels, test_y,
                victim_probs, t_start, checkpoint=fit_ckpts["retrained"]))
            bar.set_postfix(fid=f"{milestones[-1]['retrained']['fidelity']:.3f}",
                            refresh=False)
            next_cp = cps[len(milestones)] if len(milestones) < len(cps) else None
            if next_cp is None:
                break
        # 2. select (never more than the budget left, never past the next milestone); the
        # loop's own count, not oracle.remaining: after a resume the journal may already hold
        # (and charge) this round's images, which are answered again free
        k = min(round_n, budget - used, next_cp - used)
        if k <= 0:
            break
        unlabeled = torch.nonzero(~labeled_mask).flatten()
        picks, secs = strategy.select(running, pool_x, unlabeled,
                                      torch.nonzero(labeled_mask).flatten(), k, gen)
        rounds.append({"round": len(rounds), "used": used, "k": int(picks.numel()),
                       "train_seconds": train_s,
                       "candidates": 0 if not strategy.needs_surrogate
                       else int(unlabeled.numel()) if strategy.candidates is None
                       else min(strategy.candidates, int(unlabeled.numel())),
                       **{f"{key}_seconds": v for key, v in secs.items()}})
        # 3. query
        ok = ask(picks)
        bar.update(int(picks.numel()) if ok else 0)
    bar.close()
    if refused_at is not None and running is not None and (
            not milestones or milestones[-1]["used"] < int(labeled_mask.sum())):
        # a defence stopped the loop: evaluate what the attacker has at that point
        x_l, y_l = current()
        milestones.append(_evaluate_at_milestone(int(labeled_mask.sum()), running, eval_factory,
                                                 config, x_l, y_l, test_x, victim_labels,
                                                 test_y, victim_probs, t_start))
        milestones[-1]["refused"] = True
    remove_fit_ckpts()
    all_q = torch.cat(queried) if queried else torch.empty(0, dtype=torch.int64)
    return {"strategy": strategy.params(), "config": config_dict,
            "milestones": milestones, "rounds": rounds, "queried": all_q.tolist(),
            "used": int(oracle.used), "budget": budget, "refused_at": refused_at,
            "seconds": time.perf_counter() - t_start}


def oracle_num_classes(oracle: Any) -> Optional[int]:
    try:
        return int(oracle.num_classes)
    except (RuntimeError, AttributeError):
        return None


def _evaluate_at_milestone(used: int, running: Any, eval_factory: MethodFactory,
                           config: ActiveConfig, x_l: Tensor, y_l: Tensor, test_x: Tensor,
                           victim_labels: Tensor, test_y: Tensor, victim_probs: Optional[Tensor],
                           t_start: float, checkpoint: Optional[str] = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    run_m = evaluate_surrogate(running, test_x, victim_labels, test_y, victim_probs,
                               who=f"{config.method} (seed {config.seed}, running, {used} queries)")
    if (not config.warm_start and config.eval_method in (None, config.method)
            and config.eval_seed_offset == 0):
        ret_m, ret_s = run_m, 0.0  # cold running surrogate == the retrained one
    else:
        t1 = time.perf_counter()
        fresh = eval_factory(config.seed + config.eval_seed_offset)
        fresh.fit(x_l, y_l, epochs=config.epochs_for(int(x_l.shape[0])),
                  batch_size=config.batch_size, lr=config.lr, progress=False,
                  **({"checkpoint": checkpoint} if checkpoint and fresh.supports_checkpoint
                     else {}))
        ret_m = evaluate_surrogate(
            fresh, test_x, victim_labels, test_y, victim_probs,
            who=f"{config.eval_method or config.method} (seed "
                f"{config.seed + config.eval_seed_offset}, retrained, {used} queries)")
        ret_s = time.perf_counter() - t1
    return {"budget": used, "used": used, "epochs": config.epochs_for(int(x_l.shape[0])),
            "retrained": ret_m, "running": run_m,
            "retrain_seconds": ret_s, "seconds": time.perf_counter() - t0,
            "elapsed": time.perf_counter() - t_start}


def _jsonable(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    return d
