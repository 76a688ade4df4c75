"""Shared helpers of the benchmark scripts: timing, peak memory, device ceilings, metadata, tables.

Timing follows one rule per device (docs/STYLE.md section 5):

* CPU: ``torch.utils.benchmark.Timer(...).blocked_autorange`` with all of torch's threads, the
  median over blocks (and the 20th/80th percentiles as the spread), after a warm-up call.
* CUDA: ``triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])`` (CUDA events, L2 flushed
  between runs); a CUDA-event loop when Triton is missing.

Every number a script reports is measured in the same process as its baselines, so ratios are
meaningful even on a noisy shared machine; the absolute numbers carry the machine load
(``os.getloadavg``) recorded in the metadata. On CPU the variants being compared run in
interleaved rounds, and a speed-up is the median over the rounds of each round's ratio
(:func:`paired_ratio`): a VM whose speed changes for seconds at a time (measured: 4.7 / 7 / 16 /
23 ms for the same bf16 ``bmm`` within 8 s) shifts the variants of one round alike, while the
ratio of two medians can compare one variant's fast spell with another's slow one.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import torch


# ----------------------------------------------------------------------------- timing

@dataclasses.dataclass
class Timing:
    """Median and spread (20th/80th percentile) of one measured callable, in milliseconds."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: Optional[int] = None
    min_ms: Optional[float] = None
    #: each interleaved round's median (bench_many on CPU), for :func:`paired_ratio`
    round_ms: Optional[list[float]] = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(values: Sequence[float], q: float) -> float:
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    pos = q * (len(v) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def bench(fn: Callable[[], Any], device, *, min_run_time: float = 0.5, min_runs: int = 3,
          warmup: int = 1) -> Timing:
    """Time ``fn()`` on ``device``: median and 20/80 percentiles in ms.

    CPU: one timed warm-up call, then ``Timer.blocked_autorange`` long enough for at least
    ``min_runs`` calls. CUDA: ``triton.testing.do_bench`` with ``rep`` = ``min_run_time``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _bench_cuda(fn, device, min_run_time)
    from torch.utils.benchmark import Timer

    t0 = time.perf_counter()
    for _ in range(max(1, warmup)):
        fn()
    first = (time.perf_counter() - t0) / max(1, warmup)
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=max(min_run_time, min_runs * first))
    times = [t * 1e3 for t in m.times]
    return Timing(_quantile(times, 0.5), _quantile(times, 0.2), _quantile(times, 0.8),
                  len(times) * m.number_per_run, min(times))


def bench_many(fns: dict[str, Callable[[], Any]], device, *, min_run_time: float = 0.5,
               rounds: int = 3, min_runs: int = 3) -> dict[str, Any]:
    """Time several callables that will be compared: ``{name: Timing or the exception}``.

    CPU: the callables are measured in ``rounds`` interleaved rounds (A B C A B C ...), each a
    ``Timer.blocked_autorange`` of ``min_run_time / rounds``, and each one's median is taken over
    all its runs — so a change in machine load (other jobs on a shared machine) hits every
    variant alike instead of biasing the ratios. CUDA: one ``do_bench`` per callable (the GPU is
    not shared).
    """
    device = torch.device(device)
    out: dict[str, Any] = {}
    if device.type == "cuda":
        for name, fn in fns.items():
            try:
                out[name] = bench(fn, device, min_run_time=min_run_time)
            except Exception as exc:
                out[name] = exc
        return out
    from torch.utils.benchmark import Timer

    first: dict[str, float] = {}
    for name, fn in fns.items():
        try:
            t0 = time.perf_counter()
            fn()
            first[name] = time.perf_counter() - t0
        except Exception as exc:
            out[name] = exc
    samples: dict[str, list[float]] = {name: [] for name in first}
    per_round: dict[str, list[float]] = {name: [] for name in first}
    counts = dict.fromkeys(first, 0)
    rounds = max(1, rounds)
    for _ in range(rounds):
        for name in first:
            if name in out:
                continue
            timer = Timer(stmt="fn()", globals={"fn": fns[name]},
                          num_threads=torch.get_num_threads())
            want = max(min_run_time, min_runs * first[name]) / rounds
            try:
                m = timer.blocked_autorange(min_run_time=want)
            except Exception as exc:
                out[name] = exc
                continue
            samples[name] += [t * 1e3 for t in m.times]
            per_round[name].append(_quantile([t * 1e3 for t in m.times], 0.5))
            counts[name] += len(m.times) * m.number_per_run
    for name, ts in samples.items():
        if name not in out:
            out[name] = Timing(_quantile(ts, 0.5), _quantile(ts, 0.2), _quantile(ts, 0.8),
                               counts[name], min(ts), per_round[name])
    return out


def _bench_cuda(fn: Callable[[], Any], device: torch.device, min_run_time: float) -> Timing:
    rep_ms = max(20, int(min_run_time * 1e3))
    try:
        from triton.testing import do_bench
    except Exception:  # no Triton: plain CUDA events
        return _bench_cuda_events(fn, device, rep_ms)
    fn()
    synchronize(device)
    med, p20, p80 = do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return Timing(float(med), float(p20), float(p80), None)


def _bench_cuda_events(fn: Callable[[], Any], device: torch.device, rep_ms: int) -> Timing:
    fn()
    synchronize(device)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    synchronize(device)
    n = max(3, min(1000, int(rep_ms / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(n):
        start.record()
        fn()
        end.record()
        synchronize(device)
        times.append(start.elapsed_time(end))
    return Timing(_quantile(times, 0.5), _quantile(times, 0.2), _quantile(times, 0.8), n,
                  min(times))


# ----------------------------------------------------------------------------- memory

def peak_memory_bytes(fn: Callable[[], Any], device) -> Optional[int]:
    """Peak bytes allocated by one call of ``fn`` beyond what was live before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: replays the allocator events recorded by
    ``torch.profiler`` (``profile_memory=True``) in time order and takes the running maximum;
    None if the profiler cannot record them.
    """
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                  and e.device_type() == torch.autograd.DeviceType.CPU]
    except Exception:  # profiler API differences between torch versions
        return None
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return int(peak)


# ----------------------------------------------------------------------------- device ceilings

def matmul_fn(library: str, n: int, device="cpu", dtype: torch.dtype = torch.float32
              ) -> Callable[[], Any]:
    """A square n x n product by ``library``: "torch.mm" (MKL/OpenBLAS on CPU, cuBLAS on CUDA)
    or "oneDNN" (CPU: ATen's ``mkldnn::_linear_pointwise``, the GEMM faststeal's C++ ops use)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    if library == "oneDNN":
        op = torch.ops.mkldnn._linear_pointwise
        return lambda: op(a, b, None, "none", [], "")
    return lambda: torch.mm(a, b)


def matmul_libraries(device) -> list[str]:
    """The matmul libraries to measure on ``device``: torch.mm, plus oneDNN on a CPU whose torch
    has it (on AVX-512 AMD CPUs MKL runs its AVX2 code and oneDNN is ~2x faster)."""
    libs = ["torch.mm"]
    if torch.device(device).type == "cpu":
        try:
            matmul_fn("oneDNN", 8)()
            libs.append("oneDNN")
        except (AttributeError, RuntimeError):
            pass
    return libs


def gemm_rate(device, dtype: torch.dtype = torch.float32, n: Optional[int] = None,
              min_run_time: float = 1.0) -> dict[str, Any]:
    """The device's measured matmul rate (GFLOP/s): one large square product by each library
    of :func:`matmul_libraries`; the fastest is the rate, ``by_library`` has all of them."""
    device = torch.device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else 2048
    by_lib = {}
    for lib in (matmul_libraries(device) if dtype == torch.float32 else ["torch.mm"]):
        t = bench(matmul_fn(lib, n, device, dtype), device, min_run_time=min_run_time)
        by_lib[lib] = {"ms": t.median_ms, "gflops": 2 * n**3 / (t.median_ms * 1e-3) / 1e9}
    best = max(by_lib, key=lambda k: by_lib[k]["gflops"])
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "library": best,
            "ms": by_lib[best]["ms"], "gflops": by_lib[best]["gflops"], "by_library": by_lib}


