"""The CUDA kernels (``faststeal._C``, the ``cuda`` backend).

Without a GPU only two things run here: the build check (when nvcc exists, setup.py must have
compiled the CUDA kernels into ``faststeal._C``) and the backend's refusal reason. With a GPU the
kernels are compared with the reference on the same grid as the C++ CPU tests in float32, and in
float16/bfloat16 with flash-attention's rule: the kernel's error against a float32 reference is
at most twice the error of the same-dtype PyTorch composite, plus a small floor.
"""

from __future__ import annotations

import os

import pytest
import torch

from faststeal import _ext
from faststeal.ops import reference as R
from faststeal.ops import rng, use_backend
from tolerances import assert_close

NVCC = "/usr/local/cuda/bin/nvcc"
HAS_GPU_KERNELS = (_ext.C is not None and _ext.has_cuda_kernels()
                   and torch.cuda.is_available())
requires_gpu_kernels = pytest.mark.skipif(
    not HAS_GPU_KERNELS,
    reason=("needs a CUDA GPU and faststeal._C built with CUDA kernels "
            f"(GPU: {torch.cuda.is_available()}, _C: {_ext.C is not None}, "
            f"CUDA kernels: {_ext.has_cuda_kernels()})"))

LINEAR_SHAPES = [(1, 1, 1, 1), (2, 3, 97, 123), (5, 97, 123, 3), (16, 3, 97, 123),
                 (16, 123, 3, 1), (5, 1025, 97, 3)]
STATS_SHAPES = [(1, 1, 1), (2, 3, 97), (5, 97, 3), (16, 123, 10), (16, 1025, 3), (5, 3, 123),
                (3, 17, 1000)]
LOW = [torch.float16, torch.bfloat16]


@pytest.mark.skipif(not os.path.exists(NVCC), reason=f"no CUDA toolkit at {NVCC}")
def test_cuda_kernels_are_compiled_when_a_toolkit_exists():
    assert _ext.C is not None, f"faststeal._C failed to load: {_ext.LOAD_ERROR}"
    assert _ext.has_cuda_kernels(), (
        "nvcc exists but faststeal._C has no CUDA kernels: rebuild without FASTSTEAL_NO_CUDA=1 "
        f"({_ext.BUILD_HINT})")
    for name in ("ensemble_linear_fwd_cuda", "ensemble_linear_bwd_cuda", "bayes_linear_fwd_cuda",
                 "bayes_linear_bwd_cuda", "gaussian_kl_fwd_cuda", "gaussian_kl_bwd_cuda",
                 "member_stats_fwd_cuda", "ensemble_cross_entropy_fwd_cuda",
                 "ensemble_cross_entropy_bwd_cuda"):
        assert hasattr(_ext.C, name), name


@requires_gpu_kernels
@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
def test_cuda_backward_without_dx(seed_all, shared):
    """need_dx=False (a first layer) skips dx and leaves the parameter gradients unchanged."""
    from faststeal.ops import cuda_backend as G
    dev = torch.device("cuda")
    S, B, K, N = 3, 33, 17, 9
    x = torch.randn(B, K, device=dev) if shared else torch.randn(S, B, K, device=dev)
    w, b = torch.randn(S, N, K, device=dev), torch.randn(S, N, device=dev)
    key = rng.rng_key(5, rng.STREAM_DROPOUT)
    y, z = G.ensemble_linear_fwd(x, w, b, "relu", 0.2, key)
    g = torch.randn_like(y)
    full = G.ensemble_linear_bwd(g, x, w, b, y, z, "relu", 0.2, key, True)
    part = G.ensemble_linear_bwd(g, x, w, b, y, z, "relu", 0.2, key, False)
    assert full[0] is not None and part[0] is None
    for a, e in zip(part[1:], full[1:]):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    mu, rho = torch.randn(N, K, device=dev), torch.randn(N, K, device=dev) - 3
    bmu, brho = torch.randn(N, device=dev), torch.randn(N, device=dev) - 3
    kw, kb = rng.rng_key(5, rng.STREAM_WEIGHT), rng.rng_key(5, rng.STREAM_BIAS)
    full = G.bayes_linear_bwd(g, x, mu, rho, bmu, brho, S, kw, kb, True)
    part = G.bayes_linear_bwd(g, x, mu, rho, bmu, brho, S, kw, kb, False)
    assert full[0] is not None and part[0] is None
    for a, e in zip(part[1:], full[1:]):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.skipif(_ext.C is None, reason="faststeal._C is not built")
