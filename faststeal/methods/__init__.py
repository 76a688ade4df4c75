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


__all__ = ["METHODS", "UQ_METHODS", "Method", "Baseline", "DeepEnsemble", "MCDropout",
           "BayesByBackprop", "SWAG", "Laplace", "build_method", "CheckpointError"]
