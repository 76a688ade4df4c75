"""UQ methods: one shared behaviour class run for all six methods, then method-specific checks
against quantities computed independently here (closed forms, autograd, dense linear algebra,
hand-computed moments).

Data: 10 Gaussian class prototypes on 1x8x8 "images" plus noise — learnable in two epochs by
the zoo's MLP, so the whole file stays small on two shared CPU cores.
"""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from faststeal.methods import METHODS, UQ_METHODS, build_method
from faststeal.methods.base import STREAM_PREDICT, member_loss_sum, subseed
from toydata import prototype_data
from faststeal.nn import EnsembleBatchNorm

SHAPE = (1, 8, 8)
C = 10


pytestmark = pytest.mark.usefixtures("one_thread")


def make_data(n: int, seed: int, noise: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    return prototype_data(n, seed, SHAPE, C, noise)


X, Y = make_data(320, 1)
XT, YT = make_data(200, 2)
PROBE = XT[:64]

# Smaller prediction-time S than the defaults, to keep the file fast; S > 1 everywhere but the
# baseline. SWAG collects every 2 steps from step 10 of 20: snapshots 10, 12, ..., 20.
TEST_HP = {
    "baseline": {},
    "deep-ensemble": {"members": 3},
    "mc-dropout": {"members": 6},
    "bbb": {"members": 6},
    "swag": {"members": 6, "rank": 4, "collect_every": 2, "swa_start": 0.5},
    "laplace": {"members": 6},
    # The diversity-keeping variants of faststeal.methods.diverse (docs/studies.md).
    "bootstrap-ensemble": {"members": 3},
    "hetero-ensemble": {"members": 3},
    "hparam-ensemble": {"members": 3},
    "ncl-ensemble": {"members": 3},
    "repulsive-ensemble": {"members": 3},
}
EXPECTED_S = {name: hp.get("members", hp.get("samples", 1)) for name, hp in TEST_HP.items()}
FIT = dict(epochs=2, batch_size=32, lr=3e-3, record_every=5, progress=False)  # 10 steps/epoch


def make(name: str, arch: str = "mlp", seed: int = 0, **kw):
    return build_method(name, arch, SHAPE, C, seed=seed, **{**TEST_HP[name], **kw})


_FITTED: dict = {}


def fitted(name: str):
    """One fit per method, shared by the tests of the contract class."""
    if name not in _FITTED:
        _FITTED[name] = make(name).fit(X, Y, probe=PROBE, **FIT)
    return _FITTED[name]


def accuracy(m, x=XT, y=YT) -> float:
    return (m.predict_proba(x).argmax(-1) == y).float().mean().item()


# ============================================================================ shared contract

def test_every_registered_method_is_covered():
    assert set(TEST_HP) == set(METHODS)


@pytest.mark.parametrize("name", list(METHODS))
class TestMethodContract:
    def test_registry(self, name):
        m = build_method(name, "mlp", SHAPE, C)
        assert type(m) is METHODS[name] and m.name == name
        hp = m.hparams()
        assert hp["method"] == name and hp["arch"] == "mlp" and hp["seed"] == 0

    def test_output_shapes(self, name):
        m = fitted(name)
        assert m.num_members == EXPECTED_S[name]
        out = m.predict_members(XT[:37], batch_size=16)  # three chunks, the last one partial
        assert out.shape == (EXPECTED_S[name], 37, C) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        p = m.predict_proba(XT[:37])
        assert p.shape == (37, C)
        torch.testing.assert_close(p.sum(-1), torch.ones(37))
        if name != "mc-dropout":  # the members are fixed networks: chunking must not matter
            torch.testing.assert_close(out, m.predict_members(XT[:37], batch_size=1024),
                                       atol=1e-5, rtol=1e-5)

    def test_deterministic_under_seed(self, name):
        a = fitted(name)
        b = make(name).fit(X, Y, probe=PROBE, **FIT)
        assert torch.equal(a.predict_members(XT), b.predict_members(XT))
        assert torch.equal(a.predict_members(XT), a.predict_members(XT))  # fixed sampling seed
        assert a.trace == b.trace
        # ... and the seed matters: another seed starts from different weights
        c0, c1 = make(name, seed=0), make(name, seed=1)
        assert not torch.equal(c0.predict_members(XT[:8]), c1.predict_members(XT[:8]))

    def test_members_differ(self, name):
        m = fitted(name)
        out = m.predict_members(XT[:50])
        if m.num_members == 1:
            assert all(t["variance"] == 0.0 for t in m.trace)
            return
        for s, t in itertools.combinations(range(m.num_members), 2):
            assert (out[s] - out[t]).abs().max() > 1e-5, f"members {s} and {t} coincide"
        if name in ("deep-ensemble", "mc-dropout", "bbb"):  # S > 1 from initialisation on
            init = make(name).predict_members(XT[:50])
            assert init.shape[0] == EXPECTED_S[name]
            for s, t in itertools.combinations(range(init.shape[0]), 2):
                assert (init[s] - init[t]).abs().max() > 1e-5

    def test_state_dict_round_trip(self, name):
        a = fitted(name)
        buf = io.BytesIO()
        torch.save(a.state_dict(), buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        b = make(name)  # fresh instance at its initial weights
        before = b.predict_members(XT[:20])
        assert before.shape != a.predict_members(XT[:20]).shape or \
            not torch.equal(before, a.predict_members(XT[:20]))
        b.load_state_dict(state)
        assert torch.equal(a.predict_members(XT), b.predict_members(XT))
        assert torch.equal(a.predict_proba(XT), b.predict_proba(XT))
        assert b.trace == a.trace and b.hparams() == a.hparams() and b.fitted
        with pytest.raises(ValueError, match="hparams"):
            make(name, weight_decay=0.5).load_state_dict(state)
        other = "baseline" if name != "baseline" else "laplace"
        with pytest.raises(ValueError, match="method"):
            make(other).load_state_dict(state)

    def test_learns(self, name):
        assert accuracy(make(name)) < 0.3  # untrained: near chance (0.1)
        assert accuracy(fitted(name)) > 0.6

    def test_trace(self, name):
        m = fitted(name)
        tr = m.trace
        assert [t["iteration"] for t in tr] == [0, 5, 10, 15, 20]
        assert [t["epoch"] for t in tr] == [0.0, 0.5, 1.0, 1.5, 2.0]
        for t in tr:
            assert set(t) >= {"iteration", "epoch", "variance", "mutual_info", "disagreement"}
            assert t["variance"] >= 0.0 and t["mutual_info"] >= -1e-6
            assert 0.0 <= t["disagreement"] <= 1.0
        assert tr[0]["loss"] is None and all(t["loss"] > 0 for t in tr[1:])
        assert tr[-1]["members"] == EXPECTED_S[name]
        if name == "baseline":
            assert all(t["variance"] == 0.0 for t in tr)
        else:
            assert tr[-1]["variance"] > 0.0
        if name == "laplace":  # the MAP network alone until the posterior exists
            assert all(t["variance"] == 0.0 and t["members"] == 1 for t in tr[:-1])
        if name == "swag":  # one network until the first snapshot (step 10), then samples
            assert m.collected_at == [10, 12, 14, 16, 18, 20]
            assert all(t["members"] == 1 and t["variance"] == 0.0 for t in tr[:2])
            assert tr[2]["members"] == EXPECTED_S["swag"] and tr[2]["variance"] < 1e-12
            assert tr[3]["members"] == EXPECTED_S["swag"] and tr[3]["variance"] > 0.0

    def test_trace_interval_does_not_change_the_fit(self, name):
        # recording only reads the members (prediction re-seeds inside a forked RNG): a trace at
        # every step must leave the trained members bit-identical, with the same shared points
        a = fitted(name)
        b = make(name).fit(X, Y, probe=PROBE, **{**FIT, "record_every": 1})
        assert torch.equal(a.predict_members(XT), b.predict_members(XT))
        dense = {t["iteration"]: t for t in b.trace}
        assert len(b.trace) == 21 and all(dense[t["iteration"]] == t for t in a.trace)

    def test_trace_matches_hand_computed_statistics(self, name, monkeypatch):
        m = make(name)
        gen = torch.Generator().manual_seed(5)
        seen = []

        def fake_members(x, batch_size=1024):
            logits = 3.0 * torch.randn(4, x.shape[0], C, generator=gen)
            logits[1] = logits[0]  # a tie between members, to exercise disagreement
            seen.append(logits)
            return logits

        monkeypatch.setattr(m, "predict_members", fake_members)
        m.fit(X[:64], Y[:64], epochs=1, batch_size=16, lr=1e-3, probe=PROBE[:10], record_every=2,
              progress=False)
        assert [t["iteration"] for t in m.trace] == [0, 2, 4]
        assert len(seen) == 4  # 0, 2, 4 during training, then 4 again for the final members
        for t, logits in zip(m.trace, [seen[0], seen[1], seen[3]]):
            p = logits.softmax(-1)
            pbar = p.mean(0)
            var = torch.var(p, dim=0, unbiased=False).mean()
            mi = (-(pbar * pbar.log()).sum(-1) + (p * p.log()).sum(-1).mean(0)).mean()
            dis = (p.argmax(-1) != pbar.argmax(-1)[None]).float().mean()
            assert t["variance"] == pytest.approx(var.item(), rel=1e-5)
            assert t["mutual_info"] == pytest.approx(mi.item(), rel=1e-4, abs=1e-6)
            assert t["disagreement"] == pytest.approx(dis.item(), abs=1e-6)


# ============================================================================ interface errors

def test_build_method_rejects_unknown_names():
    with pytest.raises(ValueError, match="valid names: baseline, deep-ensemble"):
        build_method("dropout-ensemble", "mlp", SHAPE, C)
    with pytest.raises(ValueError, match="unknown surrogate .vgg."):
        build_method("baseline", "vgg", SHAPE, C)
    # UQ_METHODS: the paper's five, all registered; METHODS adds the baseline and the variants
    assert UQ_METHODS == ("deep-ensemble", "mc-dropout", "bbb", "swag", "laplace")
    assert set(UQ_METHODS) | {"baseline"} <= set(METHODS)


@pytest.mark.parametrize("name, kw, exc, match", [
    ("deep-ensemble", {"membrs": 3}, TypeError, "membrs"),
    ("baseline", {"dropout": 0.1}, TypeError, "dropout"),
    ("deep-ensemble", {"members": 0}, ValueError, "members"),
    ("deep-ensemble", {"bootstrap": "yes"}, ValueError, "bootstrap"),
    ("mc-dropout", {"dropout": 1.0}, ValueError, "dropout"),
    ("bbb", {"prior_sigma": 0.0}, ValueError, "prior_sigma"),
    ("bbb", {"train_samples": 0}, ValueError, "train_samples"),
    ("swag", {"swa_start": 1.0}, ValueError, "swa_start"),
    ("swag", {"rank": 0}, ValueError, "rank"),
    ("swag", {"collect_every": "often"}, ValueError, "collect_every"),
    ("laplace", {"hessian": "full"}, ValueError, "hessian"),
    ("laplace", {"predictive": "glm"}, ValueError, "predictive"),
    ("laplace", {"prior_precision": -1.0}, ValueError, "prior_precision"),
    ("baseline", {"weight_decay": -1.0}, ValueError, "weight_decay"),
    ("baseline", {"precision": "fp16"}, ValueError, "precision must be one of"),
    ("deep-ensemble", {"precision": None}, ValueError, "precision must be one of"),
])
def test_bad_hyperparameters(name, kw, exc, match):
    with pytest.raises(exc, match=match):
        build_method(name, "mlp", SHAPE, C, **kw)


def test_bad_fit_arguments():
    m = make("baseline")
    with pytest.raises(ValueError, match=r"x must be \(N, 1, 8, 8\)"):
        m.fit(X[:, :, :4], Y, epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"labels y must lie in \[0, 10\)"):
        m.fit(X, Y + 5, epochs=1, progress=False)
    with pytest.raises(ValueError, match="soft labels"):
        m.fit(X, torch.rand(len(X), C), epochs=1, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        m.fit(X, Y, epochs=0, progress=False)
    with pytest.raises(TypeError, match="x must be a floating"):
        m.predict_members(X.long())
    with pytest.raises(RuntimeError, match="fit"):
        make("laplace").kfac_factors()


# ============================================================================ Deep Ensemble

def test_member_loss_sum_is_sum_of_member_losses():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 4, generator=g, requires_grad=True)
    cases = {
        "per-member labels": torch.randint(0, 4, (3, 5), generator=g),
        "per-member soft": torch.softmax(torch.randn(3, 5, 4, generator=g), -1),
        "shared labels": torch.randint(0, 4, (5,), generator=g),
        "shared soft": torch.softmax(torch.randn(5, 4, generator=g), -1),
    }
    for label, t in cases.items():
        tt = t if t.shape[0] == 3 else t.expand(3, *t.shape)
        ref = sum(F.cross_entropy(logits[s], tt[s]) for s in range(3))
        got = member_loss_sum(logits, t)
        torch.testing.assert_close(got, ref, msg=label)
        g_ref, = torch.autograd.grad(ref, logits)
        g_got, = torch.autograd.grad(got, logits)
        torch.testing.assert_close(g_got, g_ref, msg=label)


@pytest.mark.parametrize("bootstrap", [False, True])
def test_deep_ensemble_members_get_their_own_data_orders(bootstrap, monkeypatch):
    m = make("deep-ensemble", bootstrap=bootstrap)
    x = torch.zeros(64, *SHAPE)
    x[:, 0, 0, 0] = torch.arange(64, dtype=torch.float32)  # row ids in a pixel
    y = torch.arange(64) % C
    batches = []
    original = m._train_loss

    def spy(xb, yb, n):
        batches.append((xb.detach().clone(), yb.clone()))
        return original(xb, yb, n)

    monkeypatch.setattr(m, "_train_loss", spy)
    m.fit(x, y, epochs=1, batch_size=16, progress=False)
    assert len(batches) == 4
    ids = torch.cat([xb[:, :, 0, 0, 0] for xb, _ in batches], dim=1).long()  # (S, 64)
    labels = torch.cat([yb for _, yb in batches], dim=1)
    assert ids.shape == (3, 64) and torch.equal(labels, ids % C)  # labels travel with rows
    for s, t in itertools.combinations(range(3), 2):
        assert not torch.equal(ids[s], ids[t])
    for s in range(3):
        n_unique = ids[s].unique().numel()
        if bootstrap:
            assert n_unique < 64  # resampled with replacement
        else:
            assert n_unique == 64  # a permutation: every row exactly once per epoch


def test_deep_ensemble_members_start_independent():
    w = make("deep-ensemble").model.head.weight
    for s, t in itertools.combinations(range(3), 2):
        assert not torch.allclose(w[s], w[t])


def test_soft_labels_train():
    soft = F.one_hot(Y, C).float() * 0.8 + 0.02
    for name in ("deep-ensemble", "laplace"):
        m = make(name).fit(X, soft, **FIT)
        assert accuracy(m) > 0.6


# ============================================================================ MC Dropout

def test_mc_dropout_masks_differ_and_eval_network_is_deterministic():
    m = make("mc-dropout", members=5)
    out = m.predict_members(XT[:16])
    assert out.shape == (5, 16, C)
    for s, t in itertools.combinations(range(5), 2):
        assert not torch.allclose(out[s], out[t])
    # without MC dropout the eval network is deterministic and is the mean-field "centre"
    m.model.eval()
    with torch.no_grad():
        a, b = m.model(XT[:16]), m.model(XT[:16])
    assert a.shape == (1, 16, C) and torch.equal(a, b)
    assert not any(torch.allclose(out[s], a[0]) for s in range(5))
    assert m.model.training is False and m.hparams()["dropout"] == 0.25


# ============================================================================ Bayes by Backprop

def closed_form_kl(model, prior_sigma: float) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    params = dict(model.named_parameters())
    for name, mu in params.items():
        if not name.endswith("_mu"):
            continue
        sigma = F.softplus(params[name[:-3] + "_rho"].double())
        mu = mu.double()
        total += (torch.log(prior_sigma / sigma)
                  + (sigma**2 + mu**2) / (2 * prior_sigma**2) - 0.5).sum()
    return total


def test_bbb_kl_matches_closed_form():
    m = make("bbb", prior_sigma=0.3)
    with torch.no_grad():  # move away from the uniform initial rho
        for name, p in m.model.named_parameters():
            if name.endswith("_rho"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    kl = m.kl()
    assert kl.requires_grad
    torch.testing.assert_close(kl.double(), closed_form_kl(m.model, 0.3), rtol=1e-5, atol=1e-3)


def test_bbb_initial_sigma_and_elbo_weighting():
    a = make("bbb", kl_weight=1.0)
    b = make("bbb", kl_weight=3.0)
    for name, p in a.model.named_parameters():
        if name.endswith("_rho"):
            assert torch.all(p == -5.0)
    xb, yb = X[:32], Y[:32]
    losses = []
    for m in (a, b):
        torch.manual_seed(11)  # same weight noise for both
        losses.append(m._train_loss(xb, yb, n_train=320))
    kl = closed_form_kl(a.model, a.hparams()["prior_sigma"])
    torch.testing.assert_close((losses[1] - losses[0]).double(), 2.0 * kl / 320,
                               rtol=1e-4, atol=1e-4)


# ============================================================================ SWAG

def test_swag_moments_match_recorded_iterates():
    m = make("swag", rank=3, collect_every=1, swa_start=0.5, record_iterates=True)
    m.fit(X[:64], Y[:64], epochs=2, batch_size=16, lr=1e-2, progress=False)  # 8 steps
    # collection from step ceil(0.5 * 8) = 4 on, every step: 4, 5, 6, 7, 8
    assert m.n_collected == 5 and len(m.iterates) == 5 and m.collected_at == [4, 5, 6, 7, 8]
    it = torch.stack(m.iterates).double()
    torch.testing.assert_close(it[-1].float(), torch.cat(
        [p.detach().reshape(-1) for _, p in m.model.named_parameters()]))
    assert not torch.equal(it[0], it[-1])
    torch.testing.assert_close(m.mean, it.mean(0))
    torch.testing.assert_close(m.sq_mean, (it**2).mean(0))
    torch.testing.assert_close(m.variance, it.var(0, unbiased=False).clamp_min(1e-30),
                               rtol=1e-6, atol=1e-15)
    running = [(it[i] - it[:i + 1].mean(0)) for i in range(5)]
    torch.testing.assert_close(m.deviations.double(), torch.stack(running[-3:]),
                               rtol=1e-5, atol=1e-9)
    # the prediction stack holds the samples drawn from the fixed prediction seed
    flat = m.sample_flat(6, torch.Generator().manual_seed(subseed(0, STREAM_PREDICT)))
    stack = m.sampled_model
    for s in range(6):
        torch.testing.assert_close(torch.cat([p[s].reshape(-1) for p in stack.parameters()]),
                                   flat[s])


@pytest.mark.parametrize("epochs, rank, collect_every, resolved, expected", [
    (2, 3, None, 1, [6, 7, 8]),  # short run: per step, about K + 1 snapshots
    (8, 3, None, 2, [24, 26, 28, 30, 32]),  # window of 9 steps // (K + 1) = every 2 steps
    (8, 2, None, "epoch", [24, 28, 32]),  # 3 collection epochs >= K + 1: the paper's schedule
    (2, 3, "epoch", "epoch", [8]),
    (2, 3, 3, 3, [8]),  # every 3 steps counted back from the last one, from step 6 on
])
def test_swag_collection_schedule(epochs, rank, collect_every, resolved, expected):
    m = make("swag", rank=rank, collect_every=collect_every, swa_start=0.75)
    m.fit(X[:64], Y[:64], epochs=epochs, batch_size=16, lr=1e-3, progress=False)  # 4 steps/epoch
    assert m.hparams()["collect_every_resolved"] == resolved
    assert m.collected_at == expected and m.n_collected == len(expected)


def test_swag_samples_have_the_swag_covariance():
    m = make("swag", arch="lenet", rank=4, collect_every=1, swa_start=0.5)
    m.fit(X[:64], Y[:64], epochs=2, batch_size=16, lr=3e-2, progress=False)
    assert m.n_collected == 5
    gen = torch.Generator().manual_seed(1)
    dev = m.deviations.double()  # (4, P)
    var = m.variance
    u = dev[0] / dev[0].norm()
    r = torch.randn(var.numel(), generator=gen, dtype=torch.float64)
    r /= r.norm()
    basis = torch.stack([u, r], 1).float()  # (P, 2)
    proj = torch.cat([(m.sample_flat(500, gen) - m.mean.float()) @ basis for _ in range(4)])
    proj = proj.double()  # (2000, 2) projections of theta_s - theta_SWA
    for k, v in enumerate((u, r)):
        # Var(v . theta) = scale * (v^T diag(var) v + sum_k (d_k . v)^2 / (K - 1)), scale = 1/2
        expected = 0.5 * ((v**2 * var).sum() + ((dev @ v) ** 2).sum() / 3)
        assert proj[:, k].var().item() == pytest.approx(expected.item(), rel=0.12)
        assert abs(proj[:, k].mean().item()) < 4 * math.sqrt(expected.item() / 2000)


def test_swag_refreshes_batchnorm_per_sample():
    m = make("swag", arch="resnet-small", members=3, rank=2, collect_every=1, swa_start=0.5)
    x, y = X[:64], Y[:64]
    m.fit(x, y, epochs=1, batch_size=16, lr=1e-2, progress=False)
    stack = m.sampled_model
    conv, bn = stack.body.body[0], stack.body.body[1]  # the zoo model's first conv and BN
    assert isinstance(bn, EnsembleBatchNorm) and bn.momentum == 0.1
    # 64 rows in 4 equal batches: the cumulative average of batch means is the overall mean
    for s in range(3):
        h = F.conv2d(x, conv.weight[s], padding=1)
        torch.testing.assert_close(bn.running_mean[s], h.mean(dim=(0, 2, 3)),
                                   rtol=1e-4, atol=1e-5)
    assert not torch.allclose(bn.running_mean[0], bn.running_mean[1])


# ============================================================================ Laplace

def brute_force_ggn(m, x, y):
    """Per-datum J (C, C(F+1)) by autograd through the whole network, Lambda by autograd hessian."""
    model = m.model
    params = {k: v.detach() for k, v in model.named_parameters()}
    w0, b0 = params["body.head.weight"], params["body.head.bias"]
    out = []
    for n in range(x.shape[0]):
        def logits(w, b):
            p = {**params, "body.head.weight": w, "body.head.bias": b}
            return torch.func.functional_call(model, p, (x[n:n + 1],))[0, 0]

        jw, jb = torch.autograd.functional.jacobian(logits, (w0, b0))  # (C,1,C,F), (C,1,C)
        j = torch.cat([jw[:, 0], jb[:, 0, :, None]], dim=2).reshape(C, -1).double()
        z = logits(w0, b0).detach().double()
        lam = torch.autograd.functional.hessian(
            lambda v: F.cross_entropy(v[None], y[n:n + 1]), z)
        out.append((j, lam, z))
    return out


@pytest.mark.parametrize("n", [1, 6])
def test_laplace_kfac_and_diag_match_brute_force_ggn(n):
    x, y = X[:n], Y[:n]
    m = make("laplace", arch="lenet")
    m.model.eval()
    m.fit(x, y, epochs=1, batch_size=8, progress=False)
    m.model.eval()
    terms = brute_force_ggn(m, x, y)
    ggn = sum(j.T @ lam @ j for j, lam, _ in terms)
    a, g = m.kfac_factors()
    f1 = a.shape[0]
    a_bf = sum(torch.outer(j[0, :f1], j[0, :f1]) for j, _, _ in terms)  # dz_0/dW_0,: = phi
    g_bf = sum(lam for _, lam, _ in terms)
    torch.testing.assert_close(a, a_bf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_bf, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(m.ggn_diagonal().reshape(-1), ggn.diagonal(), rtol=1e-5, atol=1e-7)
    if n == 1:  # KFAC is exact for a single datum
        torch.testing.assert_close(torch.kron(g, a) / m.n_data, ggn, rtol=1e-5, atol=1e-7)
    else:
        assert not torch.allclose(torch.kron(g, a) / m.n_data, ggn, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("hessian", ["kfac", "diag"])
def test_laplace_evidence_variance_and_probit_match_dense_algebra(hessian):
    x, y = X[:40], Y[:40]
    m = make("laplace", arch="lenet", hessian=hessian, predictive="probit")
    m.fit(x, y, epochs=2, batch_size=8, lr=3e-3, progress=False)
    m.model.eval()
    terms = brute_force_ggn(m, x, y)
    f1 = m.theta_map().shape[1]  # F + 1
    if hessian == "kfac":
        a = sum(torch.outer(j[0, :f1], j[0, :f1]) for j, _, _ in terms)  # phi phi^T
        h = torch.kron(sum(lam for _, lam, _ in terms), a) / len(terms)
    else:
        h = torch.diag(sum(j.T @ lam @ j for j, lam, _ in terms).diagonal())
    theta = m.theta_map().reshape(-1)
    loglik = -F.cross_entropy(torch.stack([z for _, _, z in terms]), y, reduction="sum")
    p = h.shape[0]

    def dense_log_z(delta):
        prec = h + delta * torch.eye(p, dtype=torch.float64)
        return (loglik - 0.5 * delta * theta @ theta + 0.5 * p * math.log(delta)
                - 0.5 * torch.linalg.slogdet(prec)[1])

    for delta in (1e-2, 1.0, 50.0):
        torch.testing.assert_close(m.log_marginal_likelihood(delta), dense_log_z(delta),
                                   rtol=1e-6, atol=1e-4)
    grid = torch.logspace(-4, 4, 33).tolist()
    assert m.log_marginal_likelihood(m.prior_precision).item() >= \
        max(dense_log_z(d).item() for d in grid) - 1e-6
    torch.testing.assert_close(m.posterior_precision(), h + m.prior_precision * torch.eye(p))

    # logit variance of test points: diag(J P^-1 J^T) with J from autograd
    cov = torch.linalg.inv(h + m.prior_precision * torch.eye(p, dtype=torch.float64))
    xt = XT[:5]
    tt = brute_force_ggn(m, xt, YT[:5])
    var_dense = torch.stack([(j @ cov @ j.T).diagonal() for j, _, _ in tt])
    torch.testing.assert_close(m.logit_variance(xt), var_dense, rtol=1e-4, atol=1e-8)
    z = torch.stack([zz for _, _, zz in tt])
    probit = torch.softmax(z / torch.sqrt(1 + math.pi / 8 * var_dense), -1).float()
    torch.testing.assert_close(m.predict_proba(xt), probit, rtol=1e-4, atol=1e-5)

    # MC members: sampled last layers applied to the MAP features, covariance P^-1
    samples = m.sample_last_layer(4000, torch.Generator().manual_seed(2))  # (S, C, F+1)
    logits = torch.einsum("scf,f->sc", samples, tt[0][0][0, :f1])
    emp = torch.cov(logits.T)
    ref = tt[0][0] @ cov @ tt[0][0].T
    torch.testing.assert_close(emp, ref, rtol=0.15, atol=0.15 * ref.diagonal().max().item())
    members = m.predict_members(xt)
    assert members.shape == (6, 5, C)
    phi = m.model.features(xt)[0]
    w, b = m._w_s, m._b_s
    torch.testing.assert_close(members, torch.einsum("scf,bf->sbc", w, phi) + b[:, None, :],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["deep-ensemble", "mc-dropout", "bbb"])
def test_bf16_training_keeps_fp32_master_state_and_learns(name):
    # precision="bf16": bfloat16 compute in the stacked layers, float32 weights, loss and outputs
    m = make(name, precision="bf16").fit(X, Y, probe=PROBE, **FIT)
    assert all(p.dtype == torch.float32 for p in m.model.parameters())
    assert m.predict_members(XT).dtype == torch.float32
    assert all(isinstance(t["loss"], float) or t["loss"] is None for t in m.trace)
    assert m.hparams()["precision"] == "bf16"
    assert accuracy(m) > 0.6
    assert abs(accuracy(m) - accuracy(fitted(name))) < 0.15  # fp32 vs bf16 on the toy task


@pytest.mark.parametrize("name,arch", [("deep-ensemble", "mlp"), ("deep-ensemble", "lenet"),
                                       ("mc-dropout", "mlp"), ("bbb", "mlp"), ("laplace", "mlp")])
def test_bf16_weight_copies_fit_what_the_cast_path_fits(monkeypatch, name, arch):
    # faststeal.master_weights: the Adam update writes the weights' bfloat16 copies instead of
    # casting them every forward (and their gradients every backward). Under torch's AVX2 /
    # AVX-512 kernels the fit is bit-identical to the cast path: the same copies (MC dropout's
    # masks, BBB's KL term in float32, lenet's convolutions left to torch's Adam included)
    from faststeal import _ext, master_weights

    if _ext.C is None:
        pytest.skip("faststeal._C not built")
    steps = []
    real_step = master_weights.MasterWeights.step
    monkeypatch.setattr(master_weights.MasterWeights, "step",
                        lambda self: (steps.append(1), real_step(self))[1])
    fits = {}
    for on in ("1", "0"):
        monkeypatch.setenv(master_weights.ENV, on)
        m = make(name, arch=arch, precision="bf16").fit(X[:128], Y[:128], epochs=1,
                                                        batch_size=32, progress=False)
        fits[on] = (m.predict_members(XT), [p.detach().clone() for p in m.model.parameters()])
        assert len(steps) == 4  # the copies ran every step of the "1" fit, none of the "0" fit
    (pred1, w1), (pred0, w0) = fits["1"], fits["0"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert torch.equal(pred1, pred0)
        assert all(torch.equal(a, b) for a, b in zip(w1, w0))
    else:  # other vector ISAs: the update may differ from torch's in the last bit
        torch.testing.assert_close(pred1, pred0, rtol=0, atol=1e-2)


def test_bf16_stacked_layers_compute_in_bf16(monkeypatch):
    # the forward of a bf16 fit reaches the op with bfloat16 tensors, the optimizer sees fp32
    from faststeal.ops import dispatch

    dtypes = []
    real = dispatch.impl

    def spy(op, kind, device_type):
        fn = real(op, kind, device_type)

        def run(*args):
            if op == "ensemble_linear" and kind == "fwd":
                dtypes.append(args[1].dtype)  # the weight as the op sees it
            return fn(*args)
        return run

    monkeypatch.setattr(dispatch, "impl", spy)
    m = make("deep-ensemble", precision="bf16").fit(X[:64], Y[:64], epochs=1, batch_size=32,
                                                     progress=False)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in m.model.parameters())


def test_fit_runs_on_the_benchmarked_train_step(monkeypatch):
    # Method.fit's updates are TrainStep calls: what benchmarks/bench_train.py times is what runs
    from faststeal import train_step

    calls = []
    real = train_step.TrainStep.__call__

    def counting(self, x, y):
        calls.append(x.shape)
        return real(self, x, y)

    monkeypatch.setattr(train_step.TrainStep, "__call__", counting)
    make("deep-ensemble").fit(X[:96], Y[:96], epochs=2, batch_size=32, progress=False)
    assert len(calls) == 2 * 3
