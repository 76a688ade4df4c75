"""Stacked layers: S members of one layer held with a leading member axis, run as one computation.

Shape contract (every layer here): activations are ``(S, B, ...)``; an input without the member
axis (``(B, ...)``) is *shared* by all members. A layer with ``members == 1`` also accepts any
number ``S'`` of leading copies and applies its single parameter set to each of them (MC Dropout:
one network, ``S'`` dropout masks); the copies are folded into the batch.

Conv-side layouts: the grouped convolution produces its output in a "batch-major" memory layout
(``(B, S, C, H, W)`` in memory, exposed as an ``(S, B, C, H, W)`` view). The conv, batch-norm,
pooling and dropout layers below keep that layout when it is a view, so a conv stack never copies
activations between layers; only the flatten before the first linear layer makes them contiguous.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..checks import positive_int
from ..ops import conv_direct, tuning

IntPair = Union[int, tuple[int, int]]


# ----------------------------------------------------------------------------- helpers

def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_rank(x, ranks: tuple[int, ...], what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in ranks:
        want = " or ".join(f"{r}-D" for r in ranks)
        raise ValueError(f"x must be {want} ({what}), got {_describe(x)}")


def _check_stack(x: torch.Tensor, members: int, layer: str) -> None:
    """A stacked input's leading axis must match ``members`` unless ``members == 1`` (broadcast)."""
    if members != 1 and x.shape[0] != members:
        raise ValueError(f"{layer} has {members} members but x has {x.shape[0]} along the member "
                         f"axis (dim 0, {_describe(x)}); pass {members} stacked inputs or a "
                         f"shared input without the member axis")


def member_copies(members: int, samples: Optional[int], stacked: Optional[int],
                  shape: tuple) -> int:
    """How many member copies a stacked model's forward (``faststeal.stack``'s
    ``StackedModule``) runs, with its checks: ``members``
    is the parameter stack size, ``samples`` the caller's copy count (for one-member MC dropout /
    Bayesian models), ``stacked`` the size of the input's member axis (None for a shared input);
    ``shape`` is the input's shape, for messages. ValueError on a contradiction."""
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int)
                                or samples < 1):
        raise ValueError(f"samples must be a positive int or None, got {samples!r}")
    if members > 1:
        if samples is not None and samples != members:
            raise ValueError(f"samples={samples} given to a model with {members} members; "
                             f"samples is for one-member (MC dropout / Bayesian) models")
        if stacked is not None and stacked != members:
            raise ValueError(f"x has {stacked} members on dim 0 but the model has {members} "
                             f"(x shape {tuple(shape)})")
        return members
    if stacked is not None:
        if samples is not None and samples != stacked:
            raise ValueError(f"samples={samples} but x has {stacked} copies on dim 0 "
                             f"(x shape {tuple(shape)})")
        return stacked
    return 1 if samples is None else samples


def next_seed() -> int:
    """A fresh seed for the counter-based RNG of the ops, drawn from torch's default CPU generator.

    One host draw per call (no device sync: the CPU generator is used even for CUDA tensors), so
    ``torch.manual_seed`` makes dropout masks and Bayesian weight samples reproducible.
    """
    return int(torch.randint(0, 2**62, (1,)).item())


