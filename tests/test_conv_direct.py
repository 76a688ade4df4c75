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

pytestmark = [pytest.mark.skipif(
    conv_direct.isa() == 0,
    reason=f"conv2d_direct needs the extension and an AVX2+FMA or AVX-512 CPU "
           f"({_ext.LOAD_ERROR or 'this CPU has neither'})"), pytest.mark.usefixtures("poison")]

ISAS = [pytest.param(i, marks=pytest.mark.skipif(conv_direct.isa() < i, reason=f"no {n} here"),
                     id=n) for i, n in ((1, "avx2"), (2, "avx512"))]

# (S, B, C, O, H, W, KH, KW, ph, pw): lenet's two convs (and its first without padding: a partial
# weight-gradient tile on AVX2); output widths around both vector sizes (8, 16) and their
# multiples (tiles of 32 columns and a partial one), 1..7 wide kernels, output-channel counts
# that take block sizes 1-16 of both ISAs (AVX-512 rows of 1-2 vectors, AVX2 rows of 1-4), a 1x1
# everything.
SHAPES = [
    (2, 2, 1, 6, 28, 28, 5, 5, 0, 0),
    (1, 1, 1, 8, 4, 20, 3, 3, 1, 1),
    (1, 2, 2, 7, 3, 12, 2, 2, 0, 0),
    (1, 2, 1, 3, 5, 14, 3, 3, 1, 1),
    (1, 1, 1, 8, 5, 6, 2, 2, 0, 1),
    (1, 1, 1, 10, 3, 22, 3, 1, 1, 0),
    (1, 1, 2, 1, 3, 22, 3, 3, 1, 1),
    (1, 1, 1, 3, 2, 40, 2, 2, 1, 0),
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
    """The oracle: one F.conv2d per member (callers run it in float64)."""
    return torch.stack([F.conv2d(x[s], w[s], None if b is None else b[s], padding=padding)
                        for s in range(x.shape[0])])


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


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("wo", [7, 12, 20, 24, 28, 40, 50])
def test_non_finite_inputs_reach_exactly_the_outputs_they_reach_in_aten(seed_all, isa, wo):
    # an inf in the last input column: the lanes of a partial row tile past the output width must
    # not add its product (0 * inf = NaN where ATen's gradient is finite)
    x = torch.randn(2, 3, 2, 6, wo + 2)
    x[:, :, 1, 3, -1] = float("inf")
    x[:, 1, 0, 0, -2] = float("nan")
    w = torch.randn(2, 4, 2, 3, 3)
    g = torch.randn(2, 3, 4, 6, wo)
    wr = w.double().requires_grad_()
    br = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    _ref(x.double(), wr, br, (1, 0)).backward(g.double())
    dw, db = _ext.C.conv2d_direct_dw_cpu(g, x, 3, 3, 1, 0, True, isa)
    assert torch.equal(dw.isfinite(), wr.grad.isfinite())
    assert not dw.isfinite().all()
    ok = wr.grad.isfinite()
    assert_close(dw[ok], wr.grad[ok].float(), what="the finite dweight entries")
    assert_close(db, br.grad.float(), what="dbias")
    y = _ext.C.conv2d_direct_fwd_cpu(x, w, None, 1, 0, isa)
    r = _ref(x.double(), w.double(), None, (1, 0))
    assert torch.equal(y.isnan(), r.isnan()) and torch.equal(y.isinf(), r.isinf())


def test_empty_batches_and_members(seed_all):
    C = _ext.C
    for s, b in ((0, 3), (2, 0)):
        x, g = torch.randn(s, b, 2, 8, 8), torch.randn(s, b, 4, 8, 8)
        w = torch.randn(s, 4, 2, 3, 3)
        assert C.conv2d_direct_fwd_cpu(x, w, torch.randn(s, 4), 1, 1).shape == (s, b, 4, 8, 8)
        dw, db = C.conv2d_direct_dw_cpu(g, x, 3, 3, 1, 1, True)
        assert dw.shape == (s, 4, 2, 3, 3) and db.shape == (s, 4)
        assert (dw == 0).all() and (db == 0).all()
    with pytest.raises(RuntimeError, match="at least one channel, row and column"):
        C.conv2d_direct_fwd_cpu(torch.randn(1, 2, 0, 8, 8), torch.randn(1, 4, 0, 3, 3), None, 1,
                                1)
    why = conv_direct.unavailable_reason(torch.randn(1, 2, 3, 0, 8), torch.randn(1, 4, 3, 3, 3),
                                         (1, 1), (1, 1), (1, 1), 1)
    assert "at least one input and output channel, row and column" in why
    why = conv_direct.unavailable_reason(torch.randn(1, 2, 3, 8, 8), torch.randn(1, 0, 3, 3, 3),
                                         (1, 1), (1, 1), (1, 1), 1)
    assert "at least one input and output channel" in why


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
@pytest.mark.parametrize("w_grad", [True, False])
def test_public_op_gradients_match_the_loop(seed_all, x_grad, bias, w_grad):
    if not (x_grad or w_grad or bias):
        pytest.skip("nothing to differentiate")
    x = torch.randn(3, 4, 2, 10, 12, requires_grad=x_grad)
    w = torch.randn(3, 5, 2, 3, 5, requires_grad=w_grad)
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
    assert len(grads) == len(ref_grads) == x_grad + w_grad + bias
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
    torch.library.opcheck(torch.ops.faststeal.conv2d_direct.default,
                          (torch.randn(2, 3, 2, 7, 9, requires_grad=True),
                           torch.randn(2, 3, 2, 3, 5, requires_grad=True), None, 0, 2),
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


def test_direct_strategy_under_no_grad_and_in_the_tuner(seed_all, monkeypatch, tmp_path):
    conv = EnsembleConv2d(2, 1, 6, 5, padding=2, strategy="direct")
    x = torch.randn(2, 8, 1, 12, 12)
    with torch.no_grad():
        y = conv(x)
    assert not y.requires_grad
    assert_close(y, _ref(x, conv.weight.detach(), conv.bias.detach(), (2, 2)), what="y")
    # tuned: 'direct' is a candidate here, and a kernel it cannot run (8 wide) of the same
    # power-of-two shape class is decided separately instead of reusing its decision
    from faststeal.ops import tuning
    monkeypatch.setenv("FASTSTEAL_TUNE", "1")
    monkeypatch.setenv("FASTSTEAL_TUNING_CACHE", str(tmp_path))
    monkeypatch.setattr(tuning, "BUDGET_S", 0.01)
    tuning.clear()
    try:
        w5, w8 = torch.randn(2, 6, 1, 5, 5), torch.randn(2, 6, 1, 5, 8)
        with torch.no_grad():
            ensemble_conv2d(x, w5, None, (1, 1), (2, 2))
            y8 = ensemble_conv2d(x, w8, None, (1, 1), (2, 2))
        times = [d["times_ms"] for k, d in tuning.decisions().items()
                 if k.startswith("ensemble_conv2d|")]
        assert sorted("direct" in t for t in times) == [False, True]
        assert_close(y8, _ref(x, w8, None, (2, 2)), what="the 5x8 conv")
    finally:
        tuning.clear()


@pytest.mark.skipif(conv_direct.isa() == 0, reason="no AVX2+FMA / AVX-512 or no extension")
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_direct_strategy_under_bf16_autocast_computes_in_float32(seed_all, x_dtype):
    # bf16 training: the float32 kernel on x cast up (a first layer's float32 input or an earlier
    # bf16 layer's output), the float32 weights as they are, the result rounded once to bf16;
    # the weight gradient is the float32 kernel's on the bf16 output gradient
    conv = EnsembleConv2d(2, 2, 3, 3, padding=1, strategy="direct")
    x = torch.randn(2, 4, 2, 9, 9).to(x_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.bfloat16
    want = conv_direct.conv2d_direct(x.float(), conv.weight, conv.bias, (1, 1))
    assert torch.equal(y, want.bfloat16())
    g = torch.randn_like(want).bfloat16()
    y.backward(g)
    gw, gb = torch.autograd.grad(want, (conv.weight, conv.bias), g.float())
    assert torch.equal(conv.weight.grad, gw) and torch.equal(conv.bias.grad, gb)


@pytest.mark.parametrize("kwargs,call,match", [
    (dict(stride=2), None, "stride 1, dilation 1 and groups 1"),
    (dict(dilation=2), None, "stride 1, dilation 1 and groups 1"),
    (dict(padding=3, kernel=3), None, "padding smaller than the kernel"),
    (dict(kernel=(3, 8)), None, "up to 7 wide"),
    (dict(), "shared", "stacked"),
    (dict(), "float64", "float32 only"),
    (dict(), "autocast", "under CPU autocast x may be torch.bfloat16"),
])
def test_direct_strategy_says_why_it_cannot_run(kwargs, call, match):
    k = kwargs.pop("kernel", 3)
    conv = EnsembleConv2d(2, 2, 3, k, strategy="direct", **kwargs)
    x = torch.randn(4, 2, 9, 9) if call == "shared" else torch.randn(2, 4, 2, 9, 9)
    if call == "float64":
        conv, x = conv.double(), x.double()
    with pytest.raises(ValueError, match=match):
        if call == "autocast":  # a float16 input under bfloat16 autocast
            with torch.autocast("cpu", dtype=torch.bfloat16):
                conv(x.half())
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
    with pytest.raises(RuntimeError, match="at least one output channel"):
        C.conv2d_direct_fwd_cpu(x, torch.randn(2, 0, 1, 3, 3), None, 0, 0)
    with pytest.raises(RuntimeError, match="grad_y must have at least one channel"):
        C.conv2d_direct_dw_cpu(torch.randn(2, 3, 0, 6, 6), x, 3, 3, 0, 0, True)
    with pytest.raises(RuntimeError, match=r"grad_y must be \(S, B, O, Ho, Wo\)"):
        C.conv2d_direct_dw_cpu(torch.randn(2, 3, 4, 5, 6), x, 3, 3, 0, 0, True)
