"""The five UQ surrogates and the single-model baseline, one file each behind one interface.

Every method is a stack of S members with a leading member axis, trained and evaluated as ONE
batched computation (see :class:`faststeal.methods.base.Method`). ``METHODS`` maps the names used
on the command line and in results files to the classes; :func:`build_method` builds one.
"""

from __future__ import annotations

from typing import Any, Optional

from .base import Method
from .baseline import Baseline
from .bayes_by_backprop import BayesByBackprop
from .checkpoint import CheckpointError
from .deep_ensemble import DeepEnsemble
from .laplace import Laplace
from .mc_dropout import MCDropout
from .swag import SWAG

METHODS: dict[str, type[Method]] = {
    "baseline": Baseline,
    "deep-ensemble": DeepEnsemble,
    "mc-dropout": MCDropout,
    "bbb": BayesByBackprop,
    "swag": SWAG,
    "laplace": Laplace,
}

#: the five UQ methods of the comparison (everything but the baseline)
UQ_METHODS = tuple(name for name in METHODS if name != "baseline")

# Diversity-keeping Deep Ensemble variants (studies beyond the paper; not part of "all").
from .diverse import DIVERSE_METHODS  # noqa: E402

METHODS.update(DIVERSE_METHODS)


def build_method(name: str, arch: Any = None, input_shape: Optional[tuple] = None,
                 num_classes: Optional[int] = None, **kwargs: Any) -> Method:
    """``METHODS[name](arch, input_shape, num_classes, **kwargs)``; ValueError for unknown names.

    ``arch`` (a zoo name) or ``surrogate=`` (a zoo name, ``"torchvision:NAME"``,
    ``"module:factory"``, an ``nn.Module`` template or a zero-argument factory) names the
    surrogate; see :class:`~faststeal.methods.base.Method`.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid names: {', '.join(METHODS)}")
    return METHODS[name](arch, input_shape, num_classes, **kwargs)


def parse_methods(methods: Any) -> list[str]:
    """Method names from a list or a comma-separated string; ``"all"`` is the baseline and the
    five UQ methods. ValueError naming an unknown method."""
    if isinstance(methods, str):
        methods = ["baseline", *UQ_METHODS] if methods.strip() == "all" else [
            m.strip() for m in methods.split(",") if m.strip()]
    if not isinstance(methods, (list, tuple)) or not methods:
        raise ValueError(f"methods must be 'all', a comma-separated string or a non-empty list of "
                         f"names from {tuple(METHODS)}, got {methods!r}")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r} (in methods); valid: {tuple(METHODS)}")
    return list(methods)


def check_method_params(method_params: Any, methods: Optional[Any] = None) -> dict[str, dict]:
    """Validate ``{method: {hyperparameter: value}}``: method names, dicts, hyperparameter names
    (the command line's and ``faststeal.steal``'s one check; values are checked when the method
    is built). Returns a copy (``{}`` for None)."""
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
        cls = METHODS[m]
        valid = {**cls.COMMON_DEFAULTS, **cls.DEFAULTS}
        unknown = sorted(set(hp) - set(valid) - ({"samples"} if "members" in valid else set()))
        if unknown:
            raise TypeError(f"method_params[{m!r}]: unknown hyperparameter(s) {unknown}; "
                            f"valid: {sorted(valid)}")
        out[m] = dict(hp)
    return out


__all__ = ["METHODS", "UQ_METHODS", "Method", "Baseline", "DeepEnsemble", "MCDropout",
           "BayesByBackprop", "SWAG", "Laplace", "build_method", "CheckpointError",
           "check_method_params", "parse_methods"]
