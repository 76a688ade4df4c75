"""Pure-PyTorch reference of every faststeal op.

One implementation per op, serving three roles: the test oracle for the Triton / C++ / CUDA
backends, the baseline in ``benchmarks/bench_ops.py`` and the fallback when no faster backend is
available. Written for clarity (two-pass statistics, autograd for the backward) rather than speed.

Backend contract (every backend module exposes the same functions; arguments are already
validated and contiguous, keys come from :func:`faststeal.ops.rng.rng_key`):

* ``ensemble_linear_fwd(x, weight, bias, activation, dropout_p, key) -> (y, z)``
  ``x``: (S, B, K) or shared (B, K); ``weight``: (S, N, K); ``bias``: (S, N) or None.
  ``y = dropout(act(x @ weight^T + bias))`` of shape (S, B, N); ``z`` is the pre-activation
  (S, B, N) when ``activation == "gelu"`` and an empty tensor otherwise (relu/none backward only
  needs ``y`` and the regenerated mask). Dropout counter = linear index of ``y``.
* ``ensemble_linear_bwd(grad_y, x, weight, bias, y, z, activation, dropout_p, key, need_dx)
  -> (dx or None, dweight, dbias or None)``; ``dx`` has the shape of ``x`` (summed over members
  when ``x`` is shared); it is None, and its GEMM skipped, when ``need_dx`` is False (autograd
  says the input needs no gradient: a network's first layer).
* ``bayes_linear_fwd(x, w_mu, w_rho, b_mu, b_rho, samples, key_w, key_b) -> y`` (S, B, N) with
  ``w_s = w_mu + softplus(w_rho) * eps_s`` (eps counter ``(s*N + n)*K + k`` on ``key_w``) and
  ``b_s = b_mu + softplus(b_rho) * eps'_s`` (counter ``s*N + n`` on ``key_b``).
* ``bayes_linear_bwd(grad_y, x, w_mu, w_rho, b_mu, b_rho, samples, key_w, key_b, need_dx)
  -> (dx or None, dw_mu, dw_rho, db_mu or None, db_rho or None)``.
* ``gaussian_kl_fwd(mu, rho, prior_sigma) -> ()`` in ``acc_dtype`` (float32; float64 for
  float64 inputs): sum of KL(N(mu, softplus(rho)^2) ||
  N(0, prior_sigma^2)); ``gaussian_kl_bwd(grad, mu, rho, prior_sigma) -> (dmu, drho)``.
* ``member_stats_fwd(logits, targets) -> MemberStats`` fields (see below), all float32 except
  ``pred`` (int64); ``correct``/``member_correct`` are empty when ``targets`` is None.
* ``ensemble_cross_entropy_fwd(logits, target) -> (S,)`` ``acc_dtype`` per-member mean loss; target is
  int64 labels (B,) or float soft targets (B, C). ``ensemble_cross_entropy_bwd(grad (S,), logits,
  target) -> dlogits``.
* ``max_pool2d_fwd(x, kernel_size, relu) -> y``: ``torch.nn.functional.max_pool2d`` over
  non-overlapping windows (stride = kernel_size, no padding, floor mode) of (N, C, H, W) ``x``,
  of ``relu(x)`` when ``relu`` (the fused backends compute it from the pooled maximum of ``x``:
  max commutes with relu); ``max_pool2d_bwd(grad_y, x, kernel_size, relu) -> dx``: the gradient
  goes to the element ATen's window scan picks (the first maximum; a NaN wins), with ``relu``
  only where the maximum is not <= 0 (relu's backward). CPU only besides this module (``cpp``).

``softplus(r) = r if r > 20 else log1p(exp(r))`` (torch's threshold), derivative ``sigmoid(r)``.
Argmax ties resolve to the first (lowest) class index everywhere.

Non-finite values (every backend gives exactly what this module gives, tested in
``tests/test_nonfinite.py``): NaN propagates and is never turned into a number (``relu(nan) =
nan`` like ``torch.relu``, a dropped NaN stays NaN as in ``nan * 0``); ``gelu`` of a +-inf
pre-activation is NaN (what ``torch.nn.functional.gelu`` gives for float32) and finite up to the
float32 maximum; in ``member_stats`` a member row holding a NaN or a +inf logit has NaN
probabilities (torch's ``log_softmax``), so every statistic of that batch row is NaN and its
argmax is class 0 (``torch.argmax`` returns the first NaN); a -inf logit, or a finite one whose
gap to the row max overflows, is a class of probability 0 that adds 0 to the entropies
(0 log 0 = 0).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import rng


class MemberStats(NamedTuple):
    """Across-member statistics of (S, B, C) logits; one pass in the fused backends.

    mean_probs (B, C): p̄ = mean_s softmax(logits_s); variance (B,): mean_c Var_s p_s(c) with
    correction 0 (>= 0); entropy_of_mean (B,): H[p̄]; mean_entropy (B,): mean_s H[p_s];
    mutual_info (B,): max(H[p̄] - mean_s H[p_s], 0) (clamps rounding); pred (B,) int64: argmax
    p̄; disagreement (B,): fraction of members whose argmax differs from ``pred``; correct (B,):
    1[pred == target]; member_correct (S,): fraction of rows where member s's argmax equals the
    target.
    """

    mean_probs: torch.Tensor
    variance: torch.Tensor
    entropy_of_mean: torch.Tensor
    mean_entropy: torch.Tensor
    mutual_info: torch.Tensor
    pred: torch.Tensor
    disagreement: torch.Tensor
    correct: torch.Tensor
    member_correct: torch.Tensor


ACTIVATIONS = ("none", "relu", "gelu")


def _activate(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(z)  # keeps NaN
    if activation == "gelu":
        # Exact (erf) GELU. F.gelu overflows to inf above 1.7e38 (float32), where gelu(z) = z
        # (exactly so from z = 10 on); +-inf -> NaN (+ (z - z)), what F.gelu gives for float32
        # (for float64 it depends on the tensor's size), so that every dtype and backend agrees.
        return torch.where(z > 10.0, z, F.gelu(z)) + (z - z)
    return z


def _dropout_scale(shape: tuple, dropout_p: float, key: int, device) -> Optional[torch.Tensor]:
    if dropout_p <= 0.0:
        return None
    n = math.prod(shape)
    keep = rng.dropout_keep(key, torch.arange(n, device=device), dropout_p).view(shape)
    scale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
    return keep.to(torch.float32) * scale


def ensemble_linear(x, weight, bias, activation, dropout_p, key):
    """Differentiable reference composite: bmm + bias + activation + dropout."""
    xs = x.unsqueeze(0).expand(weight.shape[0], -1, -1) if x.dim() == 2 else x
    z = torch.bmm(xs, weight.transpose(1, 2))
    if bias is not None:
        z = z + bias.unsqueeze(1)
    y = _activate(z, activation)
    scale = _dropout_scale(tuple(y.shape), dropout_p, key, y.device)
    if scale is not None:
        y = y * scale.to(y.dtype)
    return y, z


def ensemble_linear_fwd(x, weight, bias, activation, dropout_p, key):
    y, z = ensemble_linear(x, weight, bias, activation, dropout_p, key)
    z = z if activation == "gelu" else z.new_empty(0)
    return y, z


def _activation_grad(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "gelu":
        zf = z.to(acc_dtype(z.dtype))
        cdf = 0.5 * (1.0 + torch.erf(zf * 0.7071067811865476))
        pdf = torch.exp(-0.5 * zf * zf) * 0.3989422804014327
        return (cdf + zf * pdf).to(z.dtype)
    return torch.ones_like(z)


def _linear_grads(dz, x, w, has_bias, need_dx=True):
    """dx (None without need_dx), dW, db of z = x @ w^T + b for stacked (S, B, N) dz."""
    xs = x.unsqueeze(0).expand(w.shape[0], -1, -1) if x.dim() == 2 else x
    dw = torch.bmm(dz.transpose(1, 2), xs)
    dx = torch.bmm(dz, w) if need_dx else None
    if need_dx and x.dim() == 2:
        dx = dx.sum(0)
    db = dz.sum(1) if has_bias else None
    return dx, dw, db


def ensemble_linear_bwd(grad_y, x, weight, bias, y, z, activation, dropout_p, key, need_dx=True):
    # Recomputes the pre-activation; y and z are only used by the fused backends.
    _, z = ensemble_linear(x, weight, bias, activation, 0.0, key)
    dz = grad_y * _activation_grad(z, activation)
    scale = _dropout_scale(tuple(grad_y.shape), dropout_p, key, grad_y.device)
    if scale is not None:
        dz = dz * scale.to(dz.dtype)
    return _linear_grads(dz, x, weight, bias is not None, need_dx)


def softplus(r: torch.Tensor) -> torch.Tensor:
    return F.softplus(r, beta=1.0, threshold=20.0)


def bayes_eps(w_mu, b_mu, samples, key_w, key_b):
    """The standard normal samples eps (S, N, K) and eps' (S, N) (None without bias)."""
    n, k = w_mu.shape
    idx = torch.arange(samples * n * k, device=w_mu.device)
    eps_w = rng.normal(key_w, idx).view(samples, n, k).to(w_mu.dtype)
    eps_b = None
    if b_mu is not None:
        eps_b = rng.normal(key_b, torch.arange(samples * n, device=w_mu.device)).view(samples, n)
        eps_b = eps_b.to(b_mu.dtype)
    return eps_w, eps_b