def fold_4d(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply a per-channel 4-D op ``fn`` to an ``(S, B, C, H, W)`` stack without copying it.

    A batch-major stack (a transposed view of ``(B, S, C, H, W)`` memory) is folded into channels
    ``(B, S*C, H, W)``; anything else into the batch ``(S*B, C, H, W)``. ``fn`` must treat
    channels and batch rows independently (pooling, dropout, activations). Returns ``(S, B, ...)``.
    """
    s, b, c = x.shape[:3]
    xt = x.transpose(0, 1)
    if xt.is_contiguous():
        y = fn(xt.reshape(b, s * c, *x.shape[3:]))
        return y.view(b, s, c, *y.shape[2:]).transpose(0, 1)
    y = fn(x.reshape(s * b, c, *x.shape[3:]))
    return y.view(s, b, c, *y.shape[2:])


def _fold_batch(x: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``(S', B, ...)`` -> ``(S'*B, ...)`` (a view when possible) and the inverse for the output."""
    s, b = x.shape[:2]
    xt = x.transpose(0, 1)
    if xt.is_contiguous():  # batch-major memory: fold as (B*S') to stay a view
        return xt.reshape(b * s, *x.shape[2:]), \
            lambda y: y.view(b, s, *y.shape[1:]).transpose(0, 1)
    return x.reshape(s * b, *x.shape[2:]), lambda y: y.view(s, b, *y.shape[1:])


def _pair(v: IntPair, name: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in t):
        raise ValueError(f"{name} must be a non-negative int or a pair of them, got {v!r}")
    return t  # type: ignore[return-value]


class _MCDropoutMixin:
    """Dropout that is active in training mode, or at prediction time when ``mc_dropout`` is set."""

    mc_dropout: bool = False

    def _dropout_active(self, p: float) -> bool:
        return p > 0.0 and (self.training or self.mc_dropout)  # type: ignore[attr-defined]


def set_mc_dropout(module: nn.Module, enabled: bool) -> nn.Module:
    """Turn prediction-time (MC) dropout on or off in every faststeal dropout-bearing submodule.

    Affects :class:`EnsembleLinear` (fused dropout) and :class:`EnsembleDropout`; plain
    ``nn.Dropout`` modules are left alone. Returns ``module``.
    """
    for m in module.modules():
        if isinstance(m, _MCDropoutMixin):
            m.mc_dropout = bool(enabled)
    return module


# ----------------------------------------------------------------------------- linear

class EnsembleLinear(_MCDropoutMixin, nn.Module):
    """S linear layers with fused bias, activation and dropout.

    weight: (members, out_features, in_features); bias: (members, out_features). Each member is
    initialised independently like ``nn.Linear`` (uniform in +-1/sqrt(in_features)).
    forward: x (members, batch, in_features) or shared (batch, in_features)
    -> (members, batch, out_features), computing ``dropout(activation(x @ W_s^T + b_s))``.
    Dropout runs in training mode or when ``mc_dropout`` is set (see :func:`set_mc_dropout`).
    With ``members == 1`` an input of S' > 1 copies uses the single weight set for every copy and
    gets an independent dropout mask per copy; ``samples=T`` does the same for a shared input.
    """

    def __init__(self, members: int, in_features: int, out_features: int, bias: bool = True,
                 activation: str = "none", dropout: float = 0.0,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.members = positive_int("members", members)
        self.in_features = positive_int("in_features", in_features)
        self.out_features = positive_int("out_features", out_features)
        if activation not in ("none", "relu", "gelu"):
            raise ValueError(f"activation must be one of ('none', 'relu', 'gelu'), "
                             f"got {activation!r}")
        if (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
                or not 0 <= dropout < 1):
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        self.activation = activation
        self.dropout = float(dropout)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(members, out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(members, out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's kaiming_uniform_(a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)); drawing the
        # whole (S, N, K) tensor i.i.d. makes the members independent.
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor, samples: Optional[int] = None) -> torch.Tensor:
        _check_rank(x, (2, 3), "(members, batch, in_features) or shared (batch, in_features)")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have {self.in_features} features in its last dim, "
                             f"got {_describe(x)}")
        p = self.dropout if self._dropout_active(self.dropout) else 0.0
        seed = next_seed() if p > 0.0 else 0
        copies = None
        if self.members == 1:
            if x.dim() == 3 and x.shape[0] > 1:
                copies = x.shape[0]
            elif samples is not None and samples > 1:
                copies = samples
                x = x.unsqueeze(0) if x.dim() == 2 else x
                x = x.expand(copies, *x.shape[1:])
        if copies is not None:
            if samples is not None and samples != copies:
                raise ValueError(f"samples={samples} but x has {copies} copies on its member axis")
            # One weight set, S' copies folded into the batch: the op's counter covers the whole
            # (1, S'*B, N) output, so every copy gets its own mask.
            b = x.shape[1]
            y = ops.ensemble_linear(x.reshape(1, copies * b, self.in_features), self.weight,
                                    self.bias, self.activation, p, seed)
            return y.view(copies, b, self.out_features)
        if x.dim() == 3:
            _check_stack(x, self.members, "EnsembleLinear")
        if samples is not None and samples != self.members:
            raise ValueError(f"samples={samples} given to an EnsembleLinear with {self.members} "
                             f"members; samples is only for members == 1")
        return ops.ensemble_linear(x, self.weight, self.bias, self.activation, p, seed)

    @torch.no_grad()
    def load_member(self, i: int, linear: nn.Linear) -> None:
        """Copy a plain ``nn.Linear``'s weights into member ``i``."""
        _check_index(i, self.members)
        if tuple(linear.weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"linear.weight must be {(self.out_features, self.in_features)}, "
                             f"got {tuple(linear.weight.shape)}")
        self.weight[i].copy_(linear.weight)
        if self.bias is not None:
            if linear.bias is None:
                raise ValueError("the stacked layer has a bias but the plain nn.Linear has none")
            self.bias[i].copy_(linear.bias)

    @torch.no_grad()
    def member(self, i: int) -> nn.Linear:
        """Member ``i`` as a plain ``nn.Linear`` (a copy; activation/dropout not included)."""
        _check_index(i, self.members)
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight.copy_(self.weight[i])
        if self.bias is not None:
            lin.bias.copy_(self.bias[i])
        return lin

    def extra_repr(self) -> str:
        return (f"members={self.members}, in_features={self.in_features}, "
                f"out_features={self.out_features}, bias={self.bias is not None}, "
                f"activation={self.activation!r}, dropout={self.dropout}")


def _check_index(i, members: int) -> None:
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < members:
        raise ValueError(f"member index must be an int in [0, {members}), got {i!r}")


# ----------------------------------------------------------------------------- conv

CONV_STRATEGIES = ("auto", "grouped", "unfold", "loop", "direct")
CONV_ENV = "FASTSTEAL_CONV_STRATEGY"


def default_conv_strategy(x: torch.Tensor) -> str:
    """The strategy ``auto`` takes without tuning (``FASTSTEAL_TUNE=0``): ``loop`` for a stacked
    input on the CPU, ``grouped`` otherwise (the measurements in :class:`EnsembleConv2d`)."""
    return "loop" if (x.device.type == "cpu" and x.dim() == 5) else "grouped"


def conv_strategy(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  stride: tuple[int, int], padding: tuple[int, int],
                  dilation: tuple[int, int] = (1, 1), groups: int = 1,
                  folded: bool = False) -> str:
    """The strategy ``auto`` runs for this call: measured once per shape class, dtype, device
    model, thread count and mode (forward only under no_grad, forward + backward otherwise) by
    :mod:`faststeal.ops.tuning`; ``FASTSTEAL_CONV_STRATEGY`` forces one. A dilated or grouped
    convolution is timed as itself, under its own key, without ``unfold`` (which cannot run it).
    ``folded``: the caller needs the output member-folded ``(S*B, ...)`` (``faststeal.stack``'s
    layers), which costs ``grouped`` and ``unfold`` a copy: it is timed with them."""
    plain = groups == 1 and tuple(dilation) == (1, 1)
    names = CONV_STRATEGIES[1:]
    train = torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)
    amp = tuning.autocast_tag(x.device.type)
    # whether 'direct' can run is part of the class: sizes rounded to powers of two (a 5x5 and a
    # 5x8 kernel) must not share a decision for 'direct' that only one of them can run
    direct_ok = conv_direct.unavailable_reason(x, weight, stride, padding, dilation,
                                               groups) is None
    extra = (() if plain else (f"dilation={tuple(dilation)}", f"groups={groups}")) + \
        (("folded",) if folded else ()) + (("direct",) if direct_ok else ())
    shape = tuning.shape_class(x, weight, bias is not None, stride, padding,
                               "train" if train else "eval", amp, *extra)

    def candidates():
        # detached leaves: timing must not touch the caller's graph or the global RNG
        xd, wd = x.detach(), weight.detach()
        bd = None if bias is None else bias.detach()

        def run(strategy: str) -> None:
            if not train:
                with torch.no_grad():
                    ensemble_conv2d(xd, wd, bd, stride, padding, strategy, dilation, groups,
                                    folded)
                return
            with torch.enable_grad():
                xr = xd.clone().requires_grad_(True) if x.requires_grad else xd
                wr = wd.clone().requires_grad_(True)
                br = None if bd is None else bd.clone().requires_grad_(True)
                y = ensemble_conv2d(xr, wr, br, stride, padding, strategy, dilation, groups,
                                    folded)
                y.backward(torch.ones_like(y))

        return {n: (lambda n=n: run(n)) for n in names
                if (plain or n != "unfold") and (direct_ok or n != "direct")}

    return tuning.decide("ensemble_conv2d", x.device.type, shape, candidates,
                         default_conv_strategy(x), names, force_env=CONV_ENV)


def ensemble_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    stride: tuple[int, int], padding: tuple[int, int],
                    strategy: str = "auto", dilation: tuple[int, int] = (1, 1),
                    groups: int = 1, folded: bool = False) -> torch.Tensor:
    """S 2-D convolutions at once.

    x: (S, B, C, H, W) stacked or (B, C, H, W) shared; weight: (S, C', C // groups, kh, kw);
    bias: (S, C') or None. Returns (S, B, C', H', W'); for ``grouped`` and a shared input it is a
    batch-major view (see the module docstring); with ``folded`` the member-folded
    (S*B, C', H', W') tensor (a copy for ``grouped`` and ``unfold``, whose outputs are not
    member-major).
    ``dilation`` and ``groups`` mean what they mean for ``F.conv2d`` (per member); ``unfold``
    supports ``groups == 1`` only.

    Strategies (all loop-free except ``loop``; ``auto``, the default, times those that can run
    on this machine for this shape class and keeps the fastest — :func:`conv_strategy`):
    ``grouped`` members folded into channel groups: one ``F.conv2d(groups=S)`` on (B, S*C, H, W);
      a shared input needs no groups at all (the S filter banks are concatenated).
    ``unfold``  members folded into a batched GEMM: im2col (``F.unfold``) then ``torch.bmm``.
    ``loop``    one ``F.conv2d`` per member (the baseline people write).
    ``direct``  the C++ CPU kernel :func:`faststeal.ops.conv_direct.conv2d_direct` (vector FMAs
      along output rows): stacked float32 input, stride 1, no dilation or groups, padding
      smaller than the kernel, kernels up to 7 wide, an AVX2+FMA or AVX-512 CPU; ValueError
      (with the reason) elsewhere. Under bf16 autocast it computes in float32 and returns
      bfloat16 (where the CPU lacks bf16 arithmetic, autocast's bf16 convolutions are slow
      fallbacks). ``auto`` times it only where it can run.
    """
    s, co, ci, kh, kw = weight.shape  # ci: input channels per group
    shared = x.dim() == 4
    if strategy == "auto":
        strategy = conv_strategy(x, weight, bias, stride, padding, dilation, groups, folded)
    if folded:
        y = ensemble_conv2d(x, weight, bias, stride, padding, strategy, dilation, groups)
        return y.reshape(-1, *y.shape[2:])
    if strategy == "grouped":
        wf = weight.reshape(s * co, ci, kh, kw)
        bf = bias.reshape(s * co) if bias is not None else None
        if shared and groups == 1:
            y = F.conv2d(x, wf, bf, stride, padding, dilation)
            b = x.shape[0]
        else:
            # member s reads channels [s*C, (s+1)*C) of the folded input; its own `groups`
            # groups subdivide that block, so S*groups groups in all
            if shared:
                x = x.unsqueeze(0).expand(s, *x.shape)
            b = x.shape[1]
            xt = x.transpose(0, 1).reshape(b, s * ci * groups, *x.shape[3:])
            y = F.conv2d(xt, wf, bf, stride, padding, dilation, groups=s * groups)
        return y.view(b, s, co, *y.shape[2:]).transpose(0, 1)
    if strategy == "unfold" and (groups != 1 or tuple(dilation) != (1, 1)):
        raise ValueError(f"strategy 'unfold' supports groups=1 and dilation=1 only, got "
                         f"groups={groups}, dilation={dilation}")
    if strategy == "unfold":
        xs = x if shared else x.reshape(-1, *x.shape[2:])  # (S*B or B, C, H, W)
        h, w_ = xs.shape[-2:]
        ho = (h + 2 * padding[0] - kh) // stride[0] + 1
        wo = (w_ + 2 * padding[1] - kw) // stride[1] + 1
        cols = F.unfold(xs, (kh, kw), padding=padding, stride=stride)  # (n, C*kh*kw, L)
        b = x.shape[0] if shared else x.shape[1]
        ck, L = cols.shape[1], cols.shape[2]
        if shared:
            cols = cols.unsqueeze(0).expand(s, b, ck, L)
        else:
            cols = cols.view(s, b, ck, L)
        cols = cols.permute(0, 2, 1, 3).reshape(s, ck, b * L)
        y = torch.bmm(weight.reshape(s, co, ck), cols)  # (S, C', B*L)
        if bias is not None:
            y = y + bias.unsqueeze(-1)
        return y.view(s, co, b, ho, wo).transpose(1, 2)
    if strategy == "direct":
        why = conv_direct.unavailable_reason(x, weight, stride, padding, dilation, groups)
        if why is not None:
            raise ValueError(f"strategy 'direct' cannot run this convolution: {why}")
        return conv_direct.conv2d_direct(x, weight, bias, padding)
    if strategy == "loop":
        # unbind, not x[i]: the backward of S selects would zero-fill and add S full-size input
        # gradients (O(S^2) memory traffic); unbind's backward is one stack
        xs = [x] * s if shared else x.unbind(0)
        bs = [None] * s if bias is None else bias.unbind(0)
        outs = [F.conv2d(xi, wi, bi, stride, padding, dilation, groups)
                for xi, wi, bi in zip(xs, weight.unbind(0), bs)]
        return torch.stack(outs)
    raise ValueError(f"strategy must be one of {CONV_STRATEGIES}, got {strategy!r}")


