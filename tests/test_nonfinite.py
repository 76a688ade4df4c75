"""Non-finite values never become plausible numbers (issue 12).

Every op on every backend gives exactly what the reference gives for NaN, +-inf, +-1e38, huge
logit gaps and the sign-bit NaN (x86's inf - inf): the same NaN positions, the same infinities,
finite values within the usual tolerance. Mutual information and variance are >= 0, labels
outside [0, C) raise, a NaN/inf prior_sigma is rejected, and above the ops a surrogate whose
predictions hold NaN/inf raises an error naming the method, the seed and the members instead of
being averaged into a fidelity. Backends: cpp and triton (under the interpreter without a GPU),
plus cuda and triton on a GPU when there is one.
"""

from __future__ import annotations

import pytest
import torch

from faststeal import _ext, active, attack, metrics
from faststeal import ops
from faststeal.methods import build_method
from faststeal.ops import dispatch, reference as R, use_backend
from tolerances import TOL
from toydata import prototype_data

NAN, INF = float("nan"), float("inf")
# A NaN with the sign bit set, as x86 makes for inf - inf (0xFFC00000); torch.neg flips the bit
# on every platform.
NEG_NAN = torch.tensor(NAN).neg().item()

CASES = [("cpp", "cpu"), ("triton", "cpu")]
if torch.cuda.is_available():
    CASES += [("cuda", "cuda"), ("triton", "cuda")]


