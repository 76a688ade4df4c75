"""The architecture zoo: one definition per architecture, realised plain (victim) or stacked."""

from .zoo import ARCHS, ArchSpec, PlainModel, StackedModel, arch_spec, build_model, count_params

__all__ = ["ARCHS", "ArchSpec", "PlainModel", "StackedModel", "arch_spec", "build_model",
           "count_params"]
