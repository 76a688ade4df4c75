"""Backend selection for the faststeal ops.

Backends, fastest first where available: ``triton`` (GPU; CPU only under ``TRITON_INTERPRET=1``,
for tests), ``cuda`` (the CUDA C++ in ``csrc/cuda``), ``cpp`` (the C++ CPU code in ``csrc/cpu``)
and ``reference`` (pure PyTorch, always available). Each backend is a module exposing
``unavailable_reason(device_type) -> str | None`` and the functions of the backend contract in
:mod:`faststeal.ops.reference` (``<op>_fwd`` / ``<op>_bwd``); a backend may leave an op out, in
which case it is unavailable for that op.

The choice comes from :func:`set_backend` / :func:`use_backend`, else the ``FASTSTEAL_BACKEND``
environment variable, else ``auto``. ``auto`` walks :data:`AUTO_ORDER` for the op and device
(set from the measurements in ``docs/benchmarks.md``) and takes the first available backend. An
explicitly requested backend that cannot run raises :class:`BackendUnavailableError` saying why.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from typing import Iterator, Optional

BACKENDS = ("auto", "triton", "cuda", "cpp", "reference")
OPS = ("ensemble_linear", "bayes_linear", "gaussian_kl", "member_stats", "ensemble_cross_entropy")

_MODULES = {
    "reference": "faststeal.ops.reference",
    "cpp": "faststeal.ops.cpp_backend",
    "cuda": "faststeal.ops.cuda_backend",
    "triton": "faststeal.ops.triton",
}

# What ``auto`` tries, per device type and op, in order. From docs/benchmarks.md.
AUTO_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "cpu": {op: ("cpp", "reference") for op in OPS},
    "cuda": {op: ("triton", "cuda", "reference") for op in OPS},
}


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run the op on this device; the message says why."""


_state = threading.local()


def _env_backend() -> str:
    name = os.environ.get("FASTSTEAL_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"FASTSTEAL_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The backend currently requested (``auto`` unless set)."""
    return getattr(_state, "backend", None) or _env_backend()


def set_backend(name: str) -> None:
    """Request a backend for every op: one of ``auto``, ``triton``, ``cuda``, ``cpp``, ``reference``."""
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _state.backend = name.lower()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`; restores the previous choice on exit."""
    prev = getattr(_state, "backend", None)
    set_backend(name)
    try:
        yield
    finally:
        _state.backend = prev


_module_cache: dict[str, object] = {}
_import_errors: dict[str, str] = {}


def backend_module(name: str):
    """Import a backend module once; returns None (and remembers why) when it cannot load."""
    if name in _module_cache:
        return _module_cache[name]
    if name in _import_errors:
        return None
    try:
        mod = importlib.import_module(_MODULES[name])
    except Exception as exc:  # missing triton, broken build, ...
        _import_errors[name] = f"{type(exc).__name__}: {exc}"
        return None
    _module_cache[name] = mod
    return mod


def unavailable_reason(backend: str, op: str, device_type: str) -> Optional[str]:
    """None when ``backend`` can run ``op`` on ``device_type``, else a human-readable reason."""
    mod = backend_module(backend)
    if mod is None:
        return f"module {_MODULES[backend]} failed to import ({_import_errors[backend]})"
    reason = mod.unavailable_reason(device_type)
    if reason:
        return reason
    if not hasattr(mod, f"{op}_fwd"):
        return f"the {backend} backend has no {op} implementation"
    return None


def resolve(op: str, device_type: str) -> str:
    """The backend that will run ``op`` on ``device_type`` given the current request."""
    requested = get_backend()
    if requested != "auto":
        reason = unavailable_reason(requested, op, device_type)
        if reason:
            raise BackendUnavailableError(
                f"backend {requested!r} cannot run {op} on {device_type}: {reason}")
        return requested
    for name in AUTO_ORDER.get(device_type, {}).get(op, ("reference",)):
        if unavailable_reason(name, op, device_type) is None:
            return name
    return "reference"


def impl(op: str, kind: str, device_type: str):
    """The ``<op>_<kind>`` function (kind: fwd or bwd) of the backend chosen for the device."""
    mod = backend_module(resolve(op, device_type))
    fn = getattr(mod, f"{op}_{kind}", None)
    if fn is None:  # e.g. a backend with a fused forward but no backward
        fn = getattr(backend_module("reference"), f"{op}_{kind}")
    return fn


def report(device_types: tuple[str, ...] = ("cpu", "cuda")) -> dict[str, dict[str, str]]:
    """For ``faststeal info``: per device and op, the backend auto uses and why others refused."""
    out: dict[str, dict[str, str]] = {}
    for dev in device_types:
        out[dev] = {}
        for op in OPS:
            refusals = []
            chosen = None
            for name in AUTO_ORDER.get(dev, {}).get(op, ()):
                reason = unavailable_reason(name, op, dev)
                if reason is None:
                    chosen = name
                    break
                refusals.append(f"{name}: {reason}")
            chosen = chosen or "reference"
            out[dev][op] = chosen + (f"  (skipped {'; '.join(refusals)})" if refusals else "")
    return out
