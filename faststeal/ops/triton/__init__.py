"""Triton backend of the faststeal ops (see the contract in :mod:`faststeal.ops.reference`).

Runs on CUDA GPUs (targets H100/H200, Triton >= 3.6). On CPU tensors it runs only under the
Triton interpreter, i.e. with ``TRITON_INTERPRET=1`` set before this package is imported (the
test suite does this when there is no GPU); the interpreter is for tests, not for speed.

Every op: a private ``@triton.jit`` kernel per file, a host launcher that checks, makes contiguous,
allocates and picks the grid (block sizes from the shapes: no autotuning, so nothing is re-run
and the first call costs one compile per specialisation).
"""

from __future__ import annotations

import os
from typing import Optional

try:
    import triton  # noqa: F401
    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # pragma: no cover - depends on the install
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

if _IMPORT_ERROR is None:
    from . import _common
    from .bayes_linear import bayes_linear_bwd, bayes_linear_fwd
    from .ensemble_linear import ensemble_linear_bwd, ensemble_linear_fwd
    from .ensemble_xent import ensemble_cross_entropy_bwd, ensemble_cross_entropy_fwd
    from .gaussian_kl import gaussian_kl_bwd, gaussian_kl_fwd
    from .member_stats import member_stats_fwd

    __all__ = [
        "bayes_linear_bwd", "bayes_linear_fwd", "ensemble_cross_entropy_bwd",
        "ensemble_cross_entropy_fwd", "ensemble_linear_bwd", "ensemble_linear_fwd",
        "gaussian_kl_bwd", "gaussian_kl_fwd", "member_stats_fwd", "unavailable_reason",
    ]
else:  # pragma: no cover
    __all__ = ["unavailable_reason"]


def unavailable_reason(device_type: str) -> Optional[str]:
    """None when the Triton kernels can run on ``device_type``, else why not."""
    if _IMPORT_ERROR is not None:
        return f"triton failed to import ({_IMPORT_ERROR}); install it with `pip install triton`"
    if device_type == "cuda":
        import torch
        if not torch.cuda.is_available():
            return "no CUDA device is available (torch.cuda.is_available() is False)"
        return None
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return ("Triton runs on CPU tensors only under its interpreter (tests): set "
                    "TRITON_INTERPRET=1 before importing faststeal")
        if not _common.INTERPRET:
            return ("TRITON_INTERPRET=1 was set after faststeal.ops.triton was imported; the "
                    "kernels were already compiled for the GPU: set it before importing faststeal")
        return None
    return f"the triton backend does not run on {device_type!r} tensors"
