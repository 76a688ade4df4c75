"""The architecture zoo: each architecture is defined once, as a list of layer specs, and realised
either as a plain ``nn.Module`` (the victim; ``(B, C, H, W) -> (B, classes)``) or as a
:class:`StackedModel` of S members (``(B, C, H, W)`` shared or ``(S, B, C, H, W)`` ->
``(S, B, classes)``) built from faststeal's stacked layers.

Architectures (``ARCHS``), all adapting to the dataset's ``input_shape = (C, H, W)``:

* ``mlp``: flatten, 512, 256, classes (ReLU).
* ``lenet``: conv 6@5x5 (same padding), max-pool, conv 16@5x5, max-pool, FC 200, FC 84, classes
  (100,506 parameters on 28x28x1). Pooling only where the feature map is at least 2 wide; the
  second conv pads to "same" when the map is smaller than 8 (8x8 digits).
* ``cnn-wide``: two stages of [conv3x3 - BN - ReLU] x 2 with 64 and 128 channels, each followed
  by a max-pool; global average pool; FC 256; classes.
* ``resnet-small``: conv3x3 16 - BN - ReLU stem, three basic residual blocks (16, 32, 64 channels;
  stride 2 in the last two while the map is at least 4 wide), global average pool, classes.

``dropout=p > 0`` puts dropout on the input of every linear layer that does not read the raw
pixels (fused into the previous :class:`~faststeal.nn.EnsembleLinear` where there is one), and in
``lenet`` / ``cnn-wide`` also after each conv stage's pooling (per-element masks,
:class:`~faststeal.nn.EnsembleDropout`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..nn import (BayesConv2d, BayesLinear, EnsembleBatchNorm, EnsembleConv2d, EnsembleDropout,
                  EnsembleLinear, EnsembleMaxPool2d)
from ..nn.layers import _MCDropoutMixin, member_copies

ARCHS = ("mlp", "lenet", "cnn-wide", "resnet-small")


# ----------------------------------------------------------------------------- layer specs

@dataclass(frozen=True)
class Conv:
    cin: int
    cout: int
    k: int
    stride: int = 1
    pad: int = 0
    bias: bool = True


@dataclass(frozen=True)
class BatchNorm:
    features: int
    dims: int  # 1: (B, F) features, 2: (B, F, H, W) maps


@dataclass(frozen=True)
class ReLU:
    pass


@dataclass(frozen=True)
class MaxPool:
    k: int


@dataclass(frozen=True)
class Dropout:
    p: float


@dataclass(frozen=True)
class Flatten:
    pass


@dataclass(frozen=True)
class GlobalAvgPool:
    pass


@dataclass(frozen=True)
class Linear:
    """``dropout(activation(x W^T + b))``; activation and output dropout fuse when stacked."""
    fin: int
    fout: int
    activation: str = "none"
    dropout: float = 0.0


@dataclass(frozen=True)
class Residual:
    """``relu(body(x) + shortcut(x))``; an empty shortcut is the identity."""
    body: tuple
    shortcut: tuple = field(default_factory=tuple)


Spec = Union[Conv, BatchNorm, ReLU, MaxPool, Dropout, Flatten, GlobalAvgPool, Linear, Residual]


@dataclass(frozen=True)
class ArchSpec:
    """One architecture: ``body`` specs (input -> penultimate features) and the ``head`` layer."""
    arch: str
    input_shape: tuple[int, int, int]
    num_classes: int
    body: tuple
    head: Linear


def _conv_out(n: int, k: int, stride: int, pad: int) -> int:
    return (n + 2 * pad - k) // stride + 1


def _pool_stage(h: int, w: int, p: float) -> tuple[list, int, int]:
    """Max-pool 2 when the map allows it, then (optionally) dropout."""
    layers: list = []
    if min(h, w) >= 2:
        layers.append(MaxPool(2))
        h, w = h // 2, w // 2
    if p > 0:
        layers.append(Dropout(p))
    return layers, h, w


def _mlp(c: int, h: int, w: int, nc: int, p: float) -> tuple[list, Linear]:
    return [Flatten(), Linear(c * h * w, 512, "relu", p), Linear(512, 256, "relu", p)], \
        Linear(256, nc)


def _lenet(c: int, h: int, w: int, nc: int, p: float) -> tuple[list, Linear]:
    body: list = [Conv(c, 6, 5, pad=2), ReLU()]
    pool, h, w = _pool_stage(h, w, p)
    body += pool
    pad2 = 0 if min(h, w) >= 8 else 2  # keep at least a 4x4 map after the 5x5 conv
    body += [Conv(6, 16, 5, pad=pad2), ReLU()]
    h, w = _conv_out(h, 5, 1, pad2), _conv_out(w, 5, 1, pad2)
    pool, h, w = _pool_stage(h, w, p)
    body += pool
    body += [Flatten(), Linear(16 * h * w, 200, "relu", p), Linear(200, 84, "relu", p)]
    return body, Linear(84, nc)


def _cnn_wide(c: int, h: int, w: int, nc: int, p: float) -> tuple[list, Linear]:
    body: list = []
    cin = c
    for width in (64, 128):
        for _ in range(2):
            body += [Conv(cin, width, 3, pad=1, bias=False), BatchNorm(width, 2), ReLU()]
            cin = width
        pool, h, w = _pool_stage(h, w, p)
        body += pool
    body += [GlobalAvgPool(), Linear(cin, 256, "relu", p)]
    return body, Linear(256, nc)


def _basic_block(cin: int, cout: int, stride: int) -> Residual:
    body = (Conv(cin, cout, 3, stride, 1, bias=False), BatchNorm(cout, 2), ReLU(),
            Conv(cout, cout, 3, 1, 1, bias=False), BatchNorm(cout, 2))
    shortcut: tuple = ()
    if stride != 1 or cin != cout:
        shortcut = (Conv(cin, cout, 1, stride, 0, bias=False), BatchNorm(cout, 2))
    return Residual(body, shortcut)


def _resnet_small(c: int, h: int, w: int, nc: int, p: float) -> tuple[list, Linear]:
    body: list = [Conv(c, 16, 3, pad=1, bias=False), BatchNorm(16, 2), ReLU()]
    cin = 16
    for width, stride in ((16, 1), (32, 2), (64, 2)):
        stride = stride if min(h, w) >= 4 else 1
        body.append(_basic_block(cin, width, stride))
        h, w = _conv_out(h, 3, stride, 1), _conv_out(w, 3, stride, 1)
        cin = width
    body.append(GlobalAvgPool())
    if p > 0:
        body.append(Dropout(p))
    return body, Linear(cin, nc)


_BUILDERS = {"mlp": _mlp, "lenet": _lenet, "cnn-wide": _cnn_wide, "resnet-small": _resnet_small}


def _check_args(arch, input_shape, num_classes,
                dropout) -> tuple[str, tuple[int, int, int], int, float]:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid choices: {', '.join(ARCHS)}")
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list, torch.Size)) else None
    if shape is None or len(shape) != 3 or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(f"input_shape must be (C, H, W) with positive ints, got {input_shape!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    return arch, shape, num_classes, float(dropout)  # type: ignore[return-value]


def arch_spec(arch: str, input_shape: Sequence[int], num_classes: int,
              dropout: float = 0.0) -> ArchSpec:
    """The one definition of ``arch`` for a dataset; plain and stacked models are built from it."""
    arch, shape, num_classes, dropout = _check_args(arch, input_shape, num_classes, dropout)
    body, head = _BUILDERS[arch](*shape, num_classes, dropout)
    return ArchSpec(arch, shape, num_classes, tuple(body), head)


# ----------------------------------------------------------------------------- realisers

class GlobalAvgPool2d(nn.Module):
    """Mean over the last two (spatial) dims: (..., C, H, W) -> (..., C); plain and stacked."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


