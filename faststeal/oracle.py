"""The budgeted black-box oracle: the only way an attacker reaches the victim.

An :class:`Oracle` wraps a victim classifier (an ``nn.Module`` or any callable from a batch of
inputs to logits or probabilities) and a pool of query images. The attacker asks by pool
index and gets back only what the output mode reveals (hard label, top-k, probabilities or
logits). Accounting: one query = one image; answers are cached per pool index, so asking for
an image again costs nothing; a batch that would take the number of distinct charged images
past the budget is refused whole (:class:`BudgetExceededError`) and nothing of it is answered
or charged. Images are charged when they are sent to the victim, so a batch the victim fails on
stays charged: the victim never sees more images than the budget.

Every answer is checked before it is used (:func:`check_victim_output`: shape, one class count,
finite values, probabilities that are probabilities), and with ``journal=`` persisted as it
arrives (:class:`AnswerJournal`), so a restarted run asks the victim nothing it answered before.

The victim is held privately: no public attribute or method returns it or its parameters, and
the oracle refuses to be pickled or deep-copied (which would copy the victim). This is an API
boundary that keeps experiment code honest, not a sandbox against Python introspection.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import time
import warnings
import zlib
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


#: Images in the oracle's first victim call: a pool the victim cannot take fails on a few images.
PREFLIGHT_ROWS = 8
#: How far a row of declared probabilities may sum from 1 by default.
PROBS_ATOL = 1e-3


class BudgetExceededError(RuntimeError):
    """A query batch would take the number of charged images past the oracle's budget."""


class VictimError(ValueError):
    """The victim raised on a batch of pool images (the pool does not fit the victim)."""


class VictimOutputError(ValueError):
    """The victim's answer is unusable: not (B, C), non-finite, or not probabilities."""


