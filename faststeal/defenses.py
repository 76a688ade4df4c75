"""Oracle defences: what a deployed victim can do against model stealing.

Two kinds, both usable by the comparison (:mod:`faststeal.runs.comparison`) and the active loop
(:mod:`faststeal.active`); :func:`build_defense` gives either from a name and its parameters.

**Output perturbations** wrap the victim: :class:`DefendedVictim` (an ``nn.Module``) runs the
victim, turns its output into probabilities and post-processes them; the
:class:`~faststeal.oracle.Oracle` is then built with ``victim_outputs="probs"`` (so
``output_mode="logits"`` is refused: a defended API reveals no logits). What the attacker sees
still depends on the oracle's ``output_mode``: with hard labels (``label``) only the argmax of the
defended output reaches the attacker, so argmax-preserving defences (top-1, rounding, reverse
sigmoid on confident inputs) change nothing there; they act on ``probs`` and ``topk`` answers.

* ``top1`` — one-hot of the argmax: probability 1 on the top class, 0 elsewhere (the "argmax"
  output of Tramèr et al. 2016 / Orekondy et al. 2019). No parameters.
* ``rounding`` — probabilities rounded to ``decimals`` digits (default 1), not renormalised
  (knockoffnets' / Tramèr et al.'s rounding; the oracle's training targets renormalise).
* ``noise`` — ``normalise(clip(p + N(0, sigma²), 0))``: Gaussian noise in probability space,
  clipped at 0 and renormalised. ``sigma`` (default 0.1), ``seed`` (default 0: the same query
  stream gets the same answers).
* ``reverse-sigmoid`` — ``normalise(clip(p − beta·(sigmoid(gamma·logit p) − ½), 0, 1))``
  (Lee et al. 2019; IBM ART's ``ReverseSigmoid``, same defaults ``beta`` = 1.0, ``gamma`` = 0.1).
  Keeps the argmax when the top probability exceeds ½; below that the perturbation can lift a
  near-zero class above the top one (a test shows such a case).

**Detection** wraps the oracle: ``prada`` — :class:`PradaOracle` runs :class:`PradaDetector`
(Juuti et al. 2019, "PRADA: Protecting against DNN Model Stealing Attacks") on the stream of newly
charged images and, once it flags the stream, refuses this and every later query with
:class:`QueryRefusedError` (the client is blocked; the batch that triggered detection is charged
but not answered). Per predicted class c, PRADA keeps a growing set G_c of past queries and a
threshold T_c; each query's minimum L2 distance d to G_c joins the distance set D, and the query
joins G_c when d > T_c (then T_c = max(T_c, mean − std of the distances that admitted members)).
The Shapiro–Wilk statistic W of D (classes with >= ``min_class`` distances, 3-sigma outliers
dropped, tested every ``check_every`` queries once more than ``min_queries`` distances remain) is
compared with ``delta``: W < delta means the distances are not normally distributed (natural
queries give a roughly normal D; synthetic, perturbation-based streams do not). Parameters:
``delta`` (default 0.9), ``min_queries`` (100), ``check_every`` (10), ``min_class`` (10).
Juuti et al. choose delta per victim; 0.9 is our choice: it lets the natural Fashion-MNIST pool
(in random order) through, see docs/studies.md.

Fidelity under a defence is measured against the UNDEFENDED victim's labels (what the attacker
wants to copy); the defence only changes what the attacker is told.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

DEFENSES: tuple[str, ...] = ("none", "top1", "rounding", "noise", "reverse-sigmoid", "prada")


class QueryRefusedError(RuntimeError):
    """A defence refused to answer (e.g. PRADA flagged the query stream as an attack)."""


# ------------------------------------------------------------------------------ output defences

class OutputDefense:
    """Post-processing of the victim's (B, C) probabilities; subclasses set ``name``."""

    name = ""

    def __call__(self, probs: Tensor) -> Tensor:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class Top1(OutputDefense):
    """One-hot of the argmax: the probability vector reveals only the top-1 label."""

    name = "top1"

    def __call__(self, probs: Tensor) -> Tensor:
        out = torch.zeros_like(probs)
        return out.scatter_(1, probs.argmax(1, keepdim=True), 1.0)


