"""``ensemble_linear``: S stacked linear layers with fused bias, activation and dropout."""

from __future__ import annotations

from typing import Optional

import torch

from .. import master_weights
from . import _checks, _eager, dispatch, rng
from .reference import ACTIVATIONS


def autocast_inputs(device_type: str, *tensors: Optional[torch.Tensor]):
    """Inside ``torch.autocast(device_type, dtype)``: the floating tensors cast to ``dtype``
    (float64 stays), as autocast does for ``torch.nn.functional.linear``; else unchanged. The
    ops then compute in that dtype with float32 accumulation, and autograd returns the gradients
    of the float32 master weights through the cast (or, in a training step with
    :class:`faststeal.master_weights.MasterWeights`, a parameter's bfloat16 working copy stands
    in for the cast and keeps its gradient for the optimizer)."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dt = torch.get_autocast_dtype(device_type)
    return tuple(master_weights.cast(t, dt) if isinstance(t, torch.Tensor)
                 and t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors)


def _forward(x, weight, bias, activation, dropout_p, seed):
    fn = dispatch.impl("ensemble_linear", "fwd", x.device.type)
    key = rng.rng_key(seed, rng.STREAM_DROPOUT)
    return fn(x, weight, bias, activation, dropout_p, key)


def _grads(grad_y, x, weight, bias, y, z, activation, dropout_p, seed, need_dx):
    fn = dispatch.impl("ensemble_linear", "bwd", x.device.type)
    key = rng.rng_key(seed, rng.STREAM_DROPOUT)
    dx, dw, db = fn(grad_y.contiguous(), x, weight, bias, y, z, activation, dropout_p, key,
                    need_dx)
    # distinct empty tensors for the absent grads: torch.library forbids aliased outputs
    return (dx if dx is not None else x.new_empty(0), dw,
            db if db is not None else weight.new_empty(0))


@torch.library.custom_op("faststeal::ensemble_linear", mutates_args=())
def _ensemble_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     activation: str, dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(x, weight, bias, activation, dropout_p, seed)


@_ensemble_linear.register_fake
def _(x, weight, bias, activation, dropout_p, seed):
    y = x.new_empty(weight.shape[0], x.shape[-2], weight.shape[1])
    z = y.new_empty(y.shape) if activation == "gelu" else y.new_empty(0)
    return y, z


@torch.library.custom_op("faststeal::ensemble_linear_backward", mutates_args=())
def _ensemble_linear_backward(
        grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
        y: torch.Tensor, z: torch.Tensor, activation: str, dropout_p: float, seed: int,
        need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _grads(grad_y, x, weight, bias, y, z, activation, dropout_p, seed, need_dx)


@_ensemble_linear_backward.register_fake
def _(grad_y, x, weight, bias, y, z, activation, dropout_p, seed, need_dx):
    db = bias.new_empty(bias.shape) if bias is not None else weight.new_empty(0)
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, weight.new_empty(weight.shape), db


def _setup(ctx, inputs, output):
    x, weight, bias, activation, dropout_p, seed = inputs
    y, z = output
    ctx.save_for_backward(x, weight, bias, y, z)
    ctx.args = (activation, dropout_p, seed)


def _backward_with(grads):
    def backward(ctx, grad_y, grad_z):
        x, weight, bias, y, z = ctx.saved_tensors
        need_dx = bool(ctx.needs_input_grad[0])  # False for a first layer: no dx GEMM
        dx, dw, db = grads(grad_y, x, weight, bias, y, z, *ctx.args, need_dx)
        return (dx if need_dx else None), dw, (db if bias is not None else None), None, None, None
    return backward


_ensemble_linear.register_autograd(_backward_with(_ensemble_linear_backward), setup_context=_setup)
#: the eager twin (faststeal/ops/_eager.py): the same functions without torch.library's overhead
_EnsembleLinear = _eager.twin("EnsembleLinear", _forward, _setup, _backward_with(_grads))


def ensemble_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    activation: str = "none", dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """S linear layers at once: ``dropout(act(x @ weight[s]^T + bias[s]))``.

    x: (members, batch, in_features), or (batch, in_features) shared by all members;
    weight: (members, out_features, in_features); bias: (members, out_features) or None;
    activation: ``"none"``, ``"relu"`` or ``"gelu"`` (exact); dropout_p in [0, 1); seed: the
    counter-based RNG seed (see :mod:`faststeal.ops.rng`) — the same seed gives the same mask.
    Returns (members, batch, out_features) in x's dtype. Differentiable in x, weight and bias.
    Inside ``torch.autocast`` (e.g. bfloat16) the inputs are cast to the autocast dtype first and
    the result has that dtype.
    """
    _checks.tensor("x", x, (2, 3))
    _checks.tensor("weight", weight, (3,))
    x, weight, bias = autocast_inputs(x.device.type, x, weight, bias)
    _checks.same("weight", weight, "x", x)
    s, n, k = weight.shape
    _checks.dim_eq("x", x, -1, k, "input features (weight is (S, N, K))")
    if x.dim() == 3:
        _checks.dim_eq("x", x, 0, s, "members (weight is (S, N, K))")
    if bias is not None:
        _checks.tensor("bias", bias, (2,))
        _checks.same("bias", bias, "x", x)
        if tuple(bias.shape) != (s, n):
            raise ValueError(f"bias must be (members, out_features) = {(s, n)}, "
                             f"got {_checks.describe(bias)}")
        bias = _checks.contiguous("bias", bias)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    dropout_p = _checks.probability("dropout_p", dropout_p)
    seed = _checks.seed("seed", seed)
    x = _checks.contiguous("x", x)
    weight = _checks.contiguous("weight", weight)
    op = _EnsembleLinear.apply if _eager.plain(x, weight, bias) else _ensemble_linear
    return op(x, weight, bias, activation, dropout_p, seed)[0]