def copy_bandwidth(device, nbytes: Optional[int] = None,
                   min_run_time: float = 0.5) -> dict[str, Any]:
    """The device's measured copy bandwidth: ``dst.copy_(src)``, bytes read + written (GB/s)."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 2**28
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), device, min_run_time=min_run_time)
    return {"bytes": nbytes, "ms": t.median_ms, "gbps": 2 * nbytes / (t.median_ms * 1e-3) / 1e9}


# ----------------------------------------------------------------------------- metadata

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> Optional[list[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def env_metadata(device) -> dict[str, Any]:
    """Device, versions, commit, threads and machine load: stored with every result file."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:
        triton_version = f"unavailable ({type(exc).__name__})"
    from faststeal.info import code_version

    meta: dict[str, Any] = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else cpu_name()),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "git": {k: v for k, v in code_version().items() if k in ("commit", "dirty")},
        "loadavg_start": loadavg(),
    }
    try:
        from faststeal import _ext
        from faststeal.ops import dispatch

        meta["extension"] = "loaded" if _ext.C is not None else f"missing: {_ext.LOAD_ERROR}"
        meta["auto_backends"] = dispatch.report((device.type,))[device.type]
        from faststeal.ops import tuning

        meta["cpu_flags"] = tuning.cpu_flags()
        meta["tuning"] = "on" if tuning.enabled() else "off"
        # the measured-dispatch decisions the run used (read at the end: main() calls this last)
        meta["tuning_decisions"] = tuning.decisions()
    except Exception as exc:  # faststeal half-installed: still benchmark what runs
        meta["extension"] = f"unknown ({type(exc).__name__}: {exc})"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        meta["gpu"] = {"name": p.name, "sms": p.multi_processor_count,
                       "memory_gib": round(p.total_memory / 2**30, 1),
                       "capability": f"{p.major}.{p.minor}"}
    return meta


