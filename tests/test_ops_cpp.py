"""The C++ CPU kernels (``faststeal._C``, the ``cpp`` backend) against the pure-PyTorch reference.

Every forward and backward output is compared on a grid of member counts and awkward shapes;
dropout masks must be bit-identical; the public ops are gradchecked in float64 and opchecked
under the cpp backend; every TORCH_CHECK of the entry points has a test. Outputs are poisoned
(NaN / sentinel) before the kernels run, so an element a kernel forgets to write shows up.
"""

from __future__ import annotations

import pytest
import torch

from faststeal import _ext
from faststeal.ops import reference as R
from faststeal.ops.cpp_backend import GEMM_PATHS
from faststeal.ops import rng, use_backend
from tolerances import assert_close

pytestmark = [pytest.mark.skipif(
    _ext.C is None, reason=f"faststeal._C is not built ({_ext.LOAD_ERROR}); {_ext.BUILD_HINT}"),
    pytest.mark.usefixtures("poison")]

if _ext.C is not None:
    from faststeal.ops import cpp_backend as P

# (S, B, K, N): member counts 1, 2, 5, 16 and awkward sizes; one B = 1025 case.
LINEAR_SHAPES = [(1, 1, 1, 1), (2, 3, 97, 123), (5, 97, 123, 3), (16, 3, 97, 123),
                 (16, 123, 3, 1), (5, 1025, 97, 3)]
# (S, B, C)
STATS_SHAPES = [(1, 1, 1), (2, 3, 97), (5, 97, 3), (16, 123, 10), (16, 1025, 3), (5, 3, 123)]


def linear_inputs(S, B, K, N, shared, bias, dtype=torch.float32):
    x = torch.randn(B, K, dtype=dtype) if shared else torch.randn(S, B, K, dtype=dtype)
    w = torch.randn(S, N, K, dtype=dtype) / K**0.5
    b = torch.randn(S, N, dtype=dtype) if bias else None
    return x, w, b


# ---------------------------------------------------------------------------------------------
# ensemble_linear
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("S,B,K,N", LINEAR_SHAPES)
@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_ensemble_linear_matches_reference(seed_all, S, B, K, N, activation, dropout_p, shared,
                                           bias):
    x, w, b = linear_inputs(S, B, K, N, shared, bias)
    key = rng.rng_key(seed_all, rng.STREAM_DROPOUT)
    y, z = P.ensemble_linear_fwd(x, w, b, activation, dropout_p, key)
    y_ref, z_ref = R.ensemble_linear_fwd(x, w, b, activation, dropout_p, key)
    assert_close(y, y_ref, what="y")
    assert_close(z, z_ref, what="z")
    if dropout_p > 0:  # dropped elements are exactly zero, with rng.py's mask
        keep = rng.dropout_keep(key, torch.arange(y.numel()), dropout_p).view(y.shape)
        assert not y[~keep].any()
    if activation != "gelu":  # same zeros (gelu may underflow to 0 on one side only)
        assert torch.equal(y == 0, y_ref == 0)

    g = torch.randn_like(y_ref)
    got = P.ensemble_linear_bwd(g, x, w, b, y, z, activation, dropout_p, key)
    want = R.ensemble_linear_bwd(g, x, w, b, y_ref, z_ref, activation, dropout_p, key)
    for name, a, e in zip(("dx", "dweight", "dbias"), got, want):
        if e is None:
            assert a is None, name
        else:
            assert_close(a, e, what=name)


@pytest.mark.parametrize("gemm", ["default", *GEMM_PATHS])
@pytest.mark.parametrize("S,B,K,N,shared", [(2, 123, 97, 3, False), (5, 3, 97, 123, False),
                                            (16, 97, 123, 97, False), (5, 33, 97, 65, True)])
@pytest.mark.parametrize("activation", ["none", "relu"])
def test_every_cpu_gemm_path_matches_reference(seed_all, gemm, S, B, K, N, shared, activation):
    # every GEMM library of csrc/cpu/gemm.cpp that the measured dispatch may pick (and the
    # un-tuned default rule), forward (bias + relu after the GEMM) and backward
    fwd = P.ensemble_linear_fwd if gemm == "default" else \
        P.variants("ensemble_linear", "fwd")[gemm]
    bwd = P.ensemble_linear_bwd if gemm == "default" else \
        P.variants("ensemble_linear", "bwd")[gemm]
    x, w, b = linear_inputs(S, B, K, N, shared, True)
    y, z = fwd(x, w, b, activation, 0.0, 7)
    y_ref, z_ref = R.ensemble_linear_fwd(x, w, b, activation, 0.0, 7)
    assert_close(y, y_ref, what="y")
    g = torch.randn_like(y_ref)
    got = bwd(g, x, w, b, y, z, activation, 0.0, 7, True)
    want = R.ensemble_linear_bwd(g, x, w, b, y_ref, z_ref, activation, 0.0, 7)
    for name, a, e in zip(("dx", "dweight", "dbias"), got, want):
        assert_close(a, e, what=name)


def test_packed_gemm_path_multiplies_a_dense_copy_of_the_transposed_gradient(seed_all):
    # the matching above holds for any path; here: cpp:packed really differs from cpp:bmm by a
    # row-major copy of the backward's dz^T (the dW GEMM's strided operand), one per call
    x, w, b = linear_inputs(4, 33, 40, 24, False, True)
    g = torch.randn(4, 33, 24)
    y, z = P.ensemble_linear_fwd(x, w, b, "none", 0.0, 0)

    def clones(path):
        bwd = P.variants("ensemble_linear", "bwd")[path]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            bwd(g, x, w, b, y, z, "none", 0.0, 0, True)
        return sum(e.count for e in prof.key_averages() if e.key == "aten::clone")

    assert clones("packed") == clones("bmm") + 1


@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
def test_ensemble_linear_float64_matches_reference(seed_all, shared, activation):
    x, w, b = linear_inputs(5, 97, 123, 33, shared, True, torch.float64)
    key = rng.rng_key(3, rng.STREAM_DROPOUT)
    y, z = P.ensemble_linear_fwd(x, w, b, activation, 0.25, key)
    y_ref, z_ref = R.ensemble_linear_fwd(x, w, b, activation, 0.25, key)
    assert_close(y, y_ref, torch.float64, "y")
    assert_close(z, z_ref, torch.float64, "z")
    g = torch.randn_like(y_ref)
    got = P.ensemble_linear_bwd(g, x, w, b, y, z, activation, 0.25, key)
    want = R.ensemble_linear_bwd(g, x, w, b, y_ref, z_ref, activation, 0.25, key)
    # reference._activation_grad evaluates the gelu derivative in float32 even for float64
    # inputs, so the reference itself is only float32-accurate there (gradcheck below checks the
    # C++ float64 gelu gradient against finite differences instead).
    dtype = torch.float32 if activation == "gelu" else torch.float64
    for name, a, e in zip(("dx", "dweight", "dbias"), got, want):
        assert_close(a, e, dtype, name)


@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
def test_dropout_mask_bit_identical_to_rng(seed_all, shared):
    S, B, K, N, p = 5, 97, 31, 123, 0.4
    x, w, b = linear_inputs(S, B, K, N, shared, True)
    key = rng.rng_key(987654321, rng.STREAM_DROPOUT)
    y, _ = P.ensemble_linear_fwd(x, w, b, "none", p, key)
    keep = rng.dropout_keep(key, torch.arange(S * B * N), p).view(S, B, N)
    assert torch.equal(y != 0, keep)
    y_nodrop, _ = P.ensemble_linear_fwd(x, w, b, "none", 0.0, key)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    assert_close(y, torch.where(keep, y_nodrop * scale, torch.zeros(())), what="scaled y")
    # Backward regenerates the same mask from the key: dropped elements get no gradient.
    g = torch.ones(S, B, N)
    dx, dw, db = P.ensemble_linear_bwd(g, x, w, b, y, torch.empty(0), "none", p, key)
    assert_close(db, keep.float().sum(1) * scale, what="dbias = kept count * scale")


