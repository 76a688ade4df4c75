"""``max_pool2d``: max pooling over non-overlapping windows — the 2x2 pooling of the zoo's CNNs
and of most user CNNs — with a C++ CPU kernel (``csrc/cpu/max_pool.cpp``).

ATen's CPU ``max_pool2d`` on an NCHW batch writes int64 indices from a loop that does not
vectorize: on the 2-vCPU Intel Xeon host of docs/benchmarks.md (family 6 model 207, AVX-512, AMX)
it cost ~10x an elementwise pass over its input, ~16% of a lenet training step. The kernel keeps
no index tensor (the backward finds the window's maximum again in the saved input) and computes
what ATen computes, bit for bit (values and the gradient's element; float32, float64, bfloat16 —
float16 runs ATen's). On the CPU which of the two runs is measured
per shape class and dtype like every op (:mod:`faststeal.ops.dispatch`); on other devices, or
when a backend without this op is requested (``triton``, ``cuda``), ATen's pooling runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks, _eager, dispatch


def _forward(x, kernel_size, relu):
    return dispatch.impl("max_pool2d", "fwd", x.device.type)(x, kernel_size, relu)


def _grad(grad_y, x, kernel_size, relu):
    fn = dispatch.impl("max_pool2d", "bwd", x.device.type)
    return fn(grad_y.contiguous(), x, kernel_size, relu)


@torch.library.custom_op("faststeal::max_pool2d", mutates_args=())
def _max_pool2d(x: torch.Tensor, kernel_size: int, relu: bool) -> torch.Tensor:
    return _forward(x, kernel_size, relu)


@_max_pool2d.register_fake
def _(x, kernel_size, relu):
    n, c, h, w = x.shape
    return x.new_empty(n, c, h // kernel_size, w // kernel_size)


@torch.library.custom_op("faststeal::max_pool2d_backward", mutates_args=())
def _max_pool2d_backward(grad_y: torch.Tensor, x: torch.Tensor, kernel_size: int,
                         relu: bool) -> torch.Tensor:
    return _grad(grad_y, x, kernel_size, relu)


@_max_pool2d_backward.register_fake
def _(grad_y, x, kernel_size, relu):
    return x.new_empty(x.shape)


def _setup(ctx, inputs, output):
    x, kernel_size, relu = inputs
    ctx.save_for_backward(x)
    ctx.args = (kernel_size, relu)


def _backward_with(grads):
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        return grads(grad_y, x, *ctx.args), None, None
    return backward


_max_pool2d.register_autograd(_backward_with(_max_pool2d_backward), setup_context=_setup)
#: the eager twin (faststeal/ops/_eager.py)
_MaxPool2d = _eager.twin("FaststealMaxPool2d", _forward, _setup, _backward_with(_grad))


def max_pool2d(x: torch.Tensor, kernel_size: int = 2, relu: bool = False) -> torch.Tensor:
    """``torch.nn.functional.max_pool2d(x, kernel_size)``: stride = kernel_size, no padding,
    dilation 1, floor mode; same values and the same gradient (each window's first maximum, a
    NaN wins). ``relu=True``: ``max_pool2d(relu(x))`` in one pass, computed from the pooled
    maximum of x (max commutes with relu; where it is not positive, relu of the window's first
    element, as ATen's scan of relu's output keeps it): the values and gradient of pooling relu's
    output, without the full-size relu passes.

    x: (N, C, H, W) float with H, W >= kernel_size. A channels-last (or any non-contiguous) x,
    a tensor off the CPU, or a requested backend other than ``cpp``/``reference`` runs
    ``torch.relu`` then ``F.max_pool2d`` itself, which keeps the memory format. Differentiable
    in x.
    """
    _checks.tensor("x", x, (4,))
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
        raise ValueError(f"kernel_size must be a positive int, got {kernel_size!r}")
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
    if x.shape[2] < kernel_size or x.shape[3] < kernel_size:
        raise ValueError(f"x's height and width must be at least kernel_size {kernel_size}, got "
                         f"{_checks.describe(x)}")
    if (not x.is_contiguous() or x.device.type != "cpu"
            or dispatch.get_backend() not in ("auto", "cpp", "reference")):
        return F.max_pool2d(torch.relu(x) if relu else x, kernel_size, kernel_size)
    op = _MaxPool2d.apply if _eager.plain(x) else _max_pool2d
    return op(x, kernel_size, relu)
