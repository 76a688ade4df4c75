"""Diversity-keeping ensembles (faststeal.methods.diverse): mechanics, not conclusions."""

from __future__ import annotations

import pytest
import torch

from faststeal import ops
from faststeal.methods.diverse import (DIVERSE_METHODS, BootstrapEnsemble, HeterogeneousEnsemble,
                                       HyperparameterEnsemble, MemberAdam, NCLEnsemble,
                                       ncl_penalty, ncl_penalty_reference, repulsive_penalty)
from faststeal.query import member_features

SHAPE = (1, 8, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 96, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SHAPE, generator=g)
    w = torch.randn(64, classes, generator=g)
    return x, (x.flatten(1) @ w).argmax(1)


# ------------------------------------------------------------------ penalties

@pytest.mark.parametrize("s,b,c", [(2, 3, 4), (5, 7, 10), (1, 4, 3)])
def test_ncl_penalty_value_and_gradient_match_autograd_of_formula(s, b, c):
    g = torch.Generator().manual_seed(s * 100 + b)
    z = torch.randn(s, b, c, generator=g, dtype=torch.float64) * 2
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    fused = ncl_penalty(z1, 0.7)
    ref = ncl_penalty_reference(z2, 0.7)
    assert torch.allclose(fused.double(), ref, atol=1e-6)
    fused.backward()
    ref.backward()
    assert torch.allclose(z1.grad, z2.grad, atol=1e-6)


def test_ncl_penalty_is_minus_strength_s_c_times_batch_variance():
    z = torch.randn(5, 32, 10)
    v = ops.member_stats(z).variance.mean()  # mean_x mean_c Var_s p_s(c|x)
    assert torch.allclose(ncl_penalty(z, 0.3), -0.3 * 5 * 10 * v, rtol=1e-4)


def test_repulsive_penalty_hand_value_and_pushes_members_apart():
    p = torch.tensor([[[0.6, 0.4]], [[0.5, 0.5]]])  # S=2, B=1: one pair at ||.||^2 = 0.02
    z = p.log()
    h = max(0.02 / torch.log(torch.tensor(2.0)).item(), 1e-4)
    expect = 0.5 * 2 * torch.exp(torch.tensor(-0.02 / h))
    assert torch.allclose(repulsive_penalty(z, 0.5), expect, rtol=1e-5)
    assert float(repulsive_penalty(torch.randn(1, 3, 4), 1.0)) == 0.0
    # one gradient step on the penalty alone moves the members' probabilities apart
    z = torch.randn(4, 16, 5) * 0.1
    z.requires_grad_()
    before = ops.member_stats(z.detach()).variance.mean()
    repulsive_penalty(z, 1.0).backward()
    after = ops.member_stats((z - 0.5 * z.grad).detach()).variance.mean()
    assert after > before


# ------------------------------------------------------------------ per-member optimizer

def test_member_adam_with_equal_rates_is_torch_adam():
    torch.manual_seed(0)
    w1 = torch.randn(3, 4, 5, requires_grad=True)
    w2 = w1.detach().clone().requires_grad_()
    opt1 = MemberAdam([w1], lr=torch.full((3,), 0.01), weight_decay=torch.full((3,), 0.1))
    opt2 = torch.optim.Adam([w2], lr=0.01, weight_decay=0.1, foreach=False)
    for step in range(5):
        target = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(step))
        for w, opt in ((w1, opt1), (w2, opt2)):
            opt.zero_grad()
            ((w - target) ** 2).sum().backward()
            opt.step()
    assert torch.allclose(w1, w2, atol=1e-6)


def test_member_adam_member_s_takes_adam_steps_with_its_own_rate():
    torch.manual_seed(1)
    lrs, wds = torch.tensor([0.001, 0.01, 0.1]), torch.tensor([0.0, 0.01, 0.5])
    w = torch.randn(3, 6, requires_grad=True)
    singles = [w[s].detach().clone().requires_grad_() for s in range(3)]
    opt = MemberAdam([w], lr=lrs, weight_decay=wds)
    opts = [torch.optim.Adam([singles[s]], lr=float(lrs[s]), weight_decay=float(wds[s]),
                             foreach=False) for s in range(3)]
    for _ in range(4):
        opt.zero_grad()
        (w.sin() * torch.arange(6.0)).sum().backward()
        opt.step()
        for s in range(3):
            opts[s].zero_grad()
            (singles[s].sin() * torch.arange(6.0)).sum().backward()
            opts[s].step()
    for s in range(3):
        assert torch.allclose(w[s], singles[s], atol=1e-6)


def test_member_adam_rejects_parameters_without_member_axis():
    with pytest.raises(ValueError, match="member axis"):
        MemberAdam([torch.zeros(3, 2, requires_grad=True), torch.zeros(2, requires_grad=True)],
                   lr=0.1)


# ------------------------------------------------------------------ the variants