def test_ensemble_linear_deterministic(seed_all):
    x, w, b = linear_inputs(5, 300, 40, 50, False, True)
    key = rng.rng_key(5, 0)
    y1, z1 = P.ensemble_linear_fwd(x, w, b, "gelu", 0.2, key)
    y2, z2 = P.ensemble_linear_fwd(x, w, b, "gelu", 0.2, key)
    assert torch.equal(y1, y2) and torch.equal(z1, z2)
    g = torch.randn_like(y1)
    a = P.ensemble_linear_bwd(g, x, w, b, y1, z1, "gelu", 0.2, key)
    c = P.ensemble_linear_bwd(g, x, w, b, y1, z1, "gelu", 0.2, key)
    assert all(torch.equal(u, v) for u, v in zip(a, c))


def test_ensemble_linear_other_seed_other_mask(seed_all):
    x, w, b = linear_inputs(2, 64, 8, 64, False, True)
    y1, _ = P.ensemble_linear_fwd(x, w, b, "none", 0.5, rng.rng_key(1, 0))
    y2, _ = P.ensemble_linear_fwd(x, w, b, "none", 0.5, rng.rng_key(2, 0))
    assert not torch.equal(y1 == 0, y2 == 0)


# ---------------------------------------------------------------------------------------------
# bayes_linear and gaussian_kl
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("S,B,K,N", LINEAR_SHAPES)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "stacked"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_bayes_linear_matches_reference(seed_all, S, B, K, N, shared, bias):
    x = torch.randn(B, K) if shared else torch.randn(S, B, K)
    w_mu = torch.randn(N, K) / K**0.5
    w_rho = torch.randn(N, K) - 3.0
    b_mu = torch.randn(N) if bias else None
    b_rho = torch.randn(N) - 3.0 if bias else None
    kw, kb = rng.rng_key(seed_all, rng.STREAM_WEIGHT), rng.rng_key(seed_all, rng.STREAM_BIAS)
    y = P.bayes_linear_fwd(x, w_mu, w_rho, b_mu, b_rho, S, kw, kb)
    assert_close(y, R.bayes_linear_fwd(x, w_mu, w_rho, b_mu, b_rho, S, kw, kb), what="y")
    g = torch.randn(S, B, N)
    got = P.bayes_linear_bwd(g, x, w_mu, w_rho, b_mu, b_rho, S, kw, kb)
    want = R.bayes_linear_bwd(g, x, w_mu, w_rho, b_mu, b_rho, S, kw, kb)
    for name, a, e in zip(("dx", "dw_mu", "dw_rho", "db_mu", "db_rho"), got, want):
        if e is None:
            assert a is None, name
        else:
            assert_close(a, e, what=name)


def test_bayes_linear_float64_and_samples_differ(seed_all):
    S, B, K, N = 5, 17, 23, 11
    x = torch.randn(B, K, dtype=torch.float64)
    w_mu, w_rho = torch.randn(N, K, dtype=torch.float64), torch.randn(N, K, dtype=torch.float64)
    b_mu, b_rho = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    kw, kb = rng.rng_key(9, 1), rng.rng_key(9, 2)
    y = P.bayes_linear_fwd(x, w_mu, w_rho, b_mu, b_rho, S, kw, kb)
    # eps is a float32 sample in every backend (rng.py: "Gaussian samples agree to float32
    # rounding"), so float64 results agree with the reference to float32 accuracy.
    assert_close(y, R.bayes_linear_fwd(x, w_mu, w_rho, b_mu, b_rho, S, kw, kb), torch.float32)
    assert y.dtype == torch.float64
    assert not torch.allclose(y[0], y[1])  # the samples are different draws
    assert torch.equal(y, P.bayes_linear_fwd(x, w_mu, w_rho, b_mu, b_rho, S, kw, kb))


@pytest.mark.parametrize("shape", [(1,), (3, 97), (123, 97), (1025,), (2, 3, 5, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_kl_matches_reference(seed_all, shape, dtype):
    mu = torch.randn(shape, dtype=dtype)
    rho = torch.randn(shape, dtype=dtype) * 3 - 2  # covers the softplus threshold region too
    rho.view(-1)[0] = 25.0
    for sigma in (0.1, 1.0):
        out = P.gaussian_kl_fwd(mu, rho, sigma)
        ref = R.gaussian_kl_fwd(mu, rho, sigma)
        assert out.dtype == ref.dtype and out.shape == ()
        assert_close(out, ref, dtype, "kl")
        grad = torch.tensor(1.7, dtype=R.acc_dtype(dtype))
        for name, a, e in zip(("dmu", "drho"), P.gaussian_kl_bwd(grad, mu, rho, sigma),
                              R.gaussian_kl_bwd(grad, mu, rho, sigma)):
            assert_close(a, e, dtype, name)


# ---------------------------------------------------------------------------------------------
# member_stats
# ---------------------------------------------------------------------------------------------

def compare_stats(got, want, what=""):
    for name, a, e in zip(R.MemberStats._fields, got, want):
        assert a.dtype == e.dtype, f"{what}{name}: dtype {a.dtype} != {e.dtype}"
        if name == "pred":
            assert torch.equal(a, e), f"{what}pred differs"
        else:
            assert_close(a, e, what=what + name)


@pytest.mark.parametrize("S,B,C", STATS_SHAPES)
@pytest.mark.parametrize("with_targets", [True, False], ids=["targets", "notargets"])
@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["plain", "shifted"])
def test_member_stats_matches_reference(seed_all, S, B, C, with_targets, offset):
    logits = torch.randn(S, B, C) * 3 + offset
    targets = torch.randint(0, C, (B,)) if with_targets else None
    compare_stats(P.member_stats_fwd(logits, targets), R.member_stats_fwd(logits, targets))


def test_member_stats_float64_input(seed_all):
    logits = torch.randn(5, 97, 10, dtype=torch.float64) * 4
    targets = torch.randint(0, 10, (97,))
    compare_stats(P.member_stats_fwd(logits, targets), R.member_stats_fwd(logits, targets))


def test_member_stats_variance_is_two_pass_stable(seed_all):
    # Members that nearly agree, behind a large offset: the variance (~1e-8) is far below the
    # rounding error of a one-pass E[p^2] - E[p]^2 in float32 (~1e-9 * 10). Compare relatively
    # against a float64 two-pass on the same float32 logits.
    S, B, C = 16, 64, 10
    base = torch.randn(1, B, C) * 2 + 100.0
    logits = (base + 1e-3 * torch.randn(S, B, C)).float()
    p = torch.softmax(logits.double(), -1)
    var64 = ((p - p.mean(0)) ** 2).mean(0).mean(-1)
    got = P.member_stats_fwd(logits, None).variance.double()
    assert (var64 > 1e-11).all()
    rel = ((got - var64).abs() / var64).max().item()
    assert rel < 1e-2, f"variance relative error {rel:.3g}"


def test_member_stats_ties_pick_first_index():
    S, B, C = 3, 4, 7
    logits = torch.zeros(S, B, C)
    logits[:, 1, 2] = logits[:, 1, 5] = 1.0   # tie between classes 2 and 5
    logits[0, 2, 4] = 5.0                     # member 0 prefers 4, others tie everywhere
    out = P.member_stats_fwd(logits, torch.tensor([0, 2, 4, 1]))
    ref = R.member_stats_fwd(logits, torch.tensor([0, 2, 4, 1]))
    assert out.pred.tolist() == [0, 2, 4, 0] == ref.pred.tolist()
    compare_stats(out, ref)


def test_member_stats_uniform_logits_have_max_entropy():
    out = P.member_stats_fwd(torch.full((4, 2, 8), 7.5), None)
    expected = torch.log(torch.tensor(8.0))
    assert_close(out.entropy_of_mean, expected.expand(2), what="H[mean]")
    assert_close(out.mutual_info, torch.zeros(2), what="MI")
    assert out.correct.numel() == 0 and out.member_correct.numel() == 0


# ---------------------------------------------------------------------------------------------
# ensemble_cross_entropy
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("S,B,C", STATS_SHAPES)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["plain", "shifted"])
def test_ensemble_xent_matches_reference(seed_all, S, B, C, soft, offset):
    logits = torch.randn(S, B, C) * 3 + offset
    target = torch.softmax(torch.randn(B, C), -1) if soft else torch.randint(0, C, (B,))
    out = P.ensemble_cross_entropy_fwd(logits, target)
    assert_close(out, R.ensemble_cross_entropy_fwd(logits, target), what="loss")
    grad = torch.randn(S)
    assert_close(P.ensemble_cross_entropy_bwd(grad, logits, target),
                 R.ensemble_cross_entropy_bwd(grad, logits, target), what="dlogits")


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_ensemble_xent_float64(seed_all, soft):
    logits = torch.randn(5, 97, 10, dtype=torch.float64)
    target = (torch.softmax(torch.randn(97, 10, dtype=torch.float64), -1) if soft
              else torch.randint(0, 10, (97,)))
    out = P.ensemble_cross_entropy_fwd(logits, target)
    assert out.dtype == torch.float64
    assert_close(out, R.ensemble_cross_entropy_fwd(logits, target), torch.float64)
    grad = torch.randn(5, dtype=torch.float64)
    assert_close(P.ensemble_cross_entropy_bwd(grad, logits, target),
                 R.ensemble_cross_entropy_bwd(grad, logits, target), torch.float64)


def test_ensemble_xent_rejects_out_of_range_label():
    logits = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match=r"target\[1\] = 4 is not a class index in \[0, 4\)"):
        _ext.C.ensemble_cross_entropy_fwd_cpu(logits, torch.tensor([0, 4, 1]))
    with pytest.raises(RuntimeError, match=r"target\[0\] = -1"):
        _ext.C.ensemble_cross_entropy_bwd_cpu(torch.ones(2), logits, torch.tensor([-1, 0, 1]))