# ----------------------------------------------------------------------------- misc

class Deadline:
    """A soft wall-clock budget: benchmark loops skip the remaining cases once it has passed."""

    def __init__(self, seconds: Optional[float]) -> None:
        self.end = None if seconds is None else time.monotonic() + seconds

    def expired(self) -> bool:
        return self.end is not None and time.monotonic() > self.end

    def left(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()


def short_error(exc: BaseException, limit: int = 160) -> str:
    msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def write_json(path: str, data: Any) -> None:
    from faststeal.files import atomic_write

    atomic_write(path, json.dumps(data, indent=1, default=str))


# ----------------------------------------------------------------------------- formatting

def fmt(v: Any, digits: int = 3) -> str:
    """Compact number formatting for tables (3 significant digits, '—' for missing)."""
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if not math.isfinite(v):
        return str(v)
    if v == 0:
        return "0"
    mag = math.floor(math.log10(abs(v)))
    if mag >= digits:
        return f"{v:,.0f}"
    return f"{v:.{max(0, digits - 1 - mag)}f}"


def fmt_x(v: Optional[float]) -> str:
    """A speed-up: 2.31×."""
    return "—" if v is None else f"{v:.2f}×"


def fmt_mb(nbytes: Optional[int]) -> str:
    return "—" if nbytes is None else fmt(nbytes / 2**20)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are formatted with :func:`fmt` unless already strings."""
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in r) + " |")
    return "\n".join(lines)


def ratio(slow: Optional[float], fast: Optional[float]) -> Optional[float]:
    """Speed-up of ``fast`` over ``slow`` (times): slow / fast, None if either is missing."""
    if slow is None or fast is None or fast <= 0:
        return None
    return slow / fast


def paired_ratio(slow: Any, fast: Optional[dict[str, Any]], prefix: str = "") -> Optional[float]:
    """Speed-up of ``fast`` over ``slow``, two result rows of one :func:`bench_many` call (dicts
    with ``{prefix}median_ms`` and ``{prefix}round_ms``): the median over the interleaved rounds
    of slow/fast within each round; the ratio of the medians where per-round times are missing
    (CUDA, a failed variant). ``slow`` may be a list of rows: each round's fastest of them."""
    slows = [r for r in (slow if isinstance(slow, list) else [slow]) if r]
    if fast is None or not slows:
        return None
    med, rnd = prefix + "median_ms", prefix + "round_ms"
    rounds = [r.get(rnd) for r in slows + [fast]]
    if all(rounds) and len({len(x) for x in rounds}) == 1:
        *srs, frs = rounds
        return _quantile([min(sr[i] for sr in srs) / frs[i] for i in range(len(frs))], 0.5)
    meds = [r.get(med) for r in slows]
    return ratio(min((m for m in meds if m is not None), default=None), fast.get(med))
