"""conv2d_direct (csrc/cpu/conv_direct.cpp, faststeal/ops/conv_direct.py): the stacked direct
convolution against its reference, the ``loop`` strategy (one ``F.conv2d`` per member) computed
in float64, for every vector ISA this CPU has (AVX2+FMA and, where present, AVX-512), with
outputs poisoned so an unwritten element fails; the ``direct`` strategy of EnsembleConv2d and its
tuning; every error."""

import pytest
import torch
import torch.nn.functional as F

from faststeal import _ext
from faststeal.nn import EnsembleConv2d
from faststeal.nn.layers import ensemble_conv2d
from faststeal.ops import conv_direct
from tolerances import assert_close

pytestmark = pytest.mark.skipif(
    conv_direct.isa() == 0,
    reason=f"conv2d_direct needs the extension and an AVX2+FMA or AVX-512 CPU "
           f"({_ext.LOAD_ERROR or 'this CPU has neither'})")

ISAS = [pytest.param(i, marks=pytest.mark.skipif(conv_direct.isa() < i, reason=f"no {n} here"),
                     id=n) for i, n in ((1, "avx2"), (2, "avx512"))]

# (S, B, C, O, H, W, KH, KW, ph, pw): lenet's two convs; output widths around both vector sizes
# (8, 16) and their multiples (tiles of 32 columns and a partial one), 1..7 wide kernels,
# output-channel counts that need every block size and a remainder, a 1x1 everything.
SHAPES = [
    (2, 3, 1, 6, 28, 28, 5, 5, 2, 2),
    (2, 2, 6, 16, 14, 14, 5, 5, 0, 0),
    (1, 2, 3, 5, 9, 37, 3, 3, 1, 1),
    (1, 2, 2, 17, 7, 5, 3, 7, 0, 3),
    (3, 1, 4, 3, 40, 70, 2, 1, 1, 0),
    (1, 1, 1, 1, 1, 1, 1, 1, 0, 0),
    (2, 1, 1, 25, 6, 9, 6, 2, 5, 1),
    (1, 3, 2, 13, 5, 15, 4, 4, 3, 0),
    (1, 1, 1, 7, 3, 33, 1, 6, 0, 5),
    (1, 2, 1, 2, 4, 16, 3, 3, 1, 1),
    (1, 1, 2, 4, 2, 31, 2, 3, 0, 1),
    (2, 5, 1, 12, 8, 64, 3, 5, 1, 2),
]


def _ref(x, w, b, padding):
    """The loop strategy in float64: the oracle."""
    return torch.stack([F.conv2d(x[s], w[s], None if b is None else b[s], padding=padding)
                        for s in range(x.shape[0])])


@pytest.fixture(autouse=True)
def _poison_outputs():
    _ext.C._set_poison_outputs(True)
    yield
    _ext.C._set_poison_outputs(False)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s}" for s in range(len(SHAPES))])
def test_kernels_match_the_reference(seed_all, isa, shape):
    S, B, C, O, H, W, KH, KW, ph, pw = shape
    x = torch.randn(S, B, C, H, W)
    w = torch.randn(S, O, C, KH, KW)
    b = torch.randn(S, O)
    xd, wd, bd = (t.double().requires_grad_() for t in (x, w, b))
    ref = _ref(xd, wd, bd, (ph, pw))
    g = torch.randn(ref.shape, dtype=torch.float64)
    ref.backward(g)
    y = _ext.C.conv2d_direct_fwd_cpu(x, w, b, ph, pw, isa)
    assert_close(y, ref.detach().float(), what="y")
    assert_close(_ext.C.conv2d_direct_fwd_cpu(x, w, None, ph, pw, isa),
                 _ref(x.double(), w.double(), None, (ph, pw)).float(), what="y without bias")
    g32 = g.float()
    dw, db = _ext.C.conv2d_direct_dw_cpu(g32, x, KH, KW, ph, pw, True, isa)
    assert_close(dw, wd.grad.float(), what="dweight")
    assert_close(db, bd.grad.float(), what="dbias")
    dw2, db2 = _ext.C.conv2d_direct_dw_cpu(g32, x, KH, KW, ph, pw, False, isa)
    assert db2 is None
    torch.testing.assert_close(dw2, dw, rtol=0, atol=0)
    # the input gradient: the forward over grad_y with the flipped, transposed kernels
    dx = _ext.C.conv2d_direct_fwd_cpu(g32, conv_direct._weight_t(w), None, KH - 1 - ph,
                                      KW - 1 - pw, isa)
    assert_close(dx, xd.grad.float(), what="dx")