# ---------------------------------------------------------------------------------------------
# max_pool2d (non-overlapping windows): exactly ATen's values and gradient routing
# ---------------------------------------------------------------------------------------------

# (N, C, H, W, kernel_size): odd heights/widths (floor mode drops a row/column), k = 1, 2, 3, an
# empty batch
POOL_SHAPES = [(2, 3, 8, 8, 2), (3, 2, 7, 9, 2), (1, 1, 2, 2, 2), (4, 5, 5, 3, 2),
               (2, 3, 10, 11, 3), (2, 2, 4, 5, 1), (64, 6, 28, 28, 2), (0, 3, 4, 4, 2),
               # 2x2 rows of every path: 2-3 windows (scalar rows), 4-7 (two overlapping
               # 4-blocks), 8, 9-15 (an overlapping 8-block: by 7 and by 1), 16 (two blocks),
               # 16 + remainder; odd sizes
               (2, 3, 4, 5, 2), (2, 2, 7, 7, 2), (3, 4, 10, 10, 2), (2, 3, 6, 15, 2),
               (2, 2, 4, 16, 2), (1, 2, 5, 17, 2), (2, 2, 4, 18, 2), (3, 2, 5, 21, 2),
               (1, 2, 6, 31, 2), (1, 2, 4, 32, 2), (1, 3, 6, 38, 2)]
_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
           torch.float16: torch.int16}


