"""The one metric module (definitions in docs: PRODUCT.md "Metrics").

For S member predictions p_s(c|x) on an evaluation set:
p̄ = mean_s p_s; prediction = argmax p̄; fidelity = mean 1[pred = victim label]; accuracy = mean
1[pred = y]; mean member fidelity = mean_s fidelity of member s alone; ensemble gain = fidelity −
mean member fidelity; prediction variance V = mean_x mean_c Var_s p_s(c|x) (correction 0); mutual
information = H[p̄] − mean_s H[p_s]; disagreement = mean_x fraction of members whose argmax differs
from argmax p̄; KL(victim ‖ surrogate) = mean_x Σ_c p_v log(p_v / p̄) when the victim's
probabilities are known. Everything is computed from one ``faststeal.ops.member_stats`` pass.

Uncertainty quality, all on the method's predictive p̄ (Laplace: its probit predictive):
expected calibration error ECE = Σ_b |B_b|/N · |acc(B_b) − conf(B_b)| over 15 equal-width bins of
the confidence max_c p̄(c|x) (bin b holds b/15 <= conf < (b+1)/15, the last bin also conf = 1,
as torchmetrics bins), against the victim's labels (``ece_victim``) and the true labels
(``ece``); Brier score = mean_x Σ_c (p̄(c|x) − 1[c = y])² and NLL = mean_x −log p̄(y|x) against
the true labels; out-of-distribution AUROC = P(u(x_ood) > u(x_in)) + ½ P(tie) for the uncertainty
scores u = predictive entropy H[p̄], mutual information and per-input variance mean_c Var_s
p_s(c|x), the in-distribution test set against a second dataset (0.5: no better than chance).
"""

from __future__ import annotations

from typing import Optional

import torch

from .ops import member_stats

_EPS = 1e-12
#: confidence bins of the expected calibration error
ECE_BINS = 15


def prediction_variance(member_logits: torch.Tensor) -> float:
    """V = mean_x mean_c Var_s p_s(c|x) for (S, B, C) logits."""
    return float(member_stats(member_logits).variance.mean())


def kl_divergence(victim_probs: torch.Tensor, surrogate_probs: torch.Tensor) -> float:
    """mean_x KL(victim ‖ surrogate) for (B, C) probability rows."""
    pv = victim_probs.double()
    ps = surrogate_probs.double().clamp_min(_EPS)
    return float(torch.xlogy(pv, pv).sum(-1).sub((pv * ps.log()).sum(-1)).mean())


def _check_probs_labels(probs: torch.Tensor, labels: torch.Tensor) -> None:
    if probs.dim() != 2:
        raise ValueError(f"probs must be (B, C) probabilities, got shape {tuple(probs.shape)}")
    if labels.shape != (probs.shape[0],):
        raise ValueError(f"labels must be ({probs.shape[0]},) to match probs, got "
                         f"{tuple(labels.shape)}")


def calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error (L1) of (B, C) probabilities against (B,) int labels.

    Confidence max_c p(c|x) in ``n_bins`` equal-width bins [b/n, (b+1)/n) (confidence 1 in the
    last); ECE = Σ_b |B_b|/N · |mean 1[argmax = label] − mean confidence| over B_b.
    """
    _check_probs_labels(probs, labels)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    conf, pred = probs.double().max(-1)
    hit = (pred == labels.to(pred.device)).double()
    b = (conf * n_bins).floor().long().clamp_(0, n_bins - 1)
    # per bin: |Σ hit − Σ conf| / N  ==  |B_b|/N · |acc(B_b) − conf(B_b)|
    gap = torch.zeros(n_bins, dtype=torch.float64, device=conf.device)
    gap.index_add_(0, b, hit - conf)
    return float(gap.abs().sum() / max(1, conf.numel()))


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """mean_x Σ_c (p(c|x) − 1[c = label])² of (B, C) probabilities (0 best, 2 worst)."""
    _check_probs_labels(probs, labels)
    onehot = torch.nn.functional.one_hot(labels.to(probs.device).long(), probs.shape[1])
    return float((probs.double() - onehot).pow(2).sum(-1).mean())


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """mean_x −log p(label|x) of (B, C) probabilities (clamped at 1e-12: at most 27.6 nats)."""
    _check_probs_labels(probs, labels)
    p = probs.double().gather(1, labels.to(probs.device).long().view(-1, 1)).squeeze(1)
    return float(-p.clamp_min(_EPS).log().mean())


def auroc(scores_in: torch.Tensor, scores_out: torch.Tensor) -> float:
    """P(score_out > score_in) + ½ P(equal): the area under the ROC curve that separates the
    ``scores_out`` rows (positives, e.g. out-of-distribution) from ``scores_in`` by score.

    Mann–Whitney U with average ranks for ties (scikit-learn's ``roc_auc_score`` value), float64.
    """
    if scores_in.dim() != 1 or scores_out.dim() != 1 or not len(scores_in) or not len(scores_out):
        raise ValueError(f"scores_in and scores_out must be non-empty 1-d tensors, got shapes "
                         f"{tuple(scores_in.shape)} and {tuple(scores_out.shape)}")
    s = torch.cat([scores_in.double().flatten(), scores_out.double().to(scores_in.device)])
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    counts = counts.double()
    first = torch.cumsum(counts, 0) - counts  # 0-based rank of each distinct value's first row
    ranks = (first + (counts + 1) / 2.0)[inverse]  # 1-based average ranks
    n_in, n_out = len(scores_in), len(scores_out)
    u = ranks[n_in:].sum() - n_out * (n_out + 1) / 2.0
    return float(u / (n_in * n_out))


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -torch.xlogy(p, p).sum(-1)


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
             ood_member_logits: Optional[torch.Tensor] = None,
             ood_mean_probs: Optional[torch.Tensor] = None,
             who: str = "surrogate") -> dict[str, float]:
    """All comparison metrics of one surrogate on one evaluation set.

    member_logits: (S, B, C); victim_labels, labels: (B,) int64 (victim's answer and ground truth).
    mean_probs: (B, C) overrides p̄ for the method's prediction (e.g. Laplace's probit
    predictive); victim_probs: (B, C) enables the KL. ood_member_logits: (S, B_ood, C) the same
    members on out-of-distribution inputs (with ``ood_mean_probs`` the override of p̄ there)
    enables the OOD AUROCs; those of mutual information and variance need S > 1 (with one member
    both are identically zero). Returns plain floats. Non-finite
    predictions (here or on the OOD set) raise :class:`NonFiniteError` naming ``who`` (e.g. method and seed) and the
    members, rather than being averaged into a fidelity.
    """
    if member_logits.dim() != 3:
        raise ValueError(f"member_logits must be (S, B, C), got shape {tuple(member_logits.shape)}")
    check_finite_members(member_logits, who, mean_probs)
    b = member_logits.shape[1]
    for name, t in (("victim_labels", victim_labels), ("labels", labels)):
        if t.shape != (b,):
            raise ValueError(f"{name} must be ({b},) to match member_logits, got {tuple(t.shape)}")
    if ood_member_logits is not None and (ood_member_logits.dim() != 3 or (
            ood_member_logits.shape[0], ood_member_logits.shape[2]) != (
            member_logits.shape[0], member_logits.shape[2])):
        raise ValueError(f"ood_member_logits must be (S, B_ood, C) = ({member_logits.shape[0]}, "
                         f"B_ood, {member_logits.shape[2]}), got "
                         f"{tuple(ood_member_logits.shape)}")
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
        "ece_victim": calibration_error(p_bar, victim_labels),
        "ece": calibration_error(p_bar, labels),
        "brier": brier_score(p_bar, labels),
        "nll": nll(p_bar, labels),
    }
    if victim_probs is not None:
        out["kl"] = kl_divergence(victim_probs.to(p_bar.device), p_bar)
    if ood_member_logits is not None:
        check_finite_members(ood_member_logits, f"{who} on the OOD set", ood_mean_probs)
        so = member_stats(ood_member_logits.to(member_logits.device))
        p_ood = so.mean_probs if ood_mean_probs is None else ood_mean_probs.to(p_bar)
        out["ood_auroc_entropy"] = auroc(_entropy(p_bar.double()), _entropy(p_ood.double()))
        if member_logits.shape[0] > 1:
            out["ood_auroc_mi"] = auroc(st.mutual_info, so.mutual_info)
            out["ood_auroc_variance"] = auroc(st.variance, so.variance)
    return out


def diversity(member_logits: torch.Tensor) -> dict[str, float]:
    """The diversity statistics recorded over training on the probe set."""
    st = member_stats(member_logits)
    return {"variance": float(st.variance.mean()), "mutual_info": float(st.mutual_info.mean()),
            "disagreement": float(st.disagreement.mean())}
