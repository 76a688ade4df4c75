"""``ensemble_cross_entropy``: per-member mean cross-entropy of (S, B, C) logits, fused gradient."""

from __future__ import annotations

import torch

from . import _checks, dispatch
from .reference import acc_dtype


@torch.library.custom_op("faststeal::ensemble_cross_entropy", mutates_args=())
def _ensemble_xent(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return dispatch.impl("ensemble_cross_entropy", "fwd", logits.device.type)(logits, target)


@_ensemble_xent.register_fake
def _(logits, target):
    return logits.new_empty(logits.shape[0], dtype=acc_dtype(logits.dtype))


@torch.library.custom_op("faststeal::ensemble_cross_entropy_backward", mutates_args=())
def _ensemble_xent_backward(grad: torch.Tensor, logits: torch.Tensor,
                            target: torch.Tensor) -> torch.Tensor:
    fn = dispatch.impl("ensemble_cross_entropy", "bwd", logits.device.type)
    return fn(grad.contiguous(), logits, target)


@_ensemble_xent_backward.register_fake
def _(grad, logits, target):
    return logits.new_empty(logits.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    logits, target = ctx.saved_tensors
    return _ensemble_xent_backward(grad, logits, target), None


_ensemble_xent.register_autograd(_backward, setup_context=_setup)


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
    return _ensemble_xent(logits.contiguous(), target.contiguous())
