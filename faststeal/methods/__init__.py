"""The five UQ surrogates, the single-model baseline and the diversity variants, one file each
behind one interface.

Every method is a stack of S members with a leading member axis, trained and evaluated as ONE
batched computation (see :class:`faststeal.methods.base.Method`). ``REGISTRY`` is the one list of
methods: each name maps to its class and a ``paper`` flag — True for the comparison's methods
(the baseline and the paper's five UQ methods: what ``--methods all`` runs, in this order),
False for the diversity-keeping variants of :mod:`faststeal.methods.diverse` (studies beyond the
paper, ``faststeal study diversity``). Every registered name is accepted wherever a method name
is (the comparison's ``--methods``, ``Config.methods``, the studies). :func:`build_method` builds
one; :func:`check_hparams` validates hyperparameters without building anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .base import Method, _check_float
from .baseline import Baseline
from .bayes_by_backprop import BayesByBackprop
from .checkpoint import CheckpointError
from .deep_ensemble import DeepEnsemble
from .diverse import DIVERSE_METHODS
from .laplace import Laplace
from .mc_dropout import MCDropout
from .swag import SWAG


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: its class, and whether it is one of the paper's comparison."""

    cls: type[Method]
    paper: bool


REGISTRY: dict[str, MethodEntry] = {
    "baseline": MethodEntry(Baseline, True),
    "deep-ensemble": MethodEntry(DeepEnsemble, True),
    "mc-dropout": MethodEntry(MCDropout, True),
    "bbb": MethodEntry(BayesByBackprop, True),
    "swag": MethodEntry(SWAG, True),
    "laplace": MethodEntry(Laplace, True),
    **{name: MethodEntry(cls, False) for name, cls in DIVERSE_METHODS.items()},
}

#: every registered name -> class
METHODS: dict[str, type[Method]] = {name: e.cls for name, e in REGISTRY.items()}
#: the comparison's methods in table order (``--methods all``): the baseline and the paper's five
PAPER_METHODS: tuple[str, ...] = tuple(n for n, e in REGISTRY.items() if e.paper)
#: the five UQ methods of the comparison (everything of the paper's but the baseline)
UQ_METHODS: tuple[str, ...] = tuple(n for n in PAPER_METHODS if n != "baseline")
#: the diversity-keeping variants (not part of ``all``)
VARIANTS: tuple[str, ...] = tuple(n for n, e in REGISTRY.items() if not e.paper)


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``; ValueError naming the valid names otherwise."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid names: {', '.join(METHODS)}")
    return METHODS[name]


def build_method(name: str, arch: Any = None, input_shape: Optional[tuple] = None,
                 num_classes: Optional[int] = None, **kwargs: Any) -> Method:
    """``METHODS[name](arch, input_shape, num_classes, **kwargs)``; ValueError for unknown names.

    ``arch`` (a zoo name) or ``surrogate=`` (a zoo name, ``"torchvision:NAME"``,
    ``"module:factory"``, an ``nn.Module`` template or a zero-argument factory) names the
    surrogate; see :class:`~faststeal.methods.base.Method`.
    """
    return method_class(name)(arch, input_shape, num_classes, **kwargs)


def parse_methods(spec: Any) -> tuple[str, ...]:
    """``"all"`` (:data:`PAPER_METHODS`), a comma-separated string or a sequence of registered
    names; ValueError naming the unknown ones (and the valid names)."""
    if isinstance(spec, str):
        if spec.strip() == "all":
            return PAPER_METHODS
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    names = tuple(spec)
    bad = [n for n in names if n not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; valid: {', '.join(METHODS)} or 'all' "
                         f"(= {', '.join(PAPER_METHODS)})")
    return names


def check_hparams(name: str, hparams: Optional[dict[str, Any]], arch: Any = "mlp") -> None:
    """Raise (TypeError for unknown names, ValueError for bad values) exactly as
    ``build_method(name, arch, ..., **hparams)`` would, without building a network: the checks
    of :class:`~faststeal.methods.base.Method` and the method's ``_validate_hparams``. ``arch``:
    any surrogate setting (a name, an ``nn.Module`` template, a factory)."""
    cls = method_class(name)
    if not isinstance(hparams, dict):
        raise TypeError(f"the hyperparameters of {name!r} must be a dict, got "
                        f"{type(hparams).__name__}")
    defaults = {**cls.COMMON_DEFAULTS, **cls.DEFAULTS}
    if "samples" in hparams and "members" in defaults and "samples" not in defaults:
        hparams = {("members" if k == "samples" else k): v for k, v in hparams.items()}
    unknown = sorted(set(hparams) - set(defaults))
    if unknown:
        raise TypeError(f"{cls.__name__} got unknown hyperparameter(s) {unknown}; "
                        f"valid: {sorted(defaults)}")
    hp = {**defaults, **hparams}
    hp["weight_decay"] = _check_float("weight_decay", hp["weight_decay"], 0.0)
    from ..models.surrogate import Surrogate, surrogate_label
    from ..models.zoo import ARCHS

    # _validate_hparams reads at most self.arch and whether self.surrogate is a zoo model
    probe = cls.__new__(cls)
    probe.arch = surrogate_label(arch)
    probe.surrogate = Surrogate(probe.arch, probe.arch if probe.arch in ARCHS else None, (), 2)
    try:
        probe._validate_hparams(hp)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{name}: {exc}") from None


def check_method_params(method_params: Any, methods: Optional[Any] = None) -> dict[str, dict]:
    """Validate ``{method: {hyperparameter: value}}`` (method names, dicts, hyperparameter names
    and values, :func:`check_hparams`) for ``faststeal.steal``. Returns a copy (``{}`` for
    None)."""
    if method_params is None:
        return {}
    if not isinstance(method_params, dict):
        raise TypeError(f"method_params must be a dict of per-method dicts, got "
                        f"{type(method_params).__name__}")
    out = {}
    for m, hp in method_params.items():
        if m not in METHODS:
            raise ValueError(f"method_params key must be one of {tuple(METHODS)}, got {m!r}")
        if not isinstance(hp, dict):
            raise TypeError(f"method_params[{m!r}] must be a dict, got {type(hp).__name__}")
        check_hparams(m, hp)
        out[m] = dict(hp)
    return out


__all__ = ["REGISTRY", "METHODS", "PAPER_METHODS", "UQ_METHODS", "VARIANTS", "Method",
           "Baseline", "DeepEnsemble", "MCDropout", "BayesByBackprop", "SWAG", "Laplace",
           "method_class", "build_method", "check_hparams", "check_method_params", "parse_methods",
           "CheckpointError"]