class ResidualBlock(nn.Module):
    """``relu(body(x) + shortcut(x))``; works on plain (B, ...) and stacked (S, B, ...) tensors."""

    def __init__(self, body: nn.Module, shortcut: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


_ACT = {"none": None, "relu": nn.ReLU, "gelu": nn.GELU}


def _plain_layers(spec: Spec) -> list[nn.Module]:
    if isinstance(spec, Conv):
        return [nn.Conv2d(spec.cin, spec.cout, spec.k, spec.stride, spec.pad, bias=spec.bias)]
    if isinstance(spec, BatchNorm):
        return [(nn.BatchNorm1d if spec.dims == 1 else nn.BatchNorm2d)(spec.features)]
    if isinstance(spec, ReLU):
        return [nn.ReLU()]
    if isinstance(spec, MaxPool):
        return [nn.MaxPool2d(spec.k)]
    if isinstance(spec, Dropout):
        return [nn.Dropout(spec.p)]
    if isinstance(spec, Flatten):
        return [nn.Flatten(start_dim=-3)]
    if isinstance(spec, GlobalAvgPool):
        return [GlobalAvgPool2d()]
    if isinstance(spec, Linear):
        out: list[nn.Module] = [nn.Linear(spec.fin, spec.fout)]
        if _ACT[spec.activation] is not None:
            out.append(_ACT[spec.activation]())
        if spec.dropout > 0:
            out.append(nn.Dropout(spec.dropout))
        return out
    if isinstance(spec, Residual):
        return [ResidualBlock(_plain_seq(spec.body), _plain_seq(spec.shortcut))]
    raise TypeError(f"unknown layer spec {spec!r}")


def _plain_seq(specs) -> nn.Sequential:
    return nn.Sequential(*[m for s in specs for m in _plain_layers(s)])


def _stacked_layers(spec: Spec, members: int, bayesian: bool,
                    prior_sigma: float) -> list[nn.Module]:
    if isinstance(spec, Conv):
        if bayesian:
            return [BayesConv2d(spec.cin, spec.cout, spec.k, spec.stride, spec.pad, bias=spec.bias,
                                prior_sigma=prior_sigma)]
        return [EnsembleConv2d(members, spec.cin, spec.cout, spec.k, spec.stride, spec.pad,
                               bias=spec.bias)]
    if isinstance(spec, BatchNorm):
        return [EnsembleBatchNorm(members, spec.features)]
    if isinstance(spec, ReLU):
        return [nn.ReLU()]
    if isinstance(spec, MaxPool):
        return [EnsembleMaxPool2d(spec.k)]
    if isinstance(spec, Dropout):
        return [EnsembleDropout(spec.p)]
    if isinstance(spec, Flatten):
        return [nn.Flatten(start_dim=-3)]
    if isinstance(spec, GlobalAvgPool):
        return [GlobalAvgPool2d()]
    if isinstance(spec, Linear):
        if not bayesian:
            return [EnsembleLinear(members, spec.fin, spec.fout, activation=spec.activation,
                                   dropout=spec.dropout)]
        out: list[nn.Module] = [BayesLinear(spec.fin, spec.fout, prior_sigma=prior_sigma)]
        if _ACT[spec.activation] is not None:
            out.append(_ACT[spec.activation]())
        if spec.dropout > 0:
            out.append(EnsembleDropout(spec.dropout))
        return out
    if isinstance(spec, Residual):
        return [ResidualBlock(_stacked_seq(spec.body, members, bayesian, prior_sigma),
                              _stacked_seq(spec.shortcut, members, bayesian, prior_sigma))]
    raise TypeError(f"unknown layer spec {spec!r}")


def _stacked_seq(specs, members: int, bayesian: bool, prior_sigma: float) -> nn.Sequential:
    return nn.Sequential(*[m for s in specs for m in _stacked_layers(s, members, bayesian,
                                                                      prior_sigma)])


_PLAIN_PARAM_TYPES = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)
_STACKED_PARAM_TYPES = (EnsembleLinear, EnsembleConv2d, EnsembleBatchNorm, BayesLinear, BayesConv2d)
_BAYES_TYPES = (BayesLinear, BayesConv2d)


