"""faststeal: model stealing with uncertainty-quantification surrogates, fast.

Quick use::

    import faststeal
    summary = faststeal.run_comparison(faststeal.Config.from_preset("quick", out="runs/q"))
    res = faststeal.steal(my_model, pool=pool_x, test=(test_x, test_y), budget=1000)

Heavy modules (data, methods, runs) load on first use, so ``import faststeal`` stays cheap.
"""

import importlib.abc as _abc
import sys as _sys

__version__ = "0.1.0"


class _TorchBeforeExtension(_abc.MetaPathFinder):
    """Imports torch before ``faststeal._C`` is loaded: the extension links against torch's
    shared libraries (libc10, libtorch), which only ``import torch`` puts in the process, so
    ``import faststeal._C`` as a first statement would fail with "libc10.so: cannot open shared
    object file". A no-op for every other module; torch itself still loads lazily."""

    def find_spec(self, name, path=None, target=None):
        if name == "faststeal._C":
            import torch  # noqa: F401

        return None  # let the normal finders locate the module


if not any(isinstance(f, _TorchBeforeExtension) for f in _sys.meta_path):
    _sys.meta_path.insert(0, _TorchBeforeExtension())

__all__ = ["Config", "StolenModel", "load", "run_comparison", "stack", "stack_from", "steal",
           "unstack", "__version__"]


def __getattr__(name):
    if name in ("Config", "run_comparison"):
        from . import runs

        return getattr(runs, name)
    if name in ("stack", "stack_from", "unstack"):
        import importlib

        return getattr(importlib.import_module("faststeal.nn.stack"), name)
    if name in ("StolenModel", "load"):
        from . import stolen

        return getattr(stolen, name)
    if name == "steal":
        from .attack import steal

        return steal
    raise AttributeError(f"module 'faststeal' has no attribute {name!r}")
