"""Measured dispatch: performance choices decided by timing the candidates on this machine.

Which C++ GEMM library is fastest for a layer, which backend runs an op, which convolution
strategy a stacked conv uses — these depend on the CPU or GPU (an AMD core where MKL runs AVX2
code, an Intel core with AMX, an H100), on the dtype and on the thread count, so faststeal does
not hard-code them: the first call of each *choice point* with a new *shape class* times every
candidate on the actual arguments (interleaved rounds, the minimum of each candidate's times,
within :data:`BUDGET_S` seconds after a warm-up round), keeps the fastest, and stores the decision
in memory and in a JSON cache file keyed by the CPU/GPU model, the torch version and the
faststeal version (like Triton's autotuner or oneDNN's primitive cache). Later calls — and later
processes — read the decision. The first tuning in a process prints one line to stderr. A
resumed run reads the same decisions from the cache, so it computes what an uninterrupted one
would (with ``FASTSTEAL_TUNING_CACHE=off`` a new process measures again and may pick another
GEMM path: equal up to float rounding, not bit for bit; for a ``faststeal.stack`` model with
dropout after a conv, another memory layout also draws other, equally random, dropout masks).

Environment:

* ``FASTSTEAL_TUNE=0`` turns tuning off: every choice point takes its documented default
  (given by the caller; see ``faststeal info``). Cached decisions are not used either.
* ``FASTSTEAL_TUNING_CACHE=PATH``: the cache file's folder (default
  ``$XDG_CACHE_HOME/faststeal`` or ``~/.cache/faststeal``); ``FASTSTEAL_TUNING_CACHE=off`` keeps
  decisions in memory only.
* each choice point names its own variable that forces one candidate
  (``FASTSTEAL_BACKEND``, ``FASTSTEAL_CPU_GEMM``, ``FASTSTEAL_CONV_STRATEGY``,
  ``FASTSTEAL_STACK_LAYOUT``).

A shape class rounds every size up to a power of two (a last partial batch of 97 rows shares the
decision of 128 rows) and includes the dtype, the device model and the number of threads.
Tuning never runs while torch.compile traces or a CUDA graph captures: those take the cached
decision or the default. A corrupt cache file is ignored with a warning and rewritten.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
import warnings
from typing import Any, Callable, Mapping, Optional

import torch

from .. import master_weights
from ..checks import env_off

#: Seconds of timed rounds per decision, after one warm-up round (at least one timed round).
BUDGET_S = 0.25
#: Timed rounds at most per decision.
MAX_ROUNDS = 5

ENV_TUNE = "FASTSTEAL_TUNE"
ENV_CACHE = "FASTSTEAL_TUNING_CACHE"

_lock = threading.RLock()
_decisions: dict[str, dict[str, Any]] = {}  # cache key -> {"choice", "times_ms", ...}
_disk_loaded = False
_announced = False
#: Number of tunings (timings) run in this process; the tests read it to check the cache is used.
tunings_run = 0
#: Bumped by :func:`clear`: callers that memoise decisions (dispatch) drop their memo when it moves.
generation = 0


def enabled() -> bool:
    """Whether choice points measure (False with ``FASTSTEAL_TUNE=0``)."""
    return not env_off(ENV_TUNE)


def forced(env: Optional[str], candidates: tuple[str, ...]) -> Optional[str]:
    """The candidate the environment variable ``env`` forces, or None; ValueError if invalid."""
    if not env:
        return None
    value = os.environ.get(env, "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in candidates:
        raise ValueError(f"{env} must be 'auto' or one of {candidates}, got {value!r}")
    return value


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def cpu_flags(wanted: tuple[str, ...] = ("avx2", "avx512f", "avx512_bf16", "amx_bf16",
                                         "amx_tile", "avx512_fp16")) -> list[str]:
    """Which of the ``wanted`` performance-relevant CPU flags this host has (Linux only)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


@functools.lru_cache(maxsize=None)
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_model(device_type: str) -> str:
    """The model of the device a choice runs on (the GPU's name on CUDA)."""
    if device_type == "cuda" and torch.cuda.is_available():
        return _gpu_name(torch.cuda.current_device())
    return cpu_model()


def cache_path() -> Optional[str]:
    """The cache file of this host, torch and faststeal version; None when caching is off."""
    root = os.environ.get(ENV_CACHE, "").strip()
    if root.lower() == "off":
        return None
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "faststeal")
    from .. import __version__

    tag = f"{cpu_model()}|torch {torch.__version__}|faststeal {__version__}"
    slug = "".join(c if c.isalnum() else "-" for c in cpu_model()).strip("-")[:40]
    return os.path.join(root, f"tuning-{slug}-{stable_hash(tag)}.json")


def stable_hash(s: str) -> str:
    import hashlib

    return hashlib.sha1(s.encode()).hexdigest()[:12]


def _load_disk() -> None:
    global _disk_loaded
    if _disk_loaded:
        return
    _disk_loaded = True
    path = cache_path()
    if path is None or not os.path.exists(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        entries = data["decisions"]
        if not isinstance(entries, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("choice"), str) for v in entries.values()):
            raise ValueError("'decisions' is not a mapping of {'choice': name, ...} entries")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"faststeal: ignoring the corrupt tuning cache {path} "
                      f"({type(exc).__name__}: {exc}); it is measured again and rewritten",
                      RuntimeWarning, stacklevel=3)
        return
    for k, v in entries.items():
        if "names" in v:  # older entries (no candidate names) are never reused: measured again
            _decisions.setdefault(k, v)