def _param_layers(module: nn.Module, types: tuple) -> list[nn.Module]:
    """Parameter-bearing layers in construction order (identical for plain and stacked builds)."""
    return [m for m in module.modules() if isinstance(m, types)]


@torch.fx.wrap  # a leaf of fx traces (faststeal.stack traces plain zoo models)
def _check_input(x, input_shape: tuple[int, int, int], ranks: tuple[int, ...], what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in ranks:
        raise ValueError(f"x must be {what}, got shape {tuple(x.shape)}")
    if tuple(x.shape[-3:]) != tuple(input_shape):
        raise ValueError(f"x's trailing dims {tuple(x.shape[-3:])} do not match the model's "
                         f"input_shape (C, H, W) = {tuple(input_shape)}")


class PlainModel(nn.Module):
    """A single network (the victim): x (B, C, H, W) -> (B, num_classes) logits."""

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        self.spec = spec
        self.arch = spec.arch
        self.input_shape = spec.input_shape
        self.num_classes = spec.num_classes
        self.body = _plain_seq(spec.body)
        self.head = _plain_layers(spec.head)[0]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, F): the head's input."""
        _check_input(x, self.input_shape, (4,), "(batch, C, H, W)")
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _is_stochastic(m: nn.Module) -> bool:
    """Whether ``m`` (or a submodule) draws random numbers in its current mode."""
    for sub in m.modules():
        if isinstance(sub, _BAYES_TYPES):
            return True
        if isinstance(sub, _MCDropoutMixin):
            p = sub.dropout if isinstance(sub, EnsembleLinear) else sub.p
            if sub._dropout_active(p):
                return True
    return False


