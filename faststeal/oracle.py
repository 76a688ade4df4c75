"""The budgeted black-box oracle: the only way an attacker reaches the victim.

An :class:`Oracle` wraps a victim classifier (an ``nn.Module`` or any callable from a batch of
inputs to logits or probabilities) and a pool of query images. The attacker asks by pool
index and gets back only what the output mode reveals (hard label, top-k, probabilities or
logits). Accounting: one query = one image; answers are cached per pool index, so asking for
an image again costs nothing; a batch that would take the number of distinct charged images
past the budget is refused whole (:class:`BudgetExceededError`) and nothing of it is answered
or charged.

The victim is held privately: no public attribute or method returns it or its parameters, and
the oracle refuses to be pickled or deep-copied (which would copy the victim). This is an API
boundary that keeps experiment code honest, not a sandbox against Python introspection.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from .checks import positive_int
from .files import atomic_write

OUTPUT_MODES: tuple[str, ...] = ("label", "topk", "probs", "logits")
VICTIM_OUTPUTS: tuple[str, ...] = ("logits", "probs")


class BudgetExceededError(RuntimeError):
    """A query batch would take the number of charged images past the oracle's budget."""


@dataclass
class Answers:
    """What the oracle reveals for one query batch (row i answers ``indices[i]``).

    labels: (n,) int64 top-1 class as revealed by the mode (every mode: for ``probs``/``logits``
    it is the argmax of the revealed values). Mode-specific fields (None otherwise):
    topk_indices (n, k) int64 and, with scores, topk_scores (n, k) float32 probabilities
    (``topk``); probs (n, C) float32 (``probs``); logits (n, C) float32 (``logits``).
    charged: how many new images this batch cost.
    """

    indices: Tensor
    output_mode: str
    labels: Tensor
    topk_indices: Tensor | None = None
    topk_scores: Tensor | None = None
    probs: Tensor | None = None
    logits: Tensor | None = None
    charged: int = 0

    def __len__(self) -> int:
        return int(self.indices.shape[0])


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(choices)}")
    return value