@pytest.mark.parametrize("threads", [1, 3])
def test_weight_gradient_partial_sums_do_not_depend_on_threads(seed_all, threads):
    # the weight gradient is summed in image groups whose count follows the thread count
    x, g = torch.randn(3, 7, 2, 9, 11), torch.randn(3, 7, 4, 9, 11)
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dw, db = _ext.C.conv2d_direct_dw_cpu(g, x, 3, 3, 1, 1, True)
    finally:
        torch.set_num_threads(n)
    wr = torch.zeros(3, 4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    br = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    _ref(x.double(), wr, br, (1, 1)).backward(g.double())
    assert_close(dw, wr.grad.float(), what="dweight")
    assert_close(db, br.grad.float(), what="dbias")


@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_public_op_gradients_match_the_loop(seed_all, x_grad, bias):
    x = torch.randn(3, 4, 2, 10, 12, requires_grad=x_grad)
    w = torch.randn(3, 5, 2, 3, 5, requires_grad=True)
    b = torch.randn(3, 5, requires_grad=True) if bias else None
    y = conv_direct.conv2d_direct(x, w, b, (1, 2))
    g = torch.randn(y.shape)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None and t.requires_grad],
                                g)
    refs = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None
            for t in (x, w, b)]
    yr = _ref(*refs, (1, 2))
    ref_grads = torch.autograd.grad(yr, [t for t in refs if t is not None and t.requires_grad],
                                    g.double())
    assert_close(y, yr.detach().float(), what="y")
    assert len(grads) == len(ref_grads) == 1 + x_grad + bias
    for got, want in zip(grads, ref_grads):
        assert_close(got, want.float(), what="grad")


