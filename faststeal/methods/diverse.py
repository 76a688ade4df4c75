"""Diversity-keeping ensembles: variants of the Deep Ensemble that try to keep members apart.

The paper's explanation for the small fidelity gain of UQ surrogates is that members converge
(the prediction variance V(t) collapses over training). Each variant here attacks one cause, and
each is measured against the plain Deep Ensemble in the same run (``faststeal study diversity``,
docs/studies.md). All are S stacked members behind the :class:`~faststeal.methods.base.Method`
interface, trained with ONE optimizer step per iteration.

* ``bootstrap-ensemble`` — :class:`BootstrapEnsemble`: every member trains on its own bootstrap
  resample of the queried set (bagging, Breiman 1996) — different data per member.
* ``hetero-ensemble`` — :class:`HeterogeneousEnsemble`: members of different architectures
  (``archs``, cycled over the members and grouped: each group is one stacked model), the
  attacker's real uncertainty about the victim's architecture. Each member keeps its own data
  order, as in the Deep Ensemble.
* ``hparam-ensemble`` — :class:`HyperparameterEnsemble`: per-member learning rate and weight
  decay (log-spaced over ``lr_range`` × the fit's ``lr`` and ``weight_decay_range``, assigned to
  members in a seeded random order; in the spirit of hyper-deep ensembles, Wenzel et al. 2020),
  applied by :class:`MemberAdam`, an Adam whose step size and L2 coefficient are (S,) vectors.
* ``ncl-ensemble`` — :class:`NCLEnsemble`: negative correlation learning (Liu & Yao 1999) on the
  members' probabilities: loss = Σ_s CE_s − strength · Σ_s mean_x ||p_s(x) − p̄(x)||², i.e. the
  members' cross-entropies minus strength · S · C · (the batch's prediction variance V). Every
  member sees the same batch (the penalty compares members on the same inputs). Default
  ``strength=2.0``: on Fashion-MNIST (2,000 queries, 5 mlp members) it raises V about 10× with
  member fidelity still ~75%; at 8 the members individually collapse (~20% fidelity) while the
  ensemble stays within a point of the Deep Ensemble (docs/studies.md).
* ``repulsive-ensemble`` — :class:`RepulsiveEnsemble`: a function-space repulsive term (in the
  spirit of D'Angelo & Fortuin 2021): loss = Σ_s CE_s + strength · S · mean_x mean_{s≠j}
  exp(−||p_s(x) − p_j(x)||² / h), with the RBF bandwidth h from the median heuristic (median
  pairwise squared distance / log S, per batch, not differentiated, floored at ``min_bandwidth``).
  Shared batches, as NCL. Default ``strength=0.2`` (0.5 cost ~9 fidelity points in a small run).

``DIVERSE_METHODS`` maps these names to the classes (register them next to ``METHODS``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Optional, Sequence

import torch
from torch import Tensor, nn

from .base import Method, _check_float, _check_positive_int, member_loss_sum
from .deep_ensemble import DeepEnsemble


# ------------------------------------------------------------------------------ bootstrap

class BootstrapEnsemble(DeepEnsemble):
    """A Deep Ensemble whose members each train on their own bootstrap resample."""

    name: ClassVar[str] = "bootstrap-ensemble"
    DEFAULTS: ClassVar[dict[str, Any]] = {**DeepEnsemble.DEFAULTS, "bootstrap": True}


# ------------------------------------------------------------------------------ heterogeneous

def _parse_archs(value: Any) -> tuple[str, ...]:
    from ..models.zoo import ARCHS

    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"archs must be a non-empty list of architectures from {ARCHS}, "
                         f"got {value!r}")
    bad = [a for a in value if a not in ARCHS]
    if bad:
        raise ValueError(f"unknown architecture(s) {bad} in archs; valid: {ARCHS}")
    return tuple(value)


class HeteroStack(nn.Module):
    """Members of several architectures: one stack (``build_model(members=k)``) per
    architecture group.

    ``forward(x)``: x (B, C, H, W) shared or (S, B, C, H, W) one input per member ->
    (S, B, classes), members in group order (``member_archs``). ``features(x)`` returns the
    list of the groups' (S_g, B, F_g) penultimate features (their widths differ).
    """

    def __init__(self, groups: Sequence[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.group_archs = [a for a, _ in groups]
        self.groups = nn.ModuleList([m for _, m in groups])
        self.sizes = [int(m.members) for m in self.groups]
        self.members = sum(self.sizes)
        self.member_archs = [a for a, n in zip(self.group_archs, self.sizes, strict=True)
                             for _ in range(n)]

    def _split(self, x: Tensor) -> list[Tensor]:
        if x.dim() == 5:
            if x.shape[0] != self.members:
                raise ValueError(f"x has {x.shape[0]} members on dim 0 but the ensemble has "
                                 f"{self.members} (x shape {tuple(x.shape)})")
            return list(torch.split(x, self.sizes, dim=0))
        return [x] * len(self.groups)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([g(xi) for g, xi in zip(self.groups, self._split(x), strict=True)], dim=0)

    def features(self, x: Tensor) -> list[Tensor]:
        return [g.features(xi) for g, xi in zip(self.groups, self._split(x), strict=True)]


class HeterogeneousEnsemble(Method):
    """S members of different architectures (``archs`` cycled), each with its own data order.

    Hyperparameters: ``members`` (5), ``archs`` (None: ``arch`` first, then the zoo's other
    architectures), ``bootstrap`` (False).
    """

    name: ClassVar[str] = "hetero-ensemble"
    DEFAULTS: ClassVar[dict[str, Any]] = {"members": 5, "archs": None, "bootstrap": False}

    def _validate_hparams(self, hp: dict[str, Any]) -> None:
        from ..models.zoo import ARCHS

        if getattr(self, "surrogate", None) is not None and self.surrogate.zoo is None:
            raise ValueError("hetero-ensemble mixes zoo architectures (archs=); it does not take "
                             "a user surrogate")
        _check_positive_int("members", hp["members"])
        if hp["archs"] is None:
            hp["archs"] = (self.arch,) + tuple(a for a in ARCHS if a != self.arch)
        hp["archs"] = list(_parse_archs(hp["archs"]))
        if not isinstance(hp["bootstrap"], bool):
            raise ValueError(f"bootstrap must be a bool, got {hp['bootstrap']!r}")

    @property
    def member_archs(self) -> list[str]:
        return list(self.model.member_archs)

    def _build(self) -> nn.Module:
        from ..models.zoo import build_model

        archs = self._hp["archs"]
        s = self._hp["members"]
        cycle = [archs[i % len(archs)] for i in range(s)]
        groups = [(a, build_model(a, self.input_shape, self.num_classes, members=cycle.count(a)))
                  for a in dict.fromkeys(cycle)]  # first-appearance order
        self._resolved["member_archs"] = [a for a, m in groups for _ in range(m.members)]
        return HeteroStack(groups)

    @property
    def num_members(self) -> int:
        return self._hp["members"]

    def _data_members(self) -> int:
        return self._hp["members"]

    def _index_pool(self, gen: torch.Generator, n: int, s_data: int) -> Optional[Tensor]:
        if not self._hp["bootstrap"]:
            return None
        return torch.randint(0, n, (s_data, n), generator=gen)


# ------------------------------------------------------------------------------ per-member hparams

class MemberAdam(torch.optim.Optimizer):
    """Adam over stacked parameters with a per-member step size and L2 coefficient.

    Every parameter must have the member axis first, (S, ...). ``lr`` and ``weight_decay`` are
    (S,) tensors (or floats); the L2 term is added to the gradient as in ``torch.optim.Adam``'s
    ``weight_decay`` (coupled). With equal entries it takes exactly torch's Adam steps.
    """

    def __init__(self, params, lr: Tensor | float, weight_decay: Tensor | float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        params = list(params)
        if not params:
            raise ValueError("MemberAdam got no parameters")
        s = int(params[0].shape[0])
        for p in params:
            if p.dim() == 0 or p.shape[0] != s:
                raise ValueError(f"every parameter needs the member axis ({s}) first, got shape "
                                 f"{tuple(p.shape)}")
        lr_t = torch.as_tensor(lr, dtype=torch.float32).expand(s).clone()
        wd_t = torch.as_tensor(weight_decay, dtype=torch.float32).expand(s).clone()
        if bool((lr_t <= 0).any()) or bool((wd_t < 0).any()):
            raise ValueError("lr must be > 0 and weight_decay >= 0 for every member")
        super().__init__(params, dict(lr=lr_t, weight_decay=wd_t, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                view = (p.shape[0],) + (1,) * (p.dim() - 1)
                lr = group["lr"].to(p.device).view(view)
                wd = group["weight_decay"].to(p.device).view(view)
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                g = p.grad + wd * p
                st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                bc1 = 1 - b1 ** st["step"]
                bc2 = 1 - b2 ** st["step"]
                denom = (st["exp_avg_sq"].sqrt() / math.sqrt(bc2)).add_(group["eps"])
                p.sub_((lr / bc1) * st["exp_avg"] / denom)
        return loss


def _log_spaced(lo: float, hi: float, s: int, gen: torch.Generator) -> Tensor:
    """s values log-spaced over [lo, hi] (lo=hi or s=1: the geometric middle), seeded order."""
    if s == 1 or lo == hi:
        vals = torch.full((s,), math.sqrt(lo * hi) if lo > 0 else 0.0)
    elif lo == 0:
        vals = torch.cat([torch.zeros(1), torch.logspace(math.log10(hi) - 2, math.log10(hi),
                                                         s - 1)])
    else:
        vals = torch.logspace(math.log10(lo), math.log10(hi), s)
    return vals[torch.randperm(s, generator=gen)]


class HyperparameterEnsemble(DeepEnsemble):
    """A Deep Ensemble whose members use different learning rates and weight decays.

    Hyperparameters: ``members`` (5), ``bootstrap`` (False), ``lr_range`` ((0.3, 3.0): multipliers
    of the fit's ``lr``), ``weight_decay_range`` ((0.0, 1e-3); a 0 lower end gives one member
    without decay and the rest log-spaced over two decades below the upper end). The values chosen
    per member are in ``hparams()["member_lr"]`` / ``["member_weight_decay"]``.
    """

    name: ClassVar[str] = "hparam-ensemble"
    DEFAULTS: ClassVar[dict[str, Any]] = {**DeepEnsemble.DEFAULTS, "lr_range": (0.3, 3.0),
                                          "weight_decay_range": (0.0, 1e-3)}

    def _validate_hparams(self, hp: dict[str, Any]) -> None:
        super()._validate_hparams(hp)
        for key, low_open in (("lr_range", True), ("weight_decay_range", False)):
            v = hp[key]
            if not isinstance(v, (list, tuple)) or len(v) != 2:
                raise ValueError(f"{key} must be a (low, high) pair, got {v!r}")
            lo = _check_float(f"{key}[0]", v[0], 0.0, low_open=low_open)
            hi = _check_float(f"{key}[1]", v[1], lo)
            hp[key] = [lo, hi]

    def _make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        # Assign values to all M members, then keep this block's (member_range: sharding or
        # chunking), so member i gets the same learning rate and decay in every layout.
        s = self._hp["members"]
        gen = torch.Generator().manual_seed(self.seed * 31 + 7)
        lrs = lr * _log_spaced(*self._hp["lr_range"], s, gen)
        wds = _log_spaced(*self._hp["weight_decay_range"], s, gen) + self._hp["weight_decay"]
        self._resolved["member_lr"] = [float(v) for v in lrs]
        self._resolved["member_weight_decay"] = [float(v) for v in wds]
        a, b = self._hp["member_range"] or (0, s)
        return MemberAdam(self.model.parameters(), lr=lrs[a:b], weight_decay=wds[a:b])


# ------------------------------------------------------------------------------ diversity penalties

class _NCLPenalty(torch.autograd.Function):
    """R = −strength / B · Σ_s Σ_b ||p_s(b) − p̄(b)||² with p = softmax(logits) over classes.

    Backward in closed form: ∂R/∂p_s = −2·strength/B · (p_s − p̄) (the p̄ dependence cancels
    because Σ_s (p_s − p̄) = 0), then through the softmax Jacobian: g_z = p ⊙ (g_p − Σ_c p g_p).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, strength: float) -> Tensor:
        p = torch.softmax(logits.float(), dim=-1)
        d = p - p.mean(0, keepdim=True)
        b = logits.shape[1]
        ctx.save_for_backward(p, d)
        ctx.scale = -2.0 * strength / b
        ctx.in_dtype = logits.dtype
        return (-strength / b) * (d * d).sum()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        p, d = ctx.saved_tensors
        gp = d * (ctx.scale * grad_out)
        gz = p * (gp - (p * gp).sum(-1, keepdim=True))
        return gz.to(ctx.in_dtype), None


