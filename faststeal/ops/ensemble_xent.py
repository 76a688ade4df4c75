"""``ensemble_cross_entropy``: per-member mean cross-entropy of (S, B, C) logits, fused gradient."""

from __future__ import annotations

import torch

from . import _checks, _eager, dispatch
from .reference import acc_dtype


def _forward(logits, target):
    return dispatch.impl("ensemble_cross_entropy", "fwd", logits.device.type)(logits, target)


def _grad(grad, logits, target):
    fn = dispatch.impl("ensemble_cross_entropy", "bwd", logits.device.type)
    return fn(grad.contiguous(), logits, target)


@torch.library.custom_op("faststeal::ensemble_cross_entropy", mutates_args=())
def _ensemble_xent(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return _forward(logits, target)


@_ensemble_xent.register_fake
def _(logits, target):
    return logits.new_empty(logits.shape[0], dtype=acc_dtype(logits.dtype))


@torch.library.custom_op("faststeal::ensemble_cross_entropy_backward", mutates_args=())
def _ensemble_xent_backward(grad: torch.Tensor, logits: torch.Tensor,
                            target: torch.Tensor) -> torch.Tensor:
    return _grad(grad, logits, target)


@_ensemble_xent_backward.register_fake
def _(grad, logits, target):
    return logits.new_empty(logits.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_with(grad_fn):
    def backward(ctx, grad):
        logits, target = ctx.saved_tensors
        return grad_fn(grad, logits, target), None
    return backward


_ensemble_xent.register_autograd(_backward_with(_ensemble_xent_backward), setup_context=_setup)
#: the eager twin (faststeal/ops/_eager.py)
_EnsembleXent = _eager.twin("EnsembleCrossEntropy", _forward, _setup, _backward_with(_grad))


def ensemble_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-member mean cross-entropy.

    logits: (members, batch, classes); target: (batch,) integer labels or (batch, classes)
    probabilities (soft labels). Returns (members,) float32; the training loss of a stacked
    model is its sum, so every member gets its own gradient. Differentiable in logits.
    A label outside [0, classes) raises ValueError for CPU tensors; on a GPU it makes that
    member's loss NaN instead (checking would need a host sync every step), which training
    reports as a non-finite loss.
    """
    _checks.tensor("logits", logits, (3,))
    s, b, c = logits.shape
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits is on {logits.device}")
    if target.dtype.is_floating_point:
        if tuple(target.shape) != (b, c):
            raise ValueError(f"soft target must be (batch, classes) = {(b, c)}, got "
                             f"{_checks.describe(target)}")
        target = target.to(logits.dtype)
    else:
        if target.dtype == torch.bool or tuple(target.shape) != (b,):
            raise ValueError(f"hard target must be (batch,) = ({b},) integer labels, got "
                             f"{_checks.describe(target)}")
        if target.device.type == "cpu":  # free here; on a GPU it would cost a sync per step
            _checks.class_labels("target", target, c)
        target = target.to(torch.int64)
    logits, target = logits.contiguous(), target.contiguous()
    op = _EnsembleXent.apply if _eager.plain(logits, target) else _ensemble_xent
    return op(logits, target)
