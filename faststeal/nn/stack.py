"""Any ``nn.Module`` as S stacked members: :func:`stack`, :func:`stack_from`, :func:`unstack`.

How a user's model becomes S members (module swap; the member axis folded into the batch):

* every parameter-bearing layer with a stacked twin is replaced by it — ``nn.Linear`` ->
  :class:`~faststeal.nn.EnsembleLinear` (the fused ``ensemble_linear`` op), ``nn.Conv2d`` (any
  stride, padding, dilation, groups, bias or not) -> :class:`~faststeal.nn.EnsembleConv2d`,
  ``nn.BatchNorm1d/2d`` -> :class:`~faststeal.nn.EnsembleBatchNorm` (per-member batch and running
  statistics), ``nn.LayerNorm`` -> :class:`~faststeal.nn.EnsembleLayerNorm`, ``nn.Embedding`` ->
  :class:`~faststeal.nn.EnsembleEmbedding`, ``nn.Dropout`` ->
  :class:`~faststeal.nn.EnsembleDropout` (switchable to MC dropout), ``nn.MaxPool2d(k)`` with
  stride k and no padding, dilation, ceil mode or indices ->
  :class:`~faststeal.nn.EnsembleMaxPool2d` (the ``max_pool2d`` op: a C++ kernel on CPU, bit for
  bit ATen's results); with ``bayesian=True``
  Linear/Conv2d become :class:`~faststeal.nn.BayesLinear` / :class:`~faststeal.nn.BayesConv2d`;
* everything else — the user's own ``forward`` code, activations, pooling, ``torch.flatten(x, 1)``,
  ``x.view(x.size(0), -1)``, residual additions, ``torch.cat`` on channels — runs unchanged on a
  member-folded batch ``(S*B, ...)`` (member-major: rows ``s*B .. (s+1)*B - 1`` are member s).
  Each twin unfolds its input to ``(S, B, ...)``, runs the stacked op and folds the result back.
  So any code that treats batch rows independently is correct as it stands;
* a submodule that owns parameters (or persistent buffers) but has no twin (``nn.Conv1d``,
  ``nn.MultiheadAttention``, a custom layer, a conv with ``padding_mode="reflect"``...) keeps S
  separate copies that run through ``torch.func.vmap`` over the member axis (one
  ``UserWarning`` naming it: correct, but without the fused ops);
* before swapping, the model is traced with ``torch.fx`` (when it can be): code that reads a
  swapped layer's parameters directly (``F.linear(x, self.fc.weight)``, weight tying) cannot run
  on stacked parameters and raises a ``ValueError`` naming the graph node. A model fx cannot
  trace (data-dependent control flow) is still stacked by the module swap;
* where the traced graph shows an ``nn.ReLU`` module applied only to one ``nn.Linear``'s output,
  the relu is fused into that layer's ``ensemble_linear`` (same numbers, one pass less each way;
  the ReLU module becomes ``nn.Identity``); where an ``nn.Dropout`` follows them in the same
  ``nn.Sequential`` (so it always reads that relu), the same op applies it on the CPU (its
  counter-based mask, far cheaper than ``F.dropout``'s ``bernoulli_`` there; equally random,
  other draws; see :class:`_Fold`). The dropout module stays in the model and its own ``p``,
  ``training`` and MC-dropout flags decide, as before; where an ``nn.ReLU`` module only feeds
  such a swapped pool, the pool applies it to its pooled output (max commutes with relu: same
  numbers, two full-size passes less; ``StackedModule.fused_relu_pools``);
* a one-member stack (MC dropout, Bayesian) called in eval mode with ``samples=T`` runs the
  layers before its first random layer once and lets that layer make the T copies (dropout: T
  copies of its input; a Bayesian layer: T weight samples on the one input), where the traced
  graphs prove the result is the same as running T copies from the input
  (:func:`_shared_prefix`: only row-wise, deterministic code before that layer; checked again
  per call — no module hook, no batch norm in training mode, the batch still on dim 0 at that
  layer, the layer reached — else the call runs its T copies from the input);
* memory layout (a measured choice): where the traced graphs (train and eval mode) prove that
  a stacked conv's output only flows through layout-agnostic ops (activations, pooling,
  additions, dropout, ``cat``) into layers that take any layout and hand on nothing strided
  (another conv, batch norm, ``flatten`` from dim 1, ``x.size()``/``x.shape``), that conv may
  write channels-last (NHWC) activations; a ``view``, ``reshape``, partial ``flatten``, hook
  or any other code that could see the strides keeps it NCHW. In the ``channels_last`` layout
  every stacked conv runs one convolution per member; whether the model is faster that way is
  timed on the first call per input shape class and mode (:meth:`StackedModule.layout`, tuning
  point ``stack_layout``; ``FASTSTEAL_STACK_LAYOUT=contiguous|channels_last`` forces it). The
  values are the same up to float rounding, except that dropout draws its mask in memory order:
  a seeded run's dropout masks (equally random) depend on the layout. On a CPU, NCHW
  ``max_pool2d`` and the elementwise passes over a member-folded activation are where
  channels-last saves time. A model whose ``forward`` later takes a path the trace did not see
  could still hit a stride error in ``channels_last``: timing then warns and keeps
  ``contiguous``; force ``FASTSTEAL_STACK_LAYOUT=contiguous`` if it only shows later.

Design limits: code that mixes batch rows outside the supported layers (``x - x.mean(0)``,
a hand-written batch norm) would mix members too; use ``nn.BatchNorm`` or a module (which then
runs under vmap). The model's output must be one tensor ``(B, ...)``.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair as _tpair

from .. import ops
from ..ops import tuning
from .bayes import BayesConv2d, BayesLinear
from .layers import (EnsembleBatchNorm, EnsembleConv2d, EnsembleDropout, EnsembleEmbedding,
                     EnsembleLayerNorm, EnsembleLinear, EnsembleMaxPool2d, member_copies,
                     next_seed)

ModelOrFactory = Union[nn.Module, Callable[[], nn.Module]]
INITS = ("reset", "copy")
#: memory layouts of the stacked convolutions' outputs (see the module docstring)
LAYOUTS = ("contiguous", "channels_last")
LAYOUT_ENV = "FASTSTEAL_STACK_LAYOUT"
#: seconds of timed rounds for the layout choice (whole forward+backward runs; see tuning)
LAYOUT_BUDGET_S = 1.0


class _Ctx:
    """State shared by a stacked model and its twins: the member copies and the memory layout
    of the current call, and ``pending``: copies the first random layer still has to make of
    its input of ``rows`` rows (a one-member stack's shared prefix runs once; see
    :func:`_shared_prefix`)."""

    def __init__(self) -> None:
        self.copies = 1
        self.layout = "contiguous"
        self.pending = 1
        self.rows = 0


class _Unshare(Exception):
    """The shared prefix met a tensor it cannot copy soundly: rerun the call unshared."""


def _unfold(x: torch.Tensor, s: int) -> torch.Tensor:
    if x.shape[0] % s:
        raise ValueError(f"a stacked layer got {x.shape[0]} rows, not a multiple of its {s} "
                         f"member copies: the model's code changed the batch dimension")
    return x.reshape(s, x.shape[0] // s, *x.shape[1:])


def _fold(y: torch.Tensor) -> torch.Tensor:
    return y.reshape(y.shape[0] * y.shape[1], *y.shape[2:])


def _copies_of(x: torch.Tensor, copies: int) -> torch.Tensor:
    """``copies`` copies of the batch ``x`` folded member-major, ``(copies*B, ...)``."""
    if copies == 1:
        return x
    return x.unsqueeze(0).expand(copies, *x.shape).reshape(-1, *x.shape[1:])


def _take_pending(x: torch.Tensor, ctx: _Ctx) -> int:
    """At a one-member stack's first random layer, called with that layer's input ``x``: the
    copies it must make (1: none pending; see :func:`_shared_prefix`), now no longer pending.
    Raises :class:`_Unshare` when the batch is not on ``x``'s dim 0 (copying there is wrong)."""
    if ctx.pending <= 1:
        return 1
    if x.shape[0] != ctx.rows:
        raise _Unshare
    copies, ctx.pending = ctx.pending, 1
    return copies


