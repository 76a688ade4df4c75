"""The ``cpp`` backend: the C++ CPU kernels of ``faststeal._C`` (``csrc/cpu``).

Implements the backend contract of :mod:`faststeal.ops.reference` for CPU tensors in float32,
float64, bfloat16 and float16 (``max_pool2d``: float16 runs the reference). The GEMM ops
(``ensemble_linear``, ``bayes_linear``) multiply in the input dtype with float32 accumulation
(AMX / AVX512-BF16 where the CPU has them; the ``upcast`` path multiplies bfloat16/float16 as
float32) and run their elementwise passes in float32; the reduction ops convert bfloat16/float16
inputs to float32.

The GEMM ops come in variants, one per GEMM library of ``csrc/cpu/gemm.cpp`` (:data:`GEMM_PATHS`):
:func:`variants` hands them to the measured dispatch (:mod:`faststeal.ops.dispatch`), which times
them on the host; ``FASTSTEAL_CPU_GEMM=onednn|bmm|mm|packed|upcast`` forces one. The plain
functions use the extension's default rule (no tuning). ``upcast`` multiplies bfloat16/float16
inputs as float32 (the CPU's own bfloat16 GEMM is a slow fallback where it lacks AVX512-BF16/AMX);
:func:`variant_applies` keeps the dispatch from timing a path that would only repeat another.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Optional

import torch

from .. import _ext
from . import reference
from .reference import MemberStats

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

#: The GEMM paths of the C++ CPU ops (csrc/cpu/gemm.cpp), by their code in the extension.
GEMM_PATHS = {"onednn": 1, "bmm": 2, "mm": 3, "packed": 4, "upcast": 5}
_REDUCED = (torch.bfloat16, torch.float16)
_GEMM_OPS = ("ensemble_linear", "bayes_linear")
GEMM_ENV = "FASTSTEAL_CPU_GEMM"


def _with_gemm_path(name: str, code: int) -> Callable:
    def run(*args):
        prev = _ext.C._set_cpu_gemm_path(code)
        try:
            return globals()[name](*args)  # looked up per call (tests may patch the function)
        finally:
            _ext.C._set_cpu_gemm_path(prev)

    return run


def variants(op: str, kind: str) -> Optional[dict[str, Callable]]:
    """``{GEMM path: function}`` for the GEMM ops (all paths, or the one ``FASTSTEAL_CPU_GEMM``
    forces); None for the other ops (one implementation each)."""
    if op not in _GEMM_OPS:
        return None
    forced = os.environ.get(GEMM_ENV, "").strip().lower()
    if forced and forced != "auto" and forced not in GEMM_PATHS:
        raise ValueError(f"{GEMM_ENV} must be 'auto' or one of {tuple(GEMM_PATHS)}, "
                         f"got {forced!r}")
    paths = [forced] if forced and forced != "auto" else list(GEMM_PATHS)
    return {p: _with_gemm_path(f"{op}_{kind}", GEMM_PATHS[p]) for p in paths}


@functools.lru_cache(maxsize=None)
def onednn_multiplies(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN multiplies ``dtype`` (ATen's own check; csrc/cpu/gemm.cpp asks
    the same and runs ``bmm`` instead where it does not)."""
    if dtype not in _REDUCED:
        return dtype == torch.float32  # float64: csrc/cpu/gemm.cpp runs bmm
    name = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else \
        "_is_mkldnn_fp16_supported"
    try:
        return bool(getattr(torch.ops.mkldnn, name)())
    except (AttributeError, RuntimeError):  # a torch without the op: neither side uses oneDNN
        return False


def variant_applies(variant: str, args: tuple, kind: str = "fwd") -> bool:
    """Whether GEMM path ``variant`` runs its own GEMM for these arguments of ``<op>_<kind>``
    (``args[0]``: the input or the output gradient, in the compute dtype; in a backward
    ``args[1]`` is the input): ``upcast`` only for bfloat16/float16 (else it is ``bmm``),
    ``onednn`` only for a dtype this CPU's oneDNN multiplies (else it runs ``bmm``); the
    backward of a shared (2-D) input runs the same ``torch.mm`` on every path but ``upcast``, so
    ``bmm`` stands for them there. The dispatch does not time a path that would repeat another."""
    dtype = args[0].dtype if args and isinstance(args[0], torch.Tensor) else None
    if variant == "upcast":
        return dtype in _REDUCED
    shared_bwd = kind == "bwd" and len(args) > 1 and isinstance(args[1], torch.Tensor) and \
        args[1].dim() == 2
    if shared_bwd:
        return variant == "bmm"
    if variant == "onednn":
        return dtype is None or onednn_multiplies(dtype)
    return True