def _save_disk() -> None:
    path = cache_path()
    if path is None:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        payload = {"host": {"cpu": cpu_model(), "flags": cpu_flags(),
                            "torch": torch.__version__},
                   "decisions": {k: v for k, v in sorted(_decisions.items())
                                 if not v.get("default")}}
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tuning-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file
    except OSError as exc:  # read-only home: keep the decisions in memory
        warnings.warn(f"faststeal: could not write the tuning cache {path}: {exc}",
                      RuntimeWarning, stacklevel=3)


def autocast_tag(device_type: str) -> str:
    """The autocast dtype active on ``device_type`` ("bfloat16", ...) or "" (a key part)."""
    if not torch.is_autocast_enabled(device_type):
        return ""
    return str(torch.get_autocast_dtype(device_type))[6:]


def bucket(n: int) -> int:
    """Round a size up to a power of two (0 stays 0): sizes in one bucket share a decision."""
    return 0 if n <= 0 else 1 << max(0, math.ceil(math.log2(n)))


def shape_class(*parts: Any) -> str:
    """A compact key: tensors by bucketed shape and dtype, None, str, bool and numbers as given."""
    out = []
    for p in parts:
        if isinstance(p, torch.Tensor):
            out.append("x".join(str(bucket(d)) for d in p.shape) + ":" + str(p.dtype)[6:])
        else:
            out.append(str(p))
    return ",".join(out)


def _key(point: str, device_type: str, shape: str) -> str:
    return (f"{point}|{device_type}:{device_model(device_type)}|threads="
            f"{torch.get_num_threads()}|{shape}")


def _sync(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


def cannot_time(device_type: str) -> bool:
    if torch.compiler.is_compiling():
        return True
    return device_type == "cuda" and torch.cuda.is_current_stream_capturing()


def measure(candidates: Mapping[str, Callable[[], Any]], device_type: str,
            budget_s: Optional[float] = None) -> dict[str, float]:
    """Milliseconds per call of each candidate (the minimum over interleaved rounds after one
    warm-up round); a candidate that raises gets ``inf``. ``budget_s``: seconds of timed rounds
    (None: :data:`BUDGET_S`, read at the call)."""
    budget_s = BUDGET_S if budget_s is None else budget_s
    names = list(candidates)
    best = {n: math.inf for n in names}
    failed: set[str] = set()
    for n in names:  # warm-up: first-call costs (primitive creation, page faults, allocation)
        try:
            candidates[n]()
        except Exception:  # noqa: BLE001 - a candidate that cannot run this call is skipped
            failed.add(n)
    _sync(device_type)
    start = time.perf_counter()
    for r in range(MAX_ROUNDS):
        order = names if r % 2 == 0 else names[::-1]  # alternate, so no one always runs first
        for n in order:
            if n in failed:
                continue
            _sync(device_type)
            t0 = time.perf_counter()
            candidates[n]()
            _sync(device_type)
            best[n] = min(best[n], (time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start >= budget_s:
            break
    return best


def decide(point: str, device_type: str, shape: str,
           candidates: Callable[[], Mapping[str, Callable[[], Any]]], default: str,
           names: tuple[str, ...], force_env: Optional[str] = None,
           budget_s: Optional[float] = None) -> str:
    """The candidate to run at choice point ``point`` for this ``shape`` class on ``device_type``.

    names: every candidate's name (the allowed values of ``force_env``); candidates: builds the
    ``{name: zero-argument callable}`` to time (only called when a measurement is needed; it may
    leave out names that cannot run this call); default: the choice without tuning;
    budget_s: seconds of timed rounds (None: :data:`BUDGET_S`), at most :data:`MAX_ROUNDS` (a
    choice between whole-model runs of more than ~50 ms gets more rounds than :data:`BUDGET_S`
    allows).
    """
    f = forced(force_env, names)
    if f is not None:
        return f
    if not enabled():
        return default
    key = _key(point, device_type, shape)
    with _lock:
        hit = _decisions.get(key)
        if hit is None:
            _load_disk()
            hit = _decisions.get(key)
        # reused only if measured among the same candidate names: a decision cached before a
        # candidate existed (by an older faststeal, or one that did not record its names) is
        # measured again, once
        if hit is not None and hit["choice"] in names and hit.get("names") == list(names):
            return hit["choice"]
        if cannot_time(device_type):
            return default
        cands = dict(candidates())
        if len(cands) <= 1:
            choice = next(iter(cands), default)
            _decisions[key] = {"choice": choice, "times_ms": {}, "default": True,
                               "names": list(names)}
            return choice
        _announce()
        global tunings_run
        tunings_run += 1
        with master_weights.paused():  # a timed forward must not use up a training step's copies
            times = measure(cands, device_type, budget_s)
        choice = min(times, key=lambda n: times[n])
        if not math.isfinite(times[choice]):
            choice = default
        _decisions[key] = {"choice": choice,
                           "times_ms": {n: (round(t, 4) if math.isfinite(t) else None)
                                        for n, t in times.items()},
                           "default": False, "names": list(names)}
        _save_disk()
        return choice


def _announce() -> None:
    global _announced
    if _announced:
        return
    _announced = True
    where = cache_path() or "memory only"
    print(f"faststeal: timing kernel candidates for this machine once per layer shape "
          f"(cache: {where}; FASTSTEAL_TUNE=0 turns this off)", file=sys.stderr)


def decisions() -> dict[str, dict[str, Any]]:
    """Every decision known in this process (measured here or read from the cache)."""
    with _lock:
        _load_disk()
        return {k: dict(v) for k, v in sorted(_decisions.items()) if not v.get("default")}


def clear(memory_only: bool = True) -> None:
    """Forget the decisions in memory (and, with ``memory_only=False``, delete the cache file)."""
    global _disk_loaded, generation
    with _lock:
        generation += 1
        _decisions.clear()
        _disk_loaded = False
        if not memory_only:
            path = cache_path()
            if path and os.path.exists(path):
                os.remove(path)
