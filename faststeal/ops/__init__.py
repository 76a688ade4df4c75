"""faststeal's stacked ops: public functions, backend dispatch, reference implementations.

Every op has a pure-PyTorch reference (:mod:`faststeal.ops.reference`), a C++ CPU and a CUDA C++
implementation (``faststeal._C``) and a Triton kernel (:mod:`faststeal.ops.triton`), registered
as ``torch.ops.faststeal.*`` custom ops with fake implementations and autograd.
"""

from .bayes_linear import bayes_linear, gaussian_kl
from .dispatch import (BACKENDS, BackendUnavailableError, get_backend, report, resolve,
                       set_backend, use_backend)
from .ensemble_linear import ensemble_linear
from .ensemble_xent import ensemble_cross_entropy
from .max_pool import max_pool2d
from .member_stats import member_stats
from .reference import MemberStats

__all__ = [
    "BACKENDS", "BackendUnavailableError", "MemberStats", "bayes_linear", "ensemble_cross_entropy",
    "ensemble_linear", "gaussian_kl", "get_backend", "max_pool2d", "member_stats", "report",
    "resolve", "set_backend", "use_backend",
]
