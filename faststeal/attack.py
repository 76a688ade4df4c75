"""The attack: choose queries, ask the oracle, train surrogates on the answers, evaluate them.

``steal`` is the bring-your-own-victim entry point: any classifier (an ``nn.Module`` or a callable
from a batch of inputs to logits/probabilities), the attacker's pool and the test set as tensors
or torch Datasets. :func:`faststeal.experiment.run_comparison` drives the same functions for the
registry datasets and the zoo victims.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from . import metrics
from .methods import build_method
from .oracle import Oracle

TensorOrDataset = Union[torch.Tensor, tuple, torch.utils.data.Dataset]


def random_queries(pool_size: int, budget: int, seed: int) -> torch.Tensor:
    """``budget`` distinct pool indices drawn uniformly (the baseline query strategy)."""
    if budget > pool_size:
        raise ValueError(f"budget ({budget}) is larger than the attacker pool ({pool_size} images)")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(pool_size, generator=g)[:budget]


def query(oracle: Oracle, indices: torch.Tensor, batch_size: int = 1024,
          progress: bool = True) -> tuple[torch.Tensor, Any]:
    """Ask the oracle about ``indices`` in batches; returns (training targets, raw answers list)."""
    from tqdm.auto import tqdm

    targets = []
    answers = []
    for start in tqdm(range(0, len(indices), batch_size), desc="querying victim", unit="batch",
                      disable=not progress, leave=False):
        a = oracle.query(indices[start:start + batch_size])
        answers.append(a)
        targets.append(oracle.targets(a))
    return torch.cat(targets), answers


@torch.no_grad()
def victim_outputs(victim: Callable, x: torch.Tensor, batch_size: int = 1024,
                   outputs: str = "logits") -> torch.Tensor:
    """The victim's probabilities on evaluation data (the experimenter's view, not the attacker's)."""
    was_training = isinstance(victim, nn.Module) and victim.training
    if isinstance(victim, nn.Module):
        victim.eval()
    try:
        out = [victim(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    finally:
        if was_training:
            victim.train()
    out = torch.cat(out).float()
    return out.softmax(-1) if outputs == "logits" else out


def train_and_evaluate(method: str, arch: str, x: torch.Tensor, targets: torch.Tensor, *,
                       test_x: torch.Tensor, test_y: torch.Tensor, victim_labels: torch.Tensor,
                       victim_probs: Optional[torch.Tensor], num_classes: int, seed: int,
                       epochs: int, batch_size: int, lr: float, device: str,
                       probe: Optional[torch.Tensor] = None, record_every: int = 50,
                       hparams: Optional[dict] = None, progress: bool = True,
                       gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                       ) -> dict[str, Any]:
    """Train one method on the queried set and evaluate it on the test set.

    ``gather`` combines member predictions across ranks when the members are sharded
    (:mod:`faststeal.distributed`); metrics are then computed on all members.
    """
    t0 = time.perf_counter()
    m = build_method(method, arch, tuple(x.shape[1:]), num_classes, seed=seed, device=device,
                     **(hparams or {}))
    if gather is not None:
        m.gather_members = gather
    try:
        m.fit(x, targets, epochs=epochs, batch_size=batch_size, lr=lr, probe=probe,
              record_every=record_every, progress=progress)
    except torch.cuda.OutOfMemoryError as exc:
        raise RuntimeError(
            f"{method}: out of GPU memory with {m.num_members} members and batch size "
            f"{batch_size} per member; lower --batch-size, use fewer members "
            f"(--method-params '{{\"{method}\": {{\"members\": ...}}}}'), or shard the members "
            f"over GPUs with --nproc N --shard-members") from exc
    train_s = time.perf_counter() - t0
    members = m.predict_members(test_x)
    if gather is not None:
        members = gather(members)
        probs = None
    else:
        probs = m.predict_proba(test_x)
    check_finite(method, members, m.trace)
    res = metrics.evaluate(members, victim_labels, test_y, mean_probs=probs,
                           victim_probs=victim_probs)
    res["train_seconds"] = train_s
    res["eval_seconds"] = time.perf_counter() - t0 - train_s
    hp = dict(m.hparams())
    hp["num_members"] = int(members.shape[0])
    return {"metrics": res, "trace": list(m.trace), "hparams": hp, "seconds": train_s}


class NonFiniteError(FloatingPointError):
    """A member produced NaN/Inf: the cell is stopped, never averaged over."""


def check_finite(method: str, member_logits: torch.Tensor, trace: Sequence[dict]) -> None:
    """Raise :class:`NonFiniteError` naming the method, the members and the first bad iteration."""
    bad_loss = [t["iteration"] for t in trace
                if t.get("loss") is not None and not math.isfinite(t["loss"])]
    finite = torch.isfinite(member_logits.reshape(member_logits.shape[0], -1)).all(1)
    bad_members = (~finite).nonzero().flatten().tolist()
    if bad_members or bad_loss:
        where = (f"first non-finite training loss at iteration {bad_loss[0]}" if bad_loss
                 else "training loss finite at every record point")
        raise NonFiniteError(
            f"{method}: member(s) {bad_members or 'none'} of {member_logits.shape[0]} produced "
            f"non-finite outputs ({where}); lower the learning rate or check the targets")


def _as_xy(name: str, data: TensorOrDataset) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(data, torch.Tensor):
        return data, None
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return data[0], data[1]
    if isinstance(data, torch.utils.data.Dataset):
        items = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
        if isinstance(items[0], (tuple, list)):
            return (torch.stack([torch.as_tensor(i[0]) for i in items]),
                    torch.as_tensor([int(i[1]) for i in items]))
        return torch.stack([torch.as_tensor(i) for i in items]), None
    raise TypeError(f"{name} must be a tensor, an (x, y) tuple of tensors or a torch Dataset, "
                    f"got {type(data).__name__}")


def steal(victim: Callable, pool: TensorOrDataset, test: TensorOrDataset, budget: int, *,
          methods: Sequence[str] = ("baseline",), surrogate_arch: str = "mlp",
          output_mode: str = "label", seeds: Union[int, Sequence[int]] = 1, epochs: int = 10,
          batch_size: int = 128, lr: float = 1e-3, device: str = "cpu",
          victim_outputs_kind: str = "logits", query_seed: int = 0, progress: bool = True,
          method_params: Optional[dict[str, dict]] = None) -> dict[str, Any]:
    """Steal ``victim`` with a query budget and report each method's metrics per seed.

    victim: ``nn.Module`` or callable mapping a (B, ...) batch to (B, C) logits (or
    probabilities with ``victim_outputs_kind="probs"``); pool: attacker images (N, ...) (labels,
    if given, are ignored); test: (x, y) or a Dataset of (x, y) (or x alone: accuracy is then
    against the victim). Returns ``{"victim_test_accuracy", "queries", "results": {method:
    [per-seed metrics]}}``.
    """
    pool_x, _ = _as_xy("pool", pool)
    test_x, test_y = _as_xy("test", test)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"budget must be a positive int, got {budget!r}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    oracle = Oracle(victim, pool_x, budget, output_mode=output_mode, device=device,
                    victim_outputs=victim_outputs_kind)
    idx = random_queries(len(pool_x), budget, query_seed)
    targets, _ = query(oracle, idx, progress=progress)
    vprobs = victim_outputs(victim, test_x.to(device), outputs=victim_outputs_kind)
    vlabels = vprobs.argmax(-1)
    test_y = vlabels if test_y is None else test_y.to(device)
    num_classes = vprobs.shape[-1]
    x = pool_x[idx].to(device)
    results: dict[str, list] = {}
    for method in methods:
        for seed in seed_list:
            r = train_and_evaluate(
                method, surrogate_arch, x, targets.to(device), test_x=test_x.to(device),
                test_y=test_y, victim_labels=vlabels,
                victim_probs=vprobs if output_mode in ("probs", "logits") else None,
                num_classes=num_classes, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
                device=device, hparams=(method_params or {}).get(method), progress=progress)
            results.setdefault(method, []).append({"seed": seed, **r["metrics"]})
    return {"victim_test_accuracy": float((vlabels == test_y).float().mean()),
            "queries": {"used": oracle.used, "budget": oracle.budget}, "results": results}
