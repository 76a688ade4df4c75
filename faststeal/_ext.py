"""The one place that imports the compiled extension ``faststeal._C``.

``C`` is the module or None; ``LOAD_ERROR`` says why it is missing. Backends that need it report
``unavailable_reason()`` with that reason and the command that builds it.
"""

from __future__ import annotations

from typing import Optional

BUILD_HINT = ("build it with `pip install --no-build-isolation --no-deps -e .` "
              "(or `make install`) in the repository root")

C = None
LOAD_ERROR: Optional[str] = None
try:
    import torch  # noqa: F401  (the extension links against torch's libraries)

    from . import _C as C  # type: ignore[attr-defined,no-redef]
except Exception as exc:  # ImportError, undefined symbol after a torch upgrade, ...
    C = None
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def has_cuda_kernels() -> bool:
    return C is not None and bool(getattr(C, "WITH_CUDA", False))


def unavailable_reason() -> Optional[str]:
    if C is None:
        return f"faststeal._C is not loaded ({LOAD_ERROR}); {BUILD_HINT}"
    return None
