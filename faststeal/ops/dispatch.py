"""Backend selection for the faststeal ops.

Backends, fastest first where available: ``triton`` (GPU; CPU only under ``TRITON_INTERPRET=1``,
for tests), ``cuda`` (the CUDA C++ in ``csrc/cuda``), ``cpp`` (the C++ CPU code in ``csrc/cpu``)
and ``reference`` (pure PyTorch, always available). Each backend is a module exposing
``unavailable_reason(device_type) -> str | None`` and the functions of the backend contract in
:mod:`faststeal.ops.reference` (``<op>_fwd`` / ``<op>_bwd``); a backend may leave an op out, in
which case it is unavailable for that op.

The choice comes from :func:`set_backend` / :func:`use_backend`, else the ``FASTSTEAL_BACKEND``
environment variable, else ``auto``. ``auto`` is *measured*: the first call of an op with a new
shape class times every available backend of :data:`AUTO_ORDER` for the device — and each
backend's variants (the ``cpp`` backend's GEMM paths: ``cpp:onednn``, ``cpp:bmm``, ``cpp:mm``,
``cpp:packed``, ``cpp:upcast``; a variant that would only repeat another for the call's dtype is
left out) — on the call's own arguments, and runs the fastest from then on
(:mod:`faststeal.ops.tuning`: one decision per op, forward/backward, shape class, dtype, device
model and thread count, cached on disk). A requested backend is tuned among its own variants
only; ``FASTSTEAL_CPU_GEMM`` forces the ``cpp`` GEMM path (a forced path is always timed).
With ``FASTSTEAL_TUNE=0`` ``auto`` takes the first available backend of :data:`AUTO_ORDER` with
its default variant (the documented default). An explicitly requested
backend that cannot run raises :class:`BackendUnavailableError` saying why.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
from typing import Callable, Iterator, Optional

import torch

from . import tuning

BACKENDS = ("auto", "triton", "cuda", "cpp", "reference")
OPS = ("ensemble_linear", "bayes_linear", "gaussian_kl", "member_stats", "ensemble_cross_entropy",
       "max_pool2d")

_MODULES = {
    "reference": "faststeal.ops.reference",
    "cpp": "faststeal.ops.cpp_backend",
    "cuda": "faststeal.ops.cuda_backend",
    "triton": "faststeal.ops.triton",
}

# The backends ``auto`` considers, per device type and op; it measures them all (see the module
# docstring). The order is the default without tuning (FASTSTEAL_TUNE=0): the first available.
AUTO_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "cpu": {op: ("cpp", "reference") for op in OPS},
    "cuda": {op: ("triton", "cuda", "reference") for op in OPS if op != "max_pool2d"}
    | {"max_pool2d": ("reference",)},  # no GPU kernel of ours (ops.max_pool2d runs ATen's)
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


# Positions of the RNG keys in each backend function's arguments: not part of a shape class.
_KEY_ARGS = {("ensemble_linear", "fwd"): (5,), ("ensemble_linear", "bwd"): (8,),
             ("bayes_linear", "fwd"): (6, 7), ("bayes_linear", "bwd"): (7, 8)}


def _shape(op: str, kind: str, args: tuple) -> str:
    skip = _KEY_ARGS.get((op, kind), ())
    parts = []
    for i, a in enumerate(args):
        if i in skip:
            continue
        parts.append(a > 0 if isinstance(a, float) else a)  # dropout: on/off, not the rate
    return tuning.shape_class(*parts)


def _late(mod, name: str) -> Callable:
    """``mod.name``, looked up at every call (so a patched backend function is seen)."""
    return lambda *args: getattr(mod, name)(*args)


def variants(backend: str, op: str, kind: str) -> dict[str, Callable]:
    """``{candidate name: function}`` of one backend for ``<op>_<kind>``: the backend's own
    variants (``backend:variant``) when it offers several, else ``{backend: function}``."""
    mod = backend_module(backend)
    if not hasattr(mod, f"{op}_{kind}"):  # e.g. a backend with a fused forward but no backward
        return {"reference": _late(backend_module("reference"), f"{op}_{kind}")}
    fn = _late(mod, f"{op}_{kind}")
    extra = getattr(mod, "variants", None)
    found = extra(op, kind) if extra is not None else None
    if not found:
        return {backend: fn}
    return {f"{backend}:{v}": f for v, f in found.items()}


def _applies(name: str, args: tuple, kind: str) -> bool:
    """Whether variant ``backend:variant`` runs its own code for these arguments of a ``kind``
    (fwd/bwd) call (the backend's ``variant_applies``; e.g. ``cpp:upcast`` is ``cpp:bmm`` for
    float32 inputs): a variant that would only repeat another is not timed (the caller keeps
    the default, i.e. a forced path)."""
    backend, _, variant = name.partition(":")
    check = getattr(backend_module(backend), "variant_applies", None) if variant else None
    return check is None or check(variant, args, kind)


def candidates(op: str, kind: str, device_type: str) -> tuple[dict[str, Callable], str]:
    """The measured candidates for ``<op>_<kind>`` on ``device_type`` under the current request,
    and the name of the default (the un-tuned choice, runnable under that name too)."""
    requested = get_backend()
    if requested != "auto":
        resolve(op, device_type)  # raises BackendUnavailableError when it cannot run
        names = (requested,)
    else:
        names = tuple(n for n in AUTO_ORDER.get(device_type, {}).get(op, ("reference",))
                      if unavailable_reason(n, op, device_type) is None) or ("reference",)
    cands: dict[str, Callable] = {}
    for n in names:
        cands.update(variants(n, op, kind))
    default = names[0]
    mod = backend_module(default)
    if hasattr(mod, f"{op}_{kind}"):
        default_fn = _late(mod, f"{op}_{kind}")
    else:
        default, default_fn = "reference", _late(backend_module("reference"), f"{op}_{kind}")
    own = [k for k in cands if k.startswith(default + ":")]
    if len(own) == 1:  # one variant forced (FASTSTEAL_CPU_GEMM): it is the default too
        return cands, own[0]
    if default not in cands:
        cands = {**cands, default: default_fn}
    return cands, default


@functools.lru_cache(maxsize=None)
def _runner(op: str, kind: str, device_type: str, request: tuple) -> Callable:
    cands, default = candidates(op, kind, device_type)
    # the default backend's plain function is one of its own variants (its default GEMM path):
    # not timed twice
    timed = {n: f for n, f in cands.items()
             if not (n == default and any(k.startswith(n + ":") for k in cands))}
    names = tuple(cands)
    # a restricted candidate set (a requested backend, a forced GEMM path) decides apart from
    # auto's full set: neither may read the other's cached choice
    point = f"{op}.{kind}" + ("" if request[:2] in (("auto", ""), ("auto", "auto"))
                              else f"[{','.join(timed)}]")
    skip = _KEY_ARGS.get((op, kind), ())
    memo: dict = {}  # exact shapes -> choice: the per-call cost is one dict lookup
    memo_gen = [tuning.generation]

    def choose(*args) -> str:
        if len(timed) == 1:
            return next(iter(timed))
        if memo_gen[0] != tuning.generation:
            memo.clear()
            memo_gen[0] = tuning.generation
        fast = (torch.get_num_threads(),) + tuple(
            (a.shape, a.dtype) if isinstance(a, torch.Tensor) else
            (a > 0 if isinstance(a, float) else a) for i, a in enumerate(args) if i not in skip)
        hit = memo.get(fast)
        if hit is not None:
            return hit
        choice = tuning.decide(point, device_type, _shape(op, kind, args),
                               lambda: {n: functools.partial(f, *args) for n, f in timed.items()
                                        if n == default or _applies(n, args, kind)},
                               default, names)
        if not tuning.cannot_time(device_type):  # else: a default until measuring is possible
            memo[fast] = choice
        return choice

    def run(*args):
        return cands[choose(*args)](*args)

    run.choose = choose  # type: ignore[attr-defined]
    run.candidates = tuple(timed)  # type: ignore[attr-defined]
    return run


def impl(op: str, kind: str, device_type: str) -> Callable:
    """The ``<op>_<kind>`` function (kind: fwd or bwd) to call for the device: it runs the
    measured choice for its arguments' shape class (``impl(...).choose(*args)`` names it)."""
    request = (get_backend(), os.environ.get("FASTSTEAL_CPU_GEMM", ""), tuning.enabled())
    return _runner(op, kind, device_type, request)


def report(device_types: tuple[str, ...] = ("cpu", "cuda")) -> dict[str, dict[str, str]]:
    """For ``faststeal info``: per device and op, the candidates ``auto`` measures, its default
    without tuning, and why other backends refused."""
    out: dict[str, dict[str, str]] = {}
    for dev in device_types:
        out[dev] = {}
        for op in OPS:
            refusals, usable = [], []
            for name in AUTO_ORDER.get(dev, {}).get(op, ()):
                reason = unavailable_reason(name, op, dev)
                if reason is None:
                    usable.append(name)
                else:
                    refusals.append(f"{name}: {reason}")
            usable = usable or ["reference"]
            cands = []
            for name in usable:
                cands.extend(variants(name, op, "fwd"))
            own = [c for c in cands if c.startswith(usable[0] + ":")]
            default = own[0] if len(own) == 1 else usable[0]
            # first the un-tuned default (what `auto` runs with FASTSTEAL_TUNE=0), then the set
            # it measures
            line = (f"{default}  (default; auto measures {', '.join(cands)})" if len(cands) > 1
                    else cands[0])
            out[dev][op] = line + (f"  (skipped {'; '.join(refusals)})" if refusals else "")
    return out
