"""Mean-field Gaussian (Bayes by Backprop) layers whose S weight samples act as S stacked members.

Posterior per weight: N(mu, sigma^2) with sigma = softplus(rho); prior N(0, prior_sigma^2).
A forward call with ``samples=S`` draws S weight samples and returns an (S, B, ...) stack, so a
Bayesian network plugs into the same (S, B, ...) engine as the deterministic ensembles.
Random numbers come from torch's default generator (one seed drawn per call for the fused op), so
``torch.manual_seed`` makes the samples reproducible.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..checks import positive_int
from .layers import IntPair, _check_rank, _describe, _pair, ensemble_conv2d, next_seed


def _check_prior(prior_sigma) -> float:
    if (isinstance(prior_sigma, bool) or not isinstance(prior_sigma, (int, float))
            or not (math.isfinite(prior_sigma) and prior_sigma > 0)):
        raise ValueError(f"prior_sigma must be a positive finite float, got {prior_sigma!r}")
    return float(prior_sigma)


def _resolve_samples(x: torch.Tensor, stacked_rank: int, samples: Optional[int], layer: str) -> int:
    """Sample count: ``samples`` (default 1) for a shared input, else the input's member axis."""
    if samples is not None:
        positive_int("samples", samples)
    if x.dim() == stacked_rank:
        if samples is not None and samples != x.shape[0]:
            raise ValueError(f"{layer}: samples={samples} but x has {x.shape[0]} samples on its "
                             f"leading axis ({_describe(x)})")
        return x.shape[0]
    return 1 if samples is None else samples


class _BayesMixin:
    prior_sigma: float

    def _posterior_pairs(self):
        yield self.w_mu, self.w_rho  # type: ignore[attr-defined]
        if self.b_mu is not None:  # type: ignore[attr-defined]
            yield self.b_mu, self.b_rho  # type: ignore[attr-defined]

    def kl(self) -> torch.Tensor:
        """KL(q || prior) summed over weights and biases (float32 scalar, differentiable)."""
        return sum(ops.gaussian_kl(mu, rho, self.prior_sigma)
                   for mu, rho in self._posterior_pairs())

    def _init(self, fan_in: int, rho_init: float) -> None:
        # Means like nn.Linear/nn.Conv2d (U(+-1/sqrt(fan_in))); all rho at rho_init
        # (softplus(-5) ~ 6.7e-3: start close to the deterministic network).
        bound = 1.0 / math.sqrt(fan_in)
        with torch.no_grad():
            for mu, rho in self._posterior_pairs():
                mu.uniform_(-bound, bound)
                rho.fill_(rho_init)


class BayesLinear(_BayesMixin, nn.Module):
    """Mean-field Gaussian linear layer: x (B, K) shared or (S, B, K) -> (S, B, N).

    Parameters ``w_mu, w_rho`` (N, K) and ``b_mu, b_rho`` (N,). ``forward(x, samples)`` draws
    ``samples`` weight sets (default 1; for a stacked input the member axis is the sample count).
    Weight-space reparameterisation runs fused in :func:`faststeal.ops.bayes_linear` (the sampled
    weights are never materialised). ``local_reparam=True`` samples the pre-activations instead
    (Kingma et al. 2015): ``mean = x mu^T + b_mu``, ``var = x^2 sigma^2^T + sigma_b^2``, one
    independent noise per output element — lower-variance gradients, in plain PyTorch.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 prior_sigma: float = 1.0, rho_init: float = -5.0, local_reparam: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features = positive_int("in_features", in_features)
        self.out_features = positive_int("out_features", out_features)
        self.prior_sigma = _check_prior(prior_sigma)
        self.rho_init = float(rho_init)
        self.local_reparam = bool(local_reparam)
        kw = {"device": device, "dtype": dtype}
        self.w_mu = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.w_rho = nn.Parameter(torch.empty(out_features, in_features, **kw))
        if bias:
            self.b_mu = nn.Parameter(torch.empty(out_features, **kw))
            self.b_rho = nn.Parameter(torch.empty(out_features, **kw))
        else:
            self.register_parameter("b_mu", None)
            self.register_parameter("b_rho", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._init(self.in_features, self.rho_init)

    def forward(self, x: torch.Tensor, samples: Optional[int] = None) -> torch.Tensor:
        _check_rank(x, (2, 3), "(samples, batch, in_features) or shared (batch, in_features)")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have {self.in_features} features in its last dim, "
                             f"got {_describe(x)}")
        s = _resolve_samples(x, 3, samples, "BayesLinear")
        if not self.local_reparam:
            return ops.bayes_linear(x, self.w_mu, self.w_rho, self.b_mu, self.b_rho,
                                    seed=next_seed(), samples=s)
        mean = F.linear(x, self.w_mu, self.b_mu)
        var = F.linear(x * x, F.softplus(self.w_rho) ** 2,
                       None if self.b_rho is None else F.softplus(self.b_rho) ** 2)
        if x.dim() == 2:
            mean, var = mean.unsqueeze(0), var.unsqueeze(0)
        shape = (s, *mean.shape[1:])
        eps = torch.randn(shape, dtype=mean.dtype, device=mean.device)
        # var >= sigma^2 terms > 0 except when x and the bias are all zero; clamp keeps sqrt's
        # gradient finite there.
        return mean + var.clamp_min(1e-30).sqrt() * eps

    @torch.no_grad()
    def load_member(self, i: int, linear: nn.Linear) -> None:
        """Set the posterior means from a plain ``nn.Linear`` (``i`` must be 0; rho unchanged)."""
        if i != 0:
            raise ValueError(f"a Bayesian layer has one parameter set (member 0), got index {i!r}")
        if tuple(linear.weight.shape) != tuple(self.w_mu.shape):
            raise ValueError(f"linear.weight must be {tuple(self.w_mu.shape)}, "
                             f"got {tuple(linear.weight.shape)}")
        self.w_mu.copy_(linear.weight)
        if self.b_mu is not None:
            self.b_mu.copy_(linear.bias)

    @torch.no_grad()
    def member(self, i: int = 0) -> nn.Linear:
        """The posterior-mean network's layer as a plain ``nn.Linear``."""
        if i != 0:
            raise ValueError(f"a Bayesian layer has one parameter set (member 0), got index {i!r}")
        lin = nn.Linear(self.in_features, self.out_features, bias=self.b_mu is not None,
                        device=self.w_mu.device, dtype=self.w_mu.dtype)
        lin.weight.copy_(self.w_mu)
        if self.b_mu is not None:
            lin.bias.copy_(self.b_mu)
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.b_mu is not None}, prior_sigma={self.prior_sigma}, "
                f"local_reparam={self.local_reparam}")


