"""Surrogate architectures: the zoo (one definition per architecture, realised as plain models
and ready-made factories that :func:`faststeal.stack` stacks) and :func:`resolve_surrogate` for user models."""

from .surrogate import (Surrogate, SurrogateLike, asdict_keyed, check_surrogate,
                        check_surrogate_name, insert_dropout, resolve_surrogate, surrogate_key,
                        surrogate_label)
from .zoo import (ARCHS, FACTORIES, ArchSpec, PlainModel, arch_spec, build_model,
                  count_params)

__all__ = ["ARCHS", "ArchSpec", "FACTORIES", "PlainModel", "Surrogate",
           "SurrogateLike", "arch_spec", "asdict_keyed", "build_model", "check_surrogate",
           "check_surrogate_name", "count_params", "insert_dropout", "resolve_surrogate",
           "surrogate_key", "surrogate_label"]
