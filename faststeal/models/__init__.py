"""Surrogate architectures: the zoo (one definition per architecture, realised plain or stacked,
and as ready-made plain-model factories) and :func:`resolve_surrogate` for user models."""

from .surrogate import Surrogate, check_surrogate_name, insert_dropout, resolve_surrogate
from .zoo import (ARCHS, FACTORIES, ArchSpec, PlainModel, StackedModel, arch_spec, build_model,
                  count_params)

__all__ = ["ARCHS", "ArchSpec", "FACTORIES", "PlainModel", "StackedModel", "Surrogate",
           "arch_spec", "build_model", "check_surrogate_name", "count_params", "insert_dropout",
           "resolve_surrogate"]