class Oracle:
    """Budgeted black-box access to a victim classifier.

    victim: ``nn.Module`` (switched to eval mode and moved to ``device``) or any callable
        mapping a (B, ...) input batch to (B, C) logits (``victim_outputs="logits"``) or
        probabilities (``victim_outputs="probs"``). Always called under ``torch.no_grad``.
    pool_x: (N, ...) tensor of query images; queries name rows of it by index.
    budget: maximum number of distinct images that may be charged.
    output_mode: ``label`` | ``topk`` | ``probs`` | ``logits``.
    k, with_scores: for ``topk``: how many classes, and whether their probabilities come too.
    temperature: probabilities are softmax(logits / temperature) (``probs``, topk scores).
    decimals: round revealed real values (probabilities, scores, logits) to this many digits.
    num_classes: number of victim classes if known (else inferred from the first answer).
    """

    def __init__(self, victim: nn.Module | Callable[[Tensor], Tensor], pool_x: Tensor,
                 budget: int, *, output_mode: str = "label", k: int = 1,
                 with_scores: bool = True, temperature: float = 1.0,
                 decimals: int | None = None, batch_size: int = 1024,
                 device: str | torch.device = "cpu", victim_outputs: str = "logits",
                 num_classes: int | None = None) -> None:
        if not callable(victim):
            raise TypeError(f"victim must be an nn.Module or a callable, got "
                            f"{type(victim).__name__}")
        if not isinstance(pool_x, Tensor) or pool_x.dim() < 2:
            got = (f"shape {tuple(pool_x.shape)}" if isinstance(pool_x, Tensor)
                   else type(pool_x).__name__)
            raise ValueError(f"pool_x must be an (N, ...) tensor of query inputs, got {got}")
        if pool_x.shape[0] == 0:
            raise ValueError("pool_x is empty: the attacker needs at least one image to query")
        self._budget = positive_int("budget", budget)
        self._mode = _choice("output_mode", output_mode, OUTPUT_MODES)
        self._victim_outputs = _choice("victim_outputs", victim_outputs, VICTIM_OUTPUTS)
        if self._mode == "logits" and self._victim_outputs == "probs":
            raise ValueError("output_mode='logits' needs a victim that outputs logits "
                             "(victim_outputs='logits'); this victim outputs probabilities")
        self._k = positive_int("k", k)
        if self._mode != "topk" and self._k != 1:
            raise ValueError(f"k={k} only applies to output_mode='topk', not {self._mode!r}")
        self._with_scores = bool(with_scores)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self._temperature = float(temperature)
        if decimals is not None and (isinstance(decimals, bool) or not isinstance(decimals, int)
                                     or decimals < 0):
            raise ValueError(f"decimals must be None or an int >= 0, got {decimals!r}")
        self._decimals = decimals
        self._batch_size = positive_int("batch_size", batch_size)
        self._device = torch.device(device)
        self._num_classes = (None if num_classes is None
                             else positive_int("num_classes", num_classes))
        if self._num_classes is not None and self._mode == "topk" and self._k > self._num_classes:
            raise ValueError(f"k={self._k} exceeds num_classes={self._num_classes}")

        if isinstance(victim, nn.Module):
            victim = victim.to(self._device).eval()
        self.__victim = victim  # name-mangled: not part of the public surface
        self._pool_x = pool_x.detach()
        n = int(pool_x.shape[0])
        self._answered = torch.zeros(n, dtype=torch.bool)
        self._cache: dict[str, Tensor] = {}  # allocated on the first answer (needs C)
        self._used = 0
        self._log: list[dict[str, Any]] = []

    # -- public read-only state ---------------------------------------------------------------
    @property
    def budget(self) -> int:
        return self._budget

    @property
    def used(self) -> int:
        """Distinct images charged so far."""
        return self._used

    @property
    def remaining(self) -> int:
        return self._budget - self._used

    @property
    def pool_size(self) -> int:
        return int(self._pool_x.shape[0])

    @property
    def pool_x(self) -> Tensor:
        """The attacker's own query images (N, ...)."""
        return self._pool_x

    @property
    def output_mode(self) -> str:
        return self._mode

    @property
    def k(self) -> int:
        return self._k

    @property
    def with_scores(self) -> bool:
        return self._with_scores

    @property
    def answered_indices(self) -> Tensor:
        """Sorted pool indices answered (and charged) so far; re-querying them is free."""
        return torch.nonzero(self._answered).flatten()

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            raise RuntimeError("num_classes is not known before the first answered query; "
                               "query at least one image or pass num_classes= to Oracle")
        return self._num_classes

    @property
    def log(self) -> list[dict[str, Any]]:
        """Per call: time (unix s), requested, charged, used (cumulative), refused, indices."""
        return [dict(e, indices=list(e["indices"])) for e in self._log]

    def save_log(self, path: str | os.PathLike) -> Path:
        """Write the query log and the oracle's settings as JSON."""
        doc = {"budget": self._budget, "used": self._used, "pool_size": self.pool_size,
               "output_mode": self._mode, "k": self._k, "with_scores": self._with_scores,
               "temperature": self._temperature, "decimals": self._decimals,
               "queries": self._log}
        return atomic_write(path, json.dumps(doc, indent=1))

    def __repr__(self) -> str:
        return (f"Oracle(pool_size={self.pool_size}, budget={self._budget}, used={self._used}, "
                f"output_mode={self._mode!r}" + (f", k={self._k}" if self._mode == "topk" else "")
                + ")")

    def __getstate__(self):
        raise TypeError("an Oracle cannot be pickled or copied: it would hand out the victim")

    # -- querying --------------------------------------------------------------------------------
    def _check_indices(self, indices: Any) -> Tensor:
        if isinstance(indices, Tensor):
            idx = indices.detach().cpu()
        else:
            try:
                idx = torch.as_tensor(np.asarray(indices))
            except (TypeError, ValueError) as e:
                raise TypeError(f"indices must be a 1-D integer tensor or list, got "
                                f"{type(indices).__name__}") from e
            if isinstance(indices, (list, tuple)) and len(indices) == 0:
                idx = idx.to(torch.int64)
        if idx.dtype in (torch.bool,) or idx.dtype.is_floating_point or idx.dtype.is_complex:
            raise TypeError(f"indices must be integers, got dtype {idx.dtype}")
        if idx.dim() != 1:
            raise ValueError(f"indices must be 1-D, got shape {tuple(idx.shape)}")
        idx = idx.to(torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.pool_size):
            bad = idx[(idx < 0) | (idx >= self.pool_size)][:5].tolist()
            raise IndexError(f"indices out of range for a pool of {self.pool_size} images "
                             f"(valid: 0..{self.pool_size - 1}), got e.g. {bad}")
        return idx

    def query(self, indices: Tensor | list[int] | np.ndarray) -> Answers:
        """Answer the pool images ``indices`` (1-D ints); charges only images not yet answered.

        Raises BudgetExceededError (and charges/answers nothing) if the batch's new images
        would exceed the budget.
        """
        idx = self._check_indices(indices)
        new = torch.unique(idx[~self._answered[idx]])  # sorted, distinct, uncharged
        n_new = int(new.numel())
        entry = {"time": time.time(), "requested": int(idx.numel()), "charged": 0,
                 "used": self._used, "refused": False, "indices": idx.tolist()}
        if self._used + n_new > self._budget:
            entry["refused"] = True
            self._log.append(entry)
            raise BudgetExceededError(
                f"query refused: it needs {n_new} new images ({idx.numel()} requested, "
                f"{int(self._answered[idx].sum())} already answered) but the budget "
                f"is {self._budget} with {self._used} used ({self.remaining} remaining); "
                "nothing was answered or charged")
        if n_new:
            self._answer_new(new)
        self._used += n_new
        entry["charged"], entry["used"] = n_new, self._used
        self._log.append(entry)
        return self._gather(idx, n_new)

    def _victim_forward(self, x: Tensor) -> Tensor:
        out = self.__victim(x.to(self._device))
        if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
            got = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"victim must return ({x.shape[0]}, num_classes) scores for a batch "
                             f"of {x.shape[0]}, got {got}")
        return out.detach().float().cpu()

    def _answer_new(self, new: Tensor) -> None:
        with torch.no_grad():
            outs = [self._victim_forward(self._pool_x[new[i:i + self._batch_size]])
                    for i in range(0, new.numel(), self._batch_size)]
        raw = torch.cat(outs)
        c = raw.shape[1]
        if self._num_classes is None:
            if self._mode == "topk" and self._k > c:
                raise ValueError(f"k={self._k} exceeds the victim's {c} classes")
            self._num_classes = c
        elif c != self._num_classes:
            raise ValueError(f"victim returned {c} classes but num_classes={self._num_classes}")
        if self._victim_outputs == "logits":
            logits = raw
            probs = torch.softmax(raw / self._temperature, dim=1)
        else:
            logits = None
            probs = raw if self._temperature == 1.0 else torch.softmax(
                torch.log(raw.clamp_min(1e-45)) / self._temperature, dim=1)
        labels = raw.argmax(dim=1)
        revealed: dict[str, Tensor] = {}
        if self._mode == "label":
            revealed["labels"] = labels
        elif self._mode == "topk":
            scores, top = probs.topk(self._k, dim=1)
            revealed["topk_indices"] = top
            if self._with_scores:
                revealed["topk_scores"] = self._round(scores)
            revealed["labels"] = top[:, 0]
        elif self._mode == "probs":
            revealed["probs"] = self._round(probs)
            revealed["labels"] = revealed["probs"].argmax(dim=1)
        else:
            revealed["logits"] = self._round(logits)
            revealed["labels"] = revealed["logits"].argmax(dim=1)
        for key, val in revealed.items():
            if key not in self._cache:
                self._cache[key] = torch.zeros((self.pool_size,) + tuple(val.shape[1:]),
                                               dtype=val.dtype)
            self._cache[key][new] = val
        self._answered[new] = True

    def _round(self, t: Tensor) -> Tensor:
        return t if self._decimals is None else torch.round(t, decimals=self._decimals)

    def _gather(self, idx: Tensor, charged: int) -> Answers:
        def get(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor | None:
            if key in self._cache:
                return self._cache[key][idx].clone()
            return torch.zeros((0,) + shape, dtype=dtype) if idx.numel() == 0 else None

        c = self._num_classes or 0
        mode = self._mode
        labels = get("labels", (), torch.int64)
        return Answers(
            indices=idx.clone(), output_mode=mode,
            labels=labels if labels is not None else torch.zeros(0, dtype=torch.int64),
            topk_indices=get("topk_indices", (self._k,), torch.int64) if mode == "topk" else None,
            topk_scores=(get("topk_scores", (self._k,), torch.float32)
                         if mode == "topk" and self._with_scores else None),
            probs=get("probs", (c,), torch.float32) if mode == "probs" else None,
            logits=get("logits", (c,), torch.float32) if mode == "logits" else None,
            charged=charged)

    # -- training targets ------------------------------------------------------------------------
    def targets(self, answers: Answers) -> Tensor:
        """Training targets from answers.

        label -> (n,) int64 labels; probs / logits -> (n, C) probabilities (rounded
        probabilities renormalised; a row rounded to all zeros becomes uniform); topk with
        scores -> (n, C) probabilities with mass only on the top-k classes (renormalised);
        topk without scores -> (n,) int64 top-1 labels.
        """
        if answers.output_mode != self._mode:
            raise ValueError(f"answers are from output_mode {answers.output_mode!r}, this oracle "
                             f"uses {self._mode!r}")
        if self._mode == "label" or (self._mode == "topk" and not self._with_scores):
            return answers.labels.clone()
        c = self.num_classes if len(answers) else (self._num_classes or 0)
        if self._mode == "probs":
            return _renormalise(answers.probs.clamp_min(0.0))  # type: ignore[union-attr]
        if self._mode == "logits":
            return torch.softmax(answers.logits, dim=1)  # type: ignore[arg-type]
        scores = answers.topk_scores.clamp_min(0.0)  # type: ignore[union-attr]
        # all-zero scores (heavy rounding): spread the mass evenly over the revealed top-k
        zero = scores.sum(dim=1, keepdim=True) <= 0
        scores = torch.where(zero, torch.ones_like(scores), scores)
        dense = torch.zeros(len(answers), c, dtype=torch.float32)
        dense.scatter_(1, answers.topk_indices, scores)  # type: ignore[arg-type]
        return dense / dense.sum(dim=1, keepdim=True)


def _renormalise(p: Tensor) -> Tensor:
    s = p.sum(dim=1, keepdim=True)
    uniform = torch.full_like(p, 1.0 / max(p.shape[1], 1))
    return torch.where(s > 0, p / s.clamp_min(1e-30), uniform)