class EnsembleConv2d(nn.Module):
    """S 2-D convolution layers: x (S, B, C, H, W) or shared (B, C, H, W) -> (S, B, C', H', W').

    weight: (members, out_channels, in_channels, kh, kw); bias: (members, out_channels); each
    member initialised independently like ``nn.Conv2d``. With ``members == 1`` an input of S' > 1
    copies is folded into the batch (one conv).

    ``strategy`` (see :func:`ensemble_conv2d`): ``auto`` (default) measures the runnable strategies
    on the host the first time a shape class is seen and keeps the fastest
    (:func:`conv_strategy`; ``FASTSTEAL_CONV_STRATEGY`` forces one; with ``FASTSTEAL_TUNE=0`` it is
    ``loop`` for a stacked input on the CPU and ``grouped`` otherwise, from these measurements);
    ``grouped``, ``unfold``, ``loop`` and ``direct`` (the C++ CPU kernel
    :func:`faststeal.ops.conv_direct.conv2d_direct`, where it can run) stay selectable. Measured
    2026-11-26 (float32, B=128,
    28x28x1 input, one training step = forward + cross-entropy + backward of the whole stacked
    model, median ms):

    ===========================================  =======  =======  ======
    where, model, S                              grouped  unfold   loop
    ===========================================  =======  =======  ======
    CPU (2 shared cores), lenet, S=5               50.3    166.0    48.7
    CPU (2 shared cores), lenet, S=16             492.4    961.1   432.3
    H200, lenet, S=5                                3.6      7.3     5.0
    H200, lenet, S=16                               4.2     17.7     9.8
    H200, cnn-wide, S=5                             5.9     35.0     9.1
    H200, cnn-wide, S=16                           15.8     97.7    34.4
    ===========================================  =======  =======  ======

    On the CPU the table's loaded-machine runs could not separate grouped and loop, and ``unfold``
    is 2-4x slower (im2col copies). On a quiet machine (2026-11-26 09:20, 2 threads, the
    ``faststeal.train_step`` step of the stacked lenet with per-member batches) ``loop`` is
    clearly faster: S=4 B=128 36.0 vs 46.4 ms, S=16 B=128 144 vs 201 ms, S=16 B=32 29.5 vs
    39.3 ms (oneDNN's grouped convolution plus the batch-major ReLU cost more than S plain
    convolutions). On the GPU ``grouped`` is 1.4-2.3x faster than ``loop`` (one cuDNN call
    instead of S) and keeps the batch-major layout that lets batch norm and pooling run without
    copies. Hence the un-tuned default: ``loop`` for stacked input on the CPU, ``grouped``
    elsewhere (a shared input then takes one convolution with the S filter banks concatenated).
    Hosts differ (an Intel AMX host is not the AMD one above), so ``auto`` measures.
    """

    #: return the stacked input's output member-folded, (S*B, C', H', W') (``faststeal.stack``)
    _folded_output = False

    def __init__(self, members: int, in_channels: int, out_channels: int, kernel_size: IntPair,
                 stride: IntPair = 1, padding: IntPair = 0, bias: bool = True,
                 strategy: str = "auto", device=None, dtype=None, dilation: IntPair = 1,
                 groups: int = 1) -> None:
        super().__init__()
        self.members = positive_int("members", members)
        self.in_channels = positive_int("in_channels", in_channels)
        self.out_channels = positive_int("out_channels", out_channels)
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        self.groups = positive_int("groups", groups)
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.dilation) < 1:
            raise ValueError(f"kernel_size, stride and dilation must be >= 1, got "
                             f"{kernel_size!r}, {stride!r}, {dilation!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        if strategy not in CONV_STRATEGIES:
            raise ValueError(f"strategy must be one of {CONV_STRATEGIES}, got {strategy!r}")
        self.strategy = strategy
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(members, out_channels, in_channels // groups,
                                               *self.kernel_size, **kw))
        self.bias = nn.Parameter(torch.empty(members, out_channels, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
        bound = 1.0 / math.sqrt(self.in_channels // self.groups * self.kernel_size[0]
                                * self.kernel_size[1])
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_rank(x, (4, 5), "(members, batch, C, H, W) or shared (batch, C, H, W)")
        if x.shape[-3] != self.in_channels:
            raise ValueError(f"x must have {self.in_channels} channels (dim -3), "
                             f"got {_describe(x)}")
        if x.dim() == 5 and self.members == 1 and x.shape[0] > 1:
            xb, unfold = _fold_batch(x)
            y = F.conv2d(xb, self.weight[0], None if self.bias is None else self.bias[0],
                         self.stride, self.padding, self.dilation, self.groups)
            return unfold(y)
        if x.dim() == 5:
            _check_stack(x, self.members, "EnsembleConv2d")
        return ensemble_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.strategy,
                               self.dilation, self.groups, self._folded_output)

    @torch.no_grad()
    def load_member(self, i: int, conv: nn.Conv2d) -> None:
        """Copy a plain ``nn.Conv2d``'s weights into member ``i``."""
        _check_index(i, self.members)
        if tuple(conv.weight.shape) != tuple(self.weight.shape[1:]):
            raise ValueError(f"conv.weight must be {tuple(self.weight.shape[1:])}, "
                             f"got {tuple(conv.weight.shape)}")
        if (tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups) != \
                (self.stride, self.padding, self.dilation, self.groups):
            raise ValueError(f"conv stride/padding/dilation/groups {conv.stride}/{conv.padding}/"
                             f"{conv.dilation}/{conv.groups} differ from {self.stride}/"
                             f"{self.padding}/{self.dilation}/{self.groups}")
        self.weight[i].copy_(conv.weight)
        if self.bias is not None:
            if conv.bias is None:
                raise ValueError("the stacked layer has a bias but the plain nn.Conv2d has none")
            self.bias[i].copy_(conv.bias)

    @torch.no_grad()
    def member(self, i: int) -> nn.Conv2d:
        """Member ``i`` as a plain ``nn.Conv2d`` (a copy)."""
        _check_index(i, self.members)
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, self.groups, bias=self.bias is not None,
                         device=self.weight.device, dtype=self.weight.dtype)
        conv.weight.copy_(self.weight[i])
        if self.bias is not None:
            conv.bias.copy_(self.bias[i])
        return conv

    def extra_repr(self) -> str:
        return (f"members={self.members}, {self.in_channels}, {self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}, "
                f"strategy={self.strategy!r}")