def bayes_weights(w_mu, w_rho, b_mu, b_rho, samples, key_w, key_b):
    """Materialise the S sampled weights (S, N, K) and biases (S, N) (reference only)."""
    eps_w, eps_b = bayes_eps(w_mu, b_mu, samples, key_w, key_b)
    w = w_mu.unsqueeze(0) + softplus(w_rho).unsqueeze(0) * eps_w
    b = None if b_mu is None else b_mu.unsqueeze(0) + softplus(b_rho).unsqueeze(0) * eps_b
    return w, b


def bayes_linear(x, w_mu, w_rho, b_mu, b_rho, samples, key_w, key_b):
    w, b = bayes_weights(w_mu, w_rho, b_mu, b_rho, samples, key_w, key_b)
    return ensemble_linear(x, w, b, "none", 0.0, 0)[0]


def bayes_linear_fwd(x, w_mu, w_rho, b_mu, b_rho, samples, key_w, key_b):
    return bayes_linear(x, w_mu, w_rho, b_mu, b_rho, samples, key_w, key_b)


def bayes_linear_bwd(grad_y, x, w_mu, w_rho, b_mu, b_rho, samples, key_w, key_b, need_dx=True):
    w, b = bayes_weights(w_mu, w_rho, b_mu, b_rho, samples, key_w, key_b)
    dx, dw, db = _linear_grads(grad_y, x, w, b_mu is not None, need_dx)
    # w = mu + softplus(rho) * eps  =>  dmu = sum_s dW_s, drho = sum_s dW_s * eps_s * sigmoid(rho)
    # (eps regenerated, never recovered as (w - mu) / softplus(rho): that is 0/0 = NaN where
    # softplus underflows, e.g. rho = -110)
    eps_w, eps_b = bayes_eps(w_mu, b_mu, samples, key_w, key_b)
    dmu = dw.sum(0)
    drho = (dw * eps_w).sum(0) * torch.sigmoid(w_rho)
    dbmu = dbrho = None
    if b_mu is not None:
        dbmu = db.sum(0)
        dbrho = (db * eps_b).sum(0) * torch.sigmoid(b_rho)
    return dx, dmu, drho, dbmu, dbrho


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation/output dtype of the reductions: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def gaussian_kl(mu, rho, prior_sigma):
    sigma = softplus(rho.to(acc_dtype(rho.dtype)))
    mu = mu.to(sigma.dtype)
    var_ratio = (sigma / prior_sigma) ** 2
    return 0.5 * (var_ratio + (mu / prior_sigma) ** 2 - 1.0 - torch.log(var_ratio)).sum()