def _same_bits(a, b):
    """Bit-identical tensors, signed zeros included; NaN payloads too, except in 16-bit dtypes
    (ATen's own float -> bfloat16 conversions keep or canonicalise a NaN's payload depending on
    the code path: its backward of pool(relu(x)) returned 0xFFFF where the kernel writes 0x7FC0)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    ia, ib = a.view(_INT_OF[a.dtype]), b.view(_INT_OF[b.dtype])
    if a.element_size() == 2:
        assert torch.equal(a.isnan(), b.isnan())
        ia, ib = ia[~a.isnan()], ib[~b.isnan()]
    assert torch.equal(ia, ib)


def _pool_input(n, c, h, w, dtype, special):
    x = torch.randn(n, c, h, w).relu()  # relu: many tied zeros, as after a conv + relu
    if special and x.numel():  # NaNs of both signs, -inf windows, -0.0, exact ties
        flat = x.view(-1)
        flat[::7] = float("nan")
        flat[1::13] = -float("nan")
        flat[3::5] = float("-inf")
        flat[2::9] = -0.0
        flat[4::11] = 1.5
    return x.to(dtype)


@pytest.mark.parametrize("N,C,H,W,k", POOL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("special", [False, True], ids=["finite", "nan-inf-ties-zeros"])
@pytest.mark.parametrize("relu", [False, True], ids=["pool", "relu-pool"])
def test_max_pool2d_matches_aten_exactly(seed_all, N, C, H, W, k, dtype, special, relu):
    # float16 takes the reference (ATen) inside the cpp backend; the others the C++ kernel
    x = _pool_input(N, C, H, W, dtype, special)
    if relu:  # inputs with negatives: relu's zeros and ties come from the op itself
        x = torch.where(x == 0, x, x - 0.5).to(dtype)  # keeps -0.0
    y = P.max_pool2d_fwd(x, k, relu)
    _same_bits(y, R.max_pool2d_fwd(x, k, relu))
    g = torch.randn(y.shape).to(dtype)
    if special and g.numel():
        g.view(-1)[::3] = -0.0
        g.view(-1)[1::7] = -float("nan")
        if dtype == torch.float32:  # a signalling NaN: 0 + g quiets it (ATen accumulates)
            g.view(torch.int32).view(-1)[2::11] = 0x7F800001
    dx = P.max_pool2d_bwd(g, x, k, relu)  # poisoned output: every element must be written
    _same_bits(dx, R.max_pool2d_bwd(g, x, k, relu))
    # what the op stands for: ATen's pooling (of torch.relu's output), through autograd
    xr = x.clone().requires_grad_()
    ref = torch.nn.functional.max_pool2d(torch.relu(xr) if relu else xr, k)
    _same_bits(y, ref.detach())
    _same_bits(dx, torch.autograd.grad(ref, xr, g)[0] if ref.numel() else torch.zeros_like(x))


# float32 bits of the window catalogue's values: -inf, -1, -0, +0, 1, a quiet NaN with a
# payload, a negative one with another, a signalling NaN (each a bfloat16 value in its high half)
_WINDOW_VALUES = [0xFF800000, 0xBF800000, 0x80000000, 0x00000000, 0x3F800000, 0x7FC10000,
                  0xFFC20000, 0x7F810000]


@pytest.mark.parametrize("ow", [2, 3, 4, 5, 8, 9, 15, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("relu", [False, True], ids=["pool", "relu-pool"])
def test_max_pool2d_every_window_in_every_lane(seed_all, ow, dtype, relu):
    # all 8^4 windows of the values above (ties, signed zeros, all -inf, NaN orders and
    # payloads: float32's; bfloat16 NaNs are compared as NaNs, see _same_bits), window j of plane
    # p being window (p + j) mod 8^4: each one in every position of a row (every vector lane,
    # the overlapped blocks, the scalar rows); odd W drops a column
    v = torch.tensor(_WINDOW_VALUES, dtype=torch.int64)
    n = len(_WINDOW_VALUES) ** 4
    digits = torch.arange(n).unsqueeze(1) // torch.tensor([512, 64, 8, 1]) % 8  # (n, 4): a b c d
    win = v[digits][(torch.arange(n).unsqueeze(1) + torch.arange(ow)) % n]  # (plane, ow, 4)
    x = torch.zeros(n, 2, 2 * ow + 1, dtype=torch.int64)
    x[:, 0, :2 * ow] = win[..., :2].reshape(n, 2 * ow)
    x[:, 1, :2 * ow] = win[..., 2:].reshape(n, 2 * ow)
    x[:, :, -1] = 0x7FC30000  # the dropped column: a NaN the windows must not see
    x = x.to(torch.int32).view(torch.float32).view(1, n, 2, 2 * ow + 1)
    if dtype == torch.bfloat16:  # the high halves: the same values
        x = (x.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)
    y = P.max_pool2d_fwd(x, 2, relu)
    _same_bits(y, R.max_pool2d_fwd(x, 2, relu))
    g = torch.randn(y.shape).to(dtype)
    g.view(-1)[::5] = -0.0
    g.view(-1)[1::7] = float("inf")
    g.view(-1)[2::11] = -float("nan")
    ints = g.view(torch.int32 if dtype == torch.float32 else torch.int16).view(-1)
    ints[3::13] = 0x7F800001 if dtype == torch.float32 else 0x7F81  # signalling: 0 + g quiets
    dx = P.max_pool2d_bwd(g, x, 2, relu)
    _same_bits(dx, R.max_pool2d_bwd(g, x, 2, relu))
    if dtype == torch.bfloat16:  # the kernel's bfloat16 NaNs are the canonical 0x7FC0
        for t in (y, dx):
            assert bool((t.view(torch.int16)[t.isnan()] == 0x7FC0).all())


def test_max_pool2d_chunks_that_start_inside_a_plane(seed_all):
    # 75 output rows (5 planes of 15) over 2 and 3 threads: the chunks start inside planes
    threads = torch.get_num_threads()
    x = _pool_input(1, 5, 30, 30, torch.float32, True)
    g = torch.randn(1, 5, 15, 15)
    try:
        for n in (2, 3):
            torch.set_num_threads(n)
            for relu in (False, True):
                _same_bits(P.max_pool2d_fwd(x, 2, relu), R.max_pool2d_fwd(x, 2, relu))
                _same_bits(P.max_pool2d_bwd(g, x, 2, relu), R.max_pool2d_bwd(g, x, 2, relu))
    finally:
        torch.set_num_threads(threads)


def test_max_pool2d_public_op(seed_all):
    from faststeal.ops import max_pool2d
    x = torch.randn(3, 4, 9, 8, dtype=torch.float64, requires_grad=True)
    with use_backend("cpp"):
        assert torch.autograd.gradcheck(lambda t: max_pool2d(t, 2), (x,))
        assert torch.autograd.gradcheck(lambda t: max_pool2d(t, 3, relu=True), (x,))
        # channels-last input: F.max_pool2d runs and keeps the memory format
        xc = torch.randn(3, 4, 9, 8).contiguous(memory_format=torch.channels_last)
        for relu in (False, True):
            yc = max_pool2d(xc, 2, relu=relu)
            assert yc.is_contiguous(memory_format=torch.channels_last)
            want = torch.nn.functional.max_pool2d(xc.relu() if relu else xc, 2)
            torch.testing.assert_close(yc, want, rtol=0, atol=0)
    # off the CPU or under a backend without this op (triton, cuda): ATen's pooling runs, of
    # relu's output (a window [-1, -0; -2, -3] pools to +0 there, as in the kernel)
    x = torch.randn(2, 3, 6, 6)
    x[0, 0, :2, :2] = torch.tensor([[-1.0, -0.0], [-2.0, -3.0]])
    want = torch.nn.functional.max_pool2d(x.relu(), 2)
    for backend in ("cuda", "triton"):
        with use_backend(backend):
            y = max_pool2d(x, 2, relu=True)
        assert y.grad_fn is None
        _same_bits(y, want)
    _same_bits(max_pool2d(x, 2, relu=True), want)
    _same_bits(max_pool2d(x.contiguous(memory_format=torch.channels_last), 2, relu=True),
               want.contiguous(memory_format=torch.channels_last))
    for bad, err, msg in [((torch.randn(2, 3, 4), 2), ValueError, "x must be 4-D"),
                          ((torch.randn(1, 1, 4, 4), 0), ValueError, "kernel_size must be a "
                                                                       "positive int, got 0"),
                          ((torch.randn(1, 1, 4, 4), 2.0), ValueError, "kernel_size must be"),
                          ((torch.randn(1, 1, 3, 5), 4), ValueError, "at least kernel_size 4"),
                          ((torch.randn(1, 1, 4, 4), 2, 1), TypeError, "relu must be a bool"),
                          ((torch.zeros(1, 1, 4, 4, dtype=torch.long), 2), TypeError,
                           "x must be a floating tensor")]:
        with pytest.raises(err, match=msg):
            max_pool2d(*bad)


def test_check_max_pool2d():
    fwd, bwd = _ext.C.max_pool2d_fwd_cpu, _ext.C.max_pool2d_bwd_cpu
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(RuntimeError, match=r"max_pool2d_fwd_cpu: x must be 4-D, got 3-D"):
        fwd(x[0], 2)
    with pytest.raises(RuntimeError, match=r"max_pool2d_fwd_cpu: kernel_size must be >= 1, "
                                           r"got 0"):
        fwd(x, 0)
    with pytest.raises(RuntimeError, match=r"height and width .* must be at least kernel_size 7"):
        fwd(x, 7)
    with pytest.raises(RuntimeError, match=r"max_pool2d_fwd_cpu: x must be contiguous"):
        fwd(x.transpose(2, 3), 2)
    with pytest.raises(RuntimeError, match=r"max_pool2d_bwd_cpu: x must be 4-D, got 3-D"):
        bwd(torch.randn(2, 3, 3), x[0], 2, True)
    with pytest.raises(RuntimeError, match=r"max_pool2d_bwd_cpu: grad_y has sizes \[2, 3, 2, 2\], "
                                           r"expected the pooled output's \[2, 3, 3, 3\]"):
        bwd(torch.randn(2, 3, 2, 2), x, 2)
    with pytest.raises(RuntimeError, match=r"grad_y has dtype Double but x has dtype Float"):
        bwd(torch.randn(2, 3, 3, 3, dtype=torch.float64), x, 2)
    with pytest.raises(RuntimeError, match=r"x has dtype Half, expected one of Float, Double, "
                                           r"BFloat16"):
        fwd(x.half(), 2)


# ---------------------------------------------------------------------------------------------
# Public ops under the cpp backend: gradcheck (float64) and opcheck
# ---------------------------------------------------------------------------------------------

def _f64(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
def test_gradcheck_ensemble_linear(seed_all, activation, shared):
    from faststeal.ops import ensemble_linear
    x = _f64(3, 2) if shared else _f64(2, 3, 2)
    w, b = _f64(2, 3, 2), _f64(2, 3)
    with use_backend("cpp"):
        assert torch.autograd.gradcheck(
            lambda x, w, b: ensemble_linear(x, w, b, activation, 0.3, seed=11), (x, w, b))
        assert torch.autograd.gradcheck(
            lambda x, w: ensemble_linear(x, w, None, activation, 0.0, seed=0), (x, w))


@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
def test_gradcheck_bayes_linear(seed_all, shared):
    from faststeal.ops import bayes_linear
    x = _f64(4, 3) if shared else _f64(3, 4, 3)
    w_mu, w_rho, b_mu, b_rho = _f64(5, 3), _f64(5, 3), _f64(5), _f64(5)
    with use_backend("cpp"):
        assert torch.autograd.gradcheck(
            lambda *a: bayes_linear(*a, seed=4, samples=3), (x, w_mu, w_rho, b_mu, b_rho))


def test_gradcheck_gaussian_kl_and_xent(seed_all):
    from faststeal.ops import ensemble_cross_entropy, gaussian_kl
    mu, rho = _f64(3, 4), _f64(3, 4)
    logits = _f64(2, 5, 4)
    soft = torch.softmax(torch.randn(5, 4, dtype=torch.float64), -1)
    with use_backend("cpp"):
        assert torch.autograd.gradcheck(lambda m, r: gaussian_kl(m, r, 0.7), (mu, rho))
        assert torch.autograd.gradcheck(
            lambda lg: ensemble_cross_entropy(lg, torch.tensor([0, 3, 1, 1, 2])), (logits,))
        assert torch.autograd.gradcheck(lambda lg: ensemble_cross_entropy(lg, soft), (logits,))


def test_public_ops_use_cpp_backend(seed_all, monkeypatch):
    """The public ops are routed to this backend under use_backend('cpp') and under auto."""
    from faststeal.ops import dispatch, member_stats
    calls = []
    real = P.member_stats_fwd
    monkeypatch.setattr(P, "member_stats_fwd", lambda *a: calls.append(1) or real(*a))
    with use_backend("cpp"):
        assert dispatch.resolve("member_stats", "cpu") == "cpp"
        member_stats(torch.randn(2, 3, 4))
    with use_backend("auto"):
        assert dispatch.resolve("member_stats", "cpu") == "cpp"
    assert calls == [1]


@pytest.mark.parametrize("backend", ["cpp", "reference", "triton"])
@pytest.mark.parametrize("op", ["ensemble_linear", "bayes_linear"])
@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
def test_first_layer_backward_skips_dx(seed_all, monkeypatch, backend, op, shared):
    """An input that needs no gradient (a first layer) reaches the backend as need_dx=False and
    the weight/bias gradients are exactly those of the full backward."""
    from faststeal.ops import bayes_linear, dispatch, ensemble_linear
    reason = dispatch.unavailable_reason(backend, op, "cpu")
    if reason:
        pytest.skip(reason)
    mod = dispatch.backend_module(backend)
    seen = []
    real = getattr(mod, f"{op}_bwd")
    monkeypatch.setattr(mod, f"{op}_bwd", lambda *a: seen.append(a[-1]) or real(*a))
    S, B, K, N = 3, 7, 11, 5
    x = torch.randn(B, K) if shared else torch.randn(S, B, K)
    if op == "ensemble_linear":
        params = [torch.randn(S, N, K, requires_grad=True), torch.randn(S, N, requires_grad=True)]
        fn = lambda x_: ensemble_linear(x_, *params, activation="relu", dropout_p=0.2, seed=3)
    else:
        params = [torch.randn(N, K, requires_grad=True), torch.randn(N, K).sub(3).requires_grad_(),
                  torch.randn(N, requires_grad=True), torch.randn(N).sub(3).requires_grad_()]
        fn = lambda x_: bayes_linear(x_, *params, seed=3, samples=S)
    g = torch.randn(S, B, N)
    grads = {}
    with use_backend(backend):
        for needs in (True, False):
            x_ = x.clone().requires_grad_(needs)
            grads[needs] = torch.autograd.grad(fn(x_), params, g)
    assert seen == [True, False]
    for full, skipped in zip(grads[True], grads[False]):
        torch.testing.assert_close(skipped, full, rtol=0, atol=0)


def _opcheck_cases():
    f = torch.float64

    def r(*shape, grad=False):
        return torch.randn(*shape, dtype=f, requires_grad=grad)

    labels = torch.tensor([0, 2, 1, 1])
    y = r(2, 4, 5)
    ops = torch.ops.faststeal
    # (name, op, args); differentiable ops get inputs that require grad (autograd is checked).
    return [
        ("ensemble_linear", ops.ensemble_linear.default,
         (r(2, 4, 3, grad=True), r(2, 5, 3, grad=True), r(2, 5, grad=True), "gelu", 0.2, 3)),
        ("ensemble_linear_shared", ops.ensemble_linear.default,
         (r(4, 3, grad=True), r(2, 5, 3, grad=True), None, "relu", 0.0, 3)),
        ("ensemble_linear_first_layer", ops.ensemble_linear.default,
         (r(4, 3), r(2, 5, 3, grad=True), r(2, 5, grad=True), "relu", 0.2, 3)),
        ("ensemble_linear_backward", ops.ensemble_linear_backward.default,
         (y, r(2, 4, 3), r(2, 5, 3), r(2, 5), y, r(2, 4, 5), "gelu", 0.2, 3, True)),
        ("ensemble_linear_backward_no_dx", ops.ensemble_linear_backward.default,
         (y, r(2, 4, 3), r(2, 5, 3), r(2, 5), y, r(2, 4, 5), "gelu", 0.2, 3, False)),
        ("bayes_linear", ops.bayes_linear.default,
         (r(4, 3, grad=True), r(5, 3, grad=True), r(5, 3, grad=True), r(5, grad=True),
          r(5, grad=True), 2, 7)),
        ("bayes_linear_backward", ops.bayes_linear_backward.default,
         (r(2, 4, 5), r(2, 4, 3), r(5, 3), r(5, 3), r(5), r(5), 2, 7, True)),
        ("bayes_linear_backward_no_dx", ops.bayes_linear_backward.default,
         (r(2, 4, 5), r(4, 3), r(5, 3), r(5, 3), r(5), r(5), 2, 7, False)),
        ("gaussian_kl", ops.gaussian_kl.default, (r(5, 3, grad=True), r(5, 3, grad=True), 0.5)),
        ("gaussian_kl_backward", ops.gaussian_kl_backward.default,
         (torch.tensor(1.5, dtype=f), r(5, 3), r(5, 3), 0.5)),
        ("member_stats", ops.member_stats.default, (r(2, 4, 3), labels)),
        ("member_stats_notargets", ops.member_stats.default, (r(2, 4, 3), None)),
        ("ensemble_cross_entropy", ops.ensemble_cross_entropy.default,
         (r(2, 4, 3, grad=True), labels)),
        ("ensemble_cross_entropy_soft", ops.ensemble_cross_entropy.default,
         (r(2, 4, 3, grad=True), torch.softmax(r(4, 3), -1))),
        ("ensemble_cross_entropy_backward", ops.ensemble_cross_entropy_backward.default,
         (r(2), r(2, 4, 3), labels)),
        ("max_pool2d", ops.max_pool2d.default, (r(2, 3, 5, 6, grad=True), 2, False)),
        ("max_pool2d_relu", ops.max_pool2d.default, (r(2, 3, 5, 6, grad=True), 2, True)),
        ("max_pool2d_backward", ops.max_pool2d_backward.default,
         (r(2, 3, 2, 3), r(2, 3, 5, 6), 2, True)),
    ]


_OPCHECK_NAMES = [c[0] for c in _opcheck_cases()] if _ext.C is not None else []


@pytest.mark.parametrize("case", _OPCHECK_NAMES)
def test_opcheck_under_cpp_backend(seed_all, case):
    name, op, args = next(c for c in _opcheck_cases() if c[0] == case)
    with use_backend("cpp"):
        torch.library.opcheck(op, args)


def _route_cases():
    """(name, fn(*inputs) -> one output tensor, inputs): each differentiable public op, with
    inputs that need gradients."""
    from faststeal.ops import (bayes_linear, ensemble_cross_entropy, ensemble_linear, gaussian_kl,
                               max_pool2d)

    def r(*shape):
        return torch.randn(*shape, requires_grad=True)
    return [
        ("ensemble_linear", lambda x, w, b: ensemble_linear(x, w, b, "gelu", 0.2, seed=5),
         (r(3, 6, 4), r(3, 5, 4), r(3, 5))),
        ("ensemble_linear_first_layer", lambda w, b: ensemble_linear(
            torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), w, b, "relu"),
         (r(3, 5, 4), r(3, 5))),
        ("bayes_linear", lambda *a: bayes_linear(*a, seed=2, samples=3),
         (r(6, 4), r(5, 4), r(5, 4), r(5), r(5))),
        ("gaussian_kl", lambda m, rho: gaussian_kl(m, rho, 0.5), (r(5, 4), r(5, 4))),
        ("ensemble_cross_entropy", lambda lg: ensemble_cross_entropy(lg, torch.tensor([0, 2, 1])),
         (r(2, 3, 4),)),
        ("max_pool2d", lambda x: max_pool2d(x, 2), (r(2, 3, 6, 7),)),
        ("max_pool2d_relu", lambda x: max_pool2d(x, 2, relu=True), (r(2, 3, 6, 7),)),
    ]


_ROUTE_NAMES = [c[0] for c in _route_cases()]


@pytest.mark.parametrize("case", _ROUTE_NAMES)
def test_eager_twin_matches_the_custom_op(seed_all, monkeypatch, case):
    """In plain eager calls a public op runs its autograd.Function twin (faststeal/ops/_eager.py,
    no torch.library overhead); forced onto the custom op it gives bit-identical outputs and
    gradients, and neither route is differentiable twice."""
    from faststeal.ops import _eager
    _, fn, inputs = next(c for c in _route_cases() if c[0] == case)
    routes = {}
    with use_backend("cpp"):
        for route in ("twin", "custom_op"):
            if route == "custom_op":
                monkeypatch.setattr(_eager, "plain", lambda *t: False)
            out = fn(*inputs)
            is_op = type(out.grad_fn).__name__.startswith("GeneratedBackwardFor_faststeal_")
            assert is_op == (route == "custom_op"), type(out.grad_fn).__name__
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
            grads = torch.autograd.grad(out, inputs, g, create_graph=True)
            with pytest.raises(RuntimeError):
                torch.autograd.grad(grads[0].sum(), inputs)
            routes[route] = (out.detach(), [t.detach() for t in grads])
    (o1, g1), (o2, g2) = routes["twin"], routes["custom_op"]
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_traced_and_fake_calls_take_the_custom_op(seed_all):
    """Under a TorchDispatchMode (fake tensors, make_fx), a functorch transform or torch.compile
    the public ops are the registered custom op, so tracing sees one faststeal op."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from faststeal.ops import _eager, ensemble_linear
    x, w = torch.randn(3, 6, 4), torch.randn(3, 5, 4)
    assert _eager.plain(x, torch.nn.Parameter(w), None)
    with FakeTensorMode() as mode:
        fx, fw = mode.from_tensor(x), mode.from_tensor(w)
        assert not _eager.plain(fx, fw)
        assert ensemble_linear(fx, fw).shape == (3, 6, 5)  # fake kernel: no C++ call on fakes
    graph = make_fx(lambda a, b: ensemble_linear(a, b, activation="relu"))(x, w)
    targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert any("faststeal.ensemble_linear" in t for t in targets), targets
    compiled = torch.compile(lambda a, b: ensemble_linear(a, b, activation="relu"),
                             backend="eager", fullgraph=True)
    with use_backend("cpp"):
        torch.testing.assert_close(compiled(x, w), ensemble_linear(x, w, activation="relu"),
                                   rtol=0, atol=0)
        # torch.jit.trace records the custom op (the twin would be an untraceable Python node)
        traced = torch.jit.trace(lambda a, b: ensemble_linear(a, b, activation="relu"), (x, w))
        assert "faststeal::ensemble_linear" in str(traced.graph)
        torch.testing.assert_close(traced(x, w), ensemble_linear(x, w, activation="relu"),
                                   rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Input validation of the entry points (TORCH_CHECK messages name the argument)
# ---------------------------------------------------------------------------------------------

def _lin(S=2, B=3, K=4, N=5):
    return torch.randn(S, B, K), torch.randn(S, N, K), torch.randn(S, N)


def test_check_ensemble_linear_fwd():
    fwd = _ext.C.ensemble_linear_fwd_cpu
    x, w, b = _lin()
    with pytest.raises(RuntimeError, match=r"ensemble_linear_fwd_cpu: x must be 2-D or 3-D, got 4-D"):
        fwd(x[None], w, b, "none", 0.0, 0)
    with pytest.raises(RuntimeError, match=r"weight must be 3-D, got 2-D"):
        fwd(x, w[0], b, "none", 0.0, 0)
    with pytest.raises(RuntimeError, match=r"x has 3 members \(dim 0 of sizes \[3, 3, 4\]\) but "
                                           r"weight \(S, N, K\) has 2"):
        fwd(torch.randn(3, 3, 4), w, b, "none", 0.0, 0)
    with pytest.raises(RuntimeError, match=r"x has 6 input features .* but weight \(S, N, K\) has 4"):
        fwd(torch.randn(2, 3, 6), w, b, "none", 0.0, 0)
    with pytest.raises(RuntimeError, match=r"bias must be \(members, out_features\) = \(2, 5\), "
                                           r"got sizes \[2, 4\]"):
        fwd(x, w, torch.randn(2, 4), "none", 0.0, 0)
    with pytest.raises(RuntimeError, match=r"x has dtype Int, expected one of Float, Double, "
                                           r"BFloat16, Half"):
        fwd(x.int(), w.int(), b.int(), "none", 0.0, 0)
    with pytest.raises(RuntimeError, match=r"weight has dtype Double but x has dtype Float"):
        fwd(x, w.double(), b, "none", 0.0, 0)
    with pytest.raises(RuntimeError, match=r"x must be contiguous, got sizes \[2, 3, 4\]"):
        fwd(torch.randn(2, 4, 3).transpose(1, 2), w, b, "none", 0.0, 0)
    with pytest.raises(RuntimeError, match=r"activation must be 'none', 'relu' or 'gelu', got 'tanh'"):
        fwd(x, w, b, "tanh", 0.0, 0)
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\], got 1.5"):
        fwd(x, w, b, "none", 1.5, 0)
    with pytest.raises(RuntimeError, match=r"key must be a 32-bit key"):
        fwd(x, w, b, "none", 0.1, 2**32)
    with pytest.raises(RuntimeError, match=r"x must be a CPU tensor, got device meta"):
        fwd(x.to("meta"), w, b, "none", 0.0, 0)


