"""``bayes_linear``: S weight samples of a mean-field Gaussian linear layer, drawn in-kernel,
and ``gaussian_kl``, the KL of that posterior to a zero-mean Gaussian prior as a fused reduction."""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks, _eager, dispatch, rng
from .ensemble_linear import autocast_inputs
from .reference import acc_dtype


def _keys(seed: int) -> tuple[int, int]:
    return rng.rng_key(seed, rng.STREAM_WEIGHT), rng.rng_key(seed, rng.STREAM_BIAS)


def _forward(x, w_mu, w_rho, b_mu, b_rho, samples, seed):
    fn = dispatch.impl("bayes_linear", "fwd", x.device.type)
    return fn(x, w_mu, w_rho, b_mu, b_rho, samples, *_keys(seed))


def _grads(grad_y, x, w_mu, w_rho, b_mu, b_rho, samples, seed, need_dx):
    fn = dispatch.impl("bayes_linear", "bwd", x.device.type)
    dx, dmu, drho, dbmu, dbrho = fn(grad_y.contiguous(), x, w_mu, w_rho, b_mu, b_rho, samples,
                                    *_keys(seed), need_dx)
    # distinct empty tensors: torch.library forbids outputs that alias each other
    return (dx if dx is not None else x.new_empty(0), dmu, drho,
            dbmu if dbmu is not None else w_mu.new_empty(0),
            dbrho if dbrho is not None else w_mu.new_empty(0))


@torch.library.custom_op("faststeal::bayes_linear", mutates_args=())
def _bayes_linear(x: torch.Tensor, w_mu: torch.Tensor, w_rho: torch.Tensor,
                  b_mu: Optional[torch.Tensor], b_rho: Optional[torch.Tensor],
                  samples: int, seed: int) -> torch.Tensor:
    return _forward(x, w_mu, w_rho, b_mu, b_rho, samples, seed)


@_bayes_linear.register_fake
def _(x, w_mu, w_rho, b_mu, b_rho, samples, seed):
    return x.new_empty(samples, x.shape[-2], w_mu.shape[0])


