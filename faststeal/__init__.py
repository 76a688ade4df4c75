"""faststeal: model stealing with uncertainty-quantification surrogates, fast.

Quick use::

    import faststeal
    summary = faststeal.run_comparison(faststeal.Config.from_preset("quick", out="runs/q"))
    res = faststeal.steal(my_model, pool=pool_x, test=(test_x, test_y), budget=1000)

Heavy modules (data, methods, experiment) load on first use, so ``import faststeal`` stays cheap.
"""

__version__ = "0.1.0"

__all__ = ["Config", "StolenModel", "load", "run_comparison", "stack", "stack_from", "steal",
           "unstack", "__version__"]


def __getattr__(name):
    if name in ("Config", "run_comparison"):
        from . import experiment

        return getattr(experiment, name)
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
