"""The architecture zoo: each architecture is defined once, as a list of layer specs, and realised
as a plain ``nn.Module`` (:class:`PlainModel`; ``(B, C, H, W) -> (B, classes)``): the victim, and
the four ready-made surrogate factories (:data:`FACTORIES`). S stacked members are
:func:`faststeal.stack` of a factory — the same path as any user model
(``build_model(..., members=S)``; ``(B, C, H, W)`` shared or ``(S, B, C, H, W)`` ->
``(S, B, classes)``).

Architectures (``ARCHS``), all adapting to the dataset's ``input_shape = (C, H, W)``:

* ``mlp``: flatten, 512, 256, classes (ReLU).
* ``lenet``: conv 6@5x5 (same padding), max-pool, conv 16@5x5, max-pool, FC 200, FC 84, classes
  (100,506 parameters on 28x28x1). Pooling only where the feature map is at least 2 wide; the
  second conv pads to "same" when the map is smaller than 8 (8x8 digits).
* ``cnn-wide``: two stages of [conv3x3 - BN - ReLU] x 2 with 64 and 128 channels, each followed
  by a max-pool; global average pool; FC 256; classes.
* ``resnet-small``: conv3x3 16 - BN - ReLU stem, three basic residual blocks (16, 32, 64 channels;
  stride 2 in the last two while the map is at least 4 wide), global average pool, classes.

``dropout=p > 0`` puts ``nn.Dropout(p)`` on the input of every linear layer that does not read the
raw pixels, and in ``lenet`` / ``cnn-wide`` also after each conv stage's pooling (per-element
masks; stacked, each member copy draws its own).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import nn


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
    """Mean over the last two (spatial) dims: (..., C, H, W) -> (..., C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


class ResidualBlock(nn.Module):
    """``relu(body(x) + shortcut(x))``."""

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
        return [nn.Flatten()]
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


@torch.fx.wrap  # a leaf of fx traces (faststeal.stack traces plain zoo models)
def _check_input(x, input_shape: tuple[int, int, int]) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, C, H, W), got shape {tuple(x.shape)}")
    if tuple(x.shape[-3:]) != tuple(input_shape):
        raise ValueError(f"x's trailing dims {tuple(x.shape[-3:])} do not match the model's "
                         f"input_shape (C, H, W) = {tuple(input_shape)}")


class PlainModel(nn.Module):
    """A single network (the victim, one surrogate member): x (B, C, H, W) -> (B, num_classes)
    logits."""

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
        _check_input(x, self.input_shape)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(arch: str, input_shape: Sequence[int], num_classes: int, *,
                members: Optional[int] = None, dropout: float = 0.0, bayesian: bool = False,
                prior_sigma: float = 1.0) -> nn.Module:
    """Build ``arch`` for inputs ``input_shape = (C, H, W)`` and ``num_classes`` classes.

    ``members=None`` (and not Bayesian) gives a :class:`PlainModel` of standard torch layers,
    (B, C, H, W) -> (B, classes). ``members=S`` gives :func:`faststeal.stack` of it: a
    :class:`~faststeal.nn.StackedModule` of S independently initialised members,
    (B, C, H, W) or (S, B, C, H, W) -> (S, B, classes). ``bayesian=True`` gives a one-member
    Bayesian stack (BayesLinear/BayesConv2d twins; ``members`` must be None or 1); draw S weight
    samples with ``forward(x, samples=S)``.
    """
    spec = arch_spec(arch, input_shape, num_classes, dropout)
    if members is not None and (isinstance(members, bool) or not isinstance(members, int)
                                or members < 1):
        raise ValueError(f"members must be a positive int or None, got {members!r}")
    if bayesian and members not in (None, 1):
        raise ValueError(f"bayesian=True builds a one-member model that draws its members "
                         f"with forward(x, samples=S); members must be None or 1, "
                         f"got {members}")
    if members is None and not bayesian:
        return PlainModel(spec)
    from ..nn.stack import stack
    return stack(functools.partial(PlainModel, spec), 1 if bayesian else members,
                 input_shape=spec.input_shape, bayesian=bayesian, prior_sigma=prior_sigma)


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
#: a zoo name as a surrogate (``"lenet"``) stacks its factory with :func:`faststeal.stack`, like
#: any user model
FACTORIES = {"mlp": mlp, "lenet": lenet, "cnn-wide": cnn_wide, "resnet-small": resnet_small}


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements in ``module`` (only those requiring grad if asked)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
