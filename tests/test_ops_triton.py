"""The Triton backend against the pure-PyTorch reference, op by op and through the public API.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (``conftest.py`` sets
``TRITON_INTERPRET=1``): shapes stay small. With a GPU the same tests run on CUDA, plus the
float16/bfloat16 checks (flash-attention's rule: the kernel's error against a float32 reference
is at most twice the error of the same-dtype PyTorch composite, plus a small floor).
"""

from __future__ import annotations

import os

import pytest
import torch

import faststeal.ops as ops
from faststeal.ops import dispatch, reference as R, rng
from tolerances import tol

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import faststeal.ops.triton as T  # noqa: E402
from faststeal.ops.triton import _common, _rng  # noqa: E402
from faststeal.ops.triton import member_stats as T_member_stats  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and _common.INTERPRET
DEVICES = (["cpu"] if INTERPRETED else []) + (["cuda"] if torch.cuda.is_available() else [])
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Small absolute floor of the low-precision rule, for outputs of order one.
LOWP_FLOOR = 1e-4

pytestmark = pytest.mark.skipif(not DEVICES, reason="no GPU and not under TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Kernel outputs start as NaN (-1 for ints): an element a kernel never writes fails a test."""
    monkeypatch.setattr(_common, "POISON", True)


def _close(actual, expected, dtype=torch.float32, name=""):
    assert actual.shape == expected.shape, f"{name}: {actual.shape} vs {expected.shape}"
    torch.testing.assert_close(actual, expected, **tol(dtype), msg=lambda m: f"{name}: {m}")


def _key_ge_2_31(stream: int) -> int:
    """A seed whose key has the top bit set (the kernels bitcast it from int32)."""
    return next(s for s in range(100) if rng.rng_key(s, stream) >= 2**31)


# ---------------------------------------------------------------- backend availability


def test_unavailable_reason():
    if INTERPRETED:
        assert T.unavailable_reason("cpu") is None
    else:
        assert "TRITON_INTERPRET=1" in T.unavailable_reason("cpu")
    if torch.cuda.is_available():
        assert T.unavailable_reason("cuda") is None
    else:
        assert "CUDA" in T.unavailable_reason("cuda")
    assert "mps" in T.unavailable_reason("mps")
    for op in dispatch.OPS:
        if op == "max_pool2d":  # no Triton kernel: ops.max_pool2d runs ATen's pooling instead
            reason = dispatch.unavailable_reason("triton", op, "cpu")
            assert reason is not None and ("has no max_pool2d" in reason) == INTERPRETED, reason
            continue
        expect_none = INTERPRETED
        assert (dispatch.unavailable_reason("triton", op, "cpu") is None) == expect_none


def test_unavailable_reason_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in T.unavailable_reason("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_common, "INTERPRET", False)  # as if set after the import
    assert "before importing" in T.unavailable_reason("cpu")


# ---------------------------------------------------------------- RNG helpers, bit-exact


@triton.jit
def _rng_probe_kernel(counter_ptr, key, threshold, bits_ptr, keep_ptr, normal_ptr, n,
                      BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    c = tl.load(counter_ptr + offs, mask=mask, other=0).to(tl.uint32)  # int64 -> low 32 bits
    k = key.to(tl.uint32, bitcast=True)
    tl.store(bits_ptr + offs, _rng.random_bits(c, k).to(tl.int64), mask=mask)
    tl.store(keep_ptr + offs, _rng.dropout_keep(c, k, threshold.to(tl.uint32)).to(tl.int8),
             mask=mask)
    tl.store(normal_ptr + offs, _rng.standard_normal(c, k), mask=mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stream", [0, 1])
def test_rng_helpers_match_reference(device, stream):
    # counters around 2**31 and 2**32 (wrapping), keys with and without the top bit
    seed = _key_ge_2_31(stream) if stream else 3
    key = rng.rng_key(seed, stream)
    counter = torch.cat([torch.arange(0, 40), torch.arange(2**31 - 20, 2**31 + 20),
                         torch.arange(2**32 - 30, 2**32 + 10)]).to(device)
    n = counter.numel()
    bits = torch.full((n,), -1, dtype=torch.int64, device=device)
    keep = torch.full((n,), -1, dtype=torch.int8, device=device)
    normal = torch.full((n,), float("nan"), device=device)
    p = 0.37
    _rng_probe_kernel[(1,)](counter, _common.key_arg(key), rng.dropout_threshold(p), bits, keep,
                            normal, n, BLOCK=triton.next_power_of_2(n))
    assert torch.equal(bits, rng.random_bits(key, counter))
    assert torch.equal(keep.bool(), rng.dropout_keep(key, counter, p))
    # the normal of index i uses counters 2i, 2i+1 (mod 2**32) in both
    torch.testing.assert_close(normal, rng.normal(key, counter & 0xFFFFFFFF), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- ensemble_linear

# (S, B, K, N, shared x, activation, dropout_p, bias)
LINEAR_CASES = [
    (1, 1, 1, 1, False, "none", 0.0, True),
    (2, 3, 97, 5, True, "relu", 0.5, True),
    (5, 97, 3, 123, False, "gelu", 0.2, False),
    (16, 3, 5, 7, True, "gelu", 0.0, True),
    (2, 123, 16, 1, False, "relu", 0.0, False),
    (5, 1, 123, 3, False, "none", 0.3, True),
    (1, 97, 97, 97, True, "none", 0.0, False),
]


def _linear_inputs(s, b, k, n, shared, bias, device, dtype=torch.float32):
    x = torch.randn(*((b, k) if shared else (s, b, k)), device=device, dtype=dtype)
    w = (torch.randn(s, n, k, device=device) / max(k, 1) ** 0.5).to(dtype)
    bb = torch.randn(s, n, device=device, dtype=dtype) if bias else None
    return x, w, bb


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: "-".join(map(str, c)))
def test_ensemble_linear_matches_reference(device, case, seed_all):
    s, b, k, n, shared, act, p, bias = case
    x, w, bb = _linear_inputs(s, b, k, n, shared, bias, device)
    key = rng.rng_key(_key_ge_2_31(0) if p == 0.3 else 11, rng.STREAM_DROPOUT)
    y, z = T.ensemble_linear_fwd(x, w, bb, act, p, key)
    y_ref, z_ref = R.ensemble_linear_fwd(x, w, bb, act, p, key)
    _close(y, y_ref, name="y")
    _close(z, z_ref, name="z")
    assert (z.numel() > 0) == (act == "gelu")
    if p > 0:  # dropped elements are exactly zero in both, at the same places
        assert torch.equal(y == 0, y_ref == 0)
    grad_y = torch.randn_like(y)
    dx, dw, db = T.ensemble_linear_bwd(grad_y, x, w, bb, y, z, act, p, key)
    dx_ref, dw_ref, db_ref = R.ensemble_linear_bwd(grad_y, x, w, bb, y_ref, z_ref, act, p, key)
    _close(dx, dx_ref, name="dx")
    _close(dw, dw_ref, name="dweight")
    if bias:
        _close(db, db_ref, name="dbias")
    else:
        assert db is None


@pytest.mark.parametrize("device", DEVICES)
def test_ensemble_linear_dropout_mask_bit_identical(device, seed_all):
    s, b, k, n, p = 3, 5, 4, 37, 0.4
    x, w, bb = _linear_inputs(s, b, k, n, False, True, device)
    key = rng.rng_key(_key_ge_2_31(0), rng.STREAM_DROPOUT)
    y, _ = T.ensemble_linear_fwd(x, w, bb, "none", p, key)
    y_plain, _ = T.ensemble_linear_fwd(x, w, bb, "none", 0.0, key)
    keep = rng.dropout_keep(key, torch.arange(s * b * n, device=device), p).view(s, b, n)
    assert torch.equal(y != 0, keep)
    torch.testing.assert_close(y[keep], y_plain[keep] / (1 - p), **tol(torch.float32))
    # every member and row has its own stream position: the members' masks differ even with
    # identical members and a shared x
    x2 = torch.randn(b, k, device=device)
    w2 = w[:1].expand(s, -1, -1).contiguous()
    y2, _ = T.ensemble_linear_fwd(x2, w2, None, "none", p, key)
    assert not torch.equal(y2[0] == 0, y2[1] == 0)
    # rerun with the same key: bit-identical (forward and backward); another seed: another mask
    assert torch.equal(T.ensemble_linear_fwd(x, w, bb, "none", p, key)[0], y)
    g = torch.randn_like(y)
    d1 = T.ensemble_linear_bwd(g, x, w, bb, y, y.new_empty(0), "none", p, key)
    d2 = T.ensemble_linear_bwd(g, x, w, bb, y, y.new_empty(0), "none", p, key)
    assert all(torch.equal(a, c) for a, c in zip(d1, d2))
    y3, _ = T.ensemble_linear_fwd(x, w, bb, "none", p, rng.rng_key(5, rng.STREAM_DROPOUT))
    assert not torch.equal(y3 == 0, y == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_ensemble_linear_rejects_bad_input(device, monkeypatch):
    x = torch.randn(2, 3, 4, device=device)
    w = torch.randn(2, 5, 4, device=device)
    with pytest.raises(TypeError, match="x must be float32"):
        T.ensemble_linear_fwd(x.to(torch.int32), w, None, "none", 0.0, 0)
    with pytest.raises(ValueError, match="activation must be one of"):
        T.ensemble_linear_fwd(x, w, None, "tanh", 0.0, 0)
    y, z = T.ensemble_linear_fwd(x, w, None, "gelu", 0.0, 0)
    with pytest.raises(ValueError, match="grad_y must be"):
        T.ensemble_linear_bwd(y[:1], x, w, None, y, z, "gelu", 0.0, 0)
    with pytest.raises(ValueError, match="gelu needs the forward's z"):
        T.ensemble_linear_bwd(y, x, w, None, y, y.new_empty(0), "gelu", 0.0, 0)
    with pytest.raises(ValueError, match="relu needs the forward's y"):
        T.ensemble_linear_bwd(y, x, w, None, y.new_empty(0), z, "relu", 0.0, 0)
    if device == "cpu":
        monkeypatch.setattr(_common, "INTERPRET", False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            T.ensemble_linear_fwd(x, w, None, "none", 0.0, 0)


# ---------------------------------------------------------------- bayes_linear

# (S, B, K, N, shared x, bias)
BAYES_CASES = [
    (1, 1, 1, 1, True, True),
    (2, 3, 97, 5, False, True),
    (5, 97, 3, 123, True, True),
    (16, 3, 5, 7, True, True),
    (2, 123, 16, 1, False, False),
]


def _bayes_inputs(s, b, k, n, shared, bias, device, dtype=torch.float32):
    x = torch.randn(*((b, k) if shared else (s, b, k)), device=device).to(dtype)
    mu = (torch.randn(n, k, device=device) / max(k, 1) ** 0.5).to(dtype)
    rho = (torch.randn(n, k, device=device) * 0.5 - 3.0).to(dtype)
    if not bias:
        return x, mu, rho, None, None
    return x, mu, rho, torch.randn(n, device=device).to(dtype), \
        (torch.randn(n, device=device) - 2.0).to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", BAYES_CASES, ids=lambda c: "-".join(map(str, c)))
def test_bayes_linear_matches_reference(device, case, seed_all):
    s, b, k, n, shared, bias = case
    x, mu, rho, bmu, brho = _bayes_inputs(s, b, k, n, shared, bias, device)
    seed = _key_ge_2_31(1) if s == 2 else 4
    kw, kb = rng.rng_key(seed, rng.STREAM_WEIGHT), rng.rng_key(seed, rng.STREAM_BIAS)
    y = T.bayes_linear_fwd(x, mu, rho, bmu, brho, s, kw, kb)
    y_ref = R.bayes_linear_fwd(x, mu, rho, bmu, brho, s, kw, kb)
    _close(y, y_ref, name="y")
    g = torch.randn_like(y)
    got = T.bayes_linear_bwd(g, x, mu, rho, bmu, brho, s, kw, kb)
    want = R.bayes_linear_bwd(g, x, mu, rho, bmu, brho, s, kw, kb)
    for name, a, e in zip(("dx", "dw_mu", "dw_rho", "db_mu", "db_rho"), got, want):
        if e is None:
            assert a is None, name
        else:
            _close(a, e, name=name)


@pytest.mark.parametrize("device", DEVICES)
def test_bayes_linear_rng(device, seed_all):
    s, b, k, n = 3, 4, 6, 5
    x, mu, rho, bmu, brho = _bayes_inputs(s, b, k, n, True, True, device)
    kw, kb = rng.rng_key(9, rng.STREAM_WEIGHT), rng.rng_key(9, rng.STREAM_BIAS)
    y = T.bayes_linear_fwd(x, mu, rho, bmu, brho, s, kw, kb)
    assert torch.equal(T.bayes_linear_fwd(x, mu, rho, bmu, brho, s, kw, kb), y)
    # shared x, same mu/rho: only eps differs between samples
    assert not torch.allclose(y[0], y[1]) and not torch.allclose(y[1], y[2])
    y_other = T.bayes_linear_fwd(x, mu, rho, bmu, brho, s, rng.rng_key(10, 1), rng.rng_key(10, 2))
    assert not torch.allclose(y, y_other)
    # the bias noise alone (zero weights' sigma) differs per sample as well
    rho_off = torch.full_like(rho, -100.0)  # softplus(-100) ~ 4e-44: weights are mu
    yb = T.bayes_linear_fwd(x, mu, rho_off, bmu, brho, s, kw, kb)
    assert not torch.allclose(yb[0], yb[1])
    g = torch.randn_like(y)
    d1 = T.bayes_linear_bwd(g, x, mu, rho, bmu, brho, s, kw, kb)
    d2 = T.bayes_linear_bwd(g, x, mu, rho, bmu, brho, s, kw, kb)
    assert all(torch.equal(a, c) for a, c in zip(d1, d2))


# ---------------------------------------------------------------- gaussian_kl


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,prior", [((1,), 1.0), ((3, 97), 0.3), ((5, 123, 7), 2.0),
                                         ((70001,), 1.0)])
def test_gaussian_kl_matches_reference(device, shape, prior, seed_all):
    mu = torch.randn(*shape, device=device)
    rho = torch.randn(*shape, device=device) * 3.0 - 2.0
    rho.view(-1)[:3] = torch.tensor([25.0, -30.0, 20.0])[: rho.numel()]  # both softplus branches
    kl = T.gaussian_kl_fwd(mu, rho, prior)
    kl_ref = R.gaussian_kl_fwd(mu, rho, prior)
    assert kl.dtype == torch.float32 and kl.shape == ()
    torch.testing.assert_close(kl, kl_ref, atol=1e-3, rtol=2e-5)
    assert torch.equal(T.gaussian_kl_fwd(mu, rho, prior), kl)  # deterministic reduction
    g = torch.tensor(0.7, device=device)
    dmu, drho = T.gaussian_kl_bwd(g, mu, rho, prior)
    dmu_ref, drho_ref = R.gaussian_kl_bwd(g, mu, rho, prior)
    _close(dmu, dmu_ref, name="dmu")
    _close(drho, drho_ref, name="drho")


# ---------------------------------------------------------------- member_stats

# (S, B, C, logit shift)
STATS_CASES = [(1, 1, 1, 0.0), (2, 3, 97, 0.0), (5, 97, 10, 1e4), (16, 5, 1025, 0.0),
               (2, 123, 3, -1e4)]


def _check_stats(got: R.MemberStats, want: R.MemberStats):
    for name in R.MemberStats._fields:
        a, e = getattr(got, name), getattr(want, name)
        if name in ("pred", "disagreement", "correct", "member_correct"):
            assert a.dtype == e.dtype and torch.equal(a, e), name  # exact: counts and argmaxes
        else:
            _close(a, e, name=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", STATS_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("with_targets", [True, False])
def test_member_stats_matches_reference(device, case, with_targets, seed_all):
    s, b, c, shift = case
    logits = torch.randn(s, b, c, device=device) * 3.0 + shift
    targets = torch.randint(0, c, (b,), device=device) if with_targets else None
    got = T.member_stats_fwd(logits, targets)
    _check_stats(got, R.member_stats_fwd(logits, targets))
    if not with_targets:
        assert got.correct.numel() == 0 and got.member_correct.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_member_stats_ties_and_shift(device, seed_all):
    s, b, c = 5, 64, 6
    # small integer logits: many exact ties, between classes and between members
    logits = torch.randint(0, 3, (s, b, c), device=device).float()
    targets = torch.randint(0, c, (b,), device=device)
    _check_stats(T.member_stats_fwd(logits, targets), R.member_stats_fwd(logits, targets))
    # a +1e4 shift leaves a stable computation unchanged (up to the shift's rounding, exact
    # here as the logits are small integers): the naive one-pass variance would not
    shifted = T.member_stats_fwd(logits + 1e4, targets)
    _check_stats(shifted, R.member_stats_fwd(logits, targets))


@pytest.mark.parametrize("device", DEVICES)
def test_member_stats_wide_rows_fall_back(device, monkeypatch, seed_all):
    monkeypatch.setattr(T_member_stats, "MAX_CLASSES", 8)
    real = R.member_stats_fwd
    calls = []

    def spy(logits, targets):
        calls.append(tuple(logits.shape))
        return real(logits, targets)

    monkeypatch.setattr(R, "member_stats_fwd", spy)
    narrow = torch.randn(2, 3, 8, device=device)
    _check_stats(T.member_stats_fwd(narrow, None), real(narrow, None))
    assert calls == []  # at the limit the kernel runs
    monkeypatch.setattr(T_member_stats, "_member_stats_kernel", None)  # a launch would fail
    logits = torch.randn(2, 3, 9, device=device)
    out = T.member_stats_fwd(logits, None)
    assert calls == [(2, 3, 9)]  # past it, the reference ran, once
    _check_stats(out, real(logits, None))


# ---------------------------------------------------------------- ensemble_cross_entropy

# (S, B, C, soft targets, logit shift); C = 9000 streams several class chunks
XENT_CASES = [(1, 1, 1, False, 0.0), (2, 3, 97, True, 0.0), (5, 97, 10, False, 1e4),
              (16, 5, 1025, True, 0.0), (2, 123, 3, False, 0.0), (1, 2, 9000, True, 50.0),
              (2, 3, 9000, False, 0.0)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", XENT_CASES, ids=lambda c: "-".join(map(str, c)))
def test_ensemble_cross_entropy_matches_reference(device, case, seed_all):
    s, b, c, soft, shift = case
    logits = torch.randn(s, b, c, device=device) * 2.0 + shift
    if c > 8192:  # the row max sits in the last chunk: the online rescaling must be right
        logits[..., -1] += 10.0
    if soft:
        target = torch.softmax(torch.randn(b, c, device=device), -1)
        target[0] *= 0.5  # rows need not sum to one
    else:
        target = torch.randint(0, c, (b,), device=device)
    loss = T.ensemble_cross_entropy_fwd(logits, target)
    _close(loss, R.ensemble_cross_entropy_fwd(logits, target), name="loss")
    assert torch.equal(T.ensemble_cross_entropy_fwd(logits, target), loss)
    grad = torch.randn(s, device=device)
    _close(T.ensemble_cross_entropy_bwd(grad, logits, target),
           R.ensemble_cross_entropy_bwd(grad, logits, target), name="dlogits")


@pytest.mark.parametrize("device", DEVICES)
def test_ensemble_cross_entropy_bad_label_is_nan(device):
    logits = torch.randn(2, 3, 4, device=device)
    target = torch.tensor([0, 4, 1], device=device)
    loss = T.ensemble_cross_entropy_fwd(logits, target)
    assert torch.isnan(loss).all()
    d = T.ensemble_cross_entropy_bwd(torch.ones(2, device=device), logits, target)
    assert torch.isnan(d[:, 1]).all() and not torch.isnan(d[:, 0]).any()
    with pytest.raises(ValueError, match="hard target must be"):
        T.ensemble_cross_entropy_fwd(logits, target[:2])


# ---------------------------------------------------------------- public API, autograd


def _grads(out, *inputs):
    return torch.autograd.grad(out, [t for t in inputs if t is not None])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared", [True, False])
def test_public_api_autograd(device, shared, seed_all):
    s, b, k, n, c = 3, 5, 7, 6, 4
    x, w, bb = _linear_inputs(s, b, k, n, shared, True, device)
    x, w, bb = (t.requires_grad_() for t in (x, w, bb))
    target = torch.randint(0, c, (b,), device=device)
    _, mu, rho, bmu, brho = _bayes_inputs(s, b, n, c, True, True, device)
    mu, rho, bmu, brho = (t.requires_grad_() for t in (mu, rho, bmu, brho))

    def run():
        h = ops.ensemble_linear(x, w, bb, activation="gelu", dropout_p=0.25, seed=3)
        h = ops.ensemble_linear(h, w[:, :, :n].contiguous(), None, activation="relu",
                                dropout_p=0.1, seed=4)
        logits = ops.bayes_linear(h, mu, rho, bmu, brho, seed=5, samples=s)
        loss = ops.ensemble_cross_entropy(logits, target).sum() + 1e-3 * ops.gaussian_kl(mu, rho)
        stats = ops.member_stats(logits, target)
        return loss, stats, _grads(loss, x, w, bb, mu, rho, bmu, brho)

    with ops.use_backend("triton"):
        assert dispatch.resolve("ensemble_linear", device) == "triton"
        loss, stats, grads = run()
    with ops.use_backend("reference"):
        loss_ref, stats_ref, grads_ref = run()
    _close(loss, loss_ref, name="loss")
    _check_stats(stats, stats_ref)
    for i, (a, e) in enumerate(zip(grads, grads_ref)):
        _close(a, e, name=f"grad {i}")


@pytest.mark.parametrize("device", DEVICES)
def test_public_api_soft_target_autograd(device, seed_all):
    logits = torch.randn(2, 3, 5, device=device, requires_grad=True)
    soft = torch.softmax(torch.randn(3, 5, device=device), -1)
    with ops.use_backend("triton"):
        g = torch.autograd.grad(ops.ensemble_cross_entropy(logits, soft).sum(), logits)[0]
    with ops.use_backend("reference"):
        g_ref = torch.autograd.grad(ops.ensemble_cross_entropy(logits, soft).sum(), logits)[0]
    _close(g, g_ref, name="dlogits")


@pytest.mark.parametrize("device", DEVICES)
def test_float64_gradcheck(device, seed_all):
    """float64 runs through the kernels (fp64 accumulation) and passes gradcheck."""
    f64 = dict(device=device, dtype=torch.float64)
    x = torch.randn(2, 3, **f64, requires_grad=True)
    w = torch.randn(2, 4, 3, **f64, requires_grad=True)
    bb = torch.randn(2, 4, **f64, requires_grad=True)
    mu = torch.randn(3, 4, **f64, requires_grad=True)
    rho = (torch.randn(3, 4, **f64) - 2.0).requires_grad_()
    logits = torch.randn(2, 3, 5, **f64, requires_grad=True)
    bx = torch.randn(2, 3, **f64, requires_grad=True)
    bmu = torch.randn(3, 3, **f64, requires_grad=True)
    brho = (torch.randn(3, 3, **f64) - 2.0).requires_grad_()
    target = torch.tensor([1, 0, 4], device=device)
    with ops.use_backend("triton"):
        y = ops.ensemble_linear(x, w, bb, activation="gelu", dropout_p=0.3, seed=1)
        with ops.use_backend("reference"):
            y_ref = ops.ensemble_linear(x, w, bb, activation="gelu", dropout_p=0.3, seed=1)
        _close(y, y_ref, torch.float64, name="y float64")
        checks = [
            (lambda a, b_, c_: ops.ensemble_linear(a, b_, c_, "gelu", 0.3, 1), (x, w, bb)),
            # with a bias: without one the public op's backward currently returns one empty
            # tensor twice, which torch.library rejects as aliasing (not a kernel matter)
            (lambda a, m, r, bm, br: ops.bayes_linear(a, m, r, bm, br, seed=2, samples=2),
             (bx, bmu, brho, bb[0, :3].detach().clone().requires_grad_(),
              (bb[1, :3].detach() - 2.0).requires_grad_())),
            (lambda m, r: ops.gaussian_kl(m, r, 0.5), (mu, rho)),
            (lambda lg: ops.ensemble_cross_entropy(lg, target), (logits,)),
        ]
        for fn, inputs in checks:
            assert torch.autograd.gradcheck(fn, inputs, fast_mode=True, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------- CUDA: float16 / bfloat16


def _lowp_check(kernel_out, composite_out, exact_out, name):
    """flash-attention's rule: |kernel - fp32 ref| <= 2 |same-dtype composite - fp32 ref| + floor
    (the floor scaled by the output's magnitude, at least one)."""
    err = (kernel_out.float() - exact_out.float()).abs().max().item()
    err_pt = (composite_out.float() - exact_out.float()).abs().max().item()
    scale = max(exact_out.float().abs().max().item(), 1.0)
    assert err <= 2 * err_pt + LOWP_FLOOR * scale, f"{name}: {err} > 2 * {err_pt} + floor"


def _f32(*ts):
    return [t.float() if t is not None else None for t in ts]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act,p,shared", [("gelu", 0.2, False), ("relu", 0.0, True),
                                          ("none", 0.5, False)])
def test_ensemble_linear_low_precision(dtype, act, p, shared, seed_all):
    s, b, k, n = 4, 97, 123, 65
    x, w, bb = _linear_inputs(s, b, k, n, shared, True, "cuda", dtype)
    key = rng.rng_key(2, 0)
    y, z = T.ensemble_linear_fwd(x, w, bb, act, p, key)
    y_pt, z_pt = R.ensemble_linear_fwd(x, w, bb, act, p, key)
    y32, z32 = R.ensemble_linear_fwd(*_f32(x, w, bb), act, p, key)
    assert y.dtype == dtype
    _lowp_check(y, y_pt, y32, "y")
    g = torch.randn_like(y32)
    got = T.ensemble_linear_bwd(g.to(dtype), x, w, bb, y, z, act, p, key)
    pt = R.ensemble_linear_bwd(g.to(dtype), x, w, bb, y_pt, z_pt, act, p, key)
    ref = R.ensemble_linear_bwd(g, *_f32(x, w, bb), y32, z32, act, p, key)
    for name, a, c, e in zip(("dx", "dw", "db"), got, pt, ref):
        assert a.dtype == dtype
        _lowp_check(a, c, e, name)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bayes_linear_low_precision(dtype, seed_all):
    s, b, k, n = 3, 97, 123, 65
    inputs = _bayes_inputs(s, b, k, n, True, True, "cuda", dtype)
    keys = (rng.rng_key(2, 1), rng.rng_key(2, 2))
    y = T.bayes_linear_fwd(*inputs, s, *keys)
    _lowp_check(y, R.bayes_linear_fwd(*inputs, s, *keys),
                R.bayes_linear_fwd(*_f32(*inputs), s, *keys), "y")
    g = torch.randn_like(y)
    got = T.bayes_linear_bwd(g, *inputs, s, *keys)
    pt = R.bayes_linear_bwd(g, *inputs, s, *keys)
    ref = R.bayes_linear_bwd(g.float(), *_f32(*inputs), s, *keys)
    for name, a, c, e in zip(("dx", "dmu", "drho", "dbmu", "dbrho"), got, pt, ref):
        _lowp_check(a, c, e, name)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reductions_low_precision(dtype, seed_all):
    s, b, c = 5, 97, 123
    logits = (torch.randn(s, b, c, device="cuda") * 3).to(dtype)
    target = torch.randint(0, c, (b,), device="cuda")
    soft = torch.softmax(torch.randn(b, c, device="cuda"), -1).to(dtype)
    for t in (target, soft):
        t32 = t.float() if t.dtype.is_floating_point else t
        _lowp_check(T.ensemble_cross_entropy_fwd(logits, t),
                    R.ensemble_cross_entropy_fwd(logits, t),
                    R.ensemble_cross_entropy_fwd(logits.float(), t32), "xent")
        g = torch.randn(s, device="cuda")
        _lowp_check(T.ensemble_cross_entropy_bwd(g, logits, t),
                    R.ensemble_cross_entropy_bwd(g, logits, t),
                    R.ensemble_cross_entropy_bwd(g, logits.float(), t32), "dlogits")
    # member_stats computes in float32 from the low-precision logits: same input, fp32 tolerance
    _check_stats(T.member_stats_fwd(logits, target), R.member_stats_fwd(logits, target))
    mu = torch.randn(97, 123, device="cuda").to(dtype)
    rho = (torch.randn(97, 123, device="cuda") - 3).to(dtype)
    _close(T.gaussian_kl_fwd(mu, rho, 1.0), R.gaussian_kl_fwd(mu, rho, 1.0), name="kl")
    dm, dr = T.gaussian_kl_bwd(torch.tensor(1.0, device="cuda"), mu, rho, 1.0)
    dm_ref, dr_ref = R.gaussian_kl_bwd(torch.tensor(1.0, device="cuda"), mu, rho, 1.0)
    _close(dm, dm_ref, dtype, name="dmu")
    _close(dr, dr_ref, dtype, name="drho")