def test_custom_op_and_eager_twin_agree(seed_all):
    x = torch.randn(2, 3, 1, 8, 8, requires_grad=True)
    w = torch.randn(2, 4, 1, 3, 3, requires_grad=True)
    b = torch.randn(2, 4, requires_grad=True)
    outs = []
    for op in (conv_direct._Conv2dDirect.apply, conv_direct._conv2d_direct):
        y = op(x, w, b, 1, 1)
        outs.append((y, *torch.autograd.grad(y.square().sum(), (x, w, b))))
    for a, c in zip(*outs):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    args = (torch.randn(2, 3, 1, 8, 8, requires_grad=True),
            torch.randn(2, 4, 1, 3, 3, requires_grad=True), torch.randn(2, 4, requires_grad=True),
            1, 1)
    torch.library.opcheck(torch.ops.faststeal.conv2d_direct.default, args,
                          atol=1e-4, rtol=1e-4)
    torch.library.opcheck(torch.ops.faststeal.conv2d_direct_weight_grad.default,
                          (torch.randn(2, 3, 4, 8, 8), torch.randn(2, 3, 1, 8, 8), 3, 3, 1, 1),
                          atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("folded", [False, True])
def test_direct_strategy_of_the_stacked_conv(seed_all, folded):
    base = EnsembleConv2d(3, 2, 4, 5, padding=2, strategy="loop")
    conv = EnsembleConv2d(3, 2, 4, 5, padding=2, strategy="direct")
    conv.load_state_dict(base.state_dict())
    x = torch.randn(3, 6, 2, 11, 9)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    g = torch.randn(3, 6, 4, 11, 9)
    (base(xs[0]) * g).sum().backward()
    y = ensemble_conv2d(xs[1], conv.weight, conv.bias, (1, 1), (2, 2), "direct", folded=folded)
    assert y.shape == ((18, 4, 11, 9) if folded else (3, 6, 4, 11, 9))
    (y.reshape(g.shape) * g).sum().backward()
    assert_close(conv.weight.grad, base.weight.grad, what="dweight")
    assert_close(conv.bias.grad, base.bias.grad, what="dbias")
    assert_close(xs[1].grad, xs[0].grad, what="dx")


@pytest.mark.parametrize("kwargs,call,match", [
    (dict(stride=2), None, "stride 1, dilation 1 and groups 1"),
    (dict(dilation=2), None, "stride 1, dilation 1 and groups 1"),
    (dict(padding=3, kernel=3), None, "padding smaller than the kernel"),
    (dict(kernel=(3, 8)), None, "up to 7 wide"),
    (dict(), "shared", "stacked"),
    (dict(), "float64", "float32 only"),
    (dict(), "autocast", "autocast is on"),
])
def test_direct_strategy_says_why_it_cannot_run(kwargs, call, match):
    k = kwargs.pop("kernel", 3)
    conv = EnsembleConv2d(2, 2, 3, k, strategy="direct", **kwargs)
    x = torch.randn(4, 2, 9, 9) if call == "shared" else torch.randn(2, 4, 2, 9, 9)
    if call == "float64":
        conv, x = conv.double(), x.double()
    with pytest.raises(ValueError, match=match):
        if call == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                conv(x)
        else:
            conv(x)


def test_public_op_bad_arguments():
    x, w = torch.randn(2, 3, 1, 8, 8), torch.randn(2, 4, 1, 3, 3)
    with pytest.raises(TypeError, match="x and weight must be tensors"):
        conv_direct.conv2d_direct(x.numpy(), w)
    with pytest.raises(ValueError, match=r"weight must be \(S, O, C, KH, KW\) with S = 2"):
        conv_direct.conv2d_direct(x, torch.randn(3, 4, 1, 3, 3))
    with pytest.raises(ValueError, match=r"bias must be \(S, O\) = \(2, 4\)"):
        conv_direct.conv2d_direct(x, w, torch.randn(4))
    with pytest.raises(ValueError, match="padding smaller than the kernel"):
        conv_direct.conv2d_direct(x, w, None, (3, 0))


def test_entry_points_check_their_arguments():
    C = _ext.C
    x, w = torch.randn(2, 3, 1, 8, 8), torch.randn(2, 4, 1, 3, 3)
    with pytest.raises(RuntimeError, match="isa must be 0"):
        C.conv2d_direct_fwd_cpu(x, w, None, 0, 0, 3)
    if conv_direct.isa() < 2:
        with pytest.raises(RuntimeError, match="isa 2 is not available"):
            C.conv2d_direct_fwd_cpu(x, w, None, 0, 0, 2)
    with pytest.raises(RuntimeError, match="x has dtype Double"):
        C.conv2d_direct_fwd_cpu(x.double(), w, None, 0, 0)
    with pytest.raises(RuntimeError, match="x must be 5-D"):
        C.conv2d_direct_fwd_cpu(x[0], w, None, 0, 0)
    with pytest.raises(RuntimeError, match="weight must be 5-D"):
        C.conv2d_direct_fwd_cpu(x, w[0], None, 0, 0)
    with pytest.raises(RuntimeError, match=r"weight must be \(S, O, C, KH, KW\)"):
        C.conv2d_direct_fwd_cpu(x, torch.randn(2, 4, 2, 3, 3), None, 0, 0)
    with pytest.raises(RuntimeError, match=r"bias must be \(S, O\) = \(2, 4\)"):
        C.conv2d_direct_fwd_cpu(x, w, torch.randn(2, 5), 0, 0)
    with pytest.raises(RuntimeError, match="1 <= KW <= 7"):
        C.conv2d_direct_fwd_cpu(x, torch.randn(2, 4, 1, 3, 8), None, 0, 0)
    with pytest.raises(RuntimeError, match="must be >= 0 and smaller than the kernel"):
        C.conv2d_direct_fwd_cpu(x, w, None, 3, 0)
    with pytest.raises(RuntimeError, match="smaller than the kernel"):
        C.conv2d_direct_fwd_cpu(torch.randn(2, 3, 1, 2, 8), torch.randn(2, 4, 1, 5, 3), None, 1,
                                0)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        C.conv2d_direct_fwd_cpu(x.transpose(3, 4), w, None, 0, 0)
    with pytest.raises(RuntimeError, match=r"grad_y must be \(S, B, O, Ho, Wo\)"):
        C.conv2d_direct_dw_cpu(torch.randn(2, 3, 4, 5, 6), x, 3, 3, 0, 0, True)
