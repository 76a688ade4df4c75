"""Triton ``ensemble_linear``: S stacked ``x @ W^T + b`` with fused activation and dropout.

Forward: one program per (M tile, N tile, member) runs the K loop with ``tl.dot`` (fp32
accumulation; fp32 inputs use ``input_precision="ieee"``, i.e. no TF32, so results match the fp32
reference), then adds the bias, applies the activation and the dropout mask regenerated from the
counter-based hash (counter = linear index of y). Backward never stores ``dz``: both matmul kernels
(dx = dz @ W and dW = dz^T @ x) recompute ``dz = dy * act'(.) * mask * scale`` tile by tile from
``grad_y`` and ``y`` (relu: kept and z > 0 <=> y > 0) or ``z`` (gelu), and the dW kernel's first
K tile also reduces db. A shared x (B, K) gets dx summed over members inside one program, so no
atomics: every output is written exactly once and results are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import rng
from . import _common as C
from ._common import tile_offsets
from ._rng import dropout_keep

_ACT = {"none": 0, "relu": 1, "gelu": 2}
_SQRT1_2 = tl.constexpr(0.7071067811865476)  # jit functions may only read constexpr globals
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _gelu(z):
    # gelu(+-inf) = NaN, as in the reference
    y = 0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))
    return tl.where(tl.abs(z) == float("inf"), float("nan"), y)


@triton.jit
def _gelu_grad(z):
    cdf = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2))
    return cdf + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI


@triton.jit(do_not_specialize=["key", "threshold"])
def _ensemble_linear_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, z_ptr,
    B, N, K,
    stride_xs, stride_xb, stride_xk,
    stride_ws, stride_wn, stride_wk,
    key, threshold, scale,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    STORE_Z: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    s = tl.program_id(1).to(tl.int64)
    offs_m, offs_n = tile_offsets(pid, N, BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < B
    n_mask = offs_n < N
    x_ptrs = x_ptr + s * stride_xs + offs_m[:, None] * stride_xb + offs_k[None, :] * stride_xk
    # W tile loaded as (BLOCK_K, BLOCK_N): x @ W^T without a transpose
    w_ptrs = w_ptr + s * stride_ws + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(a, w, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        bias = tl.load(b_ptr + s * N + offs_n, mask=n_mask, other=0.0)
        acc += bias[None, :].to(ACC)
    out_mask = m_mask[:, None] & n_mask[None, :]
    idx = (s * B + offs_m[:, None]) * N + offs_n[None, :]  # int64 linear index of y
    if STORE_Z:
        tl.store(z_ptr + idx, acc.to(z_ptr.dtype.element_ty), mask=out_mask)
    # NaN is kept like the reference: relu as a tl.where (tl.maximum(nan, 0) is 0), and dropout
    # multiplies by 0 (a dropped NaN stays NaN, as nan * 0 does)
    if ACTIVATION == 1:
        acc = tl.where(acc < 0.0, 0.0, acc)
    elif ACTIVATION == 2:
        acc = _gelu(acc)
    if HAS_DROPOUT:
        keep = dropout_keep(idx.to(tl.uint32), key.to(tl.uint32, bitcast=True),
                            threshold.to(tl.uint32))
        acc = acc * tl.where(keep, scale, 0.0)
    tl.store(y_ptr + idx, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _dz_tile(dy_ptr, y_ptr, z_ptr, s, offs_b, offs_n, B, N, key, threshold, scale,
             ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr, ACC: tl.constexpr):
    """dz = dy * act'(z) * keep * scale for a tile; offs_b / offs_n come already shaped (any
    broadcastable 2-D orientation), so callers get the tile as (b, n) or (n, b); in ACC."""
    mask = (offs_b < B) & (offs_n < N)
    idx = (s * B + offs_b) * N + offs_n
    dy = tl.load(dy_ptr + idx, mask=mask, other=0.0).to(ACC)
    if ACTIVATION == 1:
        # y = relu(z) * keep * scale with scale > 0, so y > 0 <=> (kept and z > 0)
        y = tl.load(y_ptr + idx, mask=mask, other=0.0)
        dz = dy * tl.where(y > 0, scale, 0.0)  # a NaN dy stays NaN, as in the reference
    else:
        if ACTIVATION == 2:
            z = tl.load(z_ptr + idx, mask=mask, other=0.0).to(ACC)
            dz = dy * _gelu_grad(z)
        else:
            dz = dy
        if HAS_DROPOUT:
            keep = dropout_keep(idx.to(tl.uint32), key.to(tl.uint32, bitcast=True),
                                threshold.to(tl.uint32))
            dz = dz * tl.where(keep, scale, 0.0)
    return dz


@triton.jit(do_not_specialize=["key", "threshold"])
def _ensemble_linear_bwd_dx_kernel(
    dy_ptr, y_ptr, z_ptr, w_ptr, dx_ptr,
    S_LOOP, B, N, K,
    stride_ws, stride_wn, stride_wk,
    key, threshold, scale,
    ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr, ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # dx[s] = dz[s] @ W[s]; for a shared x (S_LOOP = S, one program column) dx = sum_s dz[s] @ W[s].
    pid = tl.program_id(0)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_m, offs_k = tile_offsets(pid, K, BLOCK_M, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    k_mask = offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
    for i in range(0, S_LOOP):
        s = pid_s + i
        for n0 in range(0, N, BLOCK_N):
            cur_n = n0 + offs_n
            dz = _dz_tile(dy_ptr, y_ptr, z_ptr, s, offs_m[:, None], cur_n[None, :], B, N, key,
                          threshold, scale, ACTIVATION, HAS_DROPOUT, ACC)
            w = tl.load(w_ptr + s * stride_ws + cur_n[:, None] * stride_wn
                        + offs_k[None, :] * stride_wk,
                        mask=(cur_n[:, None] < N) & k_mask[None, :], other=0.0)
            acc += tl.dot(dz.to(w.dtype), w, input_precision=PRECISION)
    out = dx_ptr + (pid_s * B + offs_m[:, None]) * K + offs_k[None, :]
    tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=(offs_m[:, None] < B) & k_mask[None, :])


@triton.jit(do_not_specialize=["key", "threshold"])
def _ensemble_linear_bwd_dw_kernel(
    dy_ptr, y_ptr, z_ptr, x_ptr, dw_ptr, db_ptr,
    B, N, K,
    stride_xs, stride_xb, stride_xk,
    key, threshold, scale,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
):
    # dW[s] = dz[s]^T @ x[s] (reduction over the batch); db[s] = sum_b dz[s] on the first K tile.
    pid = tl.program_id(0)
    s = tl.program_id(1).to(tl.int64)
    offs_n, offs_k = tile_offsets(pid, K, BLOCK_N, BLOCK_K)
    pid_k = pid % tl.cdiv(K, BLOCK_K)  # the first K tile also reduces the bias
    offs_b = tl.arange(0, BLOCK_B)
    n_mask = offs_n < N
    k_mask = offs_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    db = tl.zeros((BLOCK_N,), dtype=ACC)
    for b0 in range(0, B, BLOCK_B):
        cur_b = b0 + offs_b
        dzt = _dz_tile(dy_ptr, y_ptr, z_ptr, s, cur_b[None, :], offs_n[:, None], B, N, key,
                       threshold, scale, ACTIVATION, HAS_DROPOUT, ACC)  # (BLOCK_N, BLOCK_B)
        xt = tl.load(x_ptr + s * stride_xs + cur_b[:, None] * stride_xb
                     + offs_k[None, :] * stride_xk,
                     mask=(cur_b[:, None] < B) & k_mask[None, :], other=0.0)
        acc += tl.dot(dzt.to(xt.dtype), xt, input_precision=PRECISION)
        if HAS_BIAS:
            db += tl.sum(dzt, axis=1).to(ACC)
    out = dw_ptr + (s * N + offs_n[:, None]) * K + offs_k[None, :]
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])
    if HAS_BIAS:
        tl.store(db_ptr + s * N + offs_n, db.to(db_ptr.dtype.element_ty),
                 mask=n_mask & (pid_k == 0))


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact IEEE products (no TF32) so fp32 results match the fp32 reference.
    return "ieee"


def _blocks(m: int, n: int, k: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for an (m, n) output reducing over k."""
    if C.INTERPRET:  # few, large programs: the interpreter pays per program and per block step
        # (64 rather than larger keeps multi-tile grids and K loops covered by the CPU tests)
        return C.clamp_block(m, 16, 64), C.clamp_block(n, 16, 64), C.clamp_block(k, 16, 64), 4, 1
    if dtype == torch.float64:
        return C.clamp_block(m, 16, 64), C.clamp_block(n, 16, 64), 16, 4, 2
    bk = 32 if dtype == torch.float32 else 64
    bm, bn = C.clamp_block(m, 16, 128), C.clamp_block(n, 16, 128)
    if bm * bn > 64 * 128:  # keep the fp32 accumulator within 128 registers per thread
        bn = 64
    return bm, bn, C.clamp_block(k, 16, bk), (8 if bm * bn >= 128 * 64 else 4), 3


