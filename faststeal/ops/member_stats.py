"""``member_stats``: every across-member statistic of (S, B, C) logits in one pass."""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks, dispatch
from .reference import MemberStats


@torch.library.custom_op("faststeal::member_stats", mutates_args=())
def _member_stats(logits: torch.Tensor, targets: Optional[torch.Tensor]) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
        torch.Tensor, torch.Tensor, torch.Tensor]:
    out = dispatch.impl("member_stats", "fwd", logits.device.type)(logits, targets)
    return tuple(out)


@_member_stats.register_fake
def _(logits, targets):
    s, b, c = logits.shape
    f = dict(dtype=torch.float32)
    has_t = targets is not None
    return (logits.new_empty(b, c, **f), logits.new_empty(b, **f), logits.new_empty(b, **f),
            logits.new_empty(b, **f), logits.new_empty(b, **f),
            logits.new_empty(b, dtype=torch.int64), logits.new_empty(b, **f),
            logits.new_empty(b if has_t else 0, **f), logits.new_empty(s if has_t else 0, **f))


def member_stats(logits: torch.Tensor, targets: Optional[torch.Tensor] = None) -> MemberStats:
    """Across-member statistics of member logits.

    logits: (members, batch, classes), any float dtype (computed in float32, stable for large and
    shifted logits); targets: (batch,) integer labels in [0, classes) (e.g. the victim's) or None.
    Non-finite logits give what :func:`faststeal.ops.reference.member_stats_fwd` gives: a member
    row with a NaN or +inf makes that batch row's statistics NaN (its ``pred`` is 0, the first
    NaN, like ``torch.argmax``); a -inf logit is a class of probability 0.
    Returns :class:`MemberStats` (mean probabilities, variance, entropies, mutual information,
    ensemble argmax, disagreement; ``correct`` and ``member_correct`` are empty without targets).
    Not differentiable: this is a metric.
    """
    _checks.tensor("logits", logits, (3,))
    if min(logits.shape) == 0:
        raise ValueError(f"logits must be non-empty, got {_checks.describe(logits)}")
    if targets is not None:
        _checks.tensor("targets", targets, (1,), float_only=False)
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise TypeError(f"targets must be integer class labels, got {_checks.describe(targets)}")
        if targets.device != logits.device:
            raise ValueError(f"targets is on {targets.device} but logits is on {logits.device}")
        _checks.dim_eq("targets", targets, 0, logits.shape[1], "rows (logits is (S, B, C))")
        _checks.class_labels("targets", targets, logits.shape[2])
        targets = targets.to(torch.int64).contiguous()
    return MemberStats(*_member_stats(logits.detach().contiguous(), targets))