class Rounding(OutputDefense):
    """Probabilities rounded to ``decimals`` digits (rows may no longer sum to 1)."""

    name = "rounding"

    def __init__(self, decimals: int = 1) -> None:
        if isinstance(decimals, bool) or not isinstance(decimals, int) or decimals < 0:
            raise ValueError(f"decimals must be an int >= 0, got {decimals!r}")
        self.decimals = decimals

    def __call__(self, probs: Tensor) -> Tensor:
        return torch.round(probs, decimals=self.decimals)

    def params(self) -> dict[str, Any]:
        return {"decimals": self.decimals}


def _normalise(p: Tensor) -> Tensor:
    s = p.sum(1, keepdim=True)
    return torch.where(s > 0, p / s.clamp_min(1e-30), torch.full_like(p, 1.0 / p.shape[1]))


class AdditiveNoise(OutputDefense):
    """p + N(0, sigma²) per entry, clipped at 0 and renormalised; seeded, drawn on the CPU."""

    name = "noise"

    def __init__(self, sigma: float = 0.1, seed: int = 0) -> None:
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma >= 0:
            raise ValueError(f"sigma must be a float >= 0, got {sigma!r}")
        self.sigma = float(sigma)
        self.seed = int(seed)
        self._gen = torch.Generator().manual_seed(self.seed)

    def __call__(self, probs: Tensor) -> Tensor:
        noise = torch.randn(probs.shape, generator=self._gen) * self.sigma
        return _normalise((probs + noise.to(probs)).clamp_min(0.0))

    def params(self) -> dict[str, Any]:
        return {"sigma": self.sigma, "seed": self.seed}