def test_cuda_backend_says_why_it_cannot_run():
    from faststeal.ops import cuda_backend as G
    assert "CUDA tensors only" in G.unavailable_reason("cpu")
    reason = G.unavailable_reason("cuda")
    if not _ext.has_cuda_kernels():
        assert "without CUDA kernels" in reason and "pip install" in reason
    elif not torch.cuda.is_available():
        assert "no CUDA device" in reason
    else:
        assert reason is None


@pytest.mark.skipif(_ext.C is None or not _ext.has_cuda_kernels(),
                    reason="faststeal._C has no CUDA kernels")
def test_cuda_entry_points_reject_cpu_tensors():
    with pytest.raises(RuntimeError, match=r"member_stats_fwd_cuda: logits must be a CUDA tensor, "
                                           r"got device cpu"):
        _ext.C.member_stats_fwd_cuda(torch.randn(2, 3, 4), None)
    with pytest.raises(RuntimeError, match=r"ensemble_linear_fwd_cuda: x must be a CUDA tensor"):
        _ext.C.ensemble_linear_fwd_cuda(torch.randn(2, 3, 4), torch.randn(2, 5, 4), None, "relu",
                                        0.0, 0)


# ---------------------------------------------------------------------------------------------
# GPU correctness (skipped without a GPU)
# ---------------------------------------------------------------------------------------------

def _cuda():
    from faststeal.ops import cuda_backend as G
    return G


def assert_stats_close(got, want):
    """MemberStats fields: ``pred`` identical, the others within the float32 tolerance."""
    for name, a, e in zip(R.MemberStats._fields, got, want):
        if name == "pred":
            assert torch.equal(a, e)
        else:
            assert_close(a, e, what=name)


def assert_lowp_close(kernel, composite, exact, what=""):
    """flash-attention's rule: |kernel - exact| <= 2 |composite - exact| + floor (max norms)."""
    exact = exact.double()
    err = (kernel.double() - exact).abs().max().item()
    base = (composite.double() - exact).abs().max().item()
    floor = 1e-3 * max(1.0, exact.abs().max().item())
    assert err <= 2 * base + floor, f"{what}: error {err:.3g} > 2 * {base:.3g} + {floor:.3g}"


@requires_gpu_kernels
@pytest.mark.parametrize("S,B,K,N", LINEAR_SHAPES)
@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_ensemble_linear_cuda_matches_reference(poison, S, B, K, N, activation, dropout_p, shared,
                                                bias):
    G = _cuda()
    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(B, K, device=dev) if shared else torch.randn(S, B, K, device=dev)
    w = torch.randn(S, N, K, device=dev) / K**0.5
    b = torch.randn(S, N, device=dev) if bias else None
    key = rng.rng_key(1234, rng.STREAM_DROPOUT)
    y, z = G.ensemble_linear_fwd(x, w, b, activation, dropout_p, key)
    y_ref, z_ref = R.ensemble_linear_fwd(x, w, b, activation, dropout_p, key)
    assert_close(y, y_ref, what="y")
    assert_close(z, z_ref, what="z")
    if dropout_p > 0:
        keep = rng.dropout_keep(key, torch.arange(y.numel(), device=dev), dropout_p).view(y.shape)
        assert not y[~keep].any()
    if activation != "gelu":
        assert torch.equal(y == 0, y_ref == 0)
    g = torch.randn_like(y_ref)
    got = G.ensemble_linear_bwd(g, x, w, b, y, z, activation, dropout_p, key)
    want = R.ensemble_linear_bwd(g, x, w, b, y_ref, z_ref, activation, dropout_p, key)
    for name, a, e in zip(("dx", "dweight", "dbias"), got, want):
        if e is None:
            assert a is None
        else:
            assert_close(a, e, what=name)


