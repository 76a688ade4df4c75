"""Triton ``gaussian_kl``: sum of KL(N(mu, softplus(rho)^2) || N(0, prior_sigma^2)).

A deterministic two-stage reduction: a bounded number of programs each stride over the elements
and write one partial sum, then a single program adds the partials (no atomics, so the result is
bit-identical run to run). The backward is one elementwise kernel. Accumulation is float32
(float64 for float64 inputs), matching the contract's ``acc_dtype``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import softplus

_MAX_PARTIALS = 1024


@triton.jit
def _gaussian_kl_partial_kernel(mu_ptr, rho_ptr, ps_ptr, part_ptr, n,
                                ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    ps = tl.load(ps_ptr).to(ACC)
    inv_ps = 1.0 / ps
    acc = tl.zeros((BLOCK,), dtype=ACC)
    for start in range(pid * BLOCK, n, nprog * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(ACC)
        rho = tl.load(rho_ptr + offs, mask=mask, other=0.0).to(ACC)
        ratio = softplus(rho) * inv_ps
        var_ratio = ratio * ratio
        m = mu * inv_ps
        kl = 0.5 * (var_ratio + m * m - 1.0 - tl.log(var_ratio))
        acc += tl.where(mask, kl, 0.0)
    tl.store(part_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _sum_kernel(part_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    v = tl.load(part_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(v, axis=0))


@triton.jit
def _gaussian_kl_bwd_kernel(grad_ptr, mu_ptr, rho_ptr, ps_ptr, dmu_ptr, drho_ptr, n,
                            ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(grad_ptr).to(ACC)
    ps = tl.load(ps_ptr).to(ACC)
    inv_var = 1.0 / (ps * ps)
    mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(ACC)
    rho = tl.load(rho_ptr + offs, mask=mask, other=0.0).to(ACC)
    sigma = softplus(rho)
    tl.store(dmu_ptr + offs, (g * mu * inv_var).to(dmu_ptr.dtype.element_ty), mask=mask)
    drho = g * (sigma * inv_var - 1.0 / sigma) * tl.sigmoid(rho)
    tl.store(drho_ptr + offs, drho.to(drho_ptr.dtype.element_ty), mask=mask)


def _block(n: int) -> tuple[int, int]:
    if C.INTERPRET:
        return C.clamp_block(n, 16, 1 << 16), 4
    return 1024, 4


def _check(op, mu, rho):
    C.check_device(op, ("mu", mu), ("rho", rho))
    C.check_dtype(op, "mu", mu)
    C.check_dtype(op, "rho", rho)
    if mu.shape != rho.shape:
        raise ValueError(f"triton {op}: rho must have mu's shape {tuple(mu.shape)}, got "
                         f"{tuple(rho.shape)}")


def gaussian_kl_fwd(mu: torch.Tensor, rho: torch.Tensor, prior_sigma: float) -> torch.Tensor:
    """mu, rho: any shape (same). Returns the 0-d KL sum in float32 (float64 for float64 rho)."""
    _check("gaussian_kl_fwd", mu, rho)
    acc_dtype = torch.float64 if rho.dtype == torch.float64 else torch.float32
    mu, rho = mu.contiguous().view(-1), rho.contiguous().view(-1)
    n = mu.numel()
    out = C.empty((), acc_dtype, mu.device)
    if n == 0:
        return out.zero_()
    block, warps = _block(n)
    nprog = min(triton.cdiv(n, block), _MAX_PARTIALS)
    parts = C.empty((nprog,), acc_dtype, mu.device)
    ps = torch.full((1,), float(prior_sigma), dtype=acc_dtype, device=mu.device)
    with C.device_ctx(mu):
        _gaussian_kl_partial_kernel[(nprog,)](mu, rho, ps, parts, n, ACC=C.acc_tl(rho.dtype),
                                              BLOCK=block, num_warps=warps)
        _sum_kernel[(1,)](parts, out, nprog, BLOCK=C.np2(nprog), num_warps=4)
    return out


def gaussian_kl_bwd(grad: torch.Tensor, mu: torch.Tensor, rho: torch.Tensor,
                    prior_sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """grad: 0-d. Returns (dmu, drho) in mu's and rho's dtypes."""
    _check("gaussian_kl_bwd", mu, rho)
    acc_dtype = torch.float64 if rho.dtype == torch.float64 else torch.float32
    shape = mu.shape
    mu, rho = mu.contiguous().view(-1), rho.contiguous().view(-1)
    n = mu.numel()
    dmu = C.empty((n,), mu.dtype, mu.device)
    drho = C.empty((n,), rho.dtype, rho.device)
    if n:
        g = grad.reshape(1).to(device=mu.device, dtype=acc_dtype).contiguous()
        ps = torch.full((1,), float(prior_sigma), dtype=acc_dtype, device=mu.device)
        block, warps = _block(n)
        with C.device_ctx(mu):
            _gaussian_kl_bwd_kernel[(triton.cdiv(n, block),)](
                g, mu, rho, ps, dmu, drho, n, ACC=C.acc_tl(rho.dtype), BLOCK=block,
                num_warps=warps)
    return dmu.view(shape), drho.view(shape)
