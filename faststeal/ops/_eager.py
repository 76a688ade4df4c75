"""The eager twin of each differentiable custom op: the same forward, autograd formula and
backend, without torch.library's per-call Python.

A ``torch.library.custom_op`` is what torch.compile, export, fake tensors, ``torch.jit.trace``
and opcheck need, but each eager call of one runs Python that a plain ``autograd.Function`` does
not (schema default filling, the output alias check, the Python autograd wrapper, and the same
again for its backward op; a fused ``ensemble_linear`` forward+backward cost ~190 us against ~60
for the ``baddbmm`` + ``relu`` composite at a tiny shape). The S=5 MLP training step calls four
of them per step and its backward three: the twins made that step 1.00-1.11x as fast on the
2-core CPU host (docs/benchmarks.md, "The CNN pooling and the op-call overhead"). So every
public op runs its twin when :func:`plain` holds and the custom op otherwise; both call the one
forward and backward implementation (through :mod:`faststeal.ops.dispatch`) and share
``setup_context``/``backward``, so they compute the same thing (tests/test_ops_cpp.py checks both
routes against each other).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def plain(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a call may run the op's eager twin: not traced by torch.compile / export or
    ``torch.jit.trace``, no TorchDispatchMode active (fake tensors, make_fx, FlopCounterMode see
    the custom op), no functorch transform (vmap, grad), and every tensor a plain
    ``torch.Tensor`` or ``nn.Parameter`` (no tensor subclass)."""
    if (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or _get_current_dispatch_mode() is not None
            or torch._C._are_functorch_transforms_active()):
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


def twin(name: str, forward: Callable, setup_context: Callable,
         backward: Callable) -> type[torch.autograd.Function]:
    """An ``autograd.Function`` named ``name`` whose forward is ``forward(*inputs)``, with the
    custom op's ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)``. Its
    backward is not differentiable again (``once_differentiable``), like the custom op's.

    The forward takes ``ctx`` and calls ``setup_context`` itself (the older form of
    ``autograd.Function``): with a separate ``setup_context`` method, ``Function.apply`` binds
    the call's arguments to the forward's signature through ``inspect`` on every call (~25 us)."""
    def forward_with_ctx(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward_with_ctx),
        "backward": staticmethod(once_differentiable(backward)),
    })