class BayesConv2d(_BayesMixin, nn.Module):
    """Mean-field Gaussian conv layer: x (B, C, H, W) shared or (S, B, C, H, W)
    -> (S, B, C', H', W').

    The S weight samples are materialised as (S, C', C, kh, kw) (conv weights are small) and run
    as one grouped convolution; noise from torch's default generator.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair,
                 stride: IntPair = 1, padding: IntPair = 0, bias: bool = True,
                 prior_sigma: float = 1.0, rho_init: float = -5.0, device=None, dtype=None,
                 dilation: IntPair = 1, groups: int = 1) -> None:
        super().__init__()
        self.in_channels = positive_int("in_channels", in_channels)
        self.out_channels = positive_int("out_channels", out_channels)
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        self.groups = positive_int("groups", groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        self.prior_sigma = _check_prior(prior_sigma)
        self.rho_init = float(rho_init)
        kw = {"device": device, "dtype": dtype}
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.w_mu = nn.Parameter(torch.empty(shape, **kw))
        self.w_rho = nn.Parameter(torch.empty(shape, **kw))
        if bias:
            self.b_mu = nn.Parameter(torch.empty(out_channels, **kw))
            self.b_rho = nn.Parameter(torch.empty(out_channels, **kw))
        else:
            self.register_parameter("b_mu", None)
            self.register_parameter("b_rho", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._init(self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1],
                   self.rho_init)

    def forward(self, x: torch.Tensor, samples: Optional[int] = None) -> torch.Tensor:
        _check_rank(x, (4, 5), "(samples, batch, C, H, W) or shared (batch, C, H, W)")
        if x.shape[-3] != self.in_channels:
            raise ValueError(f"x must have {self.in_channels} channels (dim -3), "
                             f"got {_describe(x)}")
        s = _resolve_samples(x, 5, samples, "BayesConv2d")
        w = self.w_mu + F.softplus(self.w_rho) * torch.randn(
            (s, *self.w_mu.shape), dtype=self.w_mu.dtype, device=self.w_mu.device)
        b = None
        if self.b_mu is not None:
            b = self.b_mu + F.softplus(self.b_rho) * torch.randn(
                (s, self.out_channels), dtype=self.b_mu.dtype, device=self.b_mu.device)
        return ensemble_conv2d(x, w, b, self.stride, self.padding, "grouped", self.dilation,
                               self.groups)

    @torch.no_grad()
    def load_member(self, i: int, conv: nn.Conv2d) -> None:
        """Set the posterior means from a plain ``nn.Conv2d`` (``i`` must be 0; rho unchanged)."""
        if i != 0:
            raise ValueError(f"a Bayesian layer has one parameter set (member 0), got index {i!r}")
        if tuple(conv.weight.shape) != tuple(self.w_mu.shape):
            raise ValueError(f"conv.weight must be {tuple(self.w_mu.shape)}, "
                             f"got {tuple(conv.weight.shape)}")
        self.w_mu.copy_(conv.weight)
        if self.b_mu is not None:
            self.b_mu.copy_(conv.bias)

    @torch.no_grad()
    def member(self, i: int = 0) -> nn.Conv2d:
        """The posterior-mean network's layer as a plain ``nn.Conv2d``."""
        if i != 0:
            raise ValueError(f"a Bayesian layer has one parameter set (member 0), got index {i!r}")
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, self.groups, bias=self.b_mu is not None,
                         device=self.w_mu.device, dtype=self.w_mu.dtype)
        conv.weight.copy_(self.w_mu)
        if self.b_mu is not None:
            conv.bias.copy_(self.b_mu)
        return conv

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.b_mu is not None}, "
                f"prior_sigma={self.prior_sigma}")