class StackedModel(nn.Module):
    """S members of one architecture run as one computation.

    ``forward(x, samples=None)``: x (B, C, H, W) shared by all members, or (S, B, C, H, W) one
    input per member -> (S, B, num_classes) logits. ``samples`` is the number of member copies for
    a one-member model: MC Dropout (one network, ``samples`` dropout masks) or a Bayesian model
    (``samples`` weight draws; default 1). For ``members > 1`` it must be None or ``members``.
    Copies are made lazily: layers before the first random one run once and are broadcast.

    Attributes: ``members`` (the parameter stack size; 1 for Bayesian models), ``arch``,
    ``input_shape``, ``num_classes``, ``bayesian``, ``spec`` (the :class:`ArchSpec`), ``body``
    (input -> penultimate features) and ``head`` (the last EnsembleLinear/BayesLinear).
    """

    def __init__(self, spec: ArchSpec, members: int, bayesian: bool = False,
                 prior_sigma: float = 1.0) -> None:
        super().__init__()
        if bayesian and members != 1:
            raise ValueError(f"a Bayesian model has one parameter set (members=1) and draws its "
                             f"members with forward(x, samples=S); got members={members}")
        self.spec = spec
        self.arch = spec.arch
        self.input_shape = spec.input_shape
        self.num_classes = spec.num_classes
        self.members = members
        self.bayesian = bayesian
        self.prior_sigma = prior_sigma
        self.body = _stacked_seq(spec.body, members, bayesian, prior_sigma)
        self.head = _stacked_layers(spec.head, members, bayesian, prior_sigma)[0]

    # -- forward -------------------------------------------------------------------------------

    def _copies(self, x: torch.Tensor, samples: Optional[int]) -> int:
        _check_input(x, self.input_shape, (4, 5), "(batch, C, H, W) or (members, batch, C, H, W)")
        return member_copies(self.members, samples, x.shape[0] if x.dim() == 5 else None,
                             x.shape)

    @staticmethod
    def _shared(x: torch.Tensor) -> bool:
        return x.dim() in (2, 4)  # (B, F) / (B, C, H, W): no member axis

    def _run(self, layers, x: torch.Tensor, copies: int) -> torch.Tensor:
        for m in layers:
            if isinstance(m, _BAYES_TYPES):
                if not self._shared(x) and x.shape[0] == 1 and copies > 1:
                    x = x[0]
                x = m(x, samples=copies) if self._shared(x) else m(x)
                continue
            if _is_stochastic(m):
                x = self._expand(x, copies)
            x = m(x)
        return x

    def _expand(self, x: torch.Tensor, copies: int) -> torch.Tensor:
        if self._shared(x):
            x = x.unsqueeze(0)
        if x.shape[0] != copies:
            x = x.expand(copies, *x.shape[1:])
        return x

    def features(self, x: torch.Tensor, samples: Optional[int] = None) -> torch.Tensor:
        """Penultimate features (S, B, F): the head's input (after any dropout before it)."""
        copies = self._copies(x, samples)
        return self._expand(self._run(self.body, x, copies), copies).contiguous()

    def forward(self, x: torch.Tensor, samples: Optional[int] = None) -> torch.Tensor:
        copies = self._copies(x, samples)
        h = self._run(self.body, x, copies)
        return self._expand(self._run([self.head], h, copies), copies).contiguous()

    # -- Bayesian ------------------------------------------------------------------------------

    def kl(self) -> torch.Tensor:
        """Sum of the Bayesian layers' KL(q || prior); a zero tensor for non-Bayesian models."""
        terms = [m.kl() for m in self.modules() if isinstance(m, _BAYES_TYPES)]
        if not terms:
            p = next(self.parameters())
            return torch.zeros((), dtype=torch.float32, device=p.device)
        return torch.stack(terms).sum()

    # -- members <-> plain models --------------------------------------------------------------

    def param_layers(self) -> list[nn.Module]:
        """The parameter-bearing stacked layers in construction order."""
        return _param_layers(self, _STACKED_PARAM_TYPES)

    def _pairs(self, plain: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
        mine = self.param_layers()
        theirs = _param_layers(plain, _PLAIN_PARAM_TYPES)
        if len(mine) != len(theirs):
            raise ValueError(f"plain module has {len(theirs)} parameter layers but this "
                             f"{self.arch!r} model has {len(mine)}; build it with "
                             f"build_model({self.arch!r}, {self.input_shape}, {self.num_classes})")
        kinds = {EnsembleLinear: nn.Linear, BayesLinear: nn.Linear, EnsembleConv2d: nn.Conv2d,
                 BayesConv2d: nn.Conv2d}
        for k, (s, p) in enumerate(zip(mine, theirs)):
            want = kinds.get(type(s), (nn.BatchNorm1d, nn.BatchNorm2d))
            if not isinstance(p, want):
                raise ValueError(f"parameter layer {k}: expected {want}, got {type(p).__name__}")
        return list(zip(mine, theirs))

    @torch.no_grad()
    def load_member(self, i: int, plain: nn.Module) -> None:
        """Copy a plain model's weights and BatchNorm buffers into member ``i``.

        ``plain`` must have this architecture (e.g. from ``build_model(arch, input_shape,
        num_classes)``). For a Bayesian model ``i`` is 0 and the posterior means are set.
        """
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.members:
            raise ValueError(f"member index must be an int in [0, {self.members}), got {i!r}")
        for s, p in self._pairs(plain):
            s.load_member(i, p)

    @torch.no_grad()
    def member(self, i: int) -> PlainModel:
        """Member ``i`` as a plain model (a copy; the posterior mean for a Bayesian model)."""
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.members:
            raise ValueError(f"member index must be an int in [0, {self.members}), got {i!r}")
        p0 = next(self.parameters())
        plain = PlainModel(self.spec).to(device=p0.device, dtype=p0.dtype)
        for s, p in self._pairs(plain):
            if isinstance(s, EnsembleBatchNorm):
                s._copy_to(i, p)
            else:
                p.load_state_dict(s.member(i).state_dict())
        return plain.train(self.training)


def build_model(arch: str, input_shape: Sequence[int], num_classes: int, *,
                members: Optional[int] = None, dropout: float = 0.0, bayesian: bool = False,
                prior_sigma: float = 1.0) -> Union[PlainModel, StackedModel]:
    """Build ``arch`` for inputs ``input_shape = (C, H, W)`` and ``num_classes`` classes.

    ``members=None`` (and not Bayesian) gives a :class:`PlainModel` of standard torch layers,
    (B, C, H, W) -> (B, classes). ``members=S`` gives a :class:`StackedModel` of S independently
    initialised members, (B, C, H, W) or (S, B, C, H, W) -> (S, B, classes).
    ``bayesian=True`` gives a one-member :class:`StackedModel` with BayesLinear/BayesConv2d layers
    (``members`` must be None or 1); draw S weight samples with ``forward(x, samples=S)``.
    """
    spec = arch_spec(arch, input_shape, num_classes, dropout)
    if members is not None and (isinstance(members, bool) or not isinstance(members, int)
                                or members < 1):
        raise ValueError(f"members must be a positive int or None, got {members!r}")
    if (isinstance(prior_sigma, bool) or not isinstance(prior_sigma, (int, float))
            or not (math.isfinite(prior_sigma) and prior_sigma > 0)):
        raise ValueError(f"prior_sigma must be a positive finite float, got {prior_sigma!r}")
    if bayesian:
        if members not in (None, 1):
            raise ValueError(f"bayesian=True builds a one-member model that draws its members "
                             f"with forward(x, samples=S); members must be None or 1, "
                             f"got {members}")
        return StackedModel(spec, 1, bayesian=True, prior_sigma=float(prior_sigma))
    if members is None:
        return PlainModel(spec)
    return StackedModel(spec, members)


def mlp(input_shape: Sequence[int], num_classes: int, dropout: float = 0.0) -> PlainModel:
    """The zoo's ``mlp`` as a plain model (a factory for :func:`faststeal.stack`)."""
    return PlainModel(arch_spec("mlp", input_shape, num_classes, dropout))


def lenet(input_shape: Sequence[int], num_classes: int, dropout: float = 0.0) -> PlainModel:
    """The zoo's ``lenet`` as a plain model."""
    return PlainModel(arch_spec("lenet", input_shape, num_classes, dropout))


def cnn_wide(input_shape: Sequence[int], num_classes: int, dropout: float = 0.0) -> PlainModel:
    """The zoo's ``cnn-wide`` as a plain model."""
    return PlainModel(arch_spec("cnn-wide", input_shape, num_classes, dropout))


def resnet_small(input_shape: Sequence[int], num_classes: int,
                 dropout: float = 0.0) -> PlainModel:
    """The zoo's ``resnet-small`` as a plain model."""
    return PlainModel(arch_spec("resnet-small", input_shape, num_classes, dropout))


#: the zoo as four ready-made plain-model factories ``f(input_shape, num_classes, dropout=0)``;
#: on the command line ``--surrogate-arch faststeal.models.zoo:lenet`` stacks one with
#: :func:`faststeal.stack` (the bare name ``lenet`` uses the hand-fused :class:`StackedModel`)
FACTORIES = {"mlp": mlp, "lenet": lenet, "cnn-wide": cnn_wide, "resnet-small": resnet_small}


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements in ``module`` (only those requiring grad if asked)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