def ncl_penalty(logits: Tensor, strength: float) -> Tensor:
    """Negative-correlation penalty of (S, B, C) member logits (a scalar to ADD to the loss).

    = −strength · Σ_s mean_b ||softmax(z_s(b)) − p̄(b)||² = −strength · S · C · V_batch, with
    V_batch the batch's mean prediction variance (population, over members).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (S, B, C), got shape {tuple(logits.shape)}")
    return _NCLPenalty.apply(logits, float(strength))


def ncl_penalty_reference(logits: Tensor, strength: float) -> Tensor:
    """The NCL formula written plainly (autograd differentiates it); the test oracle."""
    p = torch.softmax(logits, dim=-1)
    return -strength * ((p - p.mean(0, keepdim=True)) ** 2).sum(-1).mean(1).sum()


def repulsive_penalty(logits: Tensor, strength: float, min_bandwidth: float = 1e-4) -> Tensor:
    """RBF repulsion of (S, B, C) member probabilities (a scalar to ADD to the loss).

    = strength · S · mean_b mean_{s≠j} exp(−||p_s(b) − p_j(b)||² / h), h = max(median over b and
    pairs s<j of ||p_s − p_j||² / log S, min_bandwidth), h not differentiated. 0 for S = 1.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (S, B, C), got shape {tuple(logits.shape)}")
    s = logits.shape[0]
    if s < 2:
        return logits.sum() * 0.0
    p = torch.softmax(logits.float(), dim=-1).transpose(0, 1)  # (B, S, C)
    d2 = ((p[:, :, None, :] - p[:, None, :, :]) ** 2).sum(-1)  # (B, S, S)
    iu = torch.triu_indices(s, s, 1, device=logits.device)
    pair = d2[:, iu[0], iu[1]]  # (B, S(S-1)/2)
    h = (pair.detach().median() / math.log(s)).clamp_min(min_bandwidth)
    return strength * s * torch.exp(-pair / h).mean()


