"""Triton ``ensemble_cross_entropy``: per-member mean cross-entropy of (S, B, C) logits.

Forward: one program per (row block, member) streams the classes in chunks with an online
log-sum-exp; soft targets accumulate ``sum_c t (x - ref)`` against the row's first logit, so
shifted logits do not cancel catastrophically; each program writes a partial sum and a
second tiny kernel reduces the partials per member (deterministic, no atomics). Backward: the same
online pass for (m, sum exp), then ``(softmax * sum(t) - t) * grad[s] / B`` written chunk by chunk.
Hard labels outside [0, C) give NaN (the reference raises) rather than reading out of bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C


@triton.jit
def _row_lse_state(logits_ptr, tgt_ptr, row_off, t_off, r_mask, C, SOFT: tl.constexpr,
                   ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Online (max, sum exp(x - max)) per row and, for soft targets, sum t and sum t (x - ref)
    with ref the max of the row's first chunk (same scale as the row, so no catastrophic
    cancellation for shifted logits, and nothing to rebase when the max moves). For a row of
    one chunk ref is the row max, so x - ref <= 0 never overflows: gaps beyond the float range
    give the reference's inf (a first-logit ref gave inf - inf = NaN)."""
    cols = tl.arange(0, BLOCK_C)
    x0 = tl.load(logits_ptr + row_off[:, None] + cols[None, :],
                 mask=r_mask[:, None] & (cols[None, :] < C), other=-float("inf")).to(ACC)
    ref = tl.max(x0, axis=1)
    ref = tl.where(tl.abs(ref) < float("inf"), ref, 0.0)  # NaN / inf / padded rows: 0
    m = tl.full((BLOCK_B,), -float("inf"), ACC)
    ssum = tl.zeros((BLOCK_B,), ACC)
    tsum = tl.zeros((BLOCK_B,), ACC)
    tx = tl.zeros((BLOCK_B,), ACC)
    for c0 in range(0, C, BLOCK_C):
        cur = c0 + cols
        mask = r_mask[:, None] & (cur[None, :] < C)
        x = tl.load(logits_ptr + row_off[:, None] + cur[None, :], mask=mask,
                    other=-float("inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_new = tl.where(m_new == -float("inf"), 0.0, m_new)  # padded rows stay finite
        ssum = ssum * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        if SOFT:
            t = tl.load(tgt_ptr + t_off[:, None] + cur[None, :], mask=mask, other=0.0).to(ACC)
            # tsum / tx are only read after the loop: an earlier version that rebased tx on the
            # running max (reading tsum inside the loop) passed under the interpreter but gave
            # wrong multi-chunk losses on H200 with Triton 3.6
            tx += tl.sum(t * tl.where(mask, x - ref[:, None], 0.0), axis=1)
            tsum += tl.sum(t, axis=1)
        m = m_new
    return m, ssum, tsum, tx, ref


@triton.jit
def _xent_fwd_partial_kernel(logits_ptr, tgt_ptr, part_ptr, B, C, n_blocks,
                             SOFT: tl.constexpr, ACC: tl.constexpr,
                             BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_b = tl.program_id(0)
    s = tl.program_id(1).to(tl.int64)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    r_mask = rows < B
    row_off = (s * B + rows) * C
    t_off = rows.to(tl.int64) * C
    m, ssum, tsum, tx, ref = _row_lse_state(logits_ptr, tgt_ptr, row_off, t_off, r_mask, C,
                                            SOFT, ACC, BLOCK_B, BLOCK_C)
    log_s = tl.log(tl.where(r_mask, ssum, 1.0))
    if SOFT:
        # -sum_c t (x - lse) = sum(t) (lse - ref) - sum_c t (x - ref), lse - ref = log_s + m - ref
        loss = tsum * (log_s + (m - ref)) - tx
    else:
        label = tl.load(tgt_ptr + rows, mask=r_mask, other=0)
        ok = (label >= 0) & (label < C)
        x_t = tl.load(logits_ptr + row_off + label, mask=r_mask & ok, other=0.0).to(ACC)
        loss = tl.where(ok, log_s - (x_t - m), float("nan"))
    tl.store(part_ptr + s * n_blocks + pid_b, tl.sum(tl.where(r_mask, loss, 0.0), axis=0))


@triton.jit
def _xent_fwd_reduce_kernel(part_ptr, out_ptr, n_blocks, b_ptr, BLOCK: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    acc = tl.load(part_ptr + s * n_blocks + tl.arange(0, BLOCK),
                  mask=tl.arange(0, BLOCK) < n_blocks, other=0.0)
    for i0 in range(BLOCK, n_blocks, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + s * n_blocks + offs, mask=offs < n_blocks, other=0.0)
    tl.store(out_ptr + s, tl.sum(acc, axis=0) / tl.load(b_ptr))


@triton.jit
def _xent_bwd_kernel(grad_ptr, logits_ptr, tgt_ptr, dlogits_ptr, B, C, b_ptr,
                     SOFT: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_b = tl.program_id(0)
    s = tl.program_id(1).to(tl.int64)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    r_mask = rows < B
    row_off = (s * B + rows) * C
    t_off = rows.to(tl.int64) * C
    m, ssum, tsum, tx, ref = _row_lse_state(logits_ptr, tgt_ptr, row_off, t_off, r_mask, C,
                                            SOFT, ACC, BLOCK_B, BLOCK_C)
    coef = tl.load(grad_ptr + s).to(ACC) / tl.load(b_ptr)
    inv_s = 1.0 / tl.where(r_mask, ssum, 1.0)
    if not SOFT:
        label = tl.load(tgt_ptr + rows, mask=r_mask, other=0)
        bad = (label < 0) | (label >= C)
        tsum = tl.where(bad, float("nan"), 1.0)
    cols = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        cur = c0 + cols
        mask = r_mask[:, None] & (cur[None, :] < C)
        x = tl.load(logits_ptr + row_off[:, None] + cur[None, :], mask=mask, other=0.0).to(ACC)
        p = tl.exp(x - m[:, None]) * inv_s[:, None]
        if SOFT:
            t = tl.load(tgt_ptr + t_off[:, None] + cur[None, :], mask=mask, other=0.0).to(ACC)
        else:
            t = (cur[None, :] == label[:, None]).to(ACC)
        d = (p * tsum[:, None] - t) * coef
        tl.store(dlogits_ptr + row_off[:, None] + cur[None, :],
                 d.to(dlogits_ptr.dtype.element_ty), mask=mask)


# partial sums per step of the per-member reduction (2 under the interpreter so that CPU tests
# exercise its loop)
_REDUCE_BLOCK = 2 if C.INTERPRET else 1024


def _blocks(b: int, c: int) -> tuple[int, int, int]:
    if C.INTERPRET:
        block_c = C.clamp_block(c, 16, 8192)
        # at most 32 rows, so CPU tests cover several partial sums per member
        return max(1, min(C.np2(b), 32, 16384 // block_c)), block_c, 4
    block_c = C.clamp_block(c, 16, 4096)
    block_b = max(1, min(C.np2(b), 4096 // block_c, 64))
    return block_b, block_c, (4 if block_b * block_c <= 2048 else 8)


def _check(op, logits, target):
    C.check_device(op, ("logits", logits), ("target", target))
    C.check_dtype(op, "logits", logits)
    if logits.dim() != 3:
        raise ValueError(f"triton {op}: logits must be (S, B, C), got shape {tuple(logits.shape)}")
    s, b, c = logits.shape
    if target.dtype.is_floating_point:
        if tuple(target.shape) != (b, c):
            raise ValueError(f"triton {op}: soft target must be {(b, c)}, got "
                             f"shape {tuple(target.shape)}")
    elif tuple(target.shape) != (b,) or target.dtype == torch.bool:
        raise ValueError(f"triton {op}: hard target must be ({b},) integer labels, got "
                         f"shape {tuple(target.shape)}, dtype {target.dtype}")


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def ensemble_cross_entropy_fwd(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits: (S, B, C); target: (B,) int labels or (B, C) probabilities. Returns (S,) mean
    loss per member in float32 (float64 for float64 logits)."""
    _check("ensemble_cross_entropy_fwd", logits, target)
    s, b, c = logits.shape
    soft = target.dtype.is_floating_point
    logits = logits.contiguous()
    target = target.contiguous() if soft else target.to(torch.int64).contiguous()
    acc = _acc(logits.dtype)
    out = C.empty((s,), acc, logits.device)
    if s == 0:
        return out
    if b == 0 or c == 0:  # mean over an empty batch, like torch.mean: NaN
        return out.fill_(float("nan"))
    block_b, block_c, warps = _blocks(b, c)
    n_blocks = triton.cdiv(b, block_b)
    parts = C.empty((s, n_blocks), acc, logits.device)
    denom = torch.full((1,), float(b), dtype=acc, device=logits.device)
    with C.device_ctx(logits):
        _xent_fwd_partial_kernel[(n_blocks, s)](
            logits, target, parts, b, c, n_blocks, SOFT=soft, ACC=C.acc_tl(logits.dtype),
            BLOCK_B=block_b, BLOCK_C=block_c, num_warps=warps)
        _xent_fwd_reduce_kernel[(s,)](parts, out, n_blocks, denom,
                                      BLOCK=min(C.np2(n_blocks), _REDUCE_BLOCK), num_warps=4)
    return out


def ensemble_cross_entropy_bwd(grad: torch.Tensor, logits: torch.Tensor,
                               target: torch.Tensor) -> torch.Tensor:
    """grad: (S,). Returns dlogits (S, B, C) in logits' dtype."""
    _check("ensemble_cross_entropy_bwd", logits, target)
    s, b, c = logits.shape
    if tuple(grad.shape) != (s,):
        raise ValueError(f"triton ensemble_cross_entropy_bwd: grad must be ({s},), got "
                         f"shape {tuple(grad.shape)}")
    soft = target.dtype.is_floating_point
    logits = logits.contiguous()
    target = target.contiguous() if soft else target.to(torch.int64).contiguous()
    acc = _acc(logits.dtype)
    grad = grad.to(device=logits.device, dtype=acc).contiguous()
    out = C.empty((s, b, c), logits.dtype, logits.device)
    if out.numel() == 0:
        return out
    block_b, block_c, warps = _blocks(b, c)
    denom = torch.full((1,), float(b), dtype=acc, device=logits.device)
    with C.device_ctx(logits):
        _xent_bwd_kernel[(triton.cdiv(b, block_b), s)](
            grad, logits, target, out, b, c, denom, SOFT=soft, ACC=C.acc_tl(logits.dtype),
            BLOCK_B=block_b, BLOCK_C=block_c, num_warps=warps)
    return out