def gaussian_kl_fwd(mu, rho, prior_sigma):
    return gaussian_kl(mu, rho, prior_sigma)


def gaussian_kl_bwd(grad, mu, rho, prior_sigma):
    r = rho.to(acc_dtype(rho.dtype))
    sigma = softplus(r)
    dmu = grad * mu.to(r.dtype) / prior_sigma**2
    drho = grad * (sigma / prior_sigma**2 - 1.0 / sigma) * torch.sigmoid(r)
    return dmu.to(mu.dtype), drho.to(rho.dtype)


def member_stats_fwd(logits: torch.Tensor, targets: Optional[torch.Tensor]) -> MemberStats:
    logp = torch.log_softmax(logits.float(), dim=-1)  # (S, B, C), stable for large logits
    p = logp.exp()
    mean_p = p.mean(0)
    # two-pass population variance across members (a mean of squares: >= 0), then mean over
    # classes
    variance = ((p - mean_p.unsqueeze(0)) ** 2).mean(0).mean(-1)
    entropy_of_mean = -torch.xlogy(mean_p, mean_p).sum(-1)
    # 0 log 0 = 0 for a class of probability 0 (logp = -inf: a -inf logit or an overflowing
    # gap), without hiding a NaN
    mean_entropy = -torch.where(p == 0, 0.0, p * logp).sum(-1).mean(0)
    # MI >= 0 mathematically; the two entropies round differently (-7e-7 for identical
    # members), so it is clamped at 0 (clamp_min keeps NaN)
    mutual_info = (entropy_of_mean - mean_entropy).clamp_min(0.0)
    pred = mean_p.argmax(-1)  # a NaN row (all classes NaN) gives 0, like torch.argmax
    member_pred = p.argmax(-1)  # (S, B)
    disagreement = (member_pred != pred.unsqueeze(0)).float().mean(0)
    if targets is None:
        correct = mean_p.new_empty(0)
        member_correct = mean_p.new_empty(0)
    else:
        t = targets.to(torch.int64)
        correct = (pred == t).float()
        member_correct = (member_pred == t.unsqueeze(0)).float().mean(1)
    return MemberStats(mean_p, variance, entropy_of_mean, mean_entropy, mutual_info, pred,
                       disagreement, correct, member_correct)