def unavailable_reason(device_type: str) -> Optional[str]:
    """None when the C++ CPU kernels can run on ``device_type``, else why not."""
    reason = _ext.unavailable_reason()
    if reason:
        return reason
    if device_type != "cpu":
        return f"the cpp backend runs on CPU tensors only, not {device_type}"
    return None


def _native(t: torch.Tensor) -> bool:
    return t.dtype in _DTYPES


def ensemble_linear_fwd(x, weight, bias, activation, dropout_p, key):
    if not _native(x):
        return reference.ensemble_linear_fwd(x, weight, bias, activation, dropout_p, key)
    return _ext.C.ensemble_linear_fwd_cpu(x, weight, bias, activation, float(dropout_p), int(key))


def ensemble_linear_bwd(grad_y, x, weight, bias, y, z, activation, dropout_p, key,
                        need_dx=True):
    if not _native(x):
        return reference.ensemble_linear_bwd(grad_y, x, weight, bias, y, z, activation,
                                             dropout_p, key, need_dx)
    dx, dw, db = _ext.C.ensemble_linear_bwd_cpu(grad_y, x, weight, bias, y, z, activation,
                                                float(dropout_p), int(key), bool(need_dx))
    return (dx if need_dx else None), dw, (db if bias is not None else None)


def bayes_linear_fwd(x, w_mu, w_rho, b_mu, b_rho, samples, key_w, key_b):
    if not _native(x):
        return reference.bayes_linear_fwd(x, w_mu, w_rho, b_mu, b_rho, samples, key_w, key_b)
    return _ext.C.bayes_linear_fwd_cpu(x, w_mu, w_rho, b_mu, b_rho, int(samples), int(key_w),
                                       int(key_b))


def bayes_linear_bwd(grad_y, x, w_mu, w_rho, b_mu, b_rho, samples, key_w, key_b, need_dx=True):
    if not _native(x):
        return reference.bayes_linear_bwd(grad_y, x, w_mu, w_rho, b_mu, b_rho, samples, key_w,
                                          key_b, need_dx)
    dx, dmu, drho, dbmu, dbrho = _ext.C.bayes_linear_bwd_cpu(
        grad_y, x, w_mu, w_rho, b_mu, b_rho, int(samples), int(key_w), int(key_b),
        bool(need_dx))
    if not need_dx:
        dx = None
    if b_mu is None:
        dbmu = dbrho = None
    return dx, dmu, drho, dbmu, dbrho


def gaussian_kl_fwd(mu, rho, prior_sigma):
    if not _native(mu):
        return reference.gaussian_kl_fwd(mu, rho, prior_sigma)
    return _ext.C.gaussian_kl_fwd_cpu(mu, rho, float(prior_sigma))


def gaussian_kl_bwd(grad, mu, rho, prior_sigma):
    if not _native(mu):
        return reference.gaussian_kl_bwd(grad, mu, rho, prior_sigma)
    return tuple(_ext.C.gaussian_kl_bwd_cpu(grad, mu, rho, float(prior_sigma)))


def member_stats_fwd(logits, targets):
    if not _native(logits):
        return reference.member_stats_fwd(logits, targets)
    return MemberStats(*_ext.C.member_stats_fwd_cpu(logits, targets))


def ensemble_cross_entropy_fwd(logits, target):
    if not _native(logits):
        return reference.ensemble_cross_entropy_fwd(logits, target)
    return _ext.C.ensemble_cross_entropy_fwd_cpu(logits, target)


def ensemble_cross_entropy_bwd(grad, logits, target):
    if not _native(logits):
        return reference.ensemble_cross_entropy_bwd(grad, logits, target)
    return _ext.C.ensemble_cross_entropy_bwd_cpu(grad, logits, target)


#: the dtypes of the C++ pooling kernel (float16 is left to ATen: the kernel's scalar float16
#: path was slower than ATen's)
_POOL_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def max_pool2d_fwd(x, kernel_size, relu):
    if x.dtype not in _POOL_DTYPES:
        return reference.max_pool2d_fwd(x, kernel_size, relu)
    return _ext.C.max_pool2d_fwd_cpu(x, int(kernel_size), bool(relu))


def max_pool2d_bwd(grad_y, x, kernel_size, relu):
    if x.dtype not in _POOL_DTYPES:
        return reference.max_pool2d_bwd(grad_y, x, kernel_size, relu)
    return _ext.C.max_pool2d_bwd_cpu(grad_y, x, int(kernel_size), bool(relu))
