"""``faststeal info``: versions, the compiled extension, CUDA/Triton, and each op's backend."""

from __future__ import annotations

import platform


def collect() -> dict:
    import torch

    from . import __version__, _ext
    from .ops import dispatch

    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # not installed / broken
        triton_version = f"not available ({type(exc).__name__}: {exc})"
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    return {
        "faststeal": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "triton": triton_version,
        "cpu_threads": torch.get_num_threads(),
        "extension": "loaded" if _ext.C is not None else f"not loaded: {_ext.LOAD_ERROR}",
        "extension_cuda_kernels": _ext.has_cuda_kernels(),
        "requested_backend": dispatch.get_backend(),
        "cpu_gemm": _cpu_gemm(),
        "cpu_retain_freed_memory": _retain_status(),
        "ops": dispatch.report(devices),
    }


def _cpu_gemm() -> str:
    """The library of the C++ CPU ops' float32 GEMMs (decided in csrc/cpu/gemm.cpp)."""
    from . import _ext

    return _ext.C._cpu_gemm_library() if _ext.C is not None else "none (extension not loaded)"


def _retain_status() -> str:
    from .train_step import retain_disabled_reason

    reason = retain_disabled_reason()
    return (f"off ({reason})" if reason else
            "on when training on CPU (glibc keeps freed memory; FASTSTEAL_RETAIN_CPU_MEMORY=0 "
            "turns it off)")


def format_info(info: dict) -> str:
    lines = []
    for k, v in info.items():
        if k != "ops":
            lines.append(f"{k:24s} {v}")
    lines.append("backend used by `auto` (per device and op):")
    for dev, ops in info["ops"].items():
        for op, backend in ops.items():
            lines.append(f"  {dev:5s} {op:24s} {backend}")
    return "\n".join(lines)