def _backend(backend: str, device: str) -> None:
    reason = dispatch.unavailable_reason(backend, "member_stats", device)
    if reason:
        pytest.skip(reason)


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Exactly the reference's NaN positions and infinities; finite values within TOL."""
    got, want = got.detach().cpu(), want.detach().cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not want.dtype.is_floating_point:
        assert torch.equal(got, want), f"{what}: {got.tolist()} != {want.tolist()}"
        return
    nan_diff = (got.isnan() != want.isnan()).nonzero().tolist()
    assert not nan_diff, (f"{what}: NaN positions differ at {nan_diff[:5]}: got "
                          f"{got[tuple(torch.tensor(nan_diff[0]))].item()} want "
                          f"{want[tuple(torch.tensor(nan_diff[0]))].item()}")
    atol, rtol = TOL[want.dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def test_neg_nan_has_the_sign_bit():
    bits = torch.tensor([NEG_NAN]).view(torch.int32).item()
    assert bits < 0 and torch.tensor(NEG_NAN).isnan()


# ---------------------------------------------------------------------------------------------
# member_stats
# ---------------------------------------------------------------------------------------------

S, C = 3, 5


def stats_rows() -> tuple[list[str], torch.Tensor]:
    """(S, B, C) float32 logits, one batch row per case, the special values in some members."""
    g = torch.Generator().manual_seed(0)
    rows: dict[str, torch.Tensor] = {}

    def case(name, edit):
        x = torch.randn(S, C, generator=g)
        edit(x)
        rows[name] = x

    case("finite", lambda x: None)
    case("nan", lambda x: x[1].__setitem__(2, NAN))
    case("sign-bit nan", lambda x: x[1].__setitem__(0, NEG_NAN))
    case("member all nan", lambda x: x[0].fill_(NAN))
    case("+inf", lambda x: x[0].__setitem__(1, INF))
    case("two +inf", lambda x: (x[2].__setitem__(1, INF), x[2].__setitem__(4, INF)))
    case("-inf", lambda x: x[2].__setitem__(3, -INF))
    case("-inf in every member", lambda x: x[:, 0].fill_(-INF))
    case("+inf and -inf", lambda x: (x[0].__setitem__(1, INF), x[0].__setitem__(3, -INF)))
    case("member all -inf", lambda x: x[2].fill_(-INF))
    case("gap 3e38", lambda x: x.copy_(torch.tensor([0.0] + [-3e38] * (C - 1)).expand(S, C)))
    case("+-1e38", lambda x: (x[0].__setitem__(2, 1e38), x[0].__setitem__(0, -1e38)))
    case("overflowing gap", lambda x: (x[1].__setitem__(2, 3e38), x[1].__setitem__(0, -3e38)))
    case("identical members", lambda x: x.copy_(x[0].expand(S, C)))
    return list(rows), torch.stack(list(rows.values()), 1)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_member_stats_nonfinite_rows_match_reference(backend, device, dtype):
    _backend(backend, device)
    names, logits = stats_rows()
    logits = logits.to(device=device, dtype=dtype)
    targets = torch.arange(logits.shape[1], device=device) % C
    want = R.member_stats_fwd(logits, targets)
    with use_backend(backend):
        got = ops.member_stats(logits, targets)
    for field in R.MemberStats._fields:
        g, w = getattr(got, field), getattr(want, field)
        if field == "member_correct":
            assert_same(g, w, field)
            continue
        for i, name in enumerate(names):
            assert_same(g[i], w[i], f"{backend} {dtype} {field} row '{name}'")
    pred = got.pred.cpu()
    assert bool(((pred >= 0) & (pred < C)).all()), f"pred out of range: {pred.tolist()}"
    for field in ("mutual_info", "variance"):
        v = getattr(got, field).cpu()
        assert bool((v[~v.isnan()] >= 0).all()), f"{field} < 0: {v.tolist()}"


def test_reference_member_stats_nonfinite_semantics():
    """What the reference (and so every backend) defines: NaN/+inf members make the row NaN
    with argmax 0; a -inf logit or an overflowing gap is a probability-0 class adding 0 to the
    entropies; finite rows stay finite."""
    names, logits = stats_rows()
    st = R.member_stats_fwd(logits, None)
    row = {n: i for i, n in enumerate(names)}
    nan_rows = ["nan", "sign-bit nan", "member all nan", "+inf", "two +inf", "+inf and -inf",
                "member all -inf"]
    for n in nan_rows:
        i = row[n]
        assert bool(st.mean_probs[i].isnan().all()), n
        for f in ("variance", "entropy_of_mean", "mean_entropy", "mutual_info"):
            assert getattr(st, f)[i].isnan(), (n, f)
        assert st.pred[i] == 0, n
    for n in set(names) - set(nan_rows):
        i = row[n]
        for f in ("mean_probs", "variance", "entropy_of_mean", "mean_entropy", "mutual_info"):
            assert bool(getattr(st, f)[i].isfinite().all()), (n, f)
    i = row["gap 3e38"]
    assert st.mean_entropy[i] == 0 and st.entropy_of_mean[i] == 0 and st.mutual_info[i] == 0


@pytest.mark.parametrize("backend,device", CASES)
def test_member_stats_diverged_member_is_nan_not_probabilities(backend, device):
    """A member that diverged to NaN (the sign-bit NaN of inf - inf included) gives NaN mean
    probabilities, not finite ones such as [0.589, 0.234, 0.177]."""
    _backend(backend, device)
    inf = torch.tensor(INF)
    logits = torch.tensor([[[2.0, 1.0, 0.5]], [[0.0, 0.0, 0.0]]]).to(device)
    logits[1, 0] = (inf - inf).item()  # x86: 0xFFC00000
    logits[1, 0, 0] = NEG_NAN
    with use_backend(backend):
        st = ops.member_stats(logits)
    assert bool(st.mean_probs.isnan().all()), st.mean_probs
    assert st.entropy_of_mean.isnan().all() and st.mean_entropy.isnan().all()
    assert st.pred.item() == 0  # the reference's (torch.argmax's) first NaN, never the block width


@pytest.mark.parametrize("backend,device", CASES)
def test_member_stats_large_gap_entropy_is_zero(backend, device):
    """[0, -3e38, -3e38] is one-hot: every entropy is 0 (was 9.87 on the C++ backend)."""
    _backend(backend, device)
    logits = torch.tensor([0.0, -3e38, -3e38]).expand(4, 2, 3).contiguous().to(device)
    with use_backend(backend):
        st = ops.member_stats(logits)
    for f in ("entropy_of_mean", "mean_entropy", "mutual_info", "variance"):
        assert torch.equal(getattr(st, f).cpu().abs(), torch.zeros(2)), (f, getattr(st, f))
    assert torch.equal(st.pred.cpu(), torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize("backend,device", CASES + [("reference", "cpu")])
def test_member_stats_mutual_info_nonnegative_for_identical_members(backend, device):
    """Identical members have MI 0; rounding made it -7e-7. It is clamped at 0 everywhere."""
    _backend(backend, device)
    one = torch.randn(1, 256, 10, generator=torch.Generator().manual_seed(5)) * 3
    logits = one.expand(4, -1, -1).contiguous().to(device)
    with use_backend(backend):
        st = ops.member_stats(logits)
    assert float(st.mutual_info.min()) >= 0.0
    assert float(st.variance.min()) >= 0.0
    assert float(st.mutual_info.max()) < 1e-5


@pytest.mark.parametrize("backend,device", CASES + [("reference", "cpu")])
@pytest.mark.parametrize("bad", [5, -1, 99])
def test_member_stats_rejects_out_of_range_targets(backend, device, bad):
    _backend(backend, device)
    logits = torch.randn(2, 4, C, device=device)
    targets = torch.tensor([0, 1, bad, 3], device=device)
    with use_backend(backend), pytest.raises(
            ValueError, match=rf"targets\[2\] = {bad} is not a class index in \[0, {C}\)"):
        ops.member_stats(logits, targets)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_ensemble_xent_rejects_out_of_range_labels_on_cpu(backend):
    _backend(backend, "cpu")
    with use_backend(backend), pytest.raises(
            ValueError, match=r"target\[1\] = 3 is not a class index in \[0, 3\)"):
        ops.ensemble_cross_entropy(torch.randn(2, 4, 3), torch.tensor([0, 3, 1, 2]))


@pytest.mark.skipif(_ext.C is None, reason="faststeal._C is not built")
def test_cpp_member_stats_checks_target_range():
    logits = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match=r"member_stats_fwd_cpu: targets\[1\] = 4 is not a "
                                           r"class index in \[0, 4\)"):
        _ext.C.member_stats_fwd_cpu(logits, torch.tensor([0, 4, 1]))
    with pytest.raises(RuntimeError, match=r"targets\[0\] = -2 is not a class index"):
        _ext.C.member_stats_fwd_cpu(logits, torch.tensor([-2, 0, 1]))


# ---------------------------------------------------------------------------------------------
# ensemble_cross_entropy
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_ensemble_xent_nonfinite_rows_match_reference(backend, device, soft):
    """Each special row alone (the loss is a mean over rows): loss and gradient."""
    _backend(backend, device)
    names, logits = stats_rows()
    b = logits.shape[1]
    if soft:
        target = torch.softmax(torch.randn(b, C, generator=torch.Generator().manual_seed(1)), -1)
    else:
        target = torch.tensor([1, 2, 0, 1, 3, 0, 2, 0, 2, 0, 1, 2, 1, 4])[:b]
    for i, name in enumerate(names):
        lg = logits[:, i:i + 1].contiguous().to(device)
        tg = target[i:i + 1].to(device)
        with use_backend("reference"):
            lr = lg.clone().requires_grad_()
            want = ops.ensemble_cross_entropy(lr, tg)
            want.sum().backward()
        with use_backend(backend):
            lb = lg.clone().requires_grad_()
            got = ops.ensemble_cross_entropy(lb, tg)
            got.sum().backward()
        assert_same(got, want, f"{backend} loss row '{name}'")
        assert_same(lb.grad, lr.grad, f"{backend} dlogits row '{name}'")


# ---------------------------------------------------------------------------------------------
# ensemble_linear
# ---------------------------------------------------------------------------------------------

SPECIALS = [NAN, NEG_NAN, INF, -INF, 1e38, -1e38]


def _run_linear(backend, x, w, b, activation, p):
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    with use_backend(backend):
        y = ops.ensemble_linear(x, w, b, activation, p, seed=7)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(y)
        gy.view(-1)[3] = NAN  # a NaN gradient must propagate too (nan * 0 is nan)
        y.backward(gy)
    return y, x.grad, w.grad, b.grad


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
@pytest.mark.parametrize("K", [8, 64], ids=["K8", "K64"])  # K >= 64: the oneDNN GEMM (cpp)
def test_ensemble_linear_nonfinite_matches_reference(backend, device, activation, dropout_p, K):
    _backend(backend, device)
    g = torch.Generator().manual_seed(2)
    n_s, n_b, n_n = 3, 4, 6
    x0 = torch.randn(n_s, n_b, K, generator=g)
    w0 = torch.randn(n_s, n_n, K, generator=g) * 0.1
    b0 = torch.randn(n_s, n_n, generator=g)
    # Each special value at its own (member, row) of x / (member, column) of the bias, so the
    # forward outputs stay separate (few launches: the interpreter is slow); the weight holds
    # one value per member.
    x_sp, b_sp = x0.clone(), b0.clone()
    for i, v in enumerate(SPECIALS):
        x_sp[i % n_s, i // n_s, i % K] = v
        b_sp[i % n_s, i // n_s] = v
    w_sp = [w0.clone(), w0.clone()]
    for i, v in enumerate(SPECIALS):
        w_sp[i // n_s][i % n_s, i % n_n, 3] = v
    x_inf = x0.clone()
    x_inf[0, 0] = INF  # + and - weights: inf - inf inside the GEMM
    cases = [("x specials", x_sp, w0, b0), ("bias specials", x0, w0, b_sp),
             ("w specials 1", x0, w_sp[0], b0), ("w specials 2", x0, w_sp[1], b0),
             ("x row of +inf", x_inf, w0, b0)]
    for name, x, w, b in cases:
        x, w, b = x.to(device), w.to(device), b.to(device)
        want = _run_linear("reference", x, w, b, activation, dropout_p)
        got = _run_linear(backend, x, w, b, activation, dropout_p)
        for what, gt, wt in zip(("y", "dx", "dw", "db"), got, want):
            assert_same(gt, wt, f"{backend} {activation} p={dropout_p} K={K} {name}: {what}")


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("K", [8, 64], ids=["K8", "K64"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
@pytest.mark.parametrize("nan", [NAN, NEG_NAN], ids=["nan", "sign-bit-nan"])
def test_ensemble_linear_relu_keeps_nan(backend, device, K, dropout_p, nan):
    """relu(NaN) is NaN as with torch.relu: the fused oneDNN relu (float32, K >= 64) and the
    dropout path's bit-mask relu (for the sign-bit NaN) made it 0."""
    _backend(backend, device)
    x = torch.randn(2, 3, K, device=device)
    w = torch.randn(2, 4, K, device=device)
    bias = torch.zeros(2, 4, device=device)
    bias[1, 2] = nan  # pre-activation of member 1, column 2 is NaN for every row
    x[0, 1, 0] = nan  # member 0, row 1 is NaN in every column
    with use_backend(backend):
        y = ops.ensemble_linear(x, w, bias, "relu", dropout_p, seed=3)
    want = torch.zeros(2, 3, 4, dtype=torch.bool)
    want[1, :, 2] = True
    want[0, 1, :] = True
    assert torch.equal(y.isnan().cpu(), want), y


# ---------------------------------------------------------------------------------------------
# bayes_linear and gaussian_kl
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", CASES)
def test_bayes_linear_nonfinite_matches_reference(backend, device):
    _backend(backend, device)
    g = torch.Generator().manual_seed(3)
    values = SPECIALS + [-110.0]  # softplus(-110) underflows to 0: finite in, finite out
    n_b = n_n = len(values)
    k, samples = 8, 2
    base = dict(x=torch.randn(n_b, k, generator=g), w_mu=torch.randn(n_n, k, generator=g) * 0.1,
                w_rho=torch.full((n_n, k), -3.0), b_mu=torch.randn(n_n, generator=g),
                b_rho=torch.full((n_n,), -3.0))
    cases = []
    for arg in ("x", "w_mu", "w_rho", "b_rho"):  # value i in row i: forward rows stay separate
        c = dict(base)
        c[arg] = base[arg].clone()
        for i, v in enumerate(values):
            if c[arg].dim() == 2:
                c[arg][i, i % k] = v
            else:
                c[arg][i] = v
        cases.append((f"{arg} specials", c))
    for name, c in cases:
        res = {}
        for be in ("reference", backend):
            t = {k_: v_.to(device).clone().requires_grad_() for k_, v_ in c.items()}
            with use_backend(be):
                y = ops.bayes_linear(t["x"], t["w_mu"], t["w_rho"], t["b_mu"], t["b_rho"],
                                     seed=11, samples=samples)
                y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(y))
            res[be] = [y] + [t[k_].grad for k_ in ("x", "w_mu", "w_rho", "b_mu", "b_rho")]
        for what, gt, wt in zip(("y", "dx", "dw_mu", "dw_rho", "db_mu", "db_rho"),
                                res[backend], res["reference"]):
            assert_same(gt, wt, f"{backend} bayes_linear {name}: {what}")


def test_reference_bayes_linear_grad_finite_where_softplus_underflows():
    """rho = -110 is finite, softplus(rho) is 0 in float32: the reference recovered eps as
    (w - mu) / softplus(rho) = 0/0 and gave NaN gradients."""
    x = torch.randn(3, 4)
    mu = torch.randn(2, 4)
    rho = torch.full((2, 4), -110.0)
    _, dmu, drho, _, _ = R.bayes_linear_bwd(torch.ones(2, 3, 2), x, mu, rho, None, None, 2, 1, 2)
    assert bool(dmu.isfinite().all()) and bool(drho.isfinite().all()), drho


@pytest.mark.parametrize("backend,device", CASES)
def test_gaussian_kl_nonfinite_matches_reference(backend, device):
    _backend(backend, device)
    for role in ("mu", "rho"):
        for v in SPECIALS + [-110.0, 30.0]:
            for ps in (1.0, 0.1):
                out = {}
                for be in ("reference", backend):
                    mu = torch.full((7,), 0.3, device=device)
                    rho = torch.full((7,), -2.0, device=device)
                    (mu if role == "mu" else rho)[3] = v
                    mu.requires_grad_()
                    rho.requires_grad_()
                    with use_backend(be):
                        kl = ops.gaussian_kl(mu, rho, ps)
                        kl.backward(torch.tensor(1.5, device=device))
                    out[be] = (kl, mu.grad, rho.grad)
                for what, gt, wt in zip(("kl", "dmu", "drho"), out[backend], out["reference"]):
                    assert_same(gt, wt, f"{backend} gaussian_kl {role}={v} ps={ps}: {what}")


@pytest.mark.parametrize("value", [NAN, INF, -1.0, 0.0])
def test_gaussian_kl_rejects_nonfinite_prior_sigma(value):
    mu, rho = torch.zeros(3), torch.zeros(3)
    with pytest.raises(ValueError, match=r"prior_sigma must be a positive finite float, got"):
        ops.gaussian_kl(mu, rho, value)
    from faststeal.nn import BayesLinear
    with pytest.raises(ValueError, match=r"prior_sigma must be a positive finite float"):
        BayesLinear(3, 2, prior_sigma=value)


@pytest.mark.skipif(_ext.C is None, reason="faststeal._C is not built")
@pytest.mark.parametrize("value", [NAN, INF])
def test_cpp_gaussian_kl_rejects_nonfinite_prior_sigma(value):
    with pytest.raises(RuntimeError, match=r"gaussian_kl_fwd_cpu: prior_sigma must be a positive "
                                           r"finite number, got"):
        _ext.C.gaussian_kl_fwd_cpu(torch.zeros(3), torch.zeros(3), value)


# ---------------------------------------------------------------------------------------------
# Above the ops: a diverged surrogate is an error, never a fidelity
# ---------------------------------------------------------------------------------------------

X, Y = prototype_data(64, 1, (1, 8, 8), 10)
XT, YT = prototype_data(40, 2, (1, 8, 8), 10)


def _nan_member(method, member: int) -> None:
    """Set every weight of ``member`` of a stacked (members-first) model to NaN."""
    with torch.no_grad():
        for p in method.model.parameters():
            if p.dim() >= 1 and p.shape[0] == method.num_members:
                p[member] = NAN


def test_train_and_evaluate_reports_diverged_member(monkeypatch):
    build = attack.build_method

    def build_then_diverge(*args, **kw):
        m = build(*args, **kw)
        fit = m.fit

        def fit_then_nan(*a, **k):
            out = fit(*a, **k)
            _nan_member(m, 1)
            return out
        m.fit = fit_then_nan
        return m

    monkeypatch.setattr(attack, "build_method", build_then_diverge)
    with pytest.raises(attack.NonFiniteError,
                       match=r"deep-ensemble \(seed 3\): member\(s\) \[1\] of 3 produced "
                             r"non-finite"):
        attack.train_and_evaluate(
            "deep-ensemble", "mlp", X, Y, test_x=XT, test_y=YT, victim_labels=YT,
            victim_probs=None, num_classes=10, seed=3, epochs=1, batch_size=32, lr=1e-3,
            device="cpu", hparams={"members": 3}, progress=False)


def test_metrics_evaluate_refuses_nonfinite_predictions():
    logits = torch.randn(3, 5, 4)
    labels = torch.zeros(5, dtype=torch.int64)
    logits[2, 1, 0] = NEG_NAN
    with pytest.raises(metrics.NonFiniteError,
                       match=r"mc-dropout \(seed 4\): member\(s\) \[2\] of 3 produced non-finite"):
        metrics.evaluate(logits, labels, labels, who="mc-dropout (seed 4)")
    logits[2, 1, 0] = INF
    with pytest.raises(metrics.NonFiniteError, match=r"member\(s\) \[2\]"):
        metrics.evaluate(logits, labels, labels)


def test_active_evaluation_reports_diverged_surrogate():
    m = build_method("deep-ensemble", "mlp", (1, 8, 8), 10, seed=5, device="cpu", members=2)
    m.fit(X, Y, epochs=1, batch_size=32, lr=1e-3, progress=False)
    _nan_member(m, 0)
    with pytest.raises(metrics.NonFiniteError,
                       match=r"deep-ensemble \(seed 5\): member\(s\) \[0\]"):
        active.evaluate_surrogate(m, XT, YT, YT, who="deep-ensemble (seed 5)")
