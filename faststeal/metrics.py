"""The one metric module (definitions in docs: PRODUCT.md "Metrics").

For S member predictions p_s(c|x) on an evaluation set:
p̄ = mean_s p_s; prediction = argmax p̄; fidelity = mean 1[pred = victim label]; accuracy = mean
1[pred = y]; mean member fidelity = mean_s fidelity of member s alone; ensemble gain = fidelity −
mean member fidelity; prediction variance V = mean_x mean_c Var_s p_s(c|x) (correction 0); mutual
information = H[p̄] − mean_s H[p_s]; disagreement = mean_x fraction of members whose argmax differs
from argmax p̄; KL(victim ‖ surrogate) = mean_x Σ_c p_v log(p_v / p̄) when the victim's
probabilities are known. Everything is computed from one ``faststeal.ops.member_stats`` pass.
"""

from __future__ import annotations

from typing import Optional

import torch

from .ops import member_stats

_EPS = 1e-12


def prediction_variance(member_logits: torch.Tensor) -> float:
    """V = mean_x mean_c Var_s p_s(c|x) for (S, B, C) logits."""
    return float(member_stats(member_logits).variance.mean())


def kl_divergence(victim_probs: torch.Tensor, surrogate_probs: torch.Tensor) -> float:
    """mean_x KL(victim ‖ surrogate) for (B, C) probability rows."""
    pv = victim_probs.double()
    ps = surrogate_probs.double().clamp_min(_EPS)
    return float(torch.xlogy(pv, pv).sum(-1).sub((pv * ps.log()).sum(-1)).mean())


class NonFiniteError(FloatingPointError):
    """A surrogate's predictions hold NaN/inf: it diverged, and no metric is computed from it."""


def check_finite_members(member_logits: torch.Tensor, who: str,
                         mean_probs: Optional[torch.Tensor] = None) -> None:
    """Raise :class:`NonFiniteError` naming ``who`` and the members whose (S, B, C) predictions
    hold a NaN/inf (an argmax over NaN is class 0, a plausible but meaningless fidelity)."""
    finite = torch.isfinite(member_logits.reshape(member_logits.shape[0], -1)).all(1)
    bad = (~finite).nonzero().flatten().tolist()
    if bad:
        raise NonFiniteError(
            f"{who}: member(s) {bad} of {member_logits.shape[0]} produced non-finite (NaN/inf) "
            f"predictions on the evaluation set: the surrogate diverged and gets no metrics")
    if mean_probs is not None and not bool(torch.isfinite(mean_probs).all()):
        raise NonFiniteError(f"{who}: the predictive probabilities hold NaN/inf although every "
                             f"member's predictions are finite: no metrics are computed")


def evaluate(member_logits: torch.Tensor, victim_labels: torch.Tensor, labels: torch.Tensor,
             *, mean_probs: Optional[torch.Tensor] = None,
             victim_probs: Optional[torch.Tensor] = None,
             who: str = "surrogate") -> dict[str, float]:
    """All comparison metrics of one surrogate on one evaluation set.

    member_logits: (S, B, C); victim_labels, labels: (B,) int64 (victim's answer and ground truth).
    mean_probs: (B, C) overrides p̄ for the method's prediction (e.g. Laplace's probit
    predictive); victim_probs: (B, C) enables the KL. Returns plain floats. Non-finite
    predictions raise :class:`NonFiniteError` naming ``who`` (e.g. method and seed) and the
    members, rather than being averaged into a fidelity.
    """
    if member_logits.dim() != 3:
        raise ValueError(f"member_logits must be (S, B, C), got shape {tuple(member_logits.shape)}")
    check_finite_members(member_logits, who, mean_probs)
    b = member_logits.shape[1]
    for name, t in (("victim_labels", victim_labels), ("labels", labels)):
        if t.shape != (b,):
            raise ValueError(f"{name} must be ({b},) to match member_logits, got {tuple(t.shape)}")
    victim_labels = victim_labels.to(member_logits.device)
    labels = labels.to(member_logits.device)
    st = member_stats(member_logits, victim_labels)
    p_bar = st.mean_probs if mean_probs is None else mean_probs.to(st.mean_probs)
    pred = st.pred if mean_probs is None else p_bar.argmax(-1)
    fidelity = float((pred == victim_labels).float().mean())
    member_fid = float(st.member_correct.mean())
    out = {
        "fidelity": fidelity,
        "accuracy": float((pred == labels).float().mean()),
        "mean_member_fidelity": member_fid,
        "ensemble_gain": fidelity - member_fid,
        "variance": float(st.variance.mean()),
        "mutual_info": float(st.mutual_info.mean()),
        "disagreement": float(st.disagreement.mean()),
        "members": int(member_logits.shape[0]),
    }
    if victim_probs is not None:
        out["kl"] = kl_divergence(victim_probs.to(p_bar.device), p_bar)
    return out


def diversity(member_logits: torch.Tensor) -> dict[str, float]:
    """The diversity statistics recorded over training on the probe set."""
    st = member_stats(member_logits)
    return {"variance": float(st.variance.mean()), "mutual_info": float(st.mutual_info.mean()),
            "disagreement": float(st.disagreement.mean())}