class _Twin:
    """Mixin of the folded twins: member <-> plain-layer state in the plain layer's key names."""

    _ctx: _Ctx

    def _copies(self) -> int:
        members = self.members  # type: ignore[attr-defined]
        return members if members > 1 else self._ctx.copies

    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in self._plain_items():
            out[k] = v if v.dim() == 0 else v[i]
        return out

    @torch.no_grad()
    def load_member_state(self, i: int, state: dict[str, torch.Tensor]) -> None:
        for k, v in self._plain_items():
            src = state[k]
            if v.dim() == 0:
                v.copy_(src)
            else:
                v[i].copy_(src)

    def _plain_items(self) -> list[tuple[str, torch.Tensor]]:
        names = [n for n in ("weight", "bias", "running_mean", "running_var",
                             "num_batches_tracked")]
        return [(n, getattr(self, n)) for n in names if getattr(self, n, None) is not None]


class _Fold:
    """A Linear twin (relu fused), the ``nn.Identity`` in place of its ReLU and the dropout after
    them: three consecutive children of one ``nn.Sequential`` (see :func:`_fuse_relu`). While
    all three are still its children and the activation is on the CPU, the Linear's op applies
    the dropout (its counter-based mask in the GEMM epilogue instead of a second pass drawing a
    ``bernoulli_`` mask), reading the dropout module's own ``p``, mode and MC flag, and the
    dropout module passes its input on; otherwise the dropout module runs itself. Both sides ask
    :meth:`active`. Not a timed choice (it changes which random numbers a seed draws): the
    fused mask saves a full pass over the activation on any CPU; measured on an Intel Xeon
    (family 6 model 207, AVX-512, 2 threads), 20,480x784 -> 512 relu: Linear 126 ms, with the
    fused mask 139 ms, a separate ``F.dropout`` 167 ms more."""

    def __init__(self, parent: nn.Sequential, keys: tuple[str, str, str],
                 mods: tuple[nn.Module, nn.Module, nn.Module]) -> None:
        self.parent, self.keys, self.mods = parent, keys, mods

    def active(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and all(
            self.parent._modules.get(k) is m for k, m in zip(self.keys, self.mods))

    @property
    def dropout(self) -> "_Dropout":
        return self.mods[2]  # type: ignore[return-value]


class _Linear(_Twin, EnsembleLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        fold = self.__dict__.get("_fold")
        s = self.members if self.members > 1 else 1
        if fold is None or not fold.active(x):
            y = super().forward(x.reshape(s, -1, self.in_features))
        else:  # the mask is this op's (maybe the first random layer); the dropout's flags decide
            x = _copies_of(x, _take_pending(x, self._ctx))
            drop = fold.dropout
            p = drop.p if drop._dropout_active(drop.p) else 0.0
            y = ops.ensemble_linear(x.reshape(s, -1, self.in_features), self.weight, self.bias,
                                    self.activation, p, next_seed() if p > 0 else 0)
        return y.reshape(*x.shape[:-1], self.out_features)


class _Conv2d(_Twin, EnsembleConv2d):
    #: set by :func:`stack_from` where the traced graphs prove a channels-last output is safe
    channels_last_ok = False
    _folded_output = True  # the strategies are timed with the fold they cost

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.members == 1:  # one filter bank: the whole folded batch is one convolution
            return F.conv2d(x, self.weight[0], None if self.bias is None else self.bias[0],
                            self.stride, self.padding, self.dilation, self.groups)
        if self._ctx.layout == "channels_last" and x.dim() == 4:
            # the `loop` strategy on the folded rows (split/cat, not unbind/stack: the
            # per-member convs' NHWC outputs stay NHWC in the cat), the output NHWC where this
            # conv may write it, else NCHW for its consumers
            rows = _unfold(x, self.members).shape[1]
            bs = [None] * self.members if self.bias is None else self.bias.unbind(0)
            y = torch.cat([F.conv2d(xi, wi, bi, self.stride, self.padding, self.dilation,
                                    self.groups)
                           for xi, wi, bi in zip(x.split(rows), self.weight.unbind(0), bs)])
            return y.contiguous(memory_format=torch.channels_last if self.channels_last_ok
                                else torch.contiguous_format)
        return super().forward(_unfold(x, self.members))


class _BatchNorm(_Twin, EnsembleBatchNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # members == 1: the copies of MC dropout / Bayesian samples are one batch (as
        # EnsembleBatchNorm does for a broadcast input)
        s = self.members
        xs = _unfold(x, s)
        if x.dim() == 3:  # BatchNorm1d on (N, C, L): (S, B, C, L, 1) keeps the feature dim 2
            xs = xs.unsqueeze(-1)
        return super().forward(xs).reshape(x.shape)


class _LayerNorm(_Twin, EnsembleLayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _fold(super().forward(_unfold(x, self.members)))


class _Embedding(_Twin, EnsembleEmbedding):
    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _fold(super().forward(_unfold(idx, self.members)))


_DROPOUT_FNS = {nn.Dropout: F.dropout, nn.Dropout1d: F.dropout1d, nn.Dropout2d: F.dropout2d,
                nn.Dropout3d: F.dropout3d, nn.AlphaDropout: F.alpha_dropout}


class _Dropout(EnsembleDropout):
    """torch's dropout layers on the folded batch (independent masks per member and row), made
    switchable to prediction-time (MC) dropout like every faststeal dropout."""

    def __init__(self, p: float, kind: type) -> None:
        super().__init__(p)
        self.kind = kind.__name__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fold = self.__dict__.get("_fold")
        if fold is not None and fold.active(x):
            return x  # the Linear before it applied this dropout (see _Fold)
        ctx = self.__dict__.get("_ctx")
        if ctx is not None:
            x = _copies_of(x, _take_pending(x, ctx))
        if not self._dropout_active(self.p):
            return x
        return _DROPOUT_FNS[getattr(nn, self.kind)](x, self.p, training=True)


class _BayesLinear(_Twin, BayesLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        copies = _take_pending(x, self._ctx)
        if copies > 1:  # the first random layer after a shared prefix: one input, S samples
            y = super().forward(x.reshape(-1, self.in_features), samples=copies)
            return y.reshape(copies * x.shape[0], *x.shape[1:-1], self.out_features)
        lead = x.shape[:-1]
        s = self._ctx.copies  # one weight sample per copy
        y = super().forward(x.reshape(s, -1, self.in_features))
        return y.reshape(*lead, self.out_features)

    def _plain_items(self):
        return [(k, getattr(self, a)) for k, a in (("weight", "w_mu"), ("bias", "b_mu"))
                if getattr(self, a) is not None]

    def member_state(self, i):
        return {k: v for k, v in self._plain_items()}

    @torch.no_grad()
    def load_member_state(self, i, state):
        for k, v in self._plain_items():
            v.copy_(state[k])


class _BayesConv2d(_Twin, BayesConv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        copies = _take_pending(x, self._ctx)
        if copies > 1:  # as in _BayesLinear
            return _fold(super().forward(x, samples=copies))
        return _fold(super().forward(_unfold(x, self._ctx.copies)))

    _plain_items = _BayesLinear._plain_items
    member_state = _BayesLinear.member_state
    load_member_state = _BayesLinear.load_member_state


class _VmapGroup(nn.Module):
    """S copies of a submodule that has no stacked twin, run with ``torch.func.vmap``.

    Tensor arguments arrive member-folded ``(S*B, ...)``; the copies' parameters and buffers are
    stacked on every call (differentiable ``torch.stack``, so gradients reach the copies) and
    buffers the module updates in place (running statistics) are written back afterwards.
    """

    def __init__(self, copies: Sequence[nn.Module], qualname: str, ctx: _Ctx) -> None:
        super().__init__()
        self.copies = nn.ModuleList(copies)
        self.qualname = qualname
        self.__dict__["_ctx"] = ctx

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from torch.func import functional_call, vmap

        if len(self.copies) == 1:
            return self.copies[0](*args, **kwargs)
        s = len(self.copies)
        names = [n for n, _ in self.copies[0].named_parameters()]
        bnames = [n for n, _ in self.copies[0].named_buffers()]
        params = {n: torch.stack([c.get_parameter(n) for c in self.copies]) for n in names}
        buffers = {n: torch.stack([c.get_buffer(n) for c in self.copies]) for n in bnames}
        dims = tuple(0 if isinstance(a, torch.Tensor) else None for a in args)
        xs = tuple(_unfold(a, s) if isinstance(a, torch.Tensor) else a for a in args)
        base = self.copies[0]

        def one(p, b, *xi):
            return functional_call(base, (p, b), xi, kwargs)

        try:
            out = vmap(one, in_dims=(0, 0, *dims))(params, buffers, *xs)
        except Exception as exc:
            raise RuntimeError(f"faststeal.stack: submodule {self.qualname!r} "
                               f"({type(base).__name__}) has no stacked twin and failed under "
                               f"torch.func.vmap: {exc}") from exc
        with torch.no_grad():
            for n in bnames:
                for i, c in enumerate(self.copies):
                    c.get_buffer(n).copy_(buffers[n][i])
        return torch.utils._pytree.tree_map(
            lambda t: _fold(t) if isinstance(t, torch.Tensor) else t, out)

    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        return self.copies[i].state_dict()

    @torch.no_grad()
    def load_member_state(self, i: int, state: dict[str, torch.Tensor]) -> None:
        self.copies[i].load_state_dict(state)


# ----------------------------------------------------------------------------- conversion

def _own_state(m: nn.Module) -> bool:
    """Whether ``m`` itself (not its children) holds parameters or persistent buffers."""
    persistent = [n for n in m._buffers if n not in m._non_persistent_buffers_set
                  and m._buffers[n] is not None]
    return any(p is not None for p in m._parameters.values()) or bool(persistent)


def _conv_padding(m: nn.Conv2d) -> Optional[tuple[int, int]]:
    """Symmetric integer padding of a zero-padded conv, or None (then it runs under vmap)."""
    if m.padding_mode != "zeros":
        return None
    if m.padding == "valid":
        return (0, 0)
    if m.padding == "same":
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        if any(t % 2 for t in total):
            return None
        return (total[0] // 2, total[1] // 2)
    return tuple(m.padding)  # type: ignore[return-value]


def _uninit(cls: type, *args: Any, **kwargs: Any) -> nn.Module:
    """A twin without its initialisation (every tensor is loaded from the members next)."""
    return torch.nn.utils.skip_init(cls, *args, **kwargs)


def _twin(mods: Sequence[nn.Module], ctx: _Ctx, bayesian: bool,
          prior_sigma: float) -> Optional[nn.Module]:
    """The stacked twin of ``mods`` (S plain layers of one type), or None if there is none."""
    m0 = mods[0]
    s = len(mods)
    p0 = next(m0.parameters(), None)
    kw = {} if p0 is None else {"device": p0.device, "dtype": p0.dtype}
    t: Optional[nn.Module] = None
    if type(m0) is nn.Linear:
        if bayesian:
            t = _BayesLinear(m0.in_features, m0.out_features, bias=m0.bias is not None,
                             prior_sigma=prior_sigma, **kw)
        else:
            t = _uninit(_Linear, s, m0.in_features, m0.out_features, bias=m0.bias is not None,
                        **kw)
    elif type(m0) is nn.Conv2d:
        pad = _conv_padding(m0)
        if pad is None:
            return None
        args = (m0.in_channels, m0.out_channels, m0.kernel_size)
        if bayesian:
            t = _BayesConv2d(*args, m0.stride, pad, bias=m0.bias is not None,
                             prior_sigma=prior_sigma, dilation=m0.dilation, groups=m0.groups,
                             **kw)
        else:
            t = _uninit(_Conv2d, s, *args, m0.stride, pad, bias=m0.bias is not None,
                        dilation=m0.dilation, groups=m0.groups, **kw)
    elif type(m0) in (nn.BatchNorm1d, nn.BatchNorm2d):
        if not m0.track_running_stats:
            return None
        kw = {"device": m0.running_mean.device, "dtype": m0.running_mean.dtype}
        t = _uninit(_BatchNorm, s, m0.num_features, m0.eps, m0.momentum, m0.affine, **kw)
        t.dims = 1 if type(m0) is nn.BatchNorm1d else 2
    elif type(m0) is nn.LayerNorm:
        t = _uninit(_LayerNorm, s, m0.normalized_shape, m0.eps, m0.elementwise_affine,
                    bias=getattr(m0, "bias", None) is not None, **kw)
    elif type(m0) is nn.Embedding:
        if (m0.padding_idx is not None or m0.max_norm is not None or m0.scale_grad_by_freq
                or m0.sparse):
            return None
        t = _uninit(_Embedding, s, m0.num_embeddings, m0.embedding_dim, **kw)
    elif type(m0) is nn.MaxPool2d:  # no state: one module, the fast pooling where it applies
        k = _tpair(m0.kernel_size)  # nn.MaxPool2d's stride defaults to its kernel_size
        if (m0.return_indices or m0.ceil_mode or _tpair(m0.padding) != (0, 0)
                or _tpair(m0.dilation) != (1, 1) or _tpair(m0.stride) != k):
            return None
        return EnsembleMaxPool2d(k)
    elif type(m0) in _DROPOUT_FNS:
        t = _Dropout(m0.p, type(m0))
        t.__dict__["_ctx"] = ctx
        return t.train(m0.training)
    if t is None:
        return None
    t.__dict__["_ctx"] = ctx
    if bayesian and isinstance(t, (_BayesLinear, _BayesConv2d)):
        t.load_member_state(0, m0.state_dict())
    else:
        for i, m in enumerate(mods):
            t.load_member_state(i, m.state_dict())
    return t.train(m0.training)


def _convert(mods: Sequence[nn.Module], name: str, ctx: _Ctx, bayesian: bool,
             prior_sigma: float, fallbacks: list) -> nn.Module:
    m0 = mods[0]
    twin = _twin(mods, ctx, bayesian, prior_sigma)
    if twin is not None:
        return twin
    if _own_state(m0):
        fallbacks.append((name or "<root>", type(m0).__name__))
        return _VmapGroup([copy.deepcopy(m) for m in mods], name or "<root>", ctx)
    children = {cname: _convert([m._modules[cname] for m in mods],
                                f"{name}.{cname}" if name else cname, ctx, bayesian,
                                prior_sigma, fallbacks)
                for cname, child in m0._modules.items() if child is not None}
    # copy the container (its python attributes, hooks, non-persistent buffers) with the
    # converted children in place of the originals
    memo: dict[int, Any] = {id(m0._modules[c]): new for c, new in children.items()}
    return copy.deepcopy(m0, memo)


def _state_diff(ref: nn.Module, other: nn.Module) -> list[str]:
    """The state-dict keys whose presence or shape differs between two modules, sorted."""
    a = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in other.state_dict().items()}
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _check_structure(mods: Sequence[nn.Module]) -> None:
    ref = [(n, type(m)) for n, m in mods[0].named_modules()]
    for i, m in enumerate(mods[1:], 1):
        if [(n, type(x)) for n, x in m.named_modules()] != ref:
            raise ValueError(f"modules[{i}] does not have the submodules of modules[0]; "
                             f"stack_from needs S copies of one architecture")
        bad = _state_diff(mods[0], m) if m is not mods[0] else []
        if bad:
            raise ValueError(f"modules[{i}] differs from modules[0] in state {bad[:5]}")


def _fx_check(model: nn.Module, swapped: set[str]) -> list[torch.fx.Graph]:
    """Raise if a traced graph reads a parameter of a swapped layer directly. Traces the model
    in training and in eval mode (a ``forward`` may branch on ``self.training``) and returns both
    graphs, or [] when fx cannot trace it in either mode."""
    graphs = []
    modes = [(m, m.training) for m in model.modules()]  # each module's own flag, restored
    try:
        for mode in (True, False):
            model.train(mode)
            try:
                graphs.append(torch.fx.symbolic_trace(model).graph)
            except Exception:  # untraceable (data-dependent control flow...): the swap still works
                pass
    finally:
        for m, flag in modes:
            m.training = flag
    for graph in graphs:
        for node in graph.nodes:
            if node.op != "get_attr":
                continue
            owner = node.target.rpartition(".")[0]
            if owner in swapped:
                raise ValueError(
                    f"faststeal.stack: graph node {node.name!r} reads {node.target!r}, a "
                    f"parameter of the {type(model.get_submodule(owner)).__name__} {owner!r}, "
                    f"outside its forward (weight tying or a functional call on module weights); "
                    f"stacked parameters have a leading member axis there. Call the module "
                    f"instead, or put that code in its own nn.Module (it then runs under "
                    f"torch.func.vmap)")
    return graphs if len(graphs) == 2 else []


def _has_hooks(model: nn.Module) -> bool:
    """Whether any module hook is registered, on ``model``'s modules or globally."""
    from torch.nn.modules import module as _m

    if (_m._global_forward_hooks or _m._global_forward_pre_hooks or _m._global_backward_hooks
            or _m._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
               or m._backward_pre_hooks for m in model.modules())


def _sole_readers(graph: torch.fx.Graph) -> dict[str, str]:
    """{module: reader}: modules the graph calls once whose output only ``reader`` reads — a
    module it calls once, on that output alone."""
    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    out = {}
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1 or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if (user.op == "call_module" and calls[user.target] == 1 and user.args == (node,)
                and not user.kwargs):
            out[node.target] = user.target
    return out


def _relu_pairs(graph: torch.fx.Graph) -> set[tuple[str, str, Optional[str]]]:
    """(Linear, ReLU, next) module names where the graph calls each once and the ReLU's only
    input is the Linear's output, which nothing else reads; ``next`` is the module that alone
    reads the ReLU's output in the same way (a dropout to fuse as well), else None."""
    readers = _sole_readers(graph)
    return {(node, act, readers.get(act)) for node, act in readers.items()}


def _relu_pool_pairs(graph: torch.fx.Graph) -> set[tuple[str, str, str]]:
    """(src, act, pool) module names where ``act``'s input is ``src``'s output, which only
    ``act`` reads (so nothing else can see or change it: the fused pool saves it for its
    backward), and ``pool`` alone reads ``act``'s output (see :func:`_sole_readers`)."""
    readers = _sole_readers(graph)
    nodes = {n.target: n for n in graph.nodes if n.op == "call_module"}
    out = set()
    for act, pool in readers.items():
        src = nodes[act].args[0] if len(nodes[act].args) == 1 and not nodes[act].kwargs else None
        # a module's output (not a view of another tensor that code could change in place) that
        # only the ReLU reads
        if isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1:
            out.add((src.target, act, pool))
    return out


def _fuse_relu_pool(model: nn.Module, graphs: Sequence[torch.fx.Graph],
                    body: nn.Module) -> list[str]:
    """Fold an ``nn.ReLU`` module whose output only one fast-pooling :class:`EnsembleMaxPool2d`
    (a swapped ``nn.MaxPool2d(k)``) reads into that pool (``max_pool2d(..., relu=True)``: relu
    on the pooled output instead of two full-size passes forward and backward), replacing the
    ReLU with ``nn.Identity`` in ``body``. Only where the traced graphs of both modes prove it
    and no module hook exists (a hook could observe the activation), the ReLU is not inplace and
    its input is a stacked conv's, norm's or linear's output that only it reads (the pool saves
    that input for its backward: nothing may change it in place); same values and gradients
    (max commutes with relu, see :func:`faststeal.ops.max_pool2d`). Returns the pools' names."""
    if not graphs or _has_hooks(model):
        return []
    pairs = set.intersection(*(_relu_pool_pairs(g) for g in graphs))
    fused = []
    for src_name, act_name, pool_name in sorted(pairs):
        try:
            src = body.get_submodule(src_name)
            act, pool = body.get_submodule(act_name), body.get_submodule(pool_name)
        except AttributeError:  # inside a submodule that runs under vmap
            continue
        # the source must return a new tensor (a stacked conv, norm or linear, not e.g. an
        # nn.Identity handing on a tensor others read); an inplace ReLU is kept as well
        if (not isinstance(src, (_Conv2d, _BatchNorm, _LayerNorm, _Linear))
                or type(act) is not nn.ReLU or act.inplace
                or type(pool) is not EnsembleMaxPool2d or not pool.fast):
            continue
        pool.relu = True
        body.set_submodule(act_name, nn.Identity())
        fused.append(pool_name)
    return fused


def _fuse_relu(model: nn.Module, graphs: Sequence[torch.fx.Graph], body: nn.Module,
               keep: Optional[str]) -> list[str]:
    """Fold an ``nn.ReLU`` module that only ever receives one Linear twin's output into that
    twin (``ensemble_linear``'s fused relu: one pass less forward and backward), replacing the
    ReLU with ``nn.Identity`` in ``body``. An ``nn.Dropout`` that alone reads that ReLU's output
    stays in ``body``; where the three are consecutive children of one ``nn.Sequential`` (whose
    forward calls each in order, whatever the user's code does later) they are linked as a
    :class:`_Fold`: on the CPU the Linear's op applies the dropout. Only where the
    traced graphs of both modes prove it (see :func:`_relu_pairs`), no module hook exists
    (a hook could observe the pre-activation), and the Linear is not ``keep`` (the head, whose
    output Laplace reads as logits). Numerically the same (both relus keep NaN; the backward
    masks on y > 0; a folded dropout draws other, equally random masks). Returns the fused Linear
    names."""
    if not graphs or _has_hooks(model):
        return []
    pairs = set.intersection(*(_relu_pairs(g) for g in graphs))
    fused = []
    for lin_name, act_name, after in sorted(pairs, key=str):
        if lin_name == keep:
            continue
        try:
            lin, act = body.get_submodule(lin_name), body.get_submodule(act_name)
        except AttributeError:  # inside a submodule that runs under vmap
            continue
        if type(lin) is not _Linear or lin.activation != "none" or lin.dropout \
                or type(act) is not nn.ReLU:
            continue
        lin.activation = "relu"
        ident = nn.Identity()
        body.set_submodule(act_name, ident)
        fused.append(lin_name)
        fold = _sequential_fold(body, (lin_name, act_name, after), lin, ident)
        if fold is not None:
            lin.__dict__["_fold"] = fold
            fold.dropout.__dict__["_fold"] = fold
    return fused


def _sequential_fold(body: nn.Module, names: tuple[str, str, Optional[str]], lin: nn.Module,
                     ident: nn.Module) -> Optional[_Fold]:
    """The :class:`_Fold` of a fused Linear, its Identity and an ``nn.Dropout`` after them, when
    the three are consecutive children of one plain ``nn.Sequential``; else None."""
    if names[2] is None:
        return None
    parents = {n.rpartition(".")[0] for n in names}
    if len(parents) != 1:
        return None
    parent_name = parents.pop()
    try:
        parent = body.get_submodule(parent_name) if parent_name else body
    except AttributeError:  # inside a submodule that runs under vmap
        return None
    keys = tuple(n.rpartition(".")[2] for n in names)
    order = list(parent._modules)
    drop = parent._modules.get(keys[2])
    if (type(parent) is not nn.Sequential or type(drop) is not _Dropout or drop.kind != "Dropout"
            or any(k not in order for k in keys)
            or order.index(keys[0]) + 1 != order.index(keys[1])
            or order.index(keys[1]) + 1 != order.index(keys[2])):
        return None
    return _Fold(parent, keys, (lin, ident, drop))  # type: ignore[arg-type]


# Graph nodes a channels-last activation may pass through (values do not depend on the layout
# and the result is again an activation) and nodes that end its path taking any layout.
_LAYOUT_FREE_FNS = {"relu", "relu_", "relu6", "leaky_relu", "gelu", "silu", "elu", "hardtanh",
                    "hardswish", "mish", "sigmoid", "tanh", "max_pool2d", "_max_pool2d",
                    "avg_pool2d", "adaptive_avg_pool2d", "dropout", "dropout2d", "add", "iadd",
                    "cat"}
_LAYOUT_FREE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "add", "add_"}
_LAYOUT_FREE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Hardtanh,
                        nn.Hardswish, nn.Mish, nn.Sigmoid, nn.Tanh, nn.MaxPool2d, nn.AvgPool2d,
                        nn.AdaptiveAvgPool2d, nn.Identity, EnsembleDropout, EnsembleMaxPool2d)
_ANY_LAYOUT_METHODS = {"contiguous", "size", "dim", "numel"}  # NCHW copy or no tensor
_METADATA_ATTRS = {"shape", "dtype", "device", "ndim"}  # x.shape etc. (not x.data, x.T)
_TORCH_MODULES = ("torch", "torch.nn.functional", "torch._C._nn", "_operator", "builtins")


def _flattens_from_dim_1(node: torch.fx.Node) -> bool:
    """``torch.flatten(x, 1)`` / ``x.flatten(1)`` (to the last dim): on a 4-D activation every
    dim but the batch is merged, so the result is a contiguous tensor in either layout (a copy
    of an NHWC input); other flattens can return a strided view of it."""
    start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
    end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
    return start in (0, 1) and end == -1


def _layout_role(node: torch.fx.Node, mods: dict[str, nn.Module]) -> Optional[str]:
    """"pass" (layout-agnostic, its output is an activation too), "sink" (takes any layout and
    hands nothing NHWC on) or None (might depend on the layout or pass a strided view on:
    ``view``, ``reshape``, a partial ``flatten``, ``x.data``, the model's output, user
    functions, anything not listed)."""
    if node.op == "call_module":
        m = mods.get(node.target)
        if isinstance(m, _LAYOUT_FREE_MODULES):
            return "pass"
        if isinstance(m, (_Conv2d, _BatchNorm)):
            return "sink"
        if isinstance(m, nn.Flatten) and m.start_dim in (0, 1) and m.end_dim == -1:
            return "sink"
        return None
    if node.op == "call_method":
        if node.target in _LAYOUT_FREE_METHODS:
            return "pass"
        if node.target in _ANY_LAYOUT_METHODS or (node.target == "flatten"
                                                   and _flattens_from_dim_1(node)):
            return "sink"
        return None
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if getattr(node.target, "__module__", None) not in _TORCH_MODULES:
            return None
        if name in _LAYOUT_FREE_FNS:
            return "pass"
        if name == "flatten" and _flattens_from_dim_1(node):
            return "sink"
        if name == "getattr" and len(node.args) > 1 and node.args[1] in _METADATA_ATTRS:
            return "sink"
    return None


def _channels_last_convs(graphs: Sequence[torch.fx.Graph], body: nn.Module) -> list[str]:
    """The stacked convs whose every call, in every traced graph, feeds only layout-agnostic
    ops ending in layers that take any layout (see :func:`_layout_role`): those may write
    channels-last activations without any user code seeing the difference."""
    mods = dict(body.named_modules())
    verdict: dict[str, bool] = {}
    for graph in graphs:
        for node in graph.nodes:
            if node.op != "call_module" or type(mods.get(node.target)) is not _Conv2d:
                continue
            todo, seen, ok = list(node.users), set(), True
            while todo and ok:
                user = todo.pop()
                if user in seen:
                    continue
                seen.add(user)
                role = _layout_role(user, mods)
                ok = role is not None
                if role == "pass":
                    todo.extend(user.users)
            verdict[node.target] = verdict.get(node.target, True) and ok
    return sorted(n for n, ok in verdict.items() if ok)


#: functions and tensor methods that may run before the shared prefix's cut: deterministic,
#: row-wise or shape-only (anything else — a random op, a user function — keeps the copies)
_PREFIX_FNS = (_LAYOUT_FREE_FNS - {"dropout", "dropout2d", "cat"}) | {
    "sub", "mul", "truediv", "neg", "size", "dim", "numel", "contiguous"}


def _prefix_node_ok(n: torch.fx.Node, mods: dict[str, nn.Module]) -> bool:
    """Whether node ``n`` may run before the shared prefix's cut: deterministic and keeping the
    batch on dim 0 row by row (elementwise ops, pooling, the stacked twins, ``flatten`` from
    dim >= 1, ``view``/``reshape`` to ``(x.size(0), ...)``, ``mean`` over dims >= 1, shape
    queries). Anything else — a random op, a transpose, a user function — keeps the copies."""
    if n.op in ("placeholder", "get_attr", "output"):
        return True
    if n.op == "call_module":
        m = mods.get(n.target)
        if isinstance(m, nn.Flatten):
            return m.start_dim >= 1
        return isinstance(m, (_Linear, _Conv2d, _BatchNorm, _LayerNorm, _Embedding,
                              *_LAYOUT_FREE_MODULES))
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
    if n.op == "call_function":
        module = getattr(n.target, "__module__", "") or ""
        if module.startswith("faststeal."):  # the zoo's input check
            return True
        if module not in _TORCH_MODULES:
            return False
    args = list(n.args[1:])
    if name in _PREFIX_FNS:
        return True
    if name == "getattr":
        return len(args) == 1 and args[0] in _METADATA_ATTRS
    if name == "getitem":  # x.shape[0], x.size()[1]
        src = n.args[0]
        return isinstance(src, torch.fx.Node) and _is_shape(src)
    if name == "flatten":
        start = n.kwargs.get("start_dim", args[0] if args else 0)
        return isinstance(start, int) and start >= 1
    if name in ("view", "reshape"):
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        return bool(dims) and isinstance(dims[0], torch.fx.Node) and _is_batch_size(dims[0])
    if name == "mean":
        dims = n.kwargs.get("dim", args[0] if args else None)
        dims = (dims,) if isinstance(dims, int) else dims
        return isinstance(dims, (tuple, list)) and bool(dims) and all(
            isinstance(d, int) and (d >= 1 or d in (-1, -2)) for d in dims)
    return False


def _is_shape(n: torch.fx.Node) -> bool:
    return (n.op == "call_method" and n.target == "size" and len(n.args) == 1) or (
        n.op == "call_function" and getattr(n.target, "__name__", "") == "getattr"
        and n.args[1:] == ("shape",))


def _is_batch_size(n: torch.fx.Node) -> bool:
    """``x.size(0)``, ``x.shape[0]`` or ``x.size()[0]``."""
    if n.op == "call_method" and n.target == "size":
        return tuple(n.args[1:]) == (0,) or n.kwargs.get("dim") == 0
    return (n.op == "call_function" and getattr(n.target, "__name__", "") == "getitem"
            and isinstance(n.args[0], torch.fx.Node) and _is_shape(n.args[0])
            and n.args[1] == 0)


def _shared_prefix(graphs: Sequence[torch.fx.Graph], body: nn.Module,
                   last_layer: Optional[str]) -> bool:
    """Whether a one-member stack may run the part of its forward before its first random
    layer (a dropout layer, a Linear with a fused dropout, a Bayesian layer) once for all the
    copies of an eval-mode call (MC dropout's or a Bayesian model's ``samples=T``): in every
    traced graph that layer comes no later than the last layer, nothing before it draws random
    numbers, and no value computed before it is used after it. Then only that layer's input
    crosses, and the layer makes the T copies (dropout: T copies of its input; Bayesian: T
    weight samples on the one input) — the same as running T copies from the input."""
    if not graphs:
        return False
    mods = dict(body.named_modules())
    for graph in graphs:
        nodes = list(graph.nodes)
        pos = {n: i for i, n in enumerate(nodes)}
        first = next((n for n in nodes if n.op == "call_module" and (
            isinstance(mods.get(n.target), (_Dropout, _BayesLinear, _BayesConv2d))
            or "_fold" in getattr(mods.get(n.target), "__dict__", {}))), None)
        if first is None:
            return False
        cut = pos[first]
        # the last layer must come after the cut: features() hooks its input per copy
        if any(n.op == "call_module" and n.target == last_layer and pos[n] <= cut
               for n in nodes):
            return False
        for n in nodes[:cut]:
            if not _prefix_node_ok(n, mods) or any(pos[u] > cut for u in n.users):
                return False
    return True


def _last_linear(body: nn.Module) -> Optional[str]:
    """The qualified name of the last Linear twin of ``body`` (the default head), or None."""
    names = [n for n, m in body.named_modules() if isinstance(m, (_Linear, _BayesLinear))]
    return names[-1] if names else None


class StackedModule(nn.Module):
    """S members of one user model run as one computation (built by :func:`stack`).

    ``forward(x, samples=None)``: x ``(B, *input_shape)`` shared by all members, or
    ``(S, B, *input_shape)`` one batch per member -> ``(S, B, ...)`` (the member model's output
    with a leading member axis). Without ``input_shape`` every input is taken as shared.
    ``samples``: for a one-member model (MC dropout, Bayesian), the number of copies to run
    (default 1); each copy draws its own dropout masks / weight sample.

    Attributes: ``members``, ``input_shape``, ``bayesian``, ``body`` (the converted model),
    ``head`` (the last Linear twin, or the one named by ``last_layer``), ``vmap_fallbacks``
    (names of submodules run under vmap).
    """

    def __init__(self, body: nn.Module, members: int, skeleton: nn.Module, *,
                 input_shape: Optional[Sequence[int]] = None, bayesian: bool = False,
                 last_layer: Optional[str] = None, fallbacks: Sequence[str] = ()) -> None:
        super().__init__()
        self.body = body
        self.members = members
        self.bayesian = bayesian
        self.input_shape = None if input_shape is None else tuple(int(d) for d in input_shape)
        self.vmap_fallbacks = list(fallbacks)
        self.__dict__["_skeleton"] = skeleton  # plain CPU copy (not a submodule) for member()
        self.__dict__["_ctx"] = next(
            (m.__dict__["_ctx"] for m in body.modules() if "_ctx" in m.__dict__), _Ctx())
        self.last_layer = last_layer if last_layer is not None else _last_linear(body)
        #: Linear layers whose following nn.ReLU was fused into them (see ``_fuse_relu``)
        self.fused_relus: list[str] = []
        #: max-pool twins that apply the nn.ReLU before them (see ``_fuse_relu_pool``)
        self.fused_relu_pools: list[str] = []
        #: convs that may write channels-last activations in the ``channels_last`` layout
        #: (see ``_channels_last_convs``)
        self.channels_last_convs: list[str] = []
        #: a one-member stack whose eval-mode ``samples=T`` calls run the layers before the
        #: first random layer (dropout, Bayesian) once (see ``_shared_prefix``)
        self.shared_prefix = False

    @property
    def head(self) -> nn.Module:
        if self.last_layer is None:
            raise ValueError("the model has no nn.Linear layer; name its last layer with "
                             "last_layer=")
        return self.body.get_submodule(self.last_layer)

    @property
    def num_classes(self) -> Optional[int]:
        h = self.head if self.last_layer is not None else None
        return None if h is None else int(h.out_features)

    def _stacked_input(self, x: torch.Tensor) -> bool:
        if self.input_shape is None:
            return False
        nd = len(self.input_shape)
        if x.dim() == nd + 2:
            return True
        if x.dim() != nd + 1:
            raise ValueError(f"x must be (batch, {', '.join(map(str, self.input_shape))}) or "
                             f"(members, batch, ...), got shape {tuple(x.shape)}")
        return False

    def _copies(self, x: torch.Tensor, samples: Optional[int]) -> tuple[int, bool]:
        stacked = self._stacked_input(x)
        return member_copies(self.members, samples, x.shape[0] if stacked else None,
                             x.shape), stacked

    def _run(self, x: torch.Tensor, samples: Optional[int]) -> tuple[torch.Tensor, int]:
        copies, stacked = self._copies(x, samples)
        lazy = (self.shared_prefix and copies > 1 and not stacked and not self.training
                and not any(m.training for m in self.body.modules()
                            if isinstance(m, _BatchNorm))
                and not _has_hooks(self.body))  # a hook would see B rows, or share its noise
        if stacked:
            xf = x.reshape(-1, *x.shape[2:])
        else:
            xf = x if lazy else _copies_of(x, copies)
        self._ctx.copies = copies
        self._ctx.layout = self.layout(xf)
        self._ctx.pending, self._ctx.rows = (copies, x.shape[0]) if lazy else (1, 0)
        try:
            try:
                y = self.body(xf)
                if self._ctx.pending > 1:  # the random layer was not reached: a path the
                    raise _Unshare         # trace did not see, which may draw its own noise
            except _Unshare:  # run the copies from the input, as without the shared prefix
                self._ctx.pending = 1
                y = self.body(_copies_of(x, copies))
        finally:  # a direct call of the body (or of one layer) runs NCHW, unshared
            self._ctx.layout = "contiguous"
            self._ctx.pending = 1
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"the stacked model must return one tensor, got {type(y).__name__}")
        return y, copies

    def forward(self, x: torch.Tensor, samples: Optional[int] = None) -> torch.Tensor:
        y, copies = self._run(x, samples)
        return _unfold(y, copies)

    def layout(self, xf: torch.Tensor) -> str:
        """The memory layout (one of :data:`LAYOUTS`) the body runs in for the member-folded
        input ``xf``: ``contiguous`` unless some conv may write NHWC
        (:attr:`channels_last_convs`), the input is 4-D and no module hook is registered (a
        hook could see the layout); then measured once per input shape class, dtype, device
        model, thread count, grad mode, train/eval mode and autocast dtype by timing the whole
        body (forward, and backward when gradients are on) in each layout.
        ``FASTSTEAL_STACK_LAYOUT`` forces it."""
        forced = tuning.forced(LAYOUT_ENV, LAYOUTS)  # validated even where it cannot apply
        if not self.channels_last_convs or xf.dim() != 4 or _has_hooks(self.body):
            return "contiguous"
        if forced is not None:
            return forced
        dev = xf.device.type
        grad = torch.is_grad_enabled() and (xf.requires_grad or any(
            p.requires_grad for p in self.parameters()))
        shape = tuning.shape_class(xf, "grad" if grad else "no_grad",
                                   "train" if self.training else "eval",
                                   tuning.autocast_tag(dev), self._layout_signature())
        return tuning.decide("stack_layout", dev, shape,
                             functools.partial(self._layout_candidates, xf, grad),
                             "contiguous", LAYOUTS, budget_s=LAYOUT_BUDGET_S)

    def _layout_signature(self) -> str:
        sig = self.__dict__.get("_layout_sig")
        if sig is None:
            sig = tuning.stable_hash(f"{self.body!r}|{self.channels_last_convs}")
            self.__dict__["_layout_sig"] = sig
        return sig

    def _layout_candidates(self, xf: torch.Tensor, grad: bool) -> dict[str, Callable[[], None]]:
        """One timing run per layout. It never writes the model: the buffers (batch-norm
        statistics) are clones passed with ``torch.func.functional_call`` (so graphs still
        waiting for their backward keep valid inputs), gradients come from ``autograd.grad``
        (no ``.grad`` is touched), and the RNG is restored."""
        xd = xf.detach().requires_grad_(xf.requires_grad)
        wrt = [p for p in self.parameters() if p.requires_grad] + ([xd] if xd.requires_grad
                                                                    else [])
        buffers = dict(self.body.named_buffers())
        cuda = xf.device if xf.device.type == "cuda" else None

        def run(layout: str) -> None:
            rng = torch.get_rng_state()
            cuda_rng = None if cuda is None else torch.cuda.get_rng_state(cuda)
            self._ctx.layout = layout
            try:
                with torch.set_grad_enabled(grad):
                    y = torch.func.functional_call(
                        self.body, {n: b.clone() for n, b in buffers.items()}, (xd,),
                        strict=False)
                    if grad:
                        torch.autograd.grad(y.float().sum(), wrt, allow_unused=True)
            except Exception as exc:
                if layout != "contiguous":
                    warnings.warn(f"faststeal.stack: the {layout} layout failed on this model "
                                  f"({type(exc).__name__}: {exc}); it runs contiguous",
                                  RuntimeWarning, stacklevel=2)
                raise
            finally:
                self._ctx.layout = "contiguous"
                torch.set_rng_state(rng)
                if cuda is not None:
                    torch.cuda.set_rng_state(cuda_rng, cuda)

        return {name: functools.partial(run, name) for name in LAYOUTS}

    def features(self, x: torch.Tensor, samples: Optional[int] = None) -> torch.Tensor:
        """The head's input, ``(S, B, F)`` (Laplace's penultimate features)."""
        head = self.head
        seen: list[torch.Tensor] = []
        hook = head.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        try:
            _, copies = self._run(x, samples)
        finally:
            hook.remove()
        if not seen:
            raise RuntimeError(f"the last layer {self.last_layer!r} was not called by forward")
        return _unfold(seen[-1], copies)

    def kl(self) -> torch.Tensor:
        """Sum of the Bayesian layers' KL(q || prior); zero for a deterministic stack."""
        terms = [m.kl() for m in self.modules() if isinstance(m, (BayesLinear, BayesConv2d))]
        if not terms:
            p = next(self.parameters())
            return torch.zeros((), dtype=torch.float32, device=p.device)
        return torch.stack(terms).sum()

    def _stateful(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.body.named_modules()
                if isinstance(m, (_Twin, _VmapGroup))]

    def _check_index(self, i: int) -> None:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.members:
            raise ValueError(f"member index must be an int in [0, {self.members}), got {i!r}")

    @torch.no_grad()
    def member(self, i: int) -> nn.Module:
        """Member ``i`` as a plain module of the user's class (a copy; for a Bayesian stack the
        posterior mean)."""
        self._check_index(i)
        plain = copy.deepcopy(self._skeleton)
        state = plain.state_dict()
        for name, m in self._stateful():
            for k, v in m.member_state(i).items():
                state[f"{name}.{k}" if name else k] = v.detach().clone().cpu()
        plain.load_state_dict(state)
        p0 = next(self.parameters(), None)
        if p0 is not None:
            plain = plain.to(p0.device)
        return plain.train(self.training)

    @torch.no_grad()
    def load_member(self, i: int, plain: nn.Module) -> None:
        """Copy a plain model's state (same architecture) into member ``i``."""
        self._check_index(i)
        if not isinstance(plain, nn.Module):
            raise TypeError(f"plain must be an nn.Module, got {type(plain).__name__}")
        diff = _state_diff(self._skeleton, plain)
        if diff:
            raise ValueError(f"plain ({type(plain).__name__}) is not this model's architecture: "
                             f"its state differs in {diff[:3]}{' ...' if len(diff) > 3 else ''}")
        state = plain.state_dict()
        for name, m in self._stateful():
            prefix = f"{name}." if name else ""
            m.load_member_state(i, {k[len(prefix):]: v for k, v in state.items()
                                    if k.startswith(prefix)})


# ----------------------------------------------------------------------------- public API

def _check_model(model_or_factory: ModelOrFactory, what: str = "model_or_factory") -> nn.Module:
    if isinstance(model_or_factory, nn.Module):
        return model_or_factory
    if callable(model_or_factory):
        m = model_or_factory()
        if not isinstance(m, nn.Module):
            raise TypeError(f"{what} must return an nn.Module, got {type(m).__name__}")
        return m
    raise TypeError(f"{what} must be an nn.Module or a zero-argument factory returning one, "
                    f"got {type(model_or_factory).__name__}")


def _member_seed(seed: int, i: int) -> int:
    return (seed * 1_000_003 + i * 7_919 + 101) % (2**63)


@torch.no_grad()
def _reset(m: nn.Module) -> None:
    """Re-draw every parameter of ``m`` with its layers' own ``reset_parameters``."""
    for sub in m.modules():
        if hasattr(sub, "reset_parameters") and callable(sub.reset_parameters):
            sub.reset_parameters()


def stack(model_or_factory: ModelOrFactory, members: int, *, seed: Optional[int] = None,
          init: str = "reset", input_shape: Optional[Sequence[int]] = None,
          bayesian: bool = False, prior_sigma: float = 1.0,
          last_layer: Optional[str] = None) -> StackedModule:
    """``members`` copies of a model as one :class:`StackedModule` (see the module docstring).

    model_or_factory: an ``nn.Module`` (the template) or a zero-argument callable returning one.
    init: ``"reset"`` — member i is re-initialised under its own seed (derived from ``seed``;
    ``seed=None`` draws one from torch's global RNG): a factory is called once per member, a
    template is copied and every submodule's ``reset_parameters()`` re-run; ``"copy"`` — every
    member starts from the template's weights. input_shape: one example's shape (e.g. (C, H, W)
    or (F,)); with it ``forward`` tells a shared ``(B, ...)`` input from a stacked ``(S, B, ...)``
    one. bayesian: Linear/Conv2d become mean-field Gaussian layers (members must be 1; draw S
    weight samples with ``forward(x, samples=S)``). last_layer: the qualified name of the layer
    whose input :meth:`StackedModule.features` returns (default: the last ``nn.Linear``).
    """
    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        raise ValueError(f"members must be a positive int, got {members!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
    if bayesian and members != 1:
        raise ValueError(f"a Bayesian stack has one parameter set (members=1) and draws its "
                         f"members with forward(x, samples=S); got members={members}")
    is_factory = not isinstance(model_or_factory, nn.Module)
    template = _check_model(model_or_factory)
    if init == "copy":  # one private copy (tracing runs on it), stacked S times
        mods = [copy.deepcopy(template)] * members
    else:
        base = next_seed() if seed is None else seed
        mods = []
        for i in range(members):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_member_seed(base, i))
                if is_factory:
                    m = _check_model(model_or_factory)
                else:
                    m = copy.deepcopy(template)
                    _reset(m)
            mods.append(m)
    return stack_from(mods, input_shape=input_shape, bayesian=bayesian, prior_sigma=prior_sigma,
                      last_layer=last_layer)


def stack_from(modules: Sequence[nn.Module], *, input_shape: Optional[Sequence[int]] = None,
               bayesian: bool = False, prior_sigma: float = 1.0,
               last_layer: Optional[str] = None) -> StackedModule:
    """Stack existing plain modules (one architecture) as the members, weights kept exactly.

    ``unstack(stack_from(ms))`` returns modules whose ``state_dict`` equals ``ms``'s.
    """
    if isinstance(modules, nn.Module) or not isinstance(modules, (list, tuple)) or not modules:
        raise TypeError("modules must be a non-empty list of nn.Module")
    bad = [i for i, m in enumerate(modules) if not isinstance(m, nn.Module)]
    if bad:
        raise TypeError(f"modules[{bad[0]}] is a {type(modules[bad[0]]).__name__}, "
                        f"not an nn.Module")
    if bayesian and len(modules) != 1:
        raise ValueError(f"bayesian=True stacks one module (its weights become the posterior "
                         f"means), got {len(modules)}")
    if (isinstance(prior_sigma, bool) or not isinstance(prior_sigma, (int, float))
            or not prior_sigma > 0 or not math.isfinite(prior_sigma)):
        raise ValueError(f"prior_sigma must be a positive float, got {prior_sigma!r}")
    _check_structure(modules)
    ctx = _Ctx()
    fallbacks: list[tuple[str, str]] = []
    body = _convert(modules, "", ctx, bayesian, float(prior_sigma), fallbacks)
    swapped = {n for n, m in body.named_modules() if isinstance(m, _Twin)}
    graphs: list[torch.fx.Graph] = []
    if "" not in swapped:  # a bare layer is its own twin; nothing else to check
        graphs = _fx_check(modules[0], swapped)
    for name, kind in fallbacks:
        warnings.warn(f"faststeal.stack: submodule {name!r} ({kind}) has no stacked twin; its "
                      f"{len(modules)} member(s) run through torch.func.vmap (correct, without "
                      f"the fused ops)", UserWarning, stacklevel=3)
    if last_layer is not None:
        try:
            layer = body.get_submodule(last_layer)
        except AttributeError as exc:
            raise ValueError(f"last_layer {last_layer!r} is not a submodule of the model") \
                from exc
        if not isinstance(layer, (_Linear, _BayesLinear)):
            raise ValueError(f"last_layer {last_layer!r} must be an nn.Linear, got "
                             f"{type(modules[0].get_submodule(last_layer)).__name__}")
    fused = _fuse_relu(modules[0], graphs, body,
                       last_layer if last_layer is not None else _last_linear(body))
    fused_pools = _fuse_relu_pool(modules[0], graphs, body)
    channels_last = [] if len(modules) == 1 or _has_hooks(modules[0]) else \
        _channels_last_convs(graphs, body)
    for name in channels_last:
        body.get_submodule(name).channels_last_ok = True
    skeleton = copy.deepcopy(modules[0]).cpu()
    out = StackedModule(body, len(modules), skeleton, input_shape=input_shape,
                        bayesian=bayesian, last_layer=last_layer,
                        fallbacks=[n for n, _ in fallbacks])
    out.fused_relus = fused
    out.fused_relu_pools = fused_pools
    out.channels_last_convs = channels_last
    out.shared_prefix = len(modules) == 1 and _shared_prefix(
        graphs, body, out.last_layer)
    return out


def unstack(stacked: StackedModule) -> list[nn.Module]:
    """The members of ``stacked`` as plain modules (copies)."""
    if not isinstance(stacked, StackedModule):
        raise TypeError(f"stacked must be a StackedModule (from faststeal.stack), got "
                        f"{type(stacked).__name__}")
    return [stacked.member(i) for i in range(stacked.members)]