def ensemble_cross_entropy(logits, target):
    logp = torch.log_softmax(logits.to(acc_dtype(logits.dtype)), dim=-1)  # (S, B, C)
    if target.dtype.is_floating_point:
        return -(target.to(logp.dtype).unsqueeze(0) * logp).sum(-1).mean(-1)
    return -logp.gather(-1, target.view(1, -1, 1).expand(logp.shape[0], -1, 1)).squeeze(-1).mean(-1)


def ensemble_cross_entropy_fwd(logits, target):
    return ensemble_cross_entropy(logits, target)


def ensemble_cross_entropy_bwd(grad, logits, target):
    p = torch.softmax(logits.to(acc_dtype(logits.dtype)), dim=-1)
    t = target.to(p.dtype) if target.dtype.is_floating_point else F.one_hot(target, p.shape[-1]).to(p.dtype)
    d = p * t.sum(-1, keepdim=True).unsqueeze(0) - t.unsqueeze(0)
    return (d * (grad.to(p.dtype) / logits.shape[1]).view(-1, 1, 1)).to(logits.dtype)


def max_pool2d_fwd(x, kernel_size, relu):
    return F.max_pool2d(torch.relu(x) if relu else x, kernel_size, kernel_size)


def max_pool2d_bwd(grad_y, x, kernel_size, relu):
    y, idx = F.max_pool2d(x, kernel_size, kernel_size, return_indices=True)
    if relu:  # relu's backward on the pooled maximum: nothing where it is <= 0
        grad_y = grad_y.masked_fill(y <= 0, 0)
    return torch.ops.aten.max_pool2d_with_indices_backward(
        grad_y, x, [kernel_size] * 2, [kernel_size] * 2, [0, 0], [1, 1], False, idx)


def unavailable_reason(device_type: str):
    """The reference backend runs everywhere."""
    return None