def test_check_ensemble_linear_bwd():
    bwd = _ext.C.ensemble_linear_bwd_cpu
    x, w, b = _lin()
    y = torch.randn(2, 3, 5)
    with pytest.raises(RuntimeError, match=r"grad_y must be \(members, batch, out_features\) = "
                                           r"\(2, 3, 5\), got sizes \[2, 3, 4\]"):
        bwd(torch.randn(2, 3, 4), x, w, b, y, y, "relu", 0.0, 0)
    with pytest.raises(RuntimeError, match=r"z must be 3-D, got 1-D"):
        bwd(y, x, w, b, y, torch.empty(0), "gelu", 0.0, 0)
    with pytest.raises(RuntimeError, match=r"y must be contiguous"):
        bwd(y, x, w, b, torch.randn(5, 3, 2).permute(2, 1, 0), y, "relu", 0.0, 0)


def test_check_bayes_linear():
    fwd, bwd = _ext.C.bayes_linear_fwd_cpu, _ext.C.bayes_linear_bwd_cpu
    x, mu = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(RuntimeError, match=r"bayes_linear_fwd_cpu: w_rho must have w_mu's sizes"):
        fwd(x, mu, torch.randn(5, 3), None, None, 2, 1, 2)
    with pytest.raises(RuntimeError, match=r"x has 3 members .* but samples is 2"):
        fwd(torch.randn(3, 3, 4), mu, mu, None, None, 2, 1, 2)
    with pytest.raises(RuntimeError, match=r"x has 7 input features .* w_mu \(N, K\) has 4"):
        fwd(torch.randn(3, 7), mu, mu, None, None, 2, 1, 2)
    with pytest.raises(RuntimeError, match=r"b_mu and b_rho must both be given or both be None"):
        fwd(x, mu, mu, torch.randn(5), None, 2, 1, 2)
    with pytest.raises(RuntimeError, match=r"b_rho has 4 out features"):
        fwd(x, mu, mu, torch.randn(5), torch.randn(4), 2, 1, 2)
    with pytest.raises(RuntimeError, match=r"samples must be >= 1, got 0"):
        fwd(x, mu, mu, None, None, 0, 1, 2)
    with pytest.raises(RuntimeError, match=r"key_b must be a 32-bit key"):
        fwd(x, mu, mu, None, None, 2, 1, -1)
    with pytest.raises(RuntimeError, match=r"bayes_linear_bwd_cpu: grad_y must be \(samples, batch, "
                                           r"out_features\) = \(2, 3, 5\)"):
        bwd(torch.randn(2, 3, 4), x, mu, mu, None, None, 2, 1, 2)


