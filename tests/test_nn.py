"""Stacked layers (faststeal.nn): shapes, per-member exactness, RNG, BatchNorm stats, KL."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from faststeal.nn import (CONV_STRATEGIES, BayesConv2d, BayesLinear, EnsembleBatchNorm,
                          EnsembleConv2d, EnsembleDropout, EnsembleLinear, EnsembleMaxPool2d,
                          set_mc_dropout)
from tolerances import tol

from conftest import DEVICES

ATOL = tol(torch.float32)


@pytest.fixture(autouse=True)
def _no_tf32():
    """cuDNN convolutions default to TF32 on Ampere+; the fp32 tolerances assume full fp32."""
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = prev

def _grads_everywhere(module: nn.Module) -> None:
    for name, p in module.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"


# ----------------------------------------------------------------------------- EnsembleLinear

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("members", [1, 3])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
def test_ensemble_linear_matches_per_member_linear(seed_all, device, members, shared, activation):
    layer = EnsembleLinear(members, 7, 5, activation=activation).to(device)
    x = torch.randn(4, 7, device=device) if shared else torch.randn(members, 4, 7, device=device)
    y = layer(x)
    assert y.shape == (members, 4, 5)
    act = {"none": lambda t: t, "relu": torch.relu, "gelu": F.gelu}[activation]
    for s in range(members):
        xs = x if shared else x[s]
        torch.testing.assert_close(y[s], act(F.linear(xs, layer.weight[s], layer.bias[s])), **ATOL)
        torch.testing.assert_close(y[s], act(layer.member(s)(xs)), **ATOL)


def test_ensemble_linear_members_are_independently_initialised(seed_all):
    layer = EnsembleLinear(4, 30, 20)
    bound = 1 / math.sqrt(30)
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    # nn.Linear's U(-b, b): std b/sqrt(3); and no two members share weights.
    assert abs(layer.weight.std().item() - bound / math.sqrt(3)) < 0.1 * bound
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(layer.weight[i], layer.weight[j])
            assert not torch.allclose(layer.bias[i], layer.bias[j])


def test_ensemble_linear_load_member_roundtrip(seed_all):
    layer = EnsembleLinear(3, 6, 4)
    lin = nn.Linear(6, 4)
    layer.load_member(1, lin)
    x = torch.randn(5, 6)
    torch.testing.assert_close(layer(x)[1], lin(x), **ATOL)
    torch.testing.assert_close(layer.member(1)(x), lin(x))
    with pytest.raises(ValueError, match="member index"):
        layer.load_member(3, lin)
    with pytest.raises(ValueError, match=r"linear.weight must be \(4, 6\)"):
        layer.load_member(0, nn.Linear(5, 4))


def _same_weights(layer: EnsembleLinear) -> None:
    with torch.no_grad():
        layer.weight.copy_(layer.weight[:1].expand_as(layer.weight))
        layer.bias.copy_(layer.bias[:1].expand_as(layer.bias))


def test_ensemble_linear_dropout_masks_differ_across_members(seed_all):
    layer = EnsembleLinear(3, 16, 64, dropout=0.5).train()
    _same_weights(layer)  # identical members: any difference comes from the masks
    with torch.no_grad():
        layer.bias.fill_(1.0)  # keeps pre-activations away from exact zero
    x = torch.randn(8, 16)
    y = layer(x)
    kept = y != 0
    assert 0.35 < kept.float().mean() < 0.65
    assert not torch.equal(kept[0], kept[1]) and not torch.equal(kept[1], kept[2])
    # kept elements are the member's output scaled by 1/(1-p)
    ref = (F.linear(x, layer.weight[0], layer.bias[0]) * 2.0).expand(3, -1, -1)
    torch.testing.assert_close(y[kept], ref[kept], **ATOL)


def test_ensemble_linear_dropout_broadcast_copies_get_own_masks(seed_all):
    layer = EnsembleLinear(1, 16, 64, dropout=0.5).train()
    with torch.no_grad():
        layer.bias.fill_(1.0)
    x = torch.randn(8, 16)
    y = layer(x, samples=4)
    assert y.shape == (4, 8, 64)
    ref = F.linear(x, layer.weight[0], layer.bias[0])
    kept = y != 0
    for t in range(4):  # every copy is the one network, masked and rescaled
        torch.testing.assert_close(y[t][kept[t]], (ref * 2.0)[kept[t]], **ATOL)
    assert all(not torch.equal(kept[i], kept[j]) for i in range(4) for j in range(i + 1, 4))
    # the same through an explicit (S', B, K) stack of copies
    y2 = layer(x.expand(4, 8, 16))
    assert y2.shape == (4, 8, 64) and not torch.equal(y2[0] != 0, y2[1] != 0)


def test_ensemble_linear_dropout_reproducible_under_manual_seed():
    layer = EnsembleLinear(2, 10, 12, dropout=0.3).train()
    x = torch.randn(6, 10)
    torch.manual_seed(7)
    a = layer(x)
    b = layer(x)
    torch.manual_seed(7)
    a2 = layer(x)
    b2 = layer(x)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert not torch.equal(a, b)  # successive calls draw fresh masks


def test_ensemble_linear_dropout_backward_uses_the_forward_mask(seed_all):
    layer = EnsembleLinear(2, 5, 9, dropout=0.5).train()
    with torch.no_grad():
        layer.bias.fill_(3.0)
    x = torch.randn(2, 6, 5)
    y = layer(x)
    y.sum().backward()
    scale = (y != 0).float() * 2.0
    torch.testing.assert_close(layer.weight.grad, torch.einsum("sbn,sbk->snk", scale, x), **ATOL)
    torch.testing.assert_close(layer.bias.grad, scale.sum(1), **ATOL)


def test_ensemble_linear_dropout_eval_and_mc_flag(seed_all):
    layer = EnsembleLinear(2, 10, 32, dropout=0.5)
    x = torch.randn(4, 10)
    layer.eval()
    clean = layer(x)
    assert torch.equal(clean, layer(x))
    assert (clean != 0).all()
    set_mc_dropout(layer, True)
    noisy = layer(x)
    assert layer.mc_dropout and not layer.training
    assert (noisy == 0).float().mean() > 0.3
    set_mc_dropout(layer, False)
    assert torch.equal(layer(x), clean)


def test_ensemble_linear_gradients_reach_every_parameter(seed_all):
    layer = EnsembleLinear(3, 4, 5, activation="gelu")
    x = torch.randn(3, 2, 4, requires_grad=True)
    layer(x).square().sum().backward()
    _grads_everywhere(layer)
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_ensemble_linear_bad_input():
    layer = EnsembleLinear(3, 4, 5)
    with pytest.raises(ValueError, match="x must be 2-D or 3-D"):
        layer(torch.randn(3, 2, 2, 4))
    with pytest.raises(ValueError, match="3 members but x has 2"):
        layer(torch.randn(2, 2, 4))
    with pytest.raises(ValueError, match="4 features"):
        layer(torch.randn(2, 5))
    with pytest.raises(ValueError, match="samples is only for members == 1"):
        layer(torch.randn(2, 4), samples=5)
    with pytest.raises(ValueError, match="members must be a positive int"):
        EnsembleLinear(0, 4, 5)
    with pytest.raises(ValueError, match="dropout must be"):
        EnsembleLinear(2, 4, 5, dropout=1.0)
    with pytest.raises(ValueError, match="activation must be one of"):
        EnsembleLinear(2, 4, 5, activation="tanh")


# ----------------------------------------------------------------------------- EnsembleConv2d

# 'direct' (stride 1, stacked float32 input on an AVX2/AVX-512 CPU) has tests/test_conv_direct.py
PORTABLE_CONV_STRATEGIES = [s for s in CONV_STRATEGIES if s != "direct"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", PORTABLE_CONV_STRATEGIES)
@pytest.mark.parametrize("members", [1, 3])
@pytest.mark.parametrize("shared", [True, False])
def test_ensemble_conv_matches_per_member_conv(seed_all, device, strategy, members, shared):
    conv = EnsembleConv2d(members, 2, 5, (3, 2), stride=(2, 1), padding=1,
                          strategy=strategy).to(device)
    x = torch.randn(4, 2, 9, 7, device=device)
    if not shared:
        x = torch.randn(members, 4, 2, 9, 7, device=device)
    y = conv(x)
    ref = [F.conv2d(x if shared else x[s], conv.weight[s], conv.bias[s], (2, 1), 1)
           for s in range(members)]
    assert y.shape == (members, *ref[0].shape)
    for s in range(members):
        torch.testing.assert_close(y[s], ref[s], **ATOL)
        torch.testing.assert_close(y[s], conv.member(s)(x if shared else x[s]), **ATOL)


@pytest.mark.parametrize("strategy", PORTABLE_CONV_STRATEGIES)
def test_ensemble_conv_gradients_agree_across_strategies(seed_all, strategy):
    base = EnsembleConv2d(3, 2, 4, 3, padding=1, strategy="loop")
    conv = EnsembleConv2d(3, 2, 4, 3, padding=1, strategy=strategy)
    conv.load_state_dict(base.state_dict())
    x = torch.randn(3, 5, 2, 6, 6)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    g = torch.randn(3, 5, 4, 6, 6)
    (base(xs[0]) * g).sum().backward()
    (conv(xs[1]) * g).sum().backward()
    torch.testing.assert_close(conv.weight.grad, base.weight.grad, **ATOL)
    torch.testing.assert_close(conv.bias.grad, base.bias.grad, **ATOL)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, **ATOL)
    _grads_everywhere(conv)


def test_ensemble_conv_accepts_batch_major_views_and_broadcasts_one_member(seed_all):
    conv = EnsembleConv2d(3, 2, 4, 3)
    x = torch.randn(5, 3, 2, 8, 8).transpose(0, 1)  # (S, B, ...) view of (B, S, ...) memory
    y = conv(x)
    for s in range(3):
        torch.testing.assert_close(y[s], conv.member(s)(x[s]), **ATOL)
    one = EnsembleConv2d(1, 2, 4, 3)
    for xin in (x, x.contiguous()):
        y1 = one(xin)
        assert y1.shape == (3, 5, 4, 6, 6)
        for s in range(3):
            torch.testing.assert_close(y1[s], one.member(0)(xin[s]), **ATOL)


def test_ensemble_conv_members_differ_and_bad_input(seed_all):
    conv = EnsembleConv2d(2, 3, 4, 3)
    assert not torch.allclose(conv.weight[0], conv.weight[1])
    assert conv.weight.abs().max() <= 1 / math.sqrt(27)
    with pytest.raises(ValueError, match="x must be 4-D or 5-D"):
        conv(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="2 members but x has 3"):
        conv(torch.randn(3, 1, 3, 8, 8))
    with pytest.raises(ValueError, match="3 channels"):
        conv(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="strategy must be one of"):
        EnsembleConv2d(2, 3, 4, 3, strategy="fft")
    with pytest.raises(ValueError, match=r"conv.weight must be"):
        conv.load_member(0, nn.Conv2d(3, 4, 5))


# ----------------------------------------------------------------------------- EnsembleBatchNorm

@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_running_stats_match_separate_modules(seed_all, spatial, momentum):
    s, f = 3, 4
    ebn = EnsembleBatchNorm(s, f, momentum=momentum)
    cls = nn.BatchNorm2d if spatial else nn.BatchNorm1d
    refs = [cls(f, momentum=momentum) for _ in range(s)]
    with torch.no_grad():  # different affine params per member
        ebn.weight.uniform_(0.5, 1.5)
        ebn.bias.uniform_(-1, 1)
        for i, r in enumerate(refs):
            r.weight.copy_(ebn.weight[i])
            r.bias.copy_(ebn.bias[i])
    shape = (s, 6, f, 3, 2) if spatial else (s, 6, f)
    for step in range(4):
        x = torch.randn(shape) * (step + 1) + torch.arange(s).view(s, *[1] * (len(shape) - 1))
        y = ebn(x)
        for i, r in enumerate(refs):
            torch.testing.assert_close(y[i], r(x[i]), **ATOL)
    for i, r in enumerate(refs):
        torch.testing.assert_close(ebn.running_mean[i], r.running_mean, **ATOL)
        torch.testing.assert_close(ebn.running_var[i], r.running_var, **ATOL)
    assert int(ebn.num_batches_tracked) == 4
    # eval mode uses the running stats (members' stats differ: offsets 0, 1, 2)
    assert not torch.allclose(ebn.running_mean[0], ebn.running_mean[2])
    ebn.eval()
    x = torch.randn(shape)
    y = ebn(x)
    for i, r in enumerate(refs):
        torch.testing.assert_close(y[i], r.eval()(x[i]), **ATOL)
        torch.testing.assert_close(ebn.member(i, dims=2 if spatial else 1)(x[i]), y[i], **ATOL)


def test_batchnorm_batch_major_view_and_one_member_broadcast(seed_all):
    ebn = EnsembleBatchNorm(2, 3)
    x = torch.randn(4, 2, 3, 5, 5).transpose(0, 1)
    ref = [nn.BatchNorm2d(3) for _ in range(2)]
    y = ebn(x)
    for i in range(2):
        torch.testing.assert_close(y[i], ref[i](x[i]), **ATOL)
        torch.testing.assert_close(ebn.running_var[i], ref[i].running_var, **ATOL)
    one = EnsembleBatchNorm(1, 3)
    plain = nn.BatchNorm2d(3)
    y1 = one(x)  # copies of a one-member stack are one batch of S'*B rows
    torch.testing.assert_close(y1.reshape(8, 3, 5, 5), plain(x.reshape(8, 3, 5, 5)), **ATOL)
    torch.testing.assert_close(one.running_mean[0], plain.running_mean, **ATOL)
    torch.testing.assert_close(one.running_var[0], plain.running_var, **ATOL)


def test_batchnorm_gradients_and_bad_input(seed_all):
    ebn = EnsembleBatchNorm(2, 3)
    x = torch.randn(2, 5, 3, requires_grad=True)
    (ebn(x) * torch.randn(2, 5, 3)).sum().backward()
    _grads_everywhere(ebn)
    with pytest.raises(ValueError, match="3 features in dim 2"):
        ebn(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="2 members but x has 4"):
        ebn(torch.randn(4, 5, 3))
    with pytest.raises(ValueError, match="x must be"):
        ebn(torch.randn(3))


# ----------------------------------------------------------------------------- dropout, pooling

def test_ensemble_dropout_independent_masks_eval_and_mc_flag():
    drop = EnsembleDropout(0.5)
    x = torch.ones(3, 4, 2, 5, 5)
    torch.manual_seed(3)
    y = drop(x)
    torch.manual_seed(3)
    assert torch.equal(drop(x), y)  # reproducible
    assert set(y.unique().tolist()) == {0.0, 2.0}
    assert not torch.equal(y[0], y[1]) and not torch.equal(y[0, 0], y[0, 1])
    z = drop(torch.ones(2, 50).expand(4, 2, 50))  # broadcast copies (a stride-0 view)
    assert all(not torch.equal(z[0], z[t]) for t in range(1, 4))
    drop.eval()
    assert drop(x) is x
    set_mc_dropout(nn.Sequential(drop), True)
    assert (drop(x) == 0).any()
    with pytest.raises(ValueError, match="p must be"):
        EnsembleDropout(1.5)


def test_ensemble_maxpool_matches_per_member(seed_all):
    pool = EnsembleMaxPool2d(2)
    for x in (torch.randn(3, 4, 2, 6, 5), torch.randn(4, 3, 2, 6, 5).transpose(0, 1)):
        y = pool(x)
        assert y.shape == (3, 4, 2, 3, 2)
        for s in range(3):
            torch.testing.assert_close(y[s], F.max_pool2d(x[s], 2))
    torch.testing.assert_close(pool(x[0]), F.max_pool2d(x[0], 2))


# ----------------------------------------------------------------------------- Bayesian layers

def _kl_by_hand(mu, rho, prior_sigma):
    sigma = torch.log1p(torch.exp(rho.double()))
    mu = mu.double()
    return (math.log(prior_sigma) - torch.log(sigma)
            + (sigma**2 + mu**2) / (2 * prior_sigma**2) - 0.5).sum()


@pytest.mark.parametrize("prior_sigma", [1.0, 0.3])
def test_bayes_linear_kl_closed_form(seed_all, prior_sigma):
    layer = BayesLinear(6, 4, prior_sigma=prior_sigma)
    with torch.no_grad():
        layer.w_rho.uniform_(-4, 1)
        layer.b_rho.uniform_(-4, 1)
    want = _kl_by_hand(layer.w_mu, layer.w_rho, prior_sigma) + \
        _kl_by_hand(layer.b_mu, layer.b_rho, prior_sigma)
    kl = layer.kl()
    torch.testing.assert_close(kl.double(), want, rtol=1e-5, atol=1e-4)
    kl.backward()
    _grads_everywhere(layer)
    assert BayesLinear(6, 4, bias=False).kl() > 0


def test_bayes_conv_kl_closed_form(seed_all):
    layer = BayesConv2d(2, 3, 3, prior_sigma=0.5, rho_init=-2.0)
    want = _kl_by_hand(layer.w_mu, layer.w_rho, 0.5) + _kl_by_hand(layer.b_mu, layer.b_rho, 0.5)
    torch.testing.assert_close(layer.kl().double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("local_reparam", [False, True])
def test_bayes_linear_output_distribution(seed_all, local_reparam):
    layer = BayesLinear(3, 2, rho_init=-1.0, local_reparam=local_reparam)
    x = torch.randn(2, 3)
    n = 4000
    with torch.no_grad():
        y = layer(x, samples=n)
    assert y.shape == (n, 2, 2)
    mean = F.linear(x, layer.w_mu, layer.b_mu)
    var = F.linear(x * x, F.softplus(layer.w_rho) ** 2, F.softplus(layer.b_rho) ** 2)
    se = (var / n).sqrt()
    assert ((y.mean(0) - mean).abs() < 5 * se).all(), (y.mean(0), mean)
    # sample variance of a Gaussian: relative standard error sqrt(2/n) ~ 2.2%
    torch.testing.assert_close(y.var(0), var, rtol=0.12, atol=0)


@pytest.mark.parametrize("local_reparam", [False, True])
def test_bayes_linear_shapes_samples_and_gradients(seed_all, local_reparam):
    layer = BayesLinear(5, 4, rho_init=-2.0, local_reparam=local_reparam)
    x = torch.randn(3, 5)
    y = layer(x, samples=6)
    assert y.shape == (6, 3, 4)
    assert not torch.allclose(y[0], y[1])
    assert layer(x).shape == (1, 3, 4)
    assert layer(torch.randn(2, 3, 5)).shape == (2, 3, 4)
    torch.manual_seed(11)
    a = layer(x, samples=2)
    torch.manual_seed(11)
    assert torch.equal(a, layer(x, samples=2))
    (y.square().sum() + layer.kl()).backward()
    _grads_everywhere(layer)
    with pytest.raises(ValueError, match="samples=4 but x has 2"):
        layer(torch.randn(2, 3, 5), samples=4)
    with pytest.raises(ValueError, match="5 features"):
        layer(torch.randn(3, 4))
    with pytest.raises(ValueError, match="x must be 2-D or 3-D"):
        layer(torch.randn(5))


def test_bayes_conv_shapes_mean_and_gradients(seed_all):
    layer = BayesConv2d(2, 3, 3, padding=1, rho_init=-2.0)
    x = torch.randn(4, 2, 5, 5)
    y = layer(x, samples=5)
    assert y.shape == (5, 4, 3, 5, 5)
    assert not torch.allclose(y[0], y[1])
    assert layer(torch.randn(2, 4, 2, 5, 5)).shape == (2, 4, 3, 5, 5)
    (y.square().sum() + layer.kl()).backward()
    _grads_everywhere(layer)
    with torch.no_grad():
        layer.w_rho.fill_(-30.0)  # sigma ~ 1e-13: samples collapse onto the mean network
        layer.b_rho.fill_(-30.0)
        torch.testing.assert_close(layer(x, samples=2)[1], layer.member(0)(x), **ATOL)
    with pytest.raises(ValueError, match="2 channels"):
        layer(torch.randn(4, 3, 5, 5))
