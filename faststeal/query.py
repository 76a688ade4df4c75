"""Query selection for active stealing: which pool images to ask the oracle about next.

Strategies (``STRATEGIES``), each picking ``k`` not-yet-queried pool images per round:

* ``random`` — uniform over the unqueried pool (the baseline every other strategy must beat).
* ``entropy`` — largest entropy of the mean prediction, H[p̄(x)] (ActiveThief's "uncertainty").
* ``bald`` — largest mutual information H[p̄] − mean_s H[p_s] (Houlsby et al. 2011; Gal et al. 2017).
* ``variance`` — largest prediction variance mean_c Var_s p_s(c|x), the paper's V per image.
* ``disagreement`` — largest fraction of members whose vote differs from the ensemble's
  (query-by-committee vote disagreement; DisGUIDE's signal on a natural pool).
* ``kcenter`` — greedy k-center (core-set, Sener & Savarese 2018; ActiveThief) on the
  surrogate's penultimate features, the already-queried images being the initial centres.
* ``mix`` — k-center among the ``mix_factor * k`` most uncertain candidates (by ``mix_score``),
  ActiveThief's "uncertainty + k-center" pairing (there: DFAL + k-center).

Scoring. The four uncertainty scores of every candidate come from ONE pass of
:func:`faststeal.ops.member_stats` over the surrogate's (S, B, C) member logits (the fused op:
mean probabilities, variance, entropies, mutual information and vote disagreement at once), in
chunks of ``batch_size`` candidates; :class:`PoolScores` keeps the seconds spent in the forward
pass, in the statistics and in the feature pass, so each round's cost can be reported.

Ties (many with ``disagreement``, which takes only S+1 values, and for every score of a one-member
surrogate) are broken uniformly at random with the round's generator, never by pool order.

Features for k-center: the surrogate's penultimate features of every member, concatenated,
(B, S·F) — the squared distance is the sum of the members' squared distances — then (by default)
projected to ``proj_dim`` dimensions with a seeded Gaussian matrix (Johnson–Lindenstrauss: pairwise
distances kept to a few per cent) so that the candidate × centre distances stay cheap on a CPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from . import ops

STRATEGIES: tuple[str, ...] = ("random", "entropy", "bald", "variance", "disagreement",
                               "kcenter", "mix")
#: uncertainty strategies -> the MemberStats field they rank by (largest first)
UNCERTAINTY_FIELDS: dict[str, str] = {"entropy": "entropy_of_mean", "bald": "mutual_info",
                                      "variance": "variance", "disagreement": "disagreement"}


# ------------------------------------------------------------------------------ scores

def uncertainty_scores(member_logits: Tensor) -> dict[str, Tensor]:
    """Every uncertainty score of (S, B, C) member logits from one ``member_stats`` pass.

    Returns {"entropy", "bald", "variance", "disagreement"} -> (B,) float32 tensors on the logits'
    device: H[p̄], H[p̄] − mean_s H[p_s], mean_c Var_s p_s(c) (population variance) and the
    fraction of members whose argmax differs from argmax p̄.
    """
    if not isinstance(member_logits, Tensor) or member_logits.dim() != 3:
        got = (f"shape {tuple(member_logits.shape)}" if isinstance(member_logits, Tensor)
               else type(member_logits).__name__)
        raise ValueError(f"member_logits must be (members, batch, classes), got {got}")
    st = ops.member_stats(member_logits)
    return {name: getattr(st, fld).float() for name, fld in UNCERTAINTY_FIELDS.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def member_features(method: Any, x: Tensor, batch_size: int = 2048) -> Tensor:
    """(B, D) penultimate features of every member of ``method``'s model, concatenated.

    ``method.model.features(x)`` must return (S, B, F) — or a list of such tensors (a
    heterogeneous ensemble's groups), which are concatenated along the feature axis.
    Computed in eval mode, without gradients, on ``method.device``; returned on the CPU.
    """
    model = method.model
    dev = torch.device(getattr(method, "device", "cpu"))
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                f = model.features(x[start:start + batch_size].to(dev, torch.float32))
                parts = f if isinstance(f, (list, tuple)) else [f]
                # (S, B, F) -> (B, S*F): the squared distance is the members' sum
                flat = [p.permute(1, 0, 2).reshape(p.shape[1], -1) for p in parts]
                out.append(torch.cat(flat, dim=1).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0)


@dataclass
class PoolScores:
    """What a strategy sees about the candidates of one round.

    indices: (M,) pool indices of the candidates; scores: name -> (M,) CPU float32 (empty when
    the strategy needs none); seconds: {"forward", "stats", "features", "select"} wall time.
    """

    indices: Tensor
    scores: dict[str, Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def score_pool(method: Any, pool_x: Tensor, indices: Tensor, batch_size: int = 4096) -> PoolScores:
    """Uncertainty scores of the candidates ``pool_x[indices]`` under ``method``.

    Per chunk: ``method.predict_members`` (S, b, C) then one fused ``member_stats`` pass; the
    forward and statistics times are accumulated separately (with a CUDA sync on GPU).
    """
    dev = torch.device(getattr(method, "device", "cpu"))
    fwd = stats = 0.0
    chunks: dict[str, list[Tensor]] = {k: [] for k in UNCERTAINTY_FIELDS}
    for start in range(0, int(indices.numel()), batch_size):
        xb = pool_x[indices[start:start + batch_size]]
        t0 = time.perf_counter()
        logits = method.predict_members(xb)
        _sync(dev)
        t1 = time.perf_counter()
        sc = uncertainty_scores(logits)
        _sync(dev)
        t2 = time.perf_counter()
        fwd += t1 - t0
        stats += t2 - t1
        for k, v in sc.items():
            chunks[k].append(v.cpu())
    scores = {k: (torch.cat(v) if v else torch.empty(0)) for k, v in chunks.items()}
    return PoolScores(indices=indices, scores=scores, seconds={"forward": fwd, "stats": stats})


# ------------------------------------------------------------------------------ selection

def top_k(scores: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Positions of the ``k`` largest scores, ties broken uniformly at random."""
    m = int(scores.numel())
    k = min(int(k), m)
    perm = torch.randperm(m, generator=generator)
    order = torch.argsort(scores[perm], descending=True, stable=True)
    return perm[order[:k]]


def _sq_dists_min(x: Tensor, centres: Tensor, chunk: int = 4096) -> Tensor:
    """min_j ||x_i − c_j||² for (M, D) x and (L, D) centres, in row chunks (memory M·chunk)."""
    out = torch.full((x.shape[0],), math.inf, dtype=torch.float32)
    if centres.shape[0] == 0:
        return out
    c2 = (centres * centres).sum(1)
    for start in range(0, centres.shape[0], chunk):
        c = centres[start:start + chunk]
        # ||x||² − 2 x·c + ||c||²; clamp the cancellation error at 0
        d = (x * x).sum(1, keepdim=True) - 2.0 * (x @ c.T) + c2[start:start + chunk]
        out = torch.minimum(out, d.clamp_min_(0.0).min(dim=1).values)
    return out


def kcenter_greedy(features: Tensor, k: int, centres: Optional[Tensor] = None,
                   generator: Optional[torch.Generator] = None) -> Tensor:
    """Greedy k-center: ``k`` positions into ``features`` (M, D), each the point farthest from
    the current centres (``centres`` (L, D), then every point picked so far).

    With no centres the first pick is uniform at random (``generator``). Distances are Euclidean
    (compared squared); a 2-approximation of the optimal k-center cover (Gonzalez 1985).
    """
    if features.dim() != 2:
        raise ValueError(f"features must be (M, D), got shape {tuple(features.shape)}")
    m = features.shape[0]
    k = min(int(k), m)
    if k <= 0:
        return torch.empty(0, dtype=torch.int64)
    f = features.float()
    if centres is not None and centres.shape[0] > 0:
        if centres.dim() != 2 or centres.shape[1] != f.shape[1]:
            raise ValueError(f"centres must be (L, {f.shape[1]}), got {tuple(centres.shape)}")
        mind = _sq_dists_min(f, centres.float())
    else:
        mind = torch.full((m,), math.inf)
    picks = torch.empty(k, dtype=torch.int64)
    f2 = (f * f).sum(1)
    for i in range(k):
        if math.isinf(float(mind.max())):  # no centre yet: a random first point
            j = int(torch.randint(m, (1,), generator=generator))
        else:
            j = int(torch.argmax(mind))
        picks[i] = j
        d = f2 - 2.0 * (f @ f[j]) + f2[j]
        mind = torch.minimum(mind, d.clamp_min_(0.0))
        mind[j] = -1.0  # never picked twice (even among duplicates at distance 0)
    return picks


def _projection(d_in: int, d_out: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(d_in, d_out, generator=g) / math.sqrt(d_out)


class Strategy:
    """A query-selection strategy with its parameters.

    name: one of :data:`STRATEGIES`. mix_factor / mix_score: for ``mix``, how many times ``k``
    of the most uncertain candidates (by ``entropy``/``bald``/``variance``/``disagreement``)
    k-center chooses among. candidates: score only this many unqueried images per round, drawn
    uniformly (None: the whole unqueried pool). proj_dim: random projection of the k-center
    features (None: raw features). batch_size: chunk size of the scoring pass.
    """

    def __init__(self, name: str, *, mix_factor: int = 10, mix_score: str = "bald",
                 candidates: Optional[int] = None, proj_dim: Optional[int] = 128,
                 batch_size: int = 4096) -> None:
        if name not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
        if isinstance(mix_factor, bool) or not isinstance(mix_factor, int) or mix_factor < 1:
            raise ValueError(f"mix_factor must be an int >= 1, got {mix_factor!r}")
        if mix_score not in UNCERTAINTY_FIELDS:
            raise ValueError(f"mix_score must be one of {tuple(UNCERTAINTY_FIELDS)}, "
                             f"got {mix_score!r}")
        for nm, v in (("candidates", candidates), ("proj_dim", proj_dim)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{nm} must be None or a positive int, got {v!r}")
        self.name = name
        self.mix_factor = mix_factor
        self.mix_score = mix_score
        self.candidates = candidates
        self.proj_dim = proj_dim
        self.batch_size = batch_size

    def params(self) -> dict[str, Any]:
        return {"name": self.name, "mix_factor": self.mix_factor, "mix_score": self.mix_score,
                "candidates": self.candidates, "proj_dim": self.proj_dim}

    @property
    def needs_surrogate(self) -> bool:
        return self.name != "random"

    def __repr__(self) -> str:
        return f"Strategy({self.name!r})"

    def _features(self, method: Any, x: Tensor, seed: int) -> Tensor:
        f = member_features(method, x, self.batch_size)
        if self.proj_dim is not None and f.shape[1] > self.proj_dim:
            f = f @ _projection(f.shape[1], self.proj_dim, seed)
        return f

    def select(self, method: Any, pool_x: Tensor, unlabeled: Tensor, labeled: Tensor, k: int,
               generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """Choose ``k`` distinct pool indices from ``unlabeled`` (1-D int64, pool indices).

        method: the current surrogate (unused by ``random``); labeled: pool indices already
        queried (k-center's initial centres). Returns (indices (k',) with k' = min(k,
        len(unlabeled)), seconds {"forward", "stats", "features", "select", "total"}).
        """
        t_start = time.perf_counter()
        unlabeled = unlabeled.to(torch.int64).cpu()
        k = min(int(k), int(unlabeled.numel()))
        secs = {"forward": 0.0, "stats": 0.0, "features": 0.0, "select": 0.0}
        if k <= 0:
            secs["total"] = 0.0
            return torch.empty(0, dtype=torch.int64), secs
        if self.name == "random":
            picks = unlabeled[torch.randperm(unlabeled.numel(), generator=generator)[:k]]
            secs["total"] = secs["select"] = time.perf_counter() - t_start
            return picks, secs
        cand = unlabeled
        if self.candidates is not None and cand.numel() > max(self.candidates, k):
            cand = cand[torch.randperm(cand.numel(), generator=generator)[:self.candidates]]
        # a seed for the projection that changes per round but is fixed by the generator
        proj_seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        if self.name in UNCERTAINTY_FIELDS or self.name == "mix":
            ps = score_pool(method, pool_x, cand, self.batch_size)
            secs["forward"], secs["stats"] = ps.seconds["forward"], ps.seconds["stats"]
        if self.name in UNCERTAINTY_FIELDS:
            t0 = time.perf_counter()
            picks = cand[top_k(ps.scores[self.name], k, generator)]
            secs["select"] = time.perf_counter() - t0
        else:
            if self.name == "mix":
                keep = top_k(ps.scores[self.mix_score], self.mix_factor * k, generator)
                cand = cand[keep]
            t0 = time.perf_counter()
            feats = self._features(method, pool_x[torch.cat([cand, labeled.cpu().long()])],
                                   proj_seed)
            secs["features"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            pos = kcenter_greedy(feats[:cand.numel()], k, feats[cand.numel():], generator)
            picks = cand[pos]
            secs["select"] = time.perf_counter() - t0
        secs["total"] = time.perf_counter() - t_start
        return picks, secs


def make_strategy(name: str | Strategy, **params: Any) -> Strategy:
    """A :class:`Strategy` from a name and its parameters (a Strategy is returned as is)."""
    if isinstance(name, Strategy):
        if params:
            raise TypeError("parameters given together with a Strategy instance")
        return name
    return Strategy(name, **params)

