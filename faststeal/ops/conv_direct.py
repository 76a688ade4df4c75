"""``conv2d_direct``: S stacked stride-1 convolutions of float32 images on the CPU, computed
directly by the C++ kernels of ``csrc/cpu/conv_direct.cpp`` (vector FMAs along output rows, no
im2col; AVX-512 or AVX2+FMA, picked at run time); under bf16 autocast too, in float32.

It is the ``direct`` strategy of :func:`faststeal.nn.layers.ensemble_conv2d`, for the narrow
layers where oneDNN's convolution runs far below the CPU's FMA rate — the first conv of a small
CNN (1 or 3 input channels) above all. Like every conv strategy it runs only where it was measured
to be the fastest on the host (:func:`faststeal.nn.layers.conv_strategy`); its reference, test
oracle and fallback is the ``loop`` strategy (one ``F.conv2d`` per member). Sums run in another
order than oneDNN's: results agree with ATen to float32 rounding, not bit for bit.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .. import _ext
from . import _eager
from ._checks import describe as _describe

#: the widest kernel the weight-gradient kernel is instantiated for (csrc/cpu/conv_direct.cpp)
MAX_KERNEL_WIDTH = 7


@functools.lru_cache(maxsize=None)
def isa() -> int:
    """The vector ISA the kernels run on this CPU: 2 AVX-512, 1 AVX2+FMA, 0 none (or no
    extension)."""
    return 0 if _ext.C is None else int(_ext.C.conv2d_direct_isa())


def _autocast_dtype() -> Optional[torch.dtype]:
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None


def unavailable_reason(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation,
                       groups: int) -> Optional[str]:
    """Why :func:`conv2d_direct` cannot run this convolution, or None."""
    if _ext.C is None:
        return _ext.unavailable_reason()
    if isa() == 0:
        return "this CPU has neither AVX2+FMA nor AVX-512 (or the extension was not built by GCC " \
            "for x86-64)"
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return f"it runs on the CPU only (x on {x.device})"
    if x.dim() != 5:
        return "it needs a stacked (S, B, C, H, W) input"
    if min(x.shape[2:]) < 1 or weight.dim() < 2 or weight.shape[1] < 1:
        return f"it needs at least one input and output channel, row and column (x of shape " \
            f"{tuple(x.shape)}, weight of shape {tuple(weight.shape)})"
    amp = _autocast_dtype()
    if weight.dtype != torch.float32 or x.dtype not in (torch.float32, amp):
        return f"it computes in float32 only (x {x.dtype}, weight {weight.dtype}" + \
            (f"; under CPU autocast x may be {amp})" if amp is not None else ")")
    if tuple(stride) != (1, 1) or tuple(dilation) != (1, 1) or groups != 1:
        return f"it needs stride 1, dilation 1 and groups 1 (got stride {tuple(stride)}, " \
            f"dilation {tuple(dilation)}, groups {groups})"
    kh, kw = weight.shape[-2:]
    if kw > MAX_KERNEL_WIDTH:
        return f"it supports kernels up to {MAX_KERNEL_WIDTH} wide (got {kh}x{kw})"
    if not (0 <= padding[0] < kh and 0 <= padding[1] < kw):
        return f"it needs a padding smaller than the kernel (got {tuple(padding)} for {kh}x{kw})"
    return None


def _weight_t(weight: torch.Tensor) -> torch.Tensor:
    """The kernels of the input gradient: flipped, input and output channels swapped."""
    return weight.flip(3, 4).transpose(1, 2).contiguous()


def _forward(x, weight, bias, ph, pw):
    return _ext.C.conv2d_direct_fwd_cpu(x, weight, bias, ph, pw)


def _grads(grad_y, x, weight, ph, pw, need):
    """(dx, dweight, dbias), each None where ``need`` (x, weight, bias) says it is not wanted."""
    grad_y = grad_y.contiguous()
    kh, kw = weight.shape[-2:]
    dx = _ext.C.conv2d_direct_fwd_cpu(grad_y, _weight_t(weight), None, kh - 1 - ph,
                                      kw - 1 - pw) if need[0] else None
    dw = db = None
    if need[1] or need[2]:
        dw, db = _ext.C.conv2d_direct_dw_cpu(grad_y, x, kh, kw, ph, pw, need[2])
    return dx, (dw if need[1] else None), (db if need[2] else None)


@torch.library.custom_op("faststeal::conv2d_direct", mutates_args=())
def _conv2d_direct(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ph: int,
                   pw: int) -> torch.Tensor:
    return _forward(x, weight, bias, ph, pw)


def _out_shape(x, weight, ph, pw):
    s, b, _, h, w = x.shape
    return s, b, weight.shape[1], h + 2 * ph - weight.shape[3] + 1, w + 2 * pw - weight.shape[4] + 1


@_conv2d_direct.register_fake
def _(x, weight, bias, ph, pw):
    return x.new_empty(_out_shape(x, weight, ph, pw))


@torch.library.custom_op("faststeal::conv2d_direct_weight_grad", mutates_args=())
def _conv2d_direct_weight_grad(grad_y: torch.Tensor, x: torch.Tensor, kh: int, kw: int, ph: int,
                               pw: int) -> tuple[torch.Tensor, torch.Tensor]:
    dw, db = _ext.C.conv2d_direct_dw_cpu(grad_y.contiguous(), x, kh, kw, ph, pw, True)
    return dw, db


@_conv2d_direct_weight_grad.register_fake
def _(grad_y, x, kh, kw, ph, pw):
    s, _, c = x.shape[:3]
    o = grad_y.shape[2]
    return x.new_empty(s, o, c, kh, kw), x.new_empty(s, o)


def _setup(ctx, inputs, output):
    x, weight, bias, ph, pw = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (ph, pw, bias is not None)


def _backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    ph, pw, has_bias = ctx.args
    need = ctx.needs_input_grad
    return (*_grads(grad_y, x, weight, ph, pw, (need[0], need[1], has_bias and need[2])), None,
            None)


def _backward_op(ctx, grad_y):
    x, weight = ctx.saved_tensors
    ph, pw, has_bias = ctx.args
    need = ctx.needs_input_grad
    kh, kw = weight.shape[-2:]
    dx = _conv2d_direct(grad_y.contiguous(), _weight_t(weight), None, kh - 1 - ph, kw - 1 - pw) \
        if need[0] else None
    dw = db = None
    if need[1] or (has_bias and need[2]):
        dw, db = _conv2d_direct_weight_grad(grad_y, x, kh, kw, ph, pw)
    return dx, (dw if need[1] else None), (db if has_bias and need[2] else None), None, None


_conv2d_direct.register_autograd(_backward_op, setup_context=_setup)
#: the eager twin (faststeal/ops/_eager.py)
_Conv2dDirect = _eager.twin("FaststealConv2dDirect", _forward, _setup, _backward)


def conv2d_direct(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  padding: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """S stacked convolutions, stride 1: x (S, B, C, H, W), weight (S, O, C, KH, KW), bias (S, O)
    or None, zero ``padding`` (ph, pw) smaller than the kernel -> (S, B, O, Ho, Wo), member s
    being ``F.conv2d(x[s], weight[s], bias[s], padding=padding)``. float32 on the CPU;
    differentiable in x, weight and bias. Under CPU autocast (``precision="bf16"``) it still
    computes in float32 (x cast up, the float32 weights as they are) and returns the autocast
    dtype, like the autocast convolutions it is measured against. ValueError says why a call
    cannot run (see :func:`unavailable_reason`)."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"x and weight must be tensors, got {type(x).__name__} and "
                        f"{type(weight).__name__}")
    ph, pw = (int(p) for p in padding)
    why = unavailable_reason(x, weight, (1, 1), (ph, pw), (1, 1), 1)
    if why is not None:
        raise ValueError(f"conv2d_direct cannot run: {why}")
    if weight.dim() != 5 or weight.shape[0] != x.shape[0] or weight.shape[2] != x.shape[2]:
        raise ValueError(f"weight must be (S, O, C, KH, KW) with S = {x.shape[0]} and "
                         f"C = {x.shape[2]} of x, got shape {tuple(weight.shape)}")
    if bias is not None and (tuple(bias.shape) != tuple(weight.shape[:2])
                             or bias.dtype != weight.dtype or bias.device != weight.device):
        raise ValueError(f"bias must be (S, O) = {tuple(weight.shape[:2])} in weight's dtype and "
                         f"device ({weight.dtype}, {weight.device}), got {_describe(bias)}")
    amp = _autocast_dtype()
    if amp is not None:
        with torch.autocast("cpu", enabled=False):
            return conv2d_direct(x.float(), weight, bias, (ph, pw)).to(amp)
    x, weight = x.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    op = _Conv2dDirect.apply if _eager.plain(x, weight, bias) else _conv2d_direct
    return op(x, weight, bias, ph, pw)
