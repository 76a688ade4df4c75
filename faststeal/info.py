"""``faststeal info``: versions, the compiled extension, CUDA/Triton, each op's backend
candidates, and the measured dispatch decisions taken on this host (with the alternatives'
times)."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Optional


def code_version() -> dict:
    """Which code ran: ``{"faststeal": version, "commit": sha or None, "dirty": bool or None}``.

    The commit is read with ``git`` only when the package sits at the top of a git checkout (an
    editable install; a wheel in a virtualenv inside some checkout does not take that checkout's
    commit); else ``FASTSTEAL_GIT_COMMIT`` if set (e.g. by a job script), else None. ``dirty``:
    tracked files differ from the commit."""
    from . import __version__

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> Optional[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}  # no redirects
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                 timeout=5, env=env)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    in_checkout = top is not None and os.path.realpath(top) == os.path.realpath(root)
    commit = git("rev-parse", "HEAD") if in_checkout else None
    status = git("status", "--porcelain", "--untracked-files=no") if in_checkout else None
    return {"faststeal": __version__,
            "commit": commit or os.environ.get("FASTSTEAL_GIT_COMMIT"),
            "dirty": bool(status) if status is not None else None}


def describe_code(code: dict) -> str:
    """One line for a :func:`code_version` dict (stored ones may lack keys)."""
    out = f"faststeal {code.get('faststeal') or '(version not recorded)'}"
    if code.get("commit"):
        out += f" at {code['commit']}" + (" + local changes" if code.get("dirty") else "")
    return out


def collect() -> dict:
    import torch

    from . import __version__, _ext
    from .ops import dispatch, tuning

    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # not installed / broken
        triton_version = f"not available ({type(exc).__name__}: {exc})"
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    code = code_version()
    return {
        "faststeal": __version__,
        "code": (describe_code(code) if code["commit"]
                 else f"{describe_code(code)} (commit unknown: not a git checkout)"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "triton": triton_version,
        "cpu": tuning.cpu_model(),
        "cpu_flags": " ".join(tuning.cpu_flags()) or "(none of avx2/avx512/amx reported)",
        "cpu_threads": torch.get_num_threads(),
        "extension": "loaded" if _ext.C is not None else f"not loaded: {_ext.LOAD_ERROR}",
        "extension_cuda_kernels": _ext.has_cuda_kernels(),
        "requested_backend": dispatch.get_backend(),
        "cpu_gemm": _cpu_gemm(),
        "cpp_dtypes": _cpp_dtypes(),
        "tuning": _tuning_status(),
        "cpu_retain_freed_memory": _retain_status(),
        "cpu_bf16_weight_copies": _bf16_copies_status(),
        "ops": dispatch.report(devices),
        "decisions": tuning.decisions(),
    }


def _cpp_dtypes() -> str:
    import torch

    from .ops import cpp_backend

    native = cpp_backend.onednn_multiplies(torch.bfloat16)
    return (", ".join(str(d)[6:] for d in cpp_backend._DTYPES)
            + " (bfloat16/float16: GEMMs in that dtype with float32 accumulation, or as float32"
            + " by cpp:upcast where measured faster (the default where oneDNN has no bfloat16);"
            + " bfloat16 arithmetic on this CPU: "
            + ("yes" if native else "no, per oneDNN (no AVX512-BF16/AMX)") + ")")


def _tuning_status() -> str:
    from .ops import tuning

    if not tuning.enabled():
        return f"off ({tuning.ENV_TUNE}=0): every choice takes its documented default"
    return (f"on: each op/conv times its candidates once per shape class (cache: "
            f"{tuning.cache_path() or 'memory only'})")


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


def _bf16_copies_status() -> str:
    from .master_weights import ENV, host_disabled_reason

    reason = host_disabled_reason()
    return (f"off ({reason}): bf16 steps cast the weights and their gradients" if reason else
            f"on for bf16 training with the fused Adam (the update writes the weights' bfloat16 "
            f"copies; {ENV}=0 turns it off)")


def format_info(info: dict) -> str:
    lines = []
    for k, v in info.items():
        if k not in ("ops", "decisions"):
            lines.append(f"{k:24s} {v}")
    lines.append("backend used by `auto` (per device and op):")
    for dev, ops in info["ops"].items():
        for op, backend in ops.items():
            lines.append(f"  {dev:5s} {op:24s} {backend}")
    decisions = info.get("decisions") or {}
    lines.append(f"measured decisions on this host ({len(decisions)}; choice, then every "
                 f"candidate's best time in ms):")
    for key, d in decisions.items():
        point, dev, threads, shape = (key.split("|") + ["", "", ""])[:4]
        times = ", ".join(f"{n} {'-' if t is None else f'{t:.3g}'}"
                          for n, t in sorted(d.get("times_ms", {}).items(),
                                             key=lambda kv: (kv[1] is None, kv[1] or 0)))
        lines.append(f"  {point:22s} {shape} [{dev.split(':')[0]}, {threads}] -> "
                     f"{d['choice']}  ({times})")
    if not decisions:
        lines.append("  (none yet: the first run of each layer shape measures)")
    return "\n".join(lines)