def _dropout_args(dropout_p: float, key: int) -> tuple[bool, int, int, float]:
    if dropout_p <= 0.0:
        return False, 0, 0, 1.0
    scale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
    # the reference scales by a float32 1/(1-p), also for float64 data
    return True, C.key_arg(key), rng.dropout_threshold(dropout_p), C.f32(scale)


def _check(op, x, weight, bias, activation):
    C.check_device(op, ("x", x), ("weight", weight), ("bias", bias))
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None:
            C.check_dtype(op, name, t)
    if activation not in _ACT:
        raise ValueError(f"triton {op}: activation must be one of {tuple(_ACT)}, "
                         f"got {activation!r}")


def ensemble_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias, activation: str,
                        dropout_p: float, key: int):
    """x: (S, B, K) or shared (B, K); weight: (S, N, K); bias: (S, N) or None.
    Returns (y, z): y (S, B, N) in x's dtype; z the pre-activation for gelu, else empty."""
    _check("ensemble_linear_fwd", x, weight, bias, activation)
    s, n, k = weight.shape
    b = x.shape[-2]
    x, weight = x.contiguous(), weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    gelu = activation == "gelu"
    y = C.empty((s, b, n), x.dtype, x.device)
    z = C.empty((s, b, n), x.dtype, x.device) if gelu else x.new_empty(0)
    if y.numel() == 0:
        if gelu:
            z.zero_()
        return y, z
    has_drop, key_i, thr, scale = _dropout_args(dropout_p, key)
    bm, bn, bk, warps, stages = _blocks(b, n, k, x.dtype)
    sxs = 0 if x.dim() == 2 else x.stride(0)
    grid = (triton.cdiv(b, bm) * triton.cdiv(n, bn), s)
    with C.device_ctx(x):
        _ensemble_linear_fwd_kernel[grid](
            x, weight, bias if bias is not None else weight, y, z if gelu else y,
            b, n, k,
            sxs, x.stride(-2), x.stride(-1),
            weight.stride(0), weight.stride(1), weight.stride(2),
            key_i, thr, scale,
            HAS_BIAS=bias is not None, ACTIVATION=_ACT[activation], HAS_DROPOUT=has_drop,
            STORE_Z=gelu, ACC=C.acc_tl(x.dtype), PRECISION=_precision(x.dtype),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return y, z


def ensemble_linear_bwd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias,
                        y: torch.Tensor, z: torch.Tensor, activation: str, dropout_p: float,
                        key: int, need_dx: bool = True):
    """Returns (dx or None, dweight, dbias or None); dx has x's shape (summed over members if
    shared) and is skipped without ``need_dx``.
    Needs ``y`` for relu and ``z`` for gelu (the forward's outputs); nothing is recomputed."""
    _check("ensemble_linear_bwd", x, weight, bias, activation)
    s, n, k = weight.shape
    b = x.shape[-2]
    if tuple(grad_y.shape) != (s, b, n):
        raise ValueError(f"triton ensemble_linear_bwd: grad_y must be {(s, b, n)}, got "
                         f"shape {tuple(grad_y.shape)}")
    if activation == "relu" and tuple(y.shape) != (s, b, n):
        raise ValueError(f"triton ensemble_linear_bwd: relu needs the forward's y {(s, b, n)}, "
                         f"got shape {tuple(y.shape)}")
    if activation == "gelu" and tuple(z.shape) != (s, b, n):
        raise ValueError(f"triton ensemble_linear_bwd: gelu needs the forward's z {(s, b, n)}, "
                         f"got shape {tuple(z.shape)}")
    grad_y, x, weight = grad_y.contiguous(), x.contiguous(), weight.contiguous()
    y, z = y.contiguous(), z.contiguous()
    shared = x.dim() == 2
    has_drop, key_i, thr, scale = _dropout_args(dropout_p, key)
    if activation == "relu" and not has_drop:
        scale = 1.0
    act = _ACT[activation]
    acc = C.acc_tl(x.dtype)
    prec = _precision(x.dtype)
    y_arg = y if activation == "relu" else grad_y
    z_arg = z if activation == "gelu" else grad_y
    dx = C.empty(tuple(x.shape), x.dtype, x.device) if need_dx else None
    dw = C.empty((s, n, k), weight.dtype, weight.device)
    db = C.empty((s, n), bias.dtype, bias.device) if bias is not None else None
    with C.device_ctx(x):
        if dx is not None and dx.numel():
            bm, bk, bn, warps, stages = _blocks(b, k, n, x.dtype)
            grid = (triton.cdiv(b, bm) * triton.cdiv(k, bk), 1 if shared else s)
            _ensemble_linear_bwd_dx_kernel[grid](
                grad_y, y_arg, z_arg, weight, dx,
                s if shared else 1, b, n, k,
                weight.stride(0), weight.stride(1), weight.stride(2),
                key_i, thr, scale,
                ACTIVATION=act, HAS_DROPOUT=has_drop, ACC=acc, PRECISION=prec,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
        if s * n:
            bn, bk, bb, warps, stages = _blocks(n, k, b, x.dtype)
            # K may be 0: keep one K tile so db is still reduced
            grid = (triton.cdiv(n, bn) * max(1, triton.cdiv(k, bk)), s)
            _ensemble_linear_bwd_dw_kernel[grid](
                grad_y, y_arg, z_arg, x, dw, db if db is not None else dw,
                b, n, k,
                0 if shared else x.stride(0), x.stride(-2), x.stride(-1),
                key_i, thr, scale,
                HAS_BIAS=db is not None, ACTIVATION=act, HAS_DROPOUT=has_drop, ACC=acc,
                PRECISION=prec, BLOCK_N=bn, BLOCK_K=bk, BLOCK_B=bb,
                num_warps=warps, num_stages=stages)
    return dx, dw, db