class ReverseSigmoid(OutputDefense):
    """Lee et al. 2019: p − beta·(sigmoid(gamma·logit(p)) − ½), clipped to [0, 1], renormalised.

    The perturbation is 0 at p = ½, positive above and negative below; with small ``gamma`` it
    flattens the output so that a surrogate trained on it with cross-entropy learns the wrong
    confidences. It preserves the argmax when the top probability is above ½ (the map is
    increasing there and every other class maps to at most ½); below that it may not.
    """

    name = "reverse-sigmoid"

    def __init__(self, beta: float = 1.0, gamma: float = 0.1) -> None:
        for nm, v in (("beta", beta), ("gamma", gamma)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{nm} must be a float > 0, got {v!r}")
        self.beta = float(beta)
        self.gamma = float(gamma)

    def __call__(self, probs: Tensor) -> Tensor:
        eps = 1e-9  # ART's clip: keeps logit(p) finite
        p = probs.clamp(eps, 1.0 - eps)
        r = self.beta * (torch.sigmoid(self.gamma * torch.logit(p)) - 0.5)
        return _normalise((probs - r).clamp(0.0, 1.0))

    def params(self) -> dict[str, Any]:
        return {"beta": self.beta, "gamma": self.gamma}


OUTPUT_DEFENSES: dict[str, type[OutputDefense]] = {
    "top1": Top1, "rounding": Rounding, "noise": AdditiveNoise, "reverse-sigmoid": ReverseSigmoid}


class DefendedVictim(nn.Module):
    """``victim`` followed by an output defence: x (B, ...) -> defended (B, C) probabilities.

    victim: ``nn.Module`` or callable returning logits (``victim_outputs="logits"``) or
    probabilities (``"probs"``). Build the oracle with ``victim_outputs="probs"``. Moving or
    switching this module to eval mode moves / switches the victim too (when it is a Module).
    """

    def __init__(self, victim: nn.Module | Callable[[Tensor], Tensor], defense: OutputDefense,
                 victim_outputs: str = "logits") -> None:
        super().__init__()
        if not callable(victim):
            raise TypeError(f"victim must be callable, got {type(victim).__name__}")
        if not isinstance(defense, OutputDefense):
            raise TypeError(f"defense must be an OutputDefense, got {type(defense).__name__}")
        if victim_outputs not in ("logits", "probs"):
            raise ValueError(f"victim_outputs must be 'logits' or 'probs', got {victim_outputs!r}")
        if isinstance(victim, nn.Module):
            self.victim = victim
        else:
            self._victim_fn = victim
        self.defense = defense
        self.victim_outputs = victim_outputs

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            fn = self.victim if "victim" in self._modules else self._victim_fn
            out = fn(x).float()
            probs = out.softmax(-1) if self.victim_outputs == "logits" else out
            return self.defense(probs)


# ------------------------------------------------------------------------------ PRADA

def shapiro_wilk_w(x: np.ndarray | Tensor) -> float:
    """The Shapiro–Wilk W statistic of a 1-D sample (n >= 3), Royston's (1992) coefficients.

    W = (Σ a_i x_(i))² / Σ (x_i − x̄)², in (0, 1]; close to 1 for normal samples. Matches
    ``scipy.stats.shapiro``'s statistic (AS R94) to ~1e-4 for n >= 12. A constant sample gives 1.
    """
    x = np.sort(np.asarray(x, dtype=np.float64).ravel())
    n = x.size
    if n < 3:
        raise ValueError(f"Shapiro-Wilk needs at least 3 values, got {n}")
    ss = float(((x - x.mean()) ** 2).sum())
    if ss <= 0.0:
        return 1.0
    i = np.arange(1, n + 1)
    m = torch.special.ndtri(torch.as_tensor((i - 0.375) / (n + 0.25))).numpy()
    msum = float((m * m).sum())
    c = m / math.sqrt(msum)
    u = 1.0 / math.sqrt(n)
    a = np.empty(n)
    if n == 3:
        a[:] = [-math.sqrt(0.5), 0.0, math.sqrt(0.5)]
    else:
        an = c[-1] + 0.221157 * u - 0.147981 * u**2 - 2.071190 * u**3 + 4.434685 * u**4 \
            - 2.706056 * u**5
        if n > 5:
            an1 = c[-2] + 0.042981 * u - 0.293762 * u**2 - 1.752461 * u**3 + 5.682633 * u**4 \
                - 3.582633 * u**5
            phi = (msum - 2 * m[-1] ** 2 - 2 * m[-2] ** 2) / (1 - 2 * an**2 - 2 * an1**2)
            a[:] = m / math.sqrt(phi)
            a[-1], a[-2], a[0], a[1] = an, an1, -an, -an1
        else:
            phi = (msum - 2 * m[-1] ** 2) / (1 - 2 * an**2)
            a[:] = m / math.sqrt(phi)
            a[-1], a[0] = an, -an
    w = float((a * x).sum()) ** 2 / ss
    return min(w, 1.0)


class PradaDetector:
    """PRADA's stream detector (Juuti et al. 2019, Algorithm 1) on flattened inputs, L2 distance.

    Per predicted class c: a growing set G_c (its first query, then every query whose minimum
    distance d to G_c exceeds the threshold T_c), the admitted distances A_c (starting at 0) and
    T_c = max(T_c, mean(A_c) − std(A_c)). Every query after a class's first adds its d to that
    class's distance list. Every ``check_every`` queries, the distances of the classes with at
    least ``min_class`` of them are pooled, outliers beyond 3 standard deviations dropped (as in
    the authors' release), and once more than ``min_queries`` remain the Shapiro–Wilk W is
    computed: W < ``delta`` flags the stream (sticky: a refusing oracle blocks the client).

    ``observe(x, labels)`` feeds queries in order (x: (n, ...) float, labels: (n,) the victim's
    predicted classes) and returns True once the stream is flagged. ``history`` holds the
    (queries seen, number of distances, W) of every test.
    """

    def __init__(self, delta: float = 0.9, min_queries: int = 100, check_every: int = 10,
                 min_class: int = 10) -> None:
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        for nm, v in (("min_queries", min_queries), ("check_every", check_every),
                      ("min_class", min_class)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{nm} must be a positive int, got {v!r}")
        if min_queries < 3:
            raise ValueError(f"min_queries must be >= 3 (Shapiro-Wilk), got {min_queries}")
        self.delta = float(delta)
        self.min_queries = min_queries
        self.check_every = check_every
        self.min_class = min_class
        self._growing: dict[int, list[Tensor]] = {}
        self._growing_t: dict[int, Tensor] = {}
        self._admitted: dict[int, list[float]] = {}
        self._threshold: dict[int, float] = {}
        self.distances: dict[int, list[float]] = {}
        self.history: list[tuple[int, int, float]] = []
        self.flagged = False
        self.queries_seen = 0

    def params(self) -> dict[str, Any]:
        return {"delta": self.delta, "min_queries": self.min_queries,
                "check_every": self.check_every, "min_class": self.min_class}

    @property
    def last_w(self) -> Optional[float]:
        return self.history[-1][2] if self.history else None

    def _min_dist(self, c: int, v: Tensor) -> float:
        g = self._growing_t.get(c)
        if g is None or g.shape[0] != len(self._growing[c]):
            g = torch.stack(self._growing[c])
            self._growing_t[c] = g
        return float(torch.cdist(v[None].double(), g.double()).min())

    def test(self) -> Optional[float]:
        """W of the pooled distances now (None while too few); does not change the state."""
        pooled = [d for ds in self.distances.values() if len(ds) >= self.min_class for d in ds]
        if not pooled:
            return None
        arr = np.asarray(pooled)
        sd = arr.std()
        if sd > 0:
            arr = arr[np.abs(arr - arr.mean()) < 3 * sd]
        if arr.size <= self.min_queries:
            return None
        return shapiro_wilk_w(arr)

    def observe(self, x: Tensor, labels: Tensor) -> bool:
        flat = x.detach().reshape(x.shape[0], -1).float().cpu()
        for v, c in zip(flat, labels.detach().cpu().tolist(), strict=True):
            c = int(c)
            if c not in self._growing:
                self._growing[c] = [v]
                self._admitted[c] = [0.0]
                self._threshold[c] = 0.0
            else:
                d = self._min_dist(c, v)
                self.distances.setdefault(c, []).append(d)
                if d > self._threshold[c]:
                    self._growing[c].append(v)
                    adm = self._admitted[c]
                    adm.append(d)
                    self._threshold[c] = max(self._threshold[c],
                                             float(np.mean(adm) - np.std(adm)))
            if self.queries_seen % self.check_every == 0:
                w = self.test()
                if w is not None:
                    self.history.append((self.queries_seen, sum(map(len, self.distances.values())),
                                         w))
                    self.flagged = self.flagged or w < self.delta
            self.queries_seen += 1
        return self.flagged


class PradaOracle:
    """An :class:`~faststeal.oracle.Oracle` behind PRADA: refuses once the stream is flagged.

    ``query(indices)`` asks the inner oracle, feeds the newly charged images (in the order asked)
    with the victim's revealed labels to the detector, and raises :class:`QueryRefusedError` if the
    detector flags the stream (that batch is charged but not answered) or has flagged it before
    (nothing is charged). Everything else (``budget``, ``used``, ``remaining``, ``pool_x``,
    ``targets`` ...) is the inner oracle's.
    """

    def __init__(self, oracle: Any, detector: Optional[PradaDetector] = None) -> None:
        self._inner = oracle
        self.detector = detector or PradaDetector()
        self.refused_at: Optional[int] = None
        # images the detector has seen: not the inner oracle's answered set, which an answer
        # journal fills from an earlier run (a resumed run replays the same stream to PRADA)
        self._seen = torch.zeros(oracle.pool_size, dtype=torch.bool)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)

    def __getstate__(self):
        raise TypeError("a PradaOracle cannot be pickled or copied (it holds an Oracle)")

    @property
    def blocked(self) -> bool:
        return self.detector.flagged

    def query(self, indices: Any) -> Any:
        if self.detector.flagged:
            raise QueryRefusedError(
                f"query refused: PRADA flagged this client's query stream after "
                f"{self.refused_at} charged images (W={self.detector.last_w:.4f} < delta="
                f"{self.detector.delta})")
        answers = self._inner.query(indices)
        idx = answers.indices
        seen = self._seen
        order = []
        for j, i in enumerate(idx.tolist()):  # new images, first occurrence, in the order asked
            if not seen[i]:
                seen[i] = True
                order.append(j)
        if order:
            sel = torch.as_tensor(order)
            self.detector.observe(self._inner.pool_x[idx[sel]], answers.labels[sel])
        if self.detector.flagged:
            self.refused_at = int(self._inner.used)
            raise QueryRefusedError(
                f"query refused: PRADA flagged the query stream at {self.detector.queries_seen} "
                f"queries (W={self.detector.last_w:.4f} < delta={self.detector.delta}); this "
                "and every later query is refused")
        return answers

    def __repr__(self) -> str:
        return f"PradaOracle({self._inner!r}, {self.detector.params()})"


# ------------------------------------------------------------------------------ one entry point

class Defense:
    """A named defence with its parameters, applied in two places.

    ``wrap_victim(victim, victim_outputs="logits") -> (callable, victim_outputs_for_oracle)`` and
    ``wrap_oracle(oracle) -> oracle-like``; each is the identity where the defence does not act.
    """

    def __init__(self, name: str, **params: Any) -> None:
        if name not in DEFENSES:
            raise ValueError(f"defense must be one of {DEFENSES}, got {name!r}")
        self.name = name
        self.output: Optional[OutputDefense] = None
        self.prada: Optional[dict[str, Any]] = None
        if name in OUTPUT_DEFENSES:
            try:
                self.output = OUTPUT_DEFENSES[name](**params)
            except TypeError as e:
                raise TypeError(f"defense {name!r}: {e}") from None
        elif name == "prada":
            PradaDetector(**params)  # validate now
            self.prada = dict(params)
        elif params:
            raise TypeError(f"defense 'none' takes no parameters, got {sorted(params)}")

    def params(self) -> dict[str, Any]:
        if self.output is not None:
            return self.output.params()
        if self.prada is not None:
            return PradaDetector(**self.prada).params()
        return {}

    def probs_atol(self, num_classes: int) -> float:
        """How far the served probabilities may sum from 1 (``Oracle(probs_atol=...)``):
        rounding to d digits moves each of the C values by up to 0.5 * 10**-d."""
        from .oracle import PROBS_ATOL

        if isinstance(self.output, Rounding):
            return PROBS_ATOL + 0.5 * num_classes * 10.0 ** -self.output.decimals
        return PROBS_ATOL

    def wrap_victim(self, victim: Any, victim_outputs: str = "logits") -> tuple[Any, str]:
        if self.output is None:
            return victim, victim_outputs
        return DefendedVictim(victim, self.output, victim_outputs), "probs"

    def wrap_oracle(self, oracle: Any) -> Any:
        if self.prada is None:
            return oracle
        return PradaOracle(oracle, PradaDetector(**self.prada))

    def __repr__(self) -> str:
        return f"Defense({self.name!r}, {self.params()})"


def build_defense(name: Optional[str], **params: Any) -> Defense:
    """``Defense(name or "none", **params)``."""
    return Defense(name or "none", **params)


def query_until_refused(oracle: Any, indices: Tensor, batch_size: int = 1024,
                        progress: bool = False) -> tuple[Tensor, Tensor, bool]:
    """Ask ``indices`` in batches until done or refused (``progress``: a "querying victim" bar).

    Returns (answered indices, their training targets from ``oracle.targets``, refused?). With a
    refusal, the answered prefix is what the attacker can train on.
    """
    from .progress import progress_bar

    idx_out, tgt_out = [], []
    refused = False
    for start in progress_bar(range(0, len(indices), batch_size), desc="querying victim",
                              unit="batch", disable=not progress, leave=False):
        try:
            a = oracle.query(indices[start:start + batch_size])
        except QueryRefusedError:
            refused = True
            break
        idx_out.append(a.indices)
        tgt_out.append(oracle.targets(a))
    if not idx_out:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), refused
    return torch.cat(idx_out), torch.cat(tgt_out), refused