@requires_gpu_kernels
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
def test_ensemble_linear_cuda_low_precision(poison, dtype, activation, shared):
    G = _cuda()
    torch.manual_seed(0)
    S, B, K, N, p = 5, 97, 123, 64, 0.2
    x = torch.randn(B, K, device="cuda") if shared else torch.randn(S, B, K, device="cuda")
    w = torch.randn(S, N, K, device="cuda") / K**0.5
    b = torch.randn(S, N, device="cuda")
    key = rng.rng_key(7, 0)
    lo = [t.to(dtype) for t in (x, w, b)]
    exact = R.ensemble_linear_fwd(*(t.double() for t in lo), activation, p, key)[0]
    y = G.ensemble_linear_fwd(*lo, activation, p, key)[0]
    assert y.dtype == dtype
    assert_lowp_close(y, R.ensemble_linear_fwd(*lo, activation, p, key)[0], exact, "y")
    g = torch.randn(S, B, N, device="cuda").to(dtype)
    y_ref, z_ref = R.ensemble_linear_fwd(*lo, activation, p, key)
    y_k, z_k = G.ensemble_linear_fwd(*lo, activation, p, key)
    exact_g = R.ensemble_linear_bwd(g.double(), *(t.double() for t in lo), None, None, activation,
                                    p, key)
    got = G.ensemble_linear_bwd(g, *lo, y_k, z_k, activation, p, key)
    comp = R.ensemble_linear_bwd(g, *lo, y_ref, z_ref, activation, p, key)
    for name, a, c, e in zip(("dx", "dweight", "dbias"), got, comp, exact_g):
        assert_lowp_close(a, c, e, name)


@requires_gpu_kernels
def test_dropout_mask_identical_on_cpu_and_cuda():
    G = _cuda()
    x, w = torch.randn(4, 33, 17), torch.randn(4, 29, 17)
    key = rng.rng_key(31337, 0)
    y_gpu, _ = G.ensemble_linear_fwd(x.cuda(), w.cuda(), None, "none", 0.35, key)
    keep = rng.dropout_keep(key, torch.arange(4 * 33 * 29), 0.35).view(4, 33, 29)
    assert torch.equal((y_gpu != 0).cpu(), keep)


@requires_gpu_kernels
@pytest.mark.parametrize("S,B,K,N", LINEAR_SHAPES)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "stacked"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_bayes_linear_cuda_matches_reference(poison, S, B, K, N, shared, bias):
    G = _cuda()
    torch.manual_seed(0)
    d = "cuda"
    x = torch.randn(B, K, device=d) if shared else torch.randn(S, B, K, device=d)
    w_mu, w_rho = torch.randn(N, K, device=d) / K**0.5, torch.randn(N, K, device=d) - 3
    b_mu = torch.randn(N, device=d) if bias else None
    b_rho = torch.randn(N, device=d) - 3 if bias else None
    kw, kb = rng.rng_key(5, 1), rng.rng_key(5, 2)
    y = G.bayes_linear_fwd(x, w_mu, w_rho, b_mu, b_rho, S, kw, kb)
    assert_close(y, R.bayes_linear_fwd(x, w_mu, w_rho, b_mu, b_rho, S, kw, kb), what="y")
    g = torch.randn(S, B, N, device=d)
    got = G.bayes_linear_bwd(g, x, w_mu, w_rho, b_mu, b_rho, S, kw, kb)
    want = R.bayes_linear_bwd(g, x, w_mu, w_rho, b_mu, b_rho, S, kw, kb)
    for name, a, e in zip(("dx", "dw_mu", "dw_rho", "db_mu", "db_rho"), got, want):
        if e is None:
            assert a is None
        else:
            assert_close(a, e, what=name)


@requires_gpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32] + LOW)
def test_gaussian_kl_cuda(poison, dtype):
    G = _cuda()
    torch.manual_seed(0)
    mu = torch.randn(1025, 97, device="cuda")
    rho = torch.randn(1025, 97, device="cuda") * 3 - 2
    lo = (mu.to(dtype), rho.to(dtype))
    out = G.gaussian_kl_fwd(*lo, 0.5)
    assert out.dtype == torch.float32
    ref = R.gaussian_kl_fwd(*lo, 0.5)  # computes in float32 from the same inputs
    assert_close(out, ref, what="kl")
    grad = torch.tensor(1.3, device="cuda")
    for name, a, e in zip(("dmu", "drho"), G.gaussian_kl_bwd(grad, *lo, 0.5),
                          R.gaussian_kl_bwd(grad, *lo, 0.5)):
        assert_close(a, e, dtype, name)