def test_check_gaussian_kl():
    with pytest.raises(RuntimeError, match=r"gaussian_kl_fwd_cpu: rho must have mu's sizes \[3\]"):
        _ext.C.gaussian_kl_fwd_cpu(torch.randn(3), torch.randn(4), 1.0)
    with pytest.raises(RuntimeError, match=r"prior_sigma must be a positive finite number, got -1"):
        _ext.C.gaussian_kl_fwd_cpu(torch.randn(3), torch.randn(3), -1.0)
    with pytest.raises(RuntimeError, match=r"rho has dtype Double but mu has dtype Float"):
        _ext.C.gaussian_kl_fwd_cpu(torch.randn(3), torch.randn(3).double(), 1.0)
    with pytest.raises(RuntimeError, match=r"gaussian_kl_bwd_cpu: grad must be a scalar"):
        _ext.C.gaussian_kl_bwd_cpu(torch.ones(2), torch.randn(3), torch.randn(3), 1.0)


def test_check_member_stats():
    fn = _ext.C.member_stats_fwd_cpu
    with pytest.raises(RuntimeError, match=r"member_stats_fwd_cpu: logits must be 3-D, got 2-D"):
        fn(torch.randn(3, 4), None)
    with pytest.raises(RuntimeError, match=r"logits \(members, batch, classes\) must be non-empty"):
        fn(torch.randn(2, 0, 4), None)
    with pytest.raises(RuntimeError, match=r"targets has 2 rows but logits \(S, B, C\) has 3"):
        fn(torch.randn(2, 3, 4), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match=r"targets must be int64 class labels, got Int"):
        fn(torch.randn(2, 3, 4), torch.tensor([0, 1, 2], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"logits must be contiguous"):
        fn(torch.randn(2, 4, 3).transpose(1, 2), None)


def test_check_ensemble_cross_entropy():
    fwd, bwd = _ext.C.ensemble_cross_entropy_fwd_cpu, _ext.C.ensemble_cross_entropy_bwd_cpu
    logits = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match=r"hard target must be \(batch,\) = \(3,\)"):
        fwd(logits, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match=r"soft target must be \(batch, classes\) = \(3, 4\)"):
        fwd(logits, torch.rand(3, 5))
    with pytest.raises(RuntimeError, match=r"soft target has dtype Double but logits has dtype Float"):
        fwd(logits, torch.rand(3, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"target must be int64 labels or float probabilities, "
                                           r"got dtype Int"):
        fwd(logits, torch.tensor([0, 1, 2], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"ensemble_cross_entropy_bwd_cpu: grad must be "
                                           r"\(members,\) = \(2,\)"):
        bwd(torch.ones(3), logits, torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------------------------------------
# Backend module behaviour
# ---------------------------------------------------------------------------------------------

def test_unavailable_reason():
    assert P.unavailable_reason("cpu") is None
    assert "CPU tensors only" in P.unavailable_reason("cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_cpu_does_not_fall_back_to_reference(seed_all, monkeypatch, dtype):
    # before: bf16/fp16 CPU tensors silently ran the reference; now the C++ kernels take them
    def refuse(*a):
        raise AssertionError("the reference ran")

    for name in ("ensemble_linear_fwd", "ensemble_linear_bwd", "bayes_linear_fwd",
                 "member_stats_fwd", "ensemble_cross_entropy_fwd"):
        monkeypatch.setattr(R, name, refuse)
    x, w, b = (t.to(dtype) for t in linear_inputs(2, 3, 4, 5, False, True))
    y, z = P.ensemble_linear_fwd(x, w, b, "relu", 0.0, 0)
    assert y.dtype == dtype
    P.ensemble_linear_bwd(torch.ones_like(y), x, w, b, y, z, "relu", 0.0, 0)
    P.member_stats_fwd(y, None)
    P.ensemble_cross_entropy_fwd(y, torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------- bfloat16 / float16 on the CPU

LOWP = [torch.bfloat16, torch.float16]


def _lowp(*ts, dtype):
    return [None if t is None else t.to(dtype) for t in ts]


# bf16: every GEMM path (stacked and shared input) with relu, and the fused gelu/dropout and plain
# epilogues; fp16: the default path
LOWP_LINEAR = (
    [(torch.bfloat16, g, sh, "relu", 0.0) for g in GEMM_PATHS for sh in (False, True)]
    + [(torch.bfloat16, "default", sh, a, p) for sh in (False, True)
       for a, p in (("gelu", 0.25), ("none", 0.0))]
    + [(torch.float16, "default", sh, "relu", 0.25) for sh in (False, True)])


@pytest.mark.parametrize("dtype,gemm,shared,activation,dropout_p", LOWP_LINEAR)
def test_ensemble_linear_low_precision_runs_natively(seed_all, dtype, gemm, shared, activation,
                                                    dropout_p):
    # the C++ kernels take bfloat16/float16 for real (no fallback), every GEMM path; accuracy by
    # the flash-attention rule: vs the float32 reference, within 2x the error of the torch
    # composite computed in the same dtype
    from tolerances import assert_close_lowp

    x, w, b = linear_inputs(5, 67, 97, 33, shared, True)
    xl, wl, bl = _lowp(x, w, b, dtype=dtype)
    fwd = P.ensemble_linear_fwd if gemm == "default" else \
        P.variants("ensemble_linear", "fwd")[gemm]
    bwd = P.ensemble_linear_bwd if gemm == "default" else \
        P.variants("ensemble_linear", "bwd")[gemm]
    key = rng.rng_key(5, rng.STREAM_DROPOUT)
    y, z = fwd(xl, wl, bl, activation, dropout_p, key)
    assert y.dtype == dtype
    # the reference on the same (rounded) inputs, in float32 and in the low dtype
    x32, w32, b32 = (t.float() for t in (xl, wl, bl))
    y32, z32 = R.ensemble_linear_fwd(x32, w32, b32, activation, dropout_p, key)
    yc, zc = R.ensemble_linear_fwd(xl, wl, bl, activation, dropout_p, key)
    assert_close_lowp(y, y32, yc, "y")
    g = torch.randn_like(y32)
    got = bwd(g.to(dtype), xl, wl, bl, y, z, activation, dropout_p, key, True)
    want = R.ensemble_linear_bwd(g, x32, w32, b32, y32, z32, activation, dropout_p, key)
    comp = R.ensemble_linear_bwd(g.to(dtype), xl, wl, bl, yc, zc, activation, dropout_p, key)
    for name, a, e, c in zip(("dx", "dweight", "dbias"), got, want, comp):
        assert a.dtype == dtype, name
        assert_close_lowp(a, e, c, name)


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
def test_upcast_gemm_path_multiplies_in_float32(seed_all, dtype, shared, autocast):
    # cpp:upcast: bit for bit the float32 torch.baddbmm of the operands, rounded once to the
    # input dtype (then relu) — not the bfloat16/float16 GEMM of cpp:bmm; also inside
    # torch.autocast, where bf16 training calls it (autocast must not cast the operands back)
    x, w, b = _lowp(*linear_inputs(5, 33, 97, 65, shared, True), dtype=dtype)
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):
        y, _ = P.variants("ensemble_linear", "fwd")["upcast"](x, w, b, "relu", 0.0, 0)
    xs = x.float().unsqueeze(0).expand(5, -1, -1) if shared else x.float()
    want = torch.baddbmm(b.float().unsqueeze(1), xs, w.float().transpose(1, 2))
    assert y.dtype == dtype
    assert torch.equal(y, want.to(dtype).relu())
    # the dispatch times it for these dtypes only (for float32 it would be cpp:bmm again)
    assert P.variant_applies("upcast", (x,))
    assert not P.variant_applies("upcast", (x.float(),))


def _gemm_dtypes():
    """A TorchDispatchMode recording the dtype of every ATen GEMM the C++ ops call (``.seen``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten

    class GemmDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (aten.mm, aten.bmm):
                self.seen.add(args[0].dtype)
            elif func.overloadpacket in (aten.baddbmm, aten.addmm):
                self.seen.add(args[1].dtype)  # args[0] is the bias
            return func(*args, **(kwargs or {}))

    return GemmDtypes()


@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
def test_upcast_gemm_path_backward_multiplies_in_float32(seed_all, shared):
    # every GEMM of the backward (the stacked one through stacked_linear, the shared-input one
    # through detail::mm) gets float32 operands on cpp:upcast, bfloat16 ones on cpp:bmm
    x, w, b = _lowp(*linear_inputs(3, 17, 40, 24, shared, True), dtype=torch.bfloat16)
    y, z = P.ensemble_linear_fwd(x, w, b, "none", 0.0, 0)
    g = torch.randn_like(y)
    for path, want in (("upcast", {torch.float32}), ("bmm", {torch.bfloat16})):
        with _gemm_dtypes() as mode:
            P.variants("ensemble_linear", "bwd")[path](g, x, w, b, y, z, "none", 0.0, 0, True)
        assert mode.seen == want, path


@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
def test_default_gemm_rule_multiplies_bf16_as_float32_where_onednn_cannot(seed_all, shared):
    # without tuning (the extension's default rule): bfloat16 is multiplied as float32 where
    # this CPU's oneDNN has no bfloat16 (no AVX512-BF16/AMX), in bfloat16 where it has
    x, w, b = _lowp(*linear_inputs(3, 17, 70, 24, shared, True), dtype=torch.bfloat16)
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    with _gemm_dtypes() as mode:
        y, z = P.ensemble_linear_fwd(x, w, b, "none", 0.0, 0)
        P.ensemble_linear_bwd(torch.randn_like(y), x, w, b, y, z, "none", 0.0, 0, True)
    # the native default for bfloat16 is at::bmm in bfloat16 (its oneDNN rule is float32 only)
    assert mode.seen == ({torch.bfloat16} if native else {torch.float32})
    # bayes_linear's GEMMs (weights sampled in float32, multiplied in x's dtype) follow it too
    w_mu, w_rho = _lowp(torch.randn(24, 70) / 70**0.5, torch.randn(24, 70) - 3.0,
                        dtype=torch.bfloat16)
    with _gemm_dtypes() as mode:
        yb = P.bayes_linear_fwd(x, w_mu, w_rho, None, None, 3, 1, 2)
        P.bayes_linear_bwd(torch.randn_like(yb), x, w_mu, w_rho, None, None, 3, 1, 2, True)
    assert mode.seen == ({torch.bfloat16} if native else {torch.float32})


def test_onednn_path_runs_bfloat16_on_every_cpu(seed_all):
    # where this CPU's oneDNN cannot multiply bfloat16 (no AVX512-BF16/AMX: it throws "could
    # not create a primitive descriptor"), cpp:onednn runs at::bmm for the call; the dispatch
    # then does not time it
    x, w, b = _lowp(*linear_inputs(3, 17, 40, 24, False, True), dtype=torch.bfloat16)
    y, _ = P.variants("ensemble_linear", "fwd")["onednn"](x, w, b, "none", 0.0, 0)
    y_bmm, _ = P.variants("ensemble_linear", "fwd")["bmm"](x, w, b, "none", 0.0, 0)
    supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert P.variant_applies("onednn", (x,)) == supported
    if not supported:
        assert torch.equal(y, y_bmm)
    else:
        assert_close(y.float(), y_bmm.float(), torch.bfloat16, "y")
    # not by a caught failure: that would turn oneDNN off for float32 too, for the process
    assert "failed earlier" not in _ext.C._cpu_gemm_library()


@pytest.mark.parametrize("dtype", LOWP, ids=["bf16", "fp16"])
@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
def test_bayes_linear_low_precision_runs_natively(seed_all, dtype, shared):
    from tolerances import assert_close_lowp

    S, B, K, N = 4, 37, 70, 21
    x = torch.randn(B, K) if shared else torch.randn(S, B, K)
    mu, rho = 0.1 * torch.randn(N, K), torch.randn(N, K) - 3
    bmu, brho = 0.1 * torch.randn(N), torch.randn(N) - 3
    lo = _lowp(x, mu, rho, bmu, brho, dtype=dtype)
    hi = [t.float() for t in lo]
    y = P.bayes_linear_fwd(*lo, S, 11, 12)
    assert y.dtype == dtype
    y32 = R.bayes_linear_fwd(*hi, S, 11, 12)
    yc = R.bayes_linear_fwd(*lo, S, 11, 12)
    assert_close_lowp(y, y32, yc, "y")
    g = torch.randn_like(y32)
    got = P.bayes_linear_bwd(g.to(dtype), *lo, S, 11, 12, True)
    want = R.bayes_linear_bwd(g, *hi, S, 11, 12, True)
    comp = R.bayes_linear_bwd(g.to(dtype), *lo, S, 11, 12, True)
    for name, a, e, c in zip(("dx", "dw_mu", "dw_rho", "db_mu", "db_rho"), got, want, comp):
        assert a.dtype == dtype, name
        assert_close_lowp(a, e, c, name)


@pytest.mark.parametrize("dtype", LOWP, ids=["bf16", "fp16"])
def test_reductions_take_low_precision_logits(seed_all, dtype):
    from tolerances import assert_close_lowp

    logits = (3 * torch.randn(5, 97, 10)).to(dtype)
    t = torch.randint(0, 10, (97,))
    ce = P.ensemble_cross_entropy_fwd(logits, t)
    assert ce.dtype == torch.float32
    assert_close_lowp(ce, R.ensemble_cross_entropy_fwd(logits.float(), t),
                      R.ensemble_cross_entropy_fwd(logits, t).to(dtype), "loss")
    g = torch.rand(5)
    d = P.ensemble_cross_entropy_bwd(g, logits, t)
    assert d.dtype == dtype
    assert_close_lowp(d, R.ensemble_cross_entropy_bwd(g, logits.float(), t),
                      R.ensemble_cross_entropy_bwd(g, logits, t), "dlogits")
    st = P.member_stats_fwd(logits, t)
    ref = R.member_stats_fwd(logits.float(), t)
    for name in ("mean_probs", "variance", "mutual_info"):
        assert getattr(st, name).dtype == torch.float32
        assert_close(getattr(st, name), getattr(ref, name), what=name)
    assert torch.equal(st.pred, ref.pred)
    mu, rho = torch.randn(40, 7).to(dtype), (torch.randn(40, 7) - 2).to(dtype)
    kl = P.gaussian_kl_fwd(mu, rho, 0.5)
    assert_close(kl, R.gaussian_kl_fwd(mu.float(), rho.float(), 0.5), what="kl")
