"""The architecture zoo: plain models and their stacks (faststeal.stack of the zoo factories),
exactness, members, errors."""

import pytest
import torch

from faststeal.models import ARCHS, PlainModel, build_model, count_params
from faststeal.nn import EnsembleLinear, StackedModule, set_mc_dropout

from conftest import DEVICES

ATOL = {"atol": 1e-5, "rtol": 1e-4}
SMALL = (1, 8, 8)  # digits-sized inputs keep the CPU tests fast
DATASET_SHAPES = [(1, 28, 28), (1, 8, 8), (3, 32, 32)]


@pytest.fixture(autouse=True)
def _no_tf32():
    """cuDNN convolutions default to TF32 on Ampere+; the fp32 tolerances assume full fp32."""
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = prev

def _x(shape, batch=4, members=None, device="cpu"):
    lead = () if members is None else (members,)
    return torch.randn(*lead, batch, *shape, device=device)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", DATASET_SHAPES)
def test_plain_model_shapes(seed_all, arch, shape):
    model = build_model(arch, shape, 10)
    assert isinstance(model, PlainModel)
    assert model(_x(shape, batch=2)).shape == (2, 10)
    assert not any(type(m).__module__.startswith("faststeal.nn") for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("members", [1, 3])
def test_stacked_model_shapes(seed_all, arch, members):
    model = build_model(arch, SMALL, 7, members=members)
    assert isinstance(model, StackedModule)
    assert (model.members, model.input_shape, model.num_classes) == (members, SMALL, 7)
    assert model(_x(SMALL)).shape == (members, 4, 7)
    assert model(_x(SMALL, members=members)).shape == (members, 4, 7)
    feats = model.features(_x(SMALL))
    assert feats.dim() == 3 and feats.shape[:2] == (members, 4)
    assert feats.shape[2] == model.head.in_features
    assert isinstance(model.head, EnsembleLinear) and model.head.out_features == 7


@pytest.mark.parametrize("arch", ARCHS)
def test_stacked_on_dataset_shapes(seed_all, arch):
    for shape in DATASET_SHAPES[::2]:
        model = build_model(arch, shape, 10, members=2).eval()
        assert model(_x(shape, batch=2)).shape == (2, 2, 10)


def test_lenet_size_and_count_params():
    assert count_params(build_model("lenet", (1, 28, 28), 10)) == 100_506
    m = build_model("lenet", (1, 28, 28), 10, members=3)
    assert count_params(m) == 3 * 100_506
    m.head.bias.requires_grad_(False)
    assert count_params(m, trainable_only=True) == 3 * 100_506 - 3 * 10
    # the stacked model holds S copies of exactly the plain parameter set, for every arch
    for arch in ARCHS:
        assert count_params(build_model(arch, SMALL, 5, members=2)) == \
            2 * count_params(build_model(arch, SMALL, 5))


@pytest.mark.parametrize("arch", ARCHS)
def test_members_are_independently_initialised(seed_all, arch):
    model = build_model(arch, SMALL, 10, members=3).eval()
    y = model(_x(SMALL))
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.allclose(y[i], y[j])
    w = model.head.weight
    assert not torch.allclose(w[0], w[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_one_member_stack_equals_plain_model(seed_all, device, arch):
    plain = build_model(arch, SMALL, 10).to(device)
    stacked = build_model(arch, SMALL, 10, members=1).to(device)
    stacked.load_member(0, plain)
    for step in range(3):  # train mode: batch statistics, and running stats updated alike
        x = _x(SMALL, batch=6, device=device)
        torch.testing.assert_close(stacked(x)[0], plain(x), **ATOL)
    for (name, buf), (_, ref) in zip(stacked.named_buffers(), plain.named_buffers()):
        torch.testing.assert_close(buf.reshape(ref.shape).float(), ref.float(), **ATOL,
                                   msg=name)
    plain.eval()
    stacked.eval()
    x = _x(SMALL, batch=5, device=device)
    torch.testing.assert_close(stacked(x)[0], plain(x), **ATOL)
    torch.testing.assert_close(stacked(x.unsqueeze(0))[0], plain(x), **ATOL)
    torch.testing.assert_close(stacked.features(x)[0], plain.features(x), **ATOL)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("train", [True, False])
def test_member_i_equals_member_model_alone(seed_all, arch, train):
    model = build_model(arch, SMALL, 10, members=3)
    if not train:
        model(_x(SMALL, batch=8))  # make the running stats differ from their initial values
    model.train(train)
    x = _x(SMALL, batch=5)
    xs = _x(SMALL, batch=5, members=3)
    y, ys = model(x), model(xs)
    for i in range(3):
        member = model.member(i)
        assert isinstance(member, PlainModel) and member.training == train
        torch.testing.assert_close(y[i], member(x), **ATOL)
        torch.testing.assert_close(ys[i], member(xs[i]), **ATOL)


def test_load_member_then_member_roundtrip(seed_all):
    model = build_model("resnet-small", SMALL, 10, members=3)
    plain = build_model("resnet-small", SMALL, 10)
    plain(_x(SMALL, batch=8))  # non-trivial BN buffers
    model.load_member(2, plain)
    back = model.member(2)
    for (k, a), (_, b) in zip(back.state_dict().items(), plain.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
    before = model.member(0).state_dict()  # loading member 2 left member 0 alone
    assert any(not torch.equal(before[k], v) for k, v in plain.state_dict().items()
               if v.is_floating_point())


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_every_parameter(seed_all, arch):
    model = build_model(arch, SMALL, 10, members=2, dropout=0.2)
    out = model(_x(SMALL, batch=6))
    torch.nn.functional.cross_entropy(out.reshape(-1, 10), torch.randint(0, 10, (12,))).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ARCHS)
def test_mc_dropout_one_network_many_masks(arch):
    torch.manual_seed(0)
    model = build_model(arch, SMALL, 10, members=1, dropout=0.5).eval()
    x = _x(SMALL, batch=3)
    y = model(x, samples=4)
    assert y.shape == (4, 3, 10)
    assert all(torch.equal(y[0], y[t]) for t in range(4))  # eval: dropout off
    set_mc_dropout(model, True)
    torch.manual_seed(5)
    a = model(x, samples=4)
    assert a.shape == (4, 3, 10)
    assert not torch.allclose(a[0], a[1]) and not torch.allclose(a[2], a[3])
    torch.manual_seed(5)
    assert torch.equal(model(x, samples=4), a)
    set_mc_dropout(model, False)  # back to deterministic prediction
    torch.testing.assert_close(model(x)[0], y[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_bayesian_model(seed_all, arch):
    model = build_model(arch, SMALL, 10, bayesian=True, prior_sigma=0.5)
    assert isinstance(model, StackedModule) and model.members == 1 and model.bayesian
    x = _x(SMALL, batch=3)
    y = model(x, samples=3)
    assert y.shape == (3, 3, 10)
    assert not torch.allclose(y[0], y[1])
    assert model(x).shape == (1, 3, 10)
    assert model.features(x, samples=2).shape[:2] == (2, 3)
    kls = [m.kl() for m in model.modules() if hasattr(m, "w_rho")]
    assert len(kls) >= 3
    kl = model.kl()
    torch.testing.assert_close(kl, torch.stack(kls).sum())
    (torch.nn.functional.cross_entropy(y.reshape(-1, 10), torch.randint(0, 10, (9,)))
     + kl / 1000).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert build_model(arch, SMALL, 10, members=2).kl().item() == 0.0


def test_bayesian_posterior_mean_member(seed_all):
    model = build_model("lenet", SMALL, 10, bayesian=True).eval()
    plain = build_model("lenet", SMALL, 10).eval()
    model.load_member(0, plain)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "w_rho"):
                m.w_rho.fill_(-30.0)
                m.b_rho.fill_(-30.0)
    x = _x(SMALL, batch=4)
    torch.testing.assert_close(model(x, samples=3)[2], plain(x), **ATOL)
    torch.testing.assert_close(model.member(0)(x), plain(x), **ATOL)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="valid choices: mlp, lenet, cnn-wide, resnet-small"):
        build_model("vgg", SMALL, 10)
    with pytest.raises(ValueError, match=r"input_shape must be \(C, H, W\)"):
        build_model("mlp", (8, 8), 10)
    with pytest.raises(ValueError, match="members must be a positive int"):
        build_model("mlp", SMALL, 10, members=0)
    with pytest.raises(ValueError, match="members must be None or 1"):
        build_model("mlp", SMALL, 10, members=3, bayesian=True)
    with pytest.raises(ValueError, match="dropout must be"):
        build_model("mlp", SMALL, 10, dropout=1.2)
    model = build_model("lenet", SMALL, 10, members=3)
    with pytest.raises(ValueError, match=r"do not match the model's input_shape"):
        model(torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(2, 64))
    with pytest.raises(ValueError, match="x has 2 members on dim 0 but the model has 3"):
        model(torch.randn(2, 4, *SMALL))
    with pytest.raises(ValueError, match="samples=5 given to a model with 3 members"):
        model(torch.randn(4, *SMALL), samples=5)
    with pytest.raises(ValueError, match="not this model's architecture"):
        model.load_member(0, build_model("mlp", SMALL, 10))
    with pytest.raises(ValueError, match="member index"):
        model.member(3)
    plain = build_model("lenet", SMALL, 10)
    with pytest.raises(ValueError, match="input_shape"):
        plain(torch.randn(2, 3, 8, 8))