@torch.library.custom_op("faststeal::bayes_linear_backward", mutates_args=())
def _bayes_linear_backward(
        grad_y: torch.Tensor, x: torch.Tensor, w_mu: torch.Tensor, w_rho: torch.Tensor,
        b_mu: Optional[torch.Tensor], b_rho: Optional[torch.Tensor], samples: int, seed: int,
        need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _grads(grad_y, x, w_mu, w_rho, b_mu, b_rho, samples, seed, need_dx)


@_bayes_linear_backward.register_fake
def _(grad_y, x, w_mu, w_rho, b_mu, b_rho, samples, seed, need_dx):
    b = (lambda t: t.new_empty(t.shape)) if b_mu is not None else (lambda t: w_mu.new_empty(0))
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return (dx, w_mu.new_empty(w_mu.shape), w_rho.new_empty(w_rho.shape), b(b_mu), b(b_rho))


def _setup(ctx, inputs, output):
    x, w_mu, w_rho, b_mu, b_rho, samples, seed = inputs
    ctx.save_for_backward(x, w_mu, w_rho, b_mu, b_rho)
    ctx.args = (samples, seed)


def _backward_with(grads):
    def backward(ctx, grad_y):
        x, w_mu, w_rho, b_mu, b_rho = ctx.saved_tensors
        need_dx = bool(ctx.needs_input_grad[0])  # False for a first layer: no dx GEMM
        dx, dmu, drho, dbmu, dbrho = grads(grad_y, x, w_mu, w_rho, b_mu, b_rho, *ctx.args,
                                           need_dx)
        has_b = b_mu is not None
        return ((dx if need_dx else None), dmu, drho, (dbmu if has_b else None),
                (dbrho if has_b else None), None, None)
    return backward


_bayes_linear.register_autograd(_backward_with(_bayes_linear_backward), setup_context=_setup)
#: the eager twin (faststeal/ops/_eager.py)
_BayesLinear = _eager.twin("BayesLinear", _forward, _setup, _backward_with(_grads))


def bayes_linear(x: torch.Tensor, w_mu: torch.Tensor, w_rho: torch.Tensor,
                 b_mu: Optional[torch.Tensor] = None, b_rho: Optional[torch.Tensor] = None,
                 seed: int = 0, samples: int = 1) -> torch.Tensor:
    """S samples of a Bayesian linear layer without materialising the sampled weights.

    w_s = w_mu + softplus(w_rho) * eps_s, b_s = b_mu + softplus(b_rho) * eps'_s, eps from the
    counter-based RNG (:mod:`faststeal.ops.rng`, streams 1 and 2) so backward regenerates them.
    x: (batch, in_features) shared, or (samples, batch, in_features); w_mu, w_rho:
    (out_features, in_features); b_mu, b_rho: (out_features,) or both None.
    Returns (samples, batch, out_features). Differentiable in x, mu and rho. Inside
    ``torch.autocast`` the inputs are cast to its dtype first (see ``ensemble_linear``).
    """
    _checks.tensor("x", x, (2, 3))
    _checks.tensor("w_mu", w_mu, (2,))
    _checks.tensor("w_rho", w_rho, (2,))
    # inside torch.autocast: compute in its dtype (float32 accumulation), like ensemble_linear
    x, w_mu, w_rho, b_mu, b_rho = autocast_inputs(x.device.type, x, w_mu, w_rho, b_mu, b_rho)
    _checks.same("w_mu", w_mu, "x", x)
    _checks.same("w_rho", w_rho, "x", x)
    if w_rho.shape != w_mu.shape:
        raise ValueError(f"w_rho must have w_mu's shape {tuple(w_mu.shape)}, got "
                         f"{_checks.describe(w_rho)}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    n, k = w_mu.shape
    _checks.dim_eq("x", x, -1, k, "input features (w_mu is (N, K))")
    if x.dim() == 3:
        _checks.dim_eq("x", x, 0, samples, "samples")
    if (b_mu is None) != (b_rho is None):
        raise ValueError("b_mu and b_rho must both be given or both be None")
    if b_mu is not None:
        for name, t in (("b_mu", b_mu), ("b_rho", b_rho)):
            _checks.tensor(name, t, (1,))
            _checks.same(name, t, "x", x)
            _checks.dim_eq(name, t, 0, n, "out features")
        b_mu, b_rho = b_mu.contiguous(), b_rho.contiguous()
    seed = _checks.seed("seed", seed)
    x, w_mu, w_rho = x.contiguous(), w_mu.contiguous(), w_rho.contiguous()
    op = _BayesLinear.apply if _eager.plain(x, w_mu, w_rho, b_mu, b_rho) else _bayes_linear
    return op(x, w_mu, w_rho, b_mu, b_rho, samples, seed)


def _kl_forward(mu, rho, prior_sigma):
    return dispatch.impl("gaussian_kl", "fwd", mu.device.type)(mu, rho, prior_sigma)


def _kl_grads(grad, mu, rho, prior_sigma):
    dmu, drho = dispatch.impl("gaussian_kl", "bwd", mu.device.type)(grad, mu, rho, prior_sigma)
    return dmu, drho


@torch.library.custom_op("faststeal::gaussian_kl", mutates_args=())
def _gaussian_kl(mu: torch.Tensor, rho: torch.Tensor, prior_sigma: float) -> torch.Tensor:
    return _kl_forward(mu, rho, prior_sigma)


@_gaussian_kl.register_fake
def _(mu, rho, prior_sigma):
    return mu.new_empty((), dtype=acc_dtype(mu.dtype))


@torch.library.custom_op("faststeal::gaussian_kl_backward", mutates_args=())
def _gaussian_kl_backward(grad: torch.Tensor, mu: torch.Tensor, rho: torch.Tensor,
                          prior_sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _kl_grads(grad, mu, rho, prior_sigma)


@_gaussian_kl_backward.register_fake
def _(grad, mu, rho, prior_sigma):
    return mu.new_empty(mu.shape), rho.new_empty(rho.shape)


def _kl_setup(ctx, inputs, output):
    mu, rho, prior_sigma = inputs
    ctx.save_for_backward(mu, rho)
    ctx.prior_sigma = prior_sigma


def _kl_backward_with(grads):
    def backward(ctx, grad):
        mu, rho = ctx.saved_tensors
        dmu, drho = grads(grad, mu, rho, ctx.prior_sigma)
        return dmu, drho, None
    return backward


_gaussian_kl.register_autograd(_kl_backward_with(_gaussian_kl_backward), setup_context=_kl_setup)
#: the eager twin (faststeal/ops/_eager.py)
_GaussianKL = _eager.twin("GaussianKL", _kl_forward, _kl_setup, _kl_backward_with(_kl_grads))


def gaussian_kl(mu: torch.Tensor, rho: torch.Tensor, prior_sigma: float = 1.0) -> torch.Tensor:
    """Sum over elements of KL(N(mu, softplus(rho)^2) || N(0, prior_sigma^2)); float32 scalar.

    mu, rho: tensors of one shape (any rank). Differentiable in mu and rho.
    """
    _checks.tensor("mu", mu, tuple(range(0, 9)))
    _checks.tensor("rho", rho, tuple(range(0, 9)))
    _checks.same("rho", rho, "mu", mu)
    if rho.shape != mu.shape:
        raise ValueError(f"rho must have mu's shape {tuple(mu.shape)}, got {_checks.describe(rho)}")
    prior_sigma = _checks.positive_finite("prior_sigma", prior_sigma)  # nan / inf rejected
    mu, rho = mu.contiguous(), rho.contiguous()
    op = _GaussianKL.apply if _eager.plain(mu, rho) else _gaussian_kl
    return op(mu, rho, prior_sigma)