class _PenalizedEnsemble(Method):
    """S independently initialised members on shared batches, loss = Σ_s CE_s + penalty."""

    DEFAULTS: ClassVar[dict[str, Any]] = {"members": 5, "strength": 2.0}

    def _validate_hparams(self, hp: dict[str, Any]) -> None:
        _check_positive_int("members", hp["members"])
        hp["strength"] = _check_float("strength", hp["strength"], 0.0)

    def _build(self) -> nn.Module:
        return self._make_stack(self._hp["members"])

    @property
    def num_members(self) -> int:
        return self._hp["members"]

    def _penalty(self, logits: Tensor) -> Tensor:
        raise NotImplementedError

    def _train_loss(self, xb: Tensor, yb: Tensor, n_train: int) -> Tensor:
        logits = self.model(xb)
        loss = member_loss_sum(logits, yb)
        if self._hp["strength"] > 0:
            loss = loss + self._penalty(logits)
        return loss


class NCLEnsemble(_PenalizedEnsemble):
    """Negative correlation learning: Σ_s CE_s − strength · Σ_s mean_x ||p_s − p̄||²."""

    name: ClassVar[str] = "ncl-ensemble"

    def _penalty(self, logits: Tensor) -> Tensor:
        return ncl_penalty(logits, self._hp["strength"])