@requires_gpu_kernels
@pytest.mark.parametrize("S,B,C", STATS_SHAPES)
@pytest.mark.parametrize("with_targets", [True, False], ids=["targets", "notargets"])
@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["plain", "shifted"])
def test_member_stats_cuda_matches_reference(poison, S, B, C, with_targets, offset):
    G = _cuda()
    torch.manual_seed(0)
    logits = torch.randn(S, B, C, device="cuda") * 3 + offset
    targets = torch.randint(0, C, (B,), device="cuda") if with_targets else None
    got, want = G.member_stats_fwd(logits, targets), R.member_stats_fwd(logits, targets)
    assert_stats_close(got, want)


@requires_gpu_kernels
@pytest.mark.parametrize("dtype", LOW)
def test_member_stats_cuda_low_precision_inputs(dtype):
    G = _cuda()
    torch.manual_seed(0)
    logits = (torch.randn(16, 1025, 10, device="cuda") * 3).to(dtype)
    # Both compute in float32 from the same low-precision logits.
    got, want = G.member_stats_fwd(logits, None), R.member_stats_fwd(logits, None)
    assert_stats_close(got, want)


@requires_gpu_kernels
@pytest.mark.parametrize("S,B,C", STATS_SHAPES)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["plain", "shifted"])
def test_ensemble_xent_cuda_matches_reference(poison, S, B, C, soft, offset):
    G = _cuda()
    torch.manual_seed(0)
    d = "cuda"
    logits = torch.randn(S, B, C, device=d) * 3 + offset
    target = (torch.softmax(torch.randn(B, C, device=d), -1) if soft
              else torch.randint(0, C, (B,), device=d))
    assert_close(G.ensemble_cross_entropy_fwd(logits, target),
                 R.ensemble_cross_entropy_fwd(logits, target), what="loss")
    grad = torch.randn(S, device=d)
    assert_close(G.ensemble_cross_entropy_bwd(grad, logits, target),
                 R.ensemble_cross_entropy_bwd(grad, logits, target), what="dlogits")


@requires_gpu_kernels
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_ensemble_xent_cuda_low_precision(dtype, soft):
    G = _cuda()
    torch.manual_seed(0)
    S, B, C = 5, 1025, 97
    logits = (torch.randn(S, B, C, device="cuda") * 3).to(dtype)
    target = (torch.softmax(torch.randn(B, C, device="cuda"), -1).to(dtype) if soft
              else torch.randint(0, C, (B,), device="cuda"))
    exact_t = target.double() if soft else target
    assert_lowp_close(G.ensemble_cross_entropy_fwd(logits, target),
                      R.ensemble_cross_entropy_fwd(logits, target),
                      R.ensemble_cross_entropy_fwd(logits.double(), exact_t), "loss")
    grad = torch.randn(S, device="cuda")
    assert_lowp_close(G.ensemble_cross_entropy_bwd(grad, logits, target),
                      R.ensemble_cross_entropy_bwd(grad, logits, target),
                      R.ensemble_cross_entropy_bwd(grad.double(), logits.double(), exact_t),
                      "dlogits")


@requires_gpu_kernels
def test_public_ops_gradcheck_under_cuda_backend():
    from faststeal.ops import ensemble_cross_entropy, ensemble_linear
    torch.manual_seed(0)

    def r(*s):
        return torch.randn(*s, dtype=torch.float64, device="cuda", requires_grad=True)

    with use_backend("cuda"):
        assert torch.autograd.gradcheck(
            lambda x, w, b: ensemble_linear(x, w, b, "gelu", 0.3, seed=2),
            (r(2, 4, 3), r(2, 5, 3), r(2, 5)))
        labels = torch.tensor([0, 2, 1, 1], device="cuda")
        assert torch.autograd.gradcheck(lambda lg: ensemble_cross_entropy(lg, labels),
                                        (r(2, 4, 3),))