# ----------------------------------------------------------------------------- batch norm

class EnsembleBatchNorm(nn.Module):
    """Per-member batch normalisation for (S, B, F) and (S, B, F, H, W) stacks.

    Per-member affine ``weight``/``bias`` (S, F) and real per-member running statistics
    ``running_mean``/``running_var`` (S, F), updated exactly like S separate ``nn.BatchNorm1d/2d``
    (unbiased variance in the running estimate, ``momentum=None`` = cumulative average). Training
    mode normalises each member with its own batch statistics; eval mode uses the running ones.
    With ``members == 1`` the S' copies of a broadcast input are normalised (and counted) as one
    batch of S'*B rows. A shared input (no member axis) is first broadcast to all members.
    """

    def __init__(self, members: int, num_features: int, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.members = positive_int("members", members)
        self.num_features = positive_int("num_features", num_features)
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        kw = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.ones(members, num_features, **kw))
            self.bias = nn.Parameter(torch.zeros(members, num_features, **kw))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(members, num_features, **kw))
        self.register_buffer("running_var", torch.ones(members, num_features, **kw))
        self.register_buffer("num_batches_tracked",
                             torch.tensor(0, dtype=torch.long, device=device))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def _factor(self) -> float:
        # nn.BatchNorm's exponential_average_factor.
        if not self.training:
            return 0.0
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_rank(x, (2, 3, 4, 5), "(members, batch, F[, H, W]) or shared (batch, F[, H, W])")
        feat_dim = 1 if x.dim() in (2, 4) else 2
        if x.shape[feat_dim] != self.num_features:
            raise ValueError(f"x must have {self.num_features} features in dim {feat_dim}, "
                             f"got {_describe(x)}")
        if x.dim() in (2, 4):  # shared: every member sees the same batch
            x = x.unsqueeze(0).expand(self.members, *x.shape)
        factor = self._factor()
        s = x.shape[0]
        if self.members == 1 and s > 1:
            xb, unfold = _fold_batch(x)
            y = F.batch_norm(xb, self.running_mean[0], self.running_var[0],
                             None if self.weight is None else self.weight[0],
                             None if self.bias is None else self.bias[0],
                             self.training, factor, self.eps)
            return unfold(y)
        _check_stack(x, self.members, "EnsembleBatchNorm")
        # Fold the members into channels: (B, S*F, ...). The running-stat buffers are passed as
        # flat views, so F.batch_norm updates them in place, member by member.
        b = x.shape[1]
        xb = x.transpose(0, 1).reshape(b, s * self.num_features, *x.shape[3:])
        y = F.batch_norm(xb, self.running_mean.view(-1), self.running_var.view(-1),
                         None if self.weight is None else self.weight.view(-1),
                         None if self.bias is None else self.bias.view(-1),
                         self.training, factor, self.eps)
        return y.view(b, s, self.num_features, *y.shape[2:]).transpose(0, 1)

    @torch.no_grad()
    def load_member(self, i: int, bn: nn.modules.batchnorm._BatchNorm) -> None:
        """Copy a plain ``nn.BatchNorm1d/2d``'s affine params and running stats into member i."""
        _check_index(i, self.members)
        if bn.num_features != self.num_features:
            raise ValueError(f"bn has {bn.num_features} features, expected {self.num_features}")
        if self.affine:
            self.weight[i].copy_(bn.weight)
            self.bias[i].copy_(bn.bias)
        if bn.running_mean is not None:
            self.running_mean[i].copy_(bn.running_mean)
            self.running_var[i].copy_(bn.running_var)
            self.num_batches_tracked.copy_(bn.num_batches_tracked)

    @torch.no_grad()
    def member(self, i: int, dims: int = 2) -> nn.modules.batchnorm._BatchNorm:
        """Member ``i`` as a plain ``nn.BatchNorm1d`` (dims=1) or ``nn.BatchNorm2d`` (dims=2)."""
        _check_index(i, self.members)
        cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims]
        bn = cls(self.num_features, eps=self.eps, momentum=self.momentum, affine=self.affine,
                 device=self.running_mean.device, dtype=self.running_mean.dtype)
        self._copy_to(i, bn)
        return bn.train(self.training)

    @torch.no_grad()
    def _copy_to(self, i: int, bn) -> None:
        if self.affine:
            bn.weight.copy_(self.weight[i])
            bn.bias.copy_(self.bias[i])
        bn.running_mean.copy_(self.running_mean[i])
        bn.running_var.copy_(self.running_var[i])
        bn.num_batches_tracked.copy_(self.num_batches_tracked)

    def extra_repr(self) -> str:
        return (f"members={self.members}, num_features={self.num_features}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}")