class RepulsiveEnsemble(_PenalizedEnsemble):
    """Function-space RBF repulsion between members' probabilities (median-heuristic bandwidth)."""

    name: ClassVar[str] = "repulsive-ensemble"
    DEFAULTS: ClassVar[dict[str, Any]] = {"members": 5, "strength": 0.2, "min_bandwidth": 1e-4}

    def _validate_hparams(self, hp: dict[str, Any]) -> None:
        super()._validate_hparams(hp)
        hp["min_bandwidth"] = _check_float("min_bandwidth", hp["min_bandwidth"], 0.0,
                                           low_open=True)

    def _penalty(self, logits: Tensor) -> Tensor:
        return repulsive_penalty(logits, self._hp["strength"], self._hp["min_bandwidth"])


DIVERSE_METHODS: dict[str, type[Method]] = {
    "bootstrap-ensemble": BootstrapEnsemble,
    "hetero-ensemble": HeterogeneousEnsemble,
    "hparam-ensemble": HyperparameterEnsemble,
    "ncl-ensemble": NCLEnsemble,
    "repulsive-ensemble": RepulsiveEnsemble,
}

__all__ = ["DIVERSE_METHODS", "BootstrapEnsemble", "HeterogeneousEnsemble", "HeteroStack",
           "HyperparameterEnsemble", "MemberAdam", "NCLEnsemble", "RepulsiveEnsemble",
           "ncl_penalty", "ncl_penalty_reference", "repulsive_penalty"]
