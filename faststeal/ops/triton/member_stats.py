"""Triton ``member_stats``: every across-member statistic of (S, B, C) logits in one pass.

One program owns a block of rows with all C classes in registers and loops over the S members
once: per member a stable softmax (the member's row max is subtracted before exp, so logits
shifted by 1e4 are fine), its entropy, its first-index argmax (a vote for that class) and, with
targets, an int32 atomic count of its correct rows. Across members it keeps the running sum of p
(mean_probs = sum / S, like the reference) and Welford's running mean / M2 for the variance, so
no one-pass E[p^2] - E[p]^2 cancellation. Integer atomics make member_correct deterministic.
Rows longer than ``MAX_CLASSES`` would not fit in registers: they go to the reference.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import reference
from . import _common as C

MAX_CLASSES = 16384


@triton.jit
def _first_argmax(v, cols, valid, BLOCK_C: tl.constexpr):
    """Row-wise argmax of a (rows, BLOCK_C) tile, ties to the lowest column; like torch.argmax a
    NaN counts as the maximum (the first NaN's column), never the padded width BLOCK_C (tl.max's
    NaN handling differs between the interpreter and GPUs, so NaN is decided separately)."""
    is_nan = valid & (v != v)
    has_nan = tl.max(is_nan.to(tl.int32), axis=1) > 0
    vmax = tl.max(tl.where(valid & (v == v), v, -float("inf")), axis=1)
    hit = tl.where(has_nan[:, None], is_nan, valid & (v == vmax[:, None]))
    return tl.min(tl.where(hit, cols[None, :], BLOCK_C), axis=1)


@triton.jit
def _member_stats_kernel(
    logits_ptr, targets_ptr,
    mean_ptr, var_ptr, eom_ptr, ment_ptr, mi_ptr, pred_ptr, dis_ptr, correct_ptr, count_ptr,
    S, B, C, S_F,
    HAS_TARGETS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_C)
    r_mask = rows < B
    c_mask = cols < C
    valid = r_mask[:, None] & c_mask[None, :]
    col_ok = c_mask[None, :] & (rows[:, None] >= 0)  # (BLOCK_B, BLOCK_C) class mask
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    if HAS_TARGETS:
        t = tl.load(targets_ptr + rows, mask=r_mask, other=-1)
    p_sum = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    w_mean = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    w_m2 = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    votes = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.int32)
    ent_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    member_off = pid.to(tl.int64) * 0  # int64 running offset of member s
    for s in range(0, S):
        # padded rows read zeros (finite), padded classes -inf (zero probability)
        x = tl.load(logits_ptr + member_off + offs, mask=valid, other=0.0).to(tl.float32)
        x = tl.where(col_ok, x, -float("inf"))
        shifted = x - tl.max(x, axis=1)[:, None]
        logp = shifted - tl.log(tl.sum(tl.exp(shifted), axis=1))[:, None]
        p = tl.exp(logp)
        # 0 log 0 = 0 for padded and probability-0 classes (logp = -inf); NaN stays NaN
        ent_sum += -tl.sum(tl.where(col_ok & (p != 0.0), p * logp, 0.0), axis=1)
        p_sum += p
        delta = p - w_mean
        w_mean += delta / ((s + 1) * 1.0)
        w_m2 += delta * (p - w_mean)
        member_pred = _first_argmax(p, cols, col_ok, BLOCK_C)
        votes += (cols[None, :] == member_pred[:, None]).to(tl.int32)
        if HAS_TARGETS:
            hits = tl.sum(((member_pred == t) & r_mask).to(tl.int32), axis=0)
            tl.atomic_add(count_ptr + s, hits)
        member_off += B * C
    mean_p = p_sum / S_F
    out_rc = rows[:, None].to(tl.int64) * C + cols[None, :]
    tl.store(mean_ptr + out_rc, mean_p, mask=valid)
    variance = tl.sum(tl.where(col_ok, w_m2, 0.0), axis=1) / S_F / C
    # Welford's M2 is >= 0 but may round below: clamp (tl.where, not tl.maximum, keeps NaN)
    variance = tl.where(variance < 0.0, 0.0, variance)
    pos = col_ok & (mean_p != 0.0)  # xlogy: 0 log 0 = 0, NaN stays NaN
    eom = -tl.sum(tl.where(pos, mean_p * tl.log(tl.where(pos, mean_p, 1.0)), 0.0), axis=1)
    ment = ent_sum / S_F
    mi = eom - ment
    mi = tl.where(mi < 0.0, 0.0, mi)  # >= 0: the two entropies round differently
    pred = _first_argmax(mean_p, cols, col_ok, BLOCK_C)
    agree = tl.sum(tl.where(cols[None, :] == pred[:, None], votes, 0), axis=1)
    tl.store(var_ptr + rows, variance, mask=r_mask)
    tl.store(eom_ptr + rows, eom, mask=r_mask)
    tl.store(ment_ptr + rows, ment, mask=r_mask)
    tl.store(mi_ptr + rows, mi, mask=r_mask)
    tl.store(pred_ptr + rows, pred.to(tl.int64), mask=r_mask)
    tl.store(dis_ptr + rows, (S - agree).to(tl.float32) / S_F, mask=r_mask)
    if HAS_TARGETS:
        tl.store(correct_ptr + rows, (pred == t).to(tl.float32), mask=r_mask)


def _blocks(b: int, c: int) -> tuple[int, int, int]:
    block_c = C.np2(c)
    if C.INTERPRET:
        # at most 32 rows, so CPU tests cover several programs sharing the atomic counts
        return max(1, min(C.np2(b), 32, 16384 // block_c)), block_c, 4
    block_b = max(1, min(C.np2(b), 2048 // block_c))
    return block_b, block_c, (4 if block_b * block_c <= 2048 else 8)


def member_stats_fwd(logits: torch.Tensor,
                     targets: Optional[torch.Tensor]) -> reference.MemberStats:
    """logits: (S, B, C) any float dtype (computed in float32); targets: (B,) int64 or None."""
    C.check_device("member_stats_fwd", ("logits", logits), ("targets", targets))
    C.check_dtype("member_stats_fwd", "logits", logits)
    if logits.dim() != 3 or min(logits.shape) == 0:
        raise ValueError(f"triton member_stats_fwd: logits must be non-empty (S, B, C), got "
                         f"shape {tuple(logits.shape)}")
    s, b, c = logits.shape
    if targets is not None and (targets.dtype.is_floating_point or tuple(targets.shape) != (b,)):
        raise ValueError(f"triton member_stats_fwd: targets must be ({b},) integer labels, got "
                         f"shape {tuple(targets.shape)}, dtype {targets.dtype}")
    if c > MAX_CLASSES:  # a row would not fit in registers: documented fallback
        return reference.member_stats_fwd(logits, targets)
    logits = logits.contiguous()
    dev = logits.device
    f32 = torch.float32
    mean_p = C.empty((b, c), f32, dev)
    variance, eom, ment, mi, dis = (C.empty((b,), f32, dev) for _ in range(5))
    pred = C.empty((b,), torch.int64, dev)
    has_t = targets is not None
    if has_t:
        targets = targets.to(torch.int64).contiguous()
        correct = C.empty((b,), f32, dev)
        counts = torch.zeros((s,), dtype=torch.int32, device=dev)
    else:
        correct = torch.empty(0, dtype=f32, device=dev)
        counts = None
    block_b, block_c, warps = _blocks(b, c)
    with C.device_ctx(logits):
        _member_stats_kernel[(triton.cdiv(b, block_b),)](
            logits, targets if has_t else logits,
            mean_p, variance, eom, ment, mi, pred, dis, correct if has_t else dis,
            counts if has_t else dis,
            s, b, c, float(s), HAS_TARGETS=has_t, BLOCK_B=block_b, BLOCK_C=block_c, num_warps=warps)
    # integer counts of at most B < 2**24 rows: exact in float32, same rounding as the reference
    member_correct = counts.to(f32) / b if has_t else torch.empty(0, dtype=f32, device=dev)
    return reference.MemberStats(mean_p, variance, eom, ment, mi, pred, dis, correct,
                                 member_correct)
