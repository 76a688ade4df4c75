"""Surrogate architectures: the zoo (one definition per architecture, realised plain or stacked,
and as ready-made plain-model factories) and :func:`resolve_surrogate` for user models."""

from .surrogate import (Surrogate, SurrogateLike, asdict_keyed, check_surrogate,
                        check_surrogate_name, insert_dropout, resolve_surrogate, surrogate_key,
                        surrogate_label)
from .zoo import (ARCHS, FACTORIES, ArchSpec, PlainModel, StackedModel, arch_spec, build_model,
                  count_params)

__all__ = ["ARCHS", "ArchSpec", "FACTORIES", "PlainModel", "StackedModel", "Surrogate",
           "SurrogateLike", "arch_spec", "asdict_keyed", "build_model", "check_surrogate",
           "check_surrogate_name", "count_params", "insert_dropout", "resolve_surrogate",
           "surrogate_key", "surrogate_label"]
