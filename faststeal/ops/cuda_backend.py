"""The ``cuda`` backend: the CUDA C++ kernels of ``faststeal._C`` (``csrc/cuda``).

Implements the backend contract of :mod:`faststeal.ops.reference` for CUDA tensors in float32,
float16, bfloat16 (float32 accumulation) and float64. GEMMs go to cuBLAS; bias, activation,
dropout, the Bayesian weight sampling and the reductions are fused kernels. Differences from the
reference: out-of-range hard labels in ``ensemble_cross_entropy`` give NaN instead of raising
(no host sync), and Gaussian samples agree with the reference to float32 rounding.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _ext
from .reference import MemberStats


def unavailable_reason(device_type: str) -> Optional[str]:
    """None when the CUDA kernels can run on ``device_type``, else why not."""
    reason = _ext.unavailable_reason()
    if reason:
        return reason
    if device_type != "cuda":
        return f"the cuda backend runs on CUDA tensors only, not {device_type}"
    if not _ext.has_cuda_kernels():
        return ("faststeal._C was built without CUDA kernels (no CUDA toolkit at build time, or "
                "FASTSTEAL_NO_CUDA=1); rebuild with a toolkit present: "
                + _ext.BUILD_HINT)
    if not torch.cuda.is_available():
        return "no CUDA device is available (torch.cuda.is_available() is False)"
    return None


def ensemble_linear_fwd(x, weight, bias, activation, dropout_p, key):
    return _ext.C.ensemble_linear_fwd_cuda(x, weight, bias, activation, float(dropout_p),
                                           int(key))


def ensemble_linear_bwd(grad_y, x, weight, bias, y, z, activation, dropout_p, key,
                        need_dx=True):
    dx, dw, db = _ext.C.ensemble_linear_bwd_cuda(grad_y, x, weight, bias, y, z, activation,
                                                 float(dropout_p), int(key), bool(need_dx))
    return (dx if need_dx else None), dw, (db if bias is not None else None)


def bayes_linear_fwd(x, w_mu, w_rho, b_mu, b_rho, samples, key_w, key_b):
    return _ext.C.bayes_linear_fwd_cuda(x, w_mu, w_rho, b_mu, b_rho, int(samples), int(key_w),
                                        int(key_b))


def bayes_linear_bwd(grad_y, x, w_mu, w_rho, b_mu, b_rho, samples, key_w, key_b, need_dx=True):
    dx, dmu, drho, dbmu, dbrho = _ext.C.bayes_linear_bwd_cuda(
        grad_y, x, w_mu, w_rho, b_mu, b_rho, int(samples), int(key_w), int(key_b),
        bool(need_dx))
    if not need_dx:
        dx = None
    if b_mu is None:
        dbmu = dbrho = None
    return dx, dmu, drho, dbmu, dbrho


def gaussian_kl_fwd(mu, rho, prior_sigma):
    return _ext.C.gaussian_kl_fwd_cuda(mu, rho, float(prior_sigma))


def gaussian_kl_bwd(grad, mu, rho, prior_sigma):
    return tuple(_ext.C.gaussian_kl_bwd_cuda(grad, mu, rho, float(prior_sigma)))


def member_stats_fwd(logits, targets):
    return MemberStats(*_ext.C.member_stats_fwd_cuda(logits, targets))


def ensemble_cross_entropy_fwd(logits, target):
    return _ext.C.ensemble_cross_entropy_fwd_cuda(logits, target)


def ensemble_cross_entropy_bwd(grad, logits, target):
    return _ext.C.ensemble_cross_entropy_bwd_cuda(grad, logits, target)