@pytest.mark.parametrize("name", sorted(DIVERSE_METHODS))
def test_every_variant_fits_predicts_and_traces(name):
    x, y = _data()
    hp = {"members": 3}
    if name == "hetero-ensemble":
        hp["archs"] = ["mlp", "lenet"]
    m = DIVERSE_METHODS[name]("mlp", SHAPE, 4, seed=0, **hp)
    assert m.name == name
    m.fit(x, y, epochs=1, batch_size=32, probe=x[:16], record_every=1, progress=False)
    out = m.predict_members(x[:10])
    assert out.shape == (3, 10, 4) and torch.isfinite(out).all()
    assert torch.allclose(m.predict_proba(x[:10]).sum(-1), torch.ones(10), atol=1e-5)
    assert len(m.trace) >= 3 and all(t["members"] == 3 for t in m.trace)
    assert member_features(m, x[:5]).shape[0] == 5
    assert torch.equal(m.predict_members(x[:10]), out)  # deterministic prediction


def test_heterogeneous_members_have_different_architectures():
    m = HeterogeneousEnsemble("mlp", SHAPE, 4, seed=0, members=5, archs=["mlp", "lenet"])
    assert m.member_archs == ["mlp", "mlp", "mlp", "lenet", "lenet"]
    assert m.hparams()["member_archs"] == m.member_archs
    assert m.model.group_archs == ["mlp", "lenet"]
    shapes = [sorted(tuple(p.shape[1:]) for p in g.parameters()) for g in m.model.groups]
    assert shapes[0] != shapes[1]
    feats = m.model.features(torch.randn(2, *SHAPE))
    assert [f.shape[0] for f in feats] == [3, 2] and feats[0].shape[2] != feats[1].shape[2]
    default = HeterogeneousEnsemble("lenet", SHAPE, 4, seed=0)
    assert default.hparams()["archs"][0] == "lenet" and len(set(default.member_archs)) > 1
    with pytest.raises(ValueError, match="unknown architecture"):
        HeterogeneousEnsemble("mlp", SHAPE, 4, archs=["mlp", "vit"])


def test_heterogeneous_per_member_inputs_reach_their_members():
    m = HeterogeneousEnsemble("mlp", SHAPE, 4, seed=0, members=3, archs=["mlp", "lenet"])
    x = torch.randn(3, 5, *SHAPE)
    m.model.eval()
    with torch.no_grad():
        joint = m.model(x)
        assert torch.allclose(joint[2], m.model.groups[1](x[2:3])[0], atol=1e-6)
        assert torch.allclose(joint[0], m.model.groups[0](x[0:2])[0], atol=1e-6)


def test_bootstrap_ensemble_members_see_different_resamples():
    m = BootstrapEnsemble("mlp", SHAPE, 4, seed=0, members=3)
    assert m.hparams()["bootstrap"] is True
    pool = m._index_pool(torch.Generator().manual_seed(0), 50, 3)
    assert pool.shape == (3, 50) and not torch.equal(pool[0], pool[1])
    assert len(set(pool[0].tolist())) < 50  # drawn with replacement


def test_hparam_ensemble_assigns_log_spaced_rates_per_member():
    x, y = _data()
    m = HyperparameterEnsemble("mlp", SHAPE, 4, seed=0, members=4, lr_range=(0.5, 2.0),
                               weight_decay_range=(1e-5, 1e-3))
    m.fit(x, y, epochs=1, batch_size=32, lr=1e-3, progress=False)
    lrs = sorted(m.hparams()["member_lr"])
    assert lrs[0] == pytest.approx(5e-4) and lrs[-1] == pytest.approx(2e-3)
    ratios = [b / a for a, b in zip(lrs, lrs[1:], strict=False)]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-4)  # geometric spacing
    assert sorted(m.hparams()["member_weight_decay"])[-1] == pytest.approx(1e-3)


def test_ncl_strength_raises_training_batch_variance_from_the_same_init():
    """Mechanics: the penalty acts in its direction (higher V on the data it trains on)."""
    x, y = _data(128)
    v = {}
    for strength in (0.0, 2.0):
        m = NCLEnsemble("mlp", SHAPE, 4, seed=0, members=4, strength=strength)
        m.fit(x, y, epochs=3, batch_size=32, progress=False)
        v[strength] = float(ops.member_stats(m.predict_members(x)).variance.mean())
    assert v[2.0] > v[0.0]


def test_variants_validate_hyperparameters():
    with pytest.raises(ValueError, match="strength"):
        NCLEnsemble("mlp", SHAPE, 4, strength=-1.0)
    with pytest.raises(ValueError, match="lr_range"):
        HyperparameterEnsemble("mlp", SHAPE, 4, lr_range=(1.0,))
    with pytest.raises(TypeError, match="unknown hyperparameter"):
        NCLEnsemble("mlp", SHAPE, 4, archs=["mlp"])
