"""Triton ``bayes_linear``: S weight samples of a mean-field Gaussian layer, drawn in the K loop.

``w_s = mu + softplus(rho) * eps_s`` is formed tile by tile from ``(mu, rho)`` and the hash
(eps counter ``(s*N + n)*K + k`` on ``key_w``), right before ``tl.dot``: no (S, N, K) tensor ever
exists. The backward regenerates the same eps from the key: dx uses the sampled weights again,
and one program per (N tile, K tile) loops over samples and the batch to form
``dmu = sum_s dW_s`` and ``drho = sigmoid(rho) * sum_s dW_s * eps_s`` (and db on the first K tile).
Every output is written once, so results are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import softplus, tile_offsets
from ._rng import standard_normal
from .ensemble_linear import _blocks, _precision


@triton.jit
def _sampled_w(mu_ptr, rho_ptr, key, s, offs_n, offs_k, N, K, ACC: tl.constexpr):
    """w_s[n, k] for broadcastable 2-D offs_n / offs_k; zero outside (N, K); also returns eps."""
    mask = (offs_n < N) & (offs_k < K)
    idx = offs_n * K + offs_k
    mu = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(ACC)
    rho = tl.load(rho_ptr + idx, mask=mask, other=0.0).to(ACC)
    eps = standard_normal(((s * N + offs_n) * K + offs_k).to(tl.uint32), key).to(ACC)
    w = tl.where(mask, mu + softplus(rho) * eps, 0.0)
    return w, eps


@triton.jit(do_not_specialize=["key_w", "key_b"])
def _bayes_linear_fwd_kernel(
    x_ptr, mu_ptr, rho_ptr, bmu_ptr, brho_ptr, y_ptr,
    B, N, K, stride_xs,
    key_w, key_b,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    s = tl.program_id(1).to(tl.int64)
    offs_m, offs_n = tile_offsets(pid, N, BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < B
    n_mask = offs_n < N
    kw = key_w.to(tl.uint32, bitcast=True)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        cur_k = k0 + offs_k
        a = tl.load(x_ptr + s * stride_xs + offs_m[:, None] * K + cur_k[None, :],
                    mask=m_mask[:, None] & (cur_k[None, :] < K), other=0.0)
        w, eps = _sampled_w(mu_ptr, rho_ptr, kw, s, offs_n[None, :], cur_k[:, None], N, K, ACC)
        acc += tl.dot(a, w.to(a.dtype), input_precision=PRECISION)  # w as (BLOCK_K, BLOCK_N)
    if HAS_BIAS:
        bmu = tl.load(bmu_ptr + offs_n, mask=n_mask, other=0.0).to(ACC)
        brho = tl.load(brho_ptr + offs_n, mask=n_mask, other=0.0).to(ACC)
        eps_b = standard_normal((s * N + offs_n).to(tl.uint32),
                                key_b.to(tl.uint32, bitcast=True)).to(ACC)
        acc += (bmu + softplus(brho) * eps_b)[None, :]
    out = y_ptr + (s * B + offs_m[:, None]) * N + offs_n[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=["key_w"])
def _bayes_linear_bwd_dx_kernel(
    dy_ptr, mu_ptr, rho_ptr, dx_ptr,
    S_LOOP, B, N, K, key_w,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # dx[s] = dy[s] @ w_s; a shared x (S_LOOP = S, one program column) sums over samples.
    pid = tl.program_id(0)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_m, offs_k = tile_offsets(pid, K, BLOCK_M, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = offs_m < B
    kw = key_w.to(tl.uint32, bitcast=True)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
    for i in range(0, S_LOOP):
        s = pid_s + i
        for n0 in range(0, N, BLOCK_N):
            cur_n = n0 + offs_n
            dy = tl.load(dy_ptr + (s * B + offs_m[:, None]) * N + cur_n[None, :],
                         mask=m_mask[:, None] & (cur_n[None, :] < N), other=0.0)
            w, eps = _sampled_w(mu_ptr, rho_ptr, kw, s, cur_n[:, None], offs_k[None, :], N, K,
                                ACC)
            acc += tl.dot(dy, w.to(dy.dtype), input_precision=PRECISION)
    out = dx_ptr + (pid_s * B + offs_m[:, None]) * K + offs_k[None, :]
    tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None] & (offs_k[None, :] < K))


@triton.jit(do_not_specialize=["key_w", "key_b"])
def _bayes_linear_bwd_dw_kernel(
    dy_ptr, x_ptr, mu_ptr, rho_ptr, bmu_ptr, brho_ptr,
    dmu_ptr, drho_ptr, dbmu_ptr, dbrho_ptr,
    S, B, N, K, stride_xs, key_w, key_b,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n, offs_k = tile_offsets(pid, K, BLOCK_N, BLOCK_K)
    pid_k = pid % tl.cdiv(K, BLOCK_K)  # the first K tile also reduces the bias
    offs_b = tl.arange(0, BLOCK_B)
    n_mask = offs_n < N
    k_mask = offs_k < K
    kw = key_w.to(tl.uint32, bitcast=True)
    kb = key_b.to(tl.uint32, bitcast=True)
    dmu = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    deps = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)  # sum_s dW_s * eps_s
    dbmu = tl.zeros((BLOCK_N,), dtype=ACC)
    dbeps = tl.zeros((BLOCK_N,), dtype=ACC)
    zero64 = tl.program_id(0).to(tl.int64) * 0  # int64 member index, also under the interpreter
    for s in range(0, S):
        s64 = zero64 + s
        dws = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
        # the batch sum for db stays 2-D in the loop and is reduced once after it (a row sum
        # carried through the loop trips an assertion in Triton's thread-locality pass)
        dbs2 = tl.zeros((BLOCK_N, BLOCK_B), dtype=ACC)
        for b0 in range(0, B, BLOCK_B):
            cur_b = b0 + offs_b
            dyt = tl.load(dy_ptr + (s64 * B + cur_b[None, :]) * N + offs_n[:, None],
                          mask=n_mask[:, None] & (cur_b[None, :] < B), other=0.0)  # (N, B)
            xt = tl.load(x_ptr + s64 * stride_xs + cur_b[:, None] * K + offs_k[None, :],
                         mask=(cur_b[:, None] < B) & k_mask[None, :], other=0.0)
            dws += tl.dot(dyt, xt, input_precision=PRECISION)
            if HAS_BIAS:
                dbs2 += dyt.to(ACC)
        eps = standard_normal(((s64 * N + offs_n[:, None]) * K + offs_k[None, :]).to(tl.uint32),
                              kw).to(ACC)
        dmu += dws
        deps += dws * eps
        if HAS_BIAS:
            dbs = tl.sum(dbs2, axis=1)
            eps_b = standard_normal((s64 * N + offs_n).to(tl.uint32), kb).to(ACC)
            dbmu += dbs
            dbeps += dbs * eps_b
    w_mask = n_mask[:, None] & k_mask[None, :]
    idx = offs_n[:, None] * K + offs_k[None, :]
    rho = tl.load(rho_ptr + idx, mask=w_mask, other=0.0).to(ACC)
    tl.store(dmu_ptr + idx, dmu.to(dmu_ptr.dtype.element_ty), mask=w_mask)
    tl.store(drho_ptr + idx, (deps * tl.sigmoid(rho)).to(drho_ptr.dtype.element_ty), mask=w_mask)
    if HAS_BIAS:
        b_mask = n_mask & (pid_k == 0)
        brho = tl.load(brho_ptr + offs_n, mask=b_mask, other=0.0).to(ACC)
        tl.store(dbmu_ptr + offs_n, dbmu.to(dbmu_ptr.dtype.element_ty), mask=b_mask)
        tl.store(dbrho_ptr + offs_n, (dbeps * tl.sigmoid(brho)).to(dbrho_ptr.dtype.element_ty),
                 mask=b_mask)


def _check(op, x, w_mu, w_rho, b_mu, b_rho, samples):
    C.check_device(op, ("x", x), ("w_mu", w_mu), ("w_rho", w_rho), ("b_mu", b_mu),
                   ("b_rho", b_rho))
    for name, t in (("x", x), ("w_mu", w_mu), ("w_rho", w_rho), ("b_mu", b_mu), ("b_rho", b_rho)):
        if t is not None:
            C.check_dtype(op, name, t)
    if (b_mu is None) != (b_rho is None):
        raise ValueError(f"triton {op}: b_mu and b_rho must both be given or both be None")
    if int(samples) < 1:
        raise ValueError(f"triton {op}: samples must be >= 1, got {samples}")


def bayes_linear_fwd(x: torch.Tensor, w_mu: torch.Tensor, w_rho: torch.Tensor, b_mu, b_rho,
                     samples: int, key_w: int, key_b: int) -> torch.Tensor:
    """x: (B, K) shared or (S, B, K); w_mu, w_rho: (N, K); b_mu, b_rho: (N,) or None.
    Returns y (S, B, N) in x's dtype with S = samples."""
    _check("bayes_linear_fwd", x, w_mu, w_rho, b_mu, b_rho, samples)
    n, k = w_mu.shape
    b = x.shape[-2]
    s = int(samples)
    x, w_mu, w_rho = x.contiguous(), w_mu.contiguous(), w_rho.contiguous()
    has_b = b_mu is not None
    if has_b:
        b_mu, b_rho = b_mu.contiguous(), b_rho.contiguous()
    y = C.empty((s, b, n), x.dtype, x.device)
    if y.numel() == 0:
        return y
    bm, bn, bk, warps, stages = _blocks(b, n, k, x.dtype)
    grid = (triton.cdiv(b, bm) * triton.cdiv(n, bn), s)
    with C.device_ctx(x):
        _bayes_linear_fwd_kernel[grid](
            x, w_mu, w_rho, b_mu if has_b else w_mu, b_rho if has_b else w_rho, y,
            b, n, k, 0 if x.dim() == 2 else x.stride(0),
            C.key_arg(key_w), C.key_arg(key_b),
            HAS_BIAS=has_b, ACC=C.acc_tl(x.dtype), PRECISION=_precision(x.dtype),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return y


def bayes_linear_bwd(grad_y: torch.Tensor, x: torch.Tensor, w_mu: torch.Tensor,
                     w_rho: torch.Tensor, b_mu, b_rho, samples: int, key_w: int, key_b: int,
                     need_dx: bool = True):
    """Returns (dx or None without need_dx, dw_mu, dw_rho, db_mu or None, db_rho or None); eps
    regenerated from keys."""
    _check("bayes_linear_bwd", x, w_mu, w_rho, b_mu, b_rho, samples)
    n, k = w_mu.shape
    b = x.shape[-2]
    s = int(samples)
    if tuple(grad_y.shape) != (s, b, n):
        raise ValueError(f"triton bayes_linear_bwd: grad_y must be {(s, b, n)}, got "
                         f"shape {tuple(grad_y.shape)}")
    grad_y, x = grad_y.contiguous().to(x.dtype), x.contiguous()
    w_mu, w_rho = w_mu.contiguous(), w_rho.contiguous()
    has_b = b_mu is not None
    if has_b:
        b_mu, b_rho = b_mu.contiguous(), b_rho.contiguous()
    shared = x.dim() == 2
    acc, prec = C.acc_tl(x.dtype), _precision(x.dtype)
    key_w_i, key_b_i = C.key_arg(key_w), C.key_arg(key_b)
    dx = C.empty(tuple(x.shape), x.dtype, x.device) if need_dx else None
    dmu = C.empty((n, k), w_mu.dtype, w_mu.device)
    drho = C.empty((n, k), w_rho.dtype, w_rho.device)
    dbmu = C.empty((n,), b_mu.dtype, b_mu.device) if has_b else None
    dbrho = C.empty((n,), b_rho.dtype, b_rho.device) if has_b else None
    with C.device_ctx(x):
        if dx is not None and dx.numel():
            bm, bk, bn, warps, stages = _blocks(b, k, n, x.dtype)
            grid = (triton.cdiv(b, bm) * triton.cdiv(k, bk), 1 if shared else s)
            _bayes_linear_bwd_dx_kernel[grid](
                grad_y, w_mu, w_rho, dx, s if shared else 1, b, n, k, key_w_i,
                ACC=acc, PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                num_warps=warps, num_stages=stages)
        if n:
            bn, bk, bb, warps, stages = _blocks(n, k, b, x.dtype)
            grid = (triton.cdiv(n, bn) * max(1, triton.cdiv(k, bk)),)
            _bayes_linear_bwd_dw_kernel[grid](
                grad_y, x, w_mu, w_rho, b_mu if has_b else w_mu, b_rho if has_b else w_rho,
                dmu, drho, dbmu if has_b else dmu, dbrho if has_b else drho,
                s, b, n, k, 0 if shared else x.stride(0), key_w_i, key_b_i,
                HAS_BIAS=has_b, ACC=acc, PRECISION=prec, BLOCK_N=bn, BLOCK_K=bk, BLOCK_B=bb,
                num_warps=warps, num_stages=stages)
    return dx, dmu, drho, dbmu, dbrho