class JournalError(ValueError):
    """An answer journal is corrupt or belongs to another victim, pool or output mode."""


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
    probs_atol: how far a row of declared probabilities may sum from 1 (raise it for a victim
        that rounds its probabilities to d digits: C * 0.5 * 10**-d), or a function of the
        class count C returning that tolerance (C is known only from the first answer, e.g.
        ``DefensePipeline.probs_atol``).
    journal: file that persists every answer as it arrives (:class:`AnswerJournal`); an
        existing journal is loaded first, so its images are answered from it, free, and count
        towards ``used`` (the budget is spent once across restarts).
    journal_key: JSON-able identity of the victim (e.g. its checkpoint), stored in the journal
        with the pool's digest and the output settings; a journal with another identity is
        refused (:class:`JournalError`).

    Every victim answer is checked before it is used or cached (:func:`check_victim_output`):
    a (B, C) tensor with one C across all calls, finite, and with ``victim_outputs="probs"``
    rows in [0, 1] summing to 1 (a warning when declared logits look like probabilities). The
    first victim call sends at most ``PREFLIGHT_ROWS`` images, so a pool the victim cannot
    take fails cheaply with :class:`VictimError` naming the pool's shape and dtype.
    """

    def __init__(self, victim: nn.Module | Callable[[Tensor], Tensor], pool_x: Tensor,
                 budget: int, *, output_mode: str = "label", k: int = 1,
                 with_scores: bool = True, temperature: float = 1.0,
                 decimals: int | None = None, batch_size: int = 1024,
                 device: str | torch.device = "cpu", victim_outputs: str = "logits",
                 num_classes: int | None = None,
                 probs_atol: float | Callable[[int], float] = PROBS_ATOL,
                 journal: str | os.PathLike | None = None,
                 journal_key: Any = None) -> None:
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
        if not callable(probs_atol):
            _check_probs_atol(probs_atol)
            probs_atol = float(probs_atol)
        self._probs_atol = probs_atol

        if isinstance(victim, nn.Module):
            victim = victim.to(self._device).eval()
        self.__victim = victim  # name-mangled: not part of the public surface
        self._pool_x = pool_x.detach()
        n = int(pool_x.shape[0])
        self._answered = torch.zeros(n, dtype=torch.bool)
        self._cache: dict[str, Tensor] = {}  # allocated on the first answer (needs C)
        self._used = 0
        self._log: list[dict[str, Any]] = []
        self._victim_ok = False  # set after the first valid victim answer
        self._journal: AnswerJournal | None = None
        self._saved_logs: dict[str, list] = {}  # query log files: entries of earlier sessions
        if journal is not None:
            fingerprint = {"pool": tensor_digest(self._pool_x), "pool_size": n,
                           "victim": journal_key, "victim_outputs": self._victim_outputs,
                           "output_mode": self._mode, "k": self._k,
                           "with_scores": self._with_scores, "temperature": self._temperature,
                           "decimals": self._decimals}
            self._journal = AnswerJournal(journal, fingerprint)
            for kind, rows, raw in self._journal.replay():
                if kind == "sent":
                    self._used += int(rows.numel())
                else:
                    raw = check_victim_output(raw, rows.numel(), self._victim_outputs,
                                              num_classes=self._num_classes,
                                              probs_atol=self._probs_atol, warn=False)
                    self._store(rows, raw)
                    self._victim_ok = True

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
    def journal_path(self) -> Path | None:
        """The answer journal's file (None without one)."""
        return None if self._journal is None else self._journal.path

    @property
    def answered_from_journal(self) -> int:
        """Images whose answers were loaded from the journal when this oracle was built."""
        return 0 if self._journal is None else self._journal.loaded_answers

    @property
    def log(self) -> list[dict[str, Any]]:
        """Per call of this session: time (unix s), requested, charged, used (cumulative),
        refused, indices (and error, when the victim failed part-way)."""
        return [dict(e, indices=list(e["indices"])) for e in self._log]

    def save_log(self, path: str | os.PathLike) -> Path:
        """Write the query log and the oracle's settings as JSON.

        Appends: the entries already in an existing file (an earlier run on the same run
        folder) are kept before this session's entries; ``used`` is the budget spent in all.
        """
        path = Path(path)
        key = os.fspath(path.resolve())
        if key not in self._saved_logs:
            previous: list = []
            if path.exists():
                try:
                    previous = list(json.loads(path.read_text())["queries"])
                except (ValueError, KeyError, TypeError, OSError) as exc:
                    keep = path.with_name(path.name + f".unreadable-{int(time.time())}")
                    os.replace(path, keep)
                    warnings.warn(f"query log {path} is unreadable ({type(exc).__name__}); "
                                  f"kept it as {keep} and started a new one", RuntimeWarning,
                                  stacklevel=2)
            self._saved_logs[key] = previous
        doc = {"budget": self._budget, "used": self._used, "pool_size": self.pool_size,
               "output_mode": self._mode, "k": self._k, "with_scores": self._with_scores,
               "temperature": self._temperature, "decimals": self._decimals,
               "queries": self._saved_logs[key] + self._log}
        atomic_write(path, json.dumps(doc, indent=1))
        return path

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
        would exceed the budget. The new images go to the victim in batches of ``batch_size``
        (the oracle's very first victim call: at most ``PREFLIGHT_ROWS`` images); each batch is
        charged when it is sent, so a batch the victim fails on (:class:`VictimError`) or answers
        with invalid values (:class:`VictimOutputError`) stays charged and unanswered, and the
        batches answered before it stay answered.
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
        used_before = self._used
        try:
            if n_new:
                self._answer_new(new)
        except BaseException as exc:
            entry["charged"], entry["used"] = self._used - used_before, self._used
            entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
            self._log.append(entry)
            raise
        entry["charged"], entry["used"] = n_new, self._used
        self._log.append(entry)
        return self._gather(idx, n_new)

    def _victim_forward(self, rows: Tensor) -> Tensor:
        x = self._pool_x[rows]
        try:
            with torch.no_grad():
                out = self.__victim(x.to(self._device))
        except Exception as exc:
            first = (str(exc).splitlines() or [""])[0][:300]
            raise VictimError(
                f"the victim failed on a batch of {x.shape[0]} pool images (pool_x: shape "
                f"{tuple(self._pool_x.shape)}, dtype {self._pool_x.dtype}; batch sent to device "
                f"{self._device}): {type(exc).__name__}: {first}. Check that the pool matches "
                "the victim's expected input shape and dtype") from exc
        return check_victim_output(out, x.shape[0], self._victim_outputs,
                                   num_classes=self._num_classes, probs_atol=self._probs_atol)

    def _answer_new(self, new: Tensor) -> None:
        start = 0
        while start < new.numel():
            size = self._batch_size if self._victim_ok else min(self._batch_size, PREFLIGHT_ROWS)
            rows = new[start:start + size]
            start += size
            # charge (and journal) before the victim sees the rows: a crash or an exception in
            # the victim afterwards cannot make the victim see more images than the budget
            if self._journal is not None:
                self._journal.append_sent(rows)
            self._used += int(rows.numel())
            raw = self._victim_forward(rows)
            if self._num_classes is None and self._mode == "topk" and self._k > raw.shape[1]:
                raise ValueError(f"k={self._k} exceeds the victim's {raw.shape[1]} classes")
            if self._journal is not None:  # persisted before the answer is used
                self._journal.append_answer(rows, raw)
            self._store(rows, raw)
            self._victim_ok = True

    def _store(self, rows: Tensor, raw: Tensor) -> None:
        """Cache the revealed form of the raw victim outputs ``raw`` (n, C) for pool ``rows``."""
        if self._num_classes is None:
            self._num_classes = int(raw.shape[1])
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
            self._cache[key][rows] = val
        self._answered[rows] = True

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


# -- answer validation ---------------------------------------------------------------------------
def _check_probs_atol(probs_atol: Any) -> float:
    if isinstance(probs_atol, bool) or not isinstance(probs_atol, (int, float)) \
            or not 0 < probs_atol < math.inf:
        raise ValueError(f"probs_atol must be a finite number > 0, got {probs_atol!r}")
    return float(probs_atol)


def check_victim_output(out: Any, rows: int, victim_outputs: str, *,
                        num_classes: int | None = None,
                        probs_atol: float | Callable[[int], float] = PROBS_ATOL,
                        warn: bool = True) -> Tensor:
    """Check one victim answer and return it as a float32 CPU tensor.

    out: what the victim returned for ``rows`` inputs; must be a (rows, C) tensor of finite
    values with C == ``num_classes`` when given (one C across all answers). With
    ``victim_outputs="probs"`` every value must lie in [0, 1] and every row sum to 1 within
    ``probs_atol`` (a number, or a function of C giving it); with ``"logits"``, answers that look like probabilities (every row in
    [0, 1] summing to 1) give a warning: they would be softmaxed a second time. Raises
    :class:`VictimOutputError`.
    """
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != rows:
        got = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
        raise VictimOutputError(f"victim must return ({rows}, num_classes) scores for a batch "
                                f"of {rows}, got {got}")
    if out.is_complex() or out.dtype == torch.bool:
        raise VictimOutputError(f"victim must return real-valued scores, got dtype {out.dtype}")
    out = out.detach().float().cpu()
    c = int(out.shape[1])
    if num_classes is not None and c != num_classes:
        raise VictimOutputError(f"victim returned {c} classes but num_classes={num_classes} "
                                "(earlier answers or the caller's setting)")
    finite = torch.isfinite(out).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()
        raise VictimOutputError(
            f"victim returned non-finite values (NaN or inf) in {bad.numel()} of {rows} rows "
            f"(e.g. batch rows {bad[:5].tolist()}); an argmax over NaN would look like a "
            "valid answer, so the run stops")
    sums = out.sum(dim=1)
    in_unit = bool(((out >= -1e-6) & (out <= 1 + 1e-6)).all())
    if victim_outputs == "probs":
        if callable(probs_atol):
            probs_atol = _check_probs_atol(probs_atol(c))
        worst = float((sums - 1).abs().max()) if rows else 0.0
        if not in_unit or worst > probs_atol:
            raise VictimOutputError(
                f"victim_outputs='probs' but the answers are not probabilities (values in "
                f"[{float(out.min()):.4g}, {float(out.max()):.4g}], row sums off 1 by up to "
                f"{worst:.4g} > probs_atol={probs_atol:g}); if the victim returns logits, "
                "declare victim_outputs='logits' (steal(victim_outputs_kind='logits'))")
    elif warn and rows and c > 1 and in_unit and float((sums - 1).abs().max()) <= PROBS_ATOL:
        warnings.warn("victim_outputs='logits' but the victim's answers look like "
                      "probabilities (every row in [0, 1], summing to 1): they would be "
                      "softmaxed a second time; declare victim_outputs='probs' "
                      "(steal(victim_outputs_kind='probs'))", RuntimeWarning, stacklevel=4)
    return out


def tensor_digest(t: Tensor) -> str:
    """Content hash (blake2b) of a tensor's shape, dtype and values."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -- the answer journal --------------------------------------------------------------------------
_JOURNAL_MAGIC = b"faststeal-answer-journal-v1\n"
_RECORD = struct.Struct("<4sqqI")  # tag, rows, classes, crc32 of the payload
_SENT, _ANSWER = b"SENT", b"ANSW"


class AnswerJournal:
    """Append-only, crash-safe file of everything an :class:`Oracle` sent to its victim.

    Layout: a magic line, a length-prefixed JSON header (the fingerprint: pool digest, victim
    identity, output settings), then records ``tag, n, C, crc32, payload``: ``SENT`` (n pool
    indices, int64) is written before a batch goes to the victim, ``ANSW`` (the indices and the
    victim's raw (n, C) float32 outputs) after its answer was checked. Every record is fsync'd
    before the oracle goes on. Replaying gives the budget spent (all ``SENT`` rows: a batch that
    was sent but never answered stays charged) and the answers. A torn last record (a crash
    while writing) is ignored with a warning and cut off; damage anywhere else, or a header with
    another fingerprint, raises :class:`JournalError`.
    """

    def __init__(self, path: str | os.PathLike, fingerprint: dict[str, Any]) -> None:
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # JSON round trip: comparable
        self.loaded_answers = 0
        if self.path.is_dir():
            raise JournalError(f"answer journal {self.path} is a directory, not a file")
        if not self.path.exists():
            self._create()

    def _create(self) -> None:
        head = json.dumps(self.fingerprint, sort_keys=True).encode()
        atomic_write(self.path, _JOURNAL_MAGIC + struct.pack("<q", len(head)) + head)
        _fsync_dir(self.path.parent)

    def replay(self) -> list[tuple[str, Tensor, Tensor | None]]:
        """The journal's records in order: ("sent", rows, None) and ("answer", rows, raw)."""
        data = self.path.read_bytes()
        what = f"answer journal {self.path}"
        if not data.startswith(_JOURNAL_MAGIC) or len(data) < len(_JOURNAL_MAGIC) + 8:
            raise JournalError(f"{what} is not a faststeal answer journal (bad header); move it "
                               "away to start a new one")
        pos = len(_JOURNAL_MAGIC)
        (hlen,) = struct.unpack_from("<q", data, pos)
        pos += 8
        try:
            header = json.loads(data[pos:pos + hlen])
        except ValueError:
            raise JournalError(f"{what} has an unreadable header; move it away to start a new "
                               "one") from None
        pos += hlen
        if header != self.fingerprint:
            diff = sorted(k for k in set(header) | set(self.fingerprint)
                          if header.get(k) != self.fingerprint.get(k))
            raise JournalError(
                f"{what} holds the answers of another victim, pool or output mode (differs in: "
                f"{', '.join(diff)}); use another run folder, or move the journal away to query "
                "again (the images it records were already sent to its victim)")
        out: list[tuple[str, Tensor, Tensor | None]] = []
        while pos < len(data):
            torn = None
            if len(data) - pos < _RECORD.size:
                torn = "a truncated record header"
            else:
                tag, n, c, crc = _RECORD.unpack_from(data, pos)
                size = n * 8 + n * c * 4
                body = data[pos + _RECORD.size:pos + _RECORD.size + size]
                bad = tag not in (_SENT, _ANSWER) or n < 0 or c < 0
                if not bad and len(body) < size:
                    torn = "a truncated record"
                elif bad or zlib.crc32(body) != crc:
                    if pos + _RECORD.size + max(size, 0) >= len(data):
                        torn = "a damaged last record"
                    else:
                        raise JournalError(f"{what} is damaged at byte {pos} (not at its end: "
                                           "not a torn write); move it away to start a new one")
            if torn is not None:
                # later records must follow a clean end: cut the tail off, keeping a copy of
                # the file as it was (nothing written is ever lost)
                keep = self.path.with_name(f"{self.path.name}.torn-{int(time.time())}")
                keep.write_bytes(data)
                warnings.warn(f"{what} ends with {torn} ({len(data) - pos} bytes, a write cut "
                              f"off by a crash); ignoring it (the file as it was: {keep})",
                              RuntimeWarning, stacklevel=3)
                with open(self.path, "r+b") as fh:
                    fh.truncate(pos)
                    fh.flush()
                    os.fsync(fh.fileno())
                break
            rows = torch.from_numpy(np.frombuffer(body, dtype=np.int64, count=n).copy())
            if tag == _SENT:
                out.append(("sent", rows, None))
            else:
                raw = np.frombuffer(body, dtype=np.float32, offset=n * 8).copy()
                out.append(("answer", rows, torch.from_numpy(raw).view(n, c)))
                self.loaded_answers += n
            pos += _RECORD.size + size
        return out

    def append_sent(self, rows: Tensor) -> None:
        self._append(_SENT, rows, None)

    def append_answer(self, rows: Tensor, raw: Tensor) -> None:
        self._append(_ANSWER, rows, raw)

    def _append(self, tag: bytes, rows: Tensor, raw: Tensor | None) -> None:
        body = rows.to(torch.int64).contiguous().numpy().tobytes()
        c = 0
        if raw is not None:
            c = int(raw.shape[1])
            body += raw.to(torch.float32).contiguous().numpy().tobytes()
        rec = _RECORD.pack(tag, int(rows.numel()), c, zlib.crc32(body)) + body
        with open(self.path, "ab") as fh:
            fh.write(rec)
            fh.flush()
            os.fsync(fh.fileno())


def set_aside(path: str | os.PathLike) -> Path:
    """Rename ``path`` to ``<path>.set-aside-<unix time>`` (nothing is deleted); returns the new
    name. For a journal that belongs to another configuration (``faststeal run --force``)."""
    path = Path(path)
    new = path.with_name(f"{path.name}.set-aside-{int(time.time())}")
    os.replace(path, new)
    return new


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible everywhere (e.g. Windows); the data itself is fsync'd
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