# ----------------------------------------------------------------------------- dropout, pooling

class EnsembleDropout(_MCDropoutMixin, nn.Module):
    """Dropout with an independent mask per member, sample and element (torch's default generator).

    Active in training mode or when ``mc_dropout`` is set (see :func:`set_mc_dropout`). Any shape;
    meant for (S, B, C, H, W) conv feature maps and (S, B, F) features between non-fused layers.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"p must be a float in [0, 1), got {p!r}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._dropout_active(self.p):
            return x
        return F.dropout(x, self.p, training=True)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class EnsembleMaxPool2d(nn.Module):
    """``max_pool2d`` on (S, B, C, H, W) stacks or shared / member-folded (B, C, H, W) inputs.
    Square non-overlapping windows (stride = kernel size, the usual ``MaxPool2d(2)``: ``fast``)
    run :func:`faststeal.ops.max_pool2d` (a C++ kernel on CPU, where ATen's is slow); other
    windows ``F.max_pool2d``. ``relu=True`` pools ``relu(x)`` (fused into the op when fast). The
    twin of ``nn.MaxPool2d`` in :func:`faststeal.stack`, which sets ``relu`` where the model's
    ReLU module only feeds this pool."""

    def __init__(self, kernel_size: IntPair, stride: Optional[IntPair] = None,
                 relu: bool = False) -> None:
        super().__init__()
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride") if stride is not None else self.kernel_size
        self.relu = bool(relu)

    @property
    def fast(self) -> bool:
        k = self.kernel_size
        return k[0] == k[1] and self.stride == k

    def _pool(self, t: torch.Tensor) -> torch.Tensor:
        if self.fast and t.dim() == 4:
            return ops.max_pool2d(t, self.kernel_size[0], relu=self.relu)
        return F.max_pool2d(torch.relu(t) if self.relu else t, self.kernel_size, self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 3-D: a member-folded (S*B, H, W) batch, pooled like nn.MaxPool2d pools it
        _check_rank(x, (3, 4, 5), "(members, batch, C, H, W), shared / folded (batch, C, H, W) "
                                  "or folded (batch, H, W)")
        return fold_4d(x, self._pool) if x.dim() == 5 else self._pool(x)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}"
                + (", relu=True" if self.relu else ""))


# --------------------------------------------------------------------------- layer norm, embedding

class EnsembleLayerNorm(nn.Module):
    """Per-member layer normalisation: x (S, B, ..., *normalized_shape) -> same shape.

    The normalisation itself has no parameters (one ``F.layer_norm`` over the whole stack); the
    per-member affine ``weight``/``bias`` are (S, *normalized_shape), initialised like
    ``nn.LayerNorm`` (ones, zeros).
    """

    def __init__(self, members: int, normalized_shape, eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.members = positive_int("members", members)
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
        self.normalized_shape = tuple(int(d) for d in shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        kw = {"device": device, "dtype": dtype}
        self.weight = (nn.Parameter(torch.ones(members, *self.normalized_shape, **kw))
                       if elementwise_affine else None)
        self.bias = (nn.Parameter(torch.zeros(members, *self.normalized_shape, **kw))
                     if elementwise_affine and bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nd = len(self.normalized_shape)
        if x.dim() < nd + 2 or tuple(x.shape[-nd:]) != self.normalized_shape:
            raise ValueError(f"x must be (members, batch, ..., {self.normalized_shape}), "
                             f"got {_describe(x)}")
        _check_stack(x, self.members, "EnsembleLayerNorm")
        y = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        view = (self.members,) + (1,) * (x.dim() - 1 - nd) + self.normalized_shape
        if self.weight is not None:
            y = y * self.weight.view(view)
        if self.bias is not None:
            y = y + self.bias.view(view)
        return y

    def extra_repr(self) -> str:
        return (f"members={self.members}, {self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")


class EnsembleEmbedding(nn.Module):
    """S embedding tables: indices (S, B, ...) int64 -> (S, B, ..., embedding_dim).

    weight: (S, num_embeddings, embedding_dim), initialised N(0, 1) like ``nn.Embedding``. The
    lookup is ONE ``F.embedding`` into the (S * num_embeddings, dim) table with member ``s``'s
    indices offset by ``s * num_embeddings``.
    """

    def __init__(self, members: int, num_embeddings: int, embedding_dim: int, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.members = positive_int("members", members)
        self.num_embeddings = positive_int("num_embeddings", num_embeddings)
        self.embedding_dim = positive_int("embedding_dim", embedding_dim)
        self.weight = nn.Parameter(torch.empty(members, num_embeddings, embedding_dim,
                                               device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int32, torch.int64) \
                or idx.dim() < 2:
            raise ValueError(f"idx must be an integer tensor (members, batch, ...), got "
                             f"{_describe(idx) if isinstance(idx, torch.Tensor) else type(idx)}")
        _check_stack(idx, self.members, "EnsembleEmbedding")
        s = idx.shape[0]
        offs = torch.arange(s, device=idx.device, dtype=idx.dtype) * self.num_embeddings
        if self.members == 1:
            offs = offs * 0
        flat = self.weight.reshape(-1, self.embedding_dim)
        return F.embedding(idx + offs.view(s, *([1] * (idx.dim() - 1))), flat)

    def extra_repr(self) -> str:
        return f"members={self.members}, {self.num_embeddings}, {self.embedding_dim}"
