"""Every faststeal op on every available backend, beside the reference and the plain PyTorch
composite a user would write, in one run.

Per case: median time (20th–80th percentile), achieved GB/s (a minimum-traffic byte model: every
input read once, every output written once) and GFLOP/s, the fraction of the device's measured
copy bandwidth and matmul rate (measured in the same run, see :mod:`benchmarks.common`), the
speed-up over the reference backend and over the composite, and the max abs error against the
reference output (same seed, so dropout masks / weight samples are bit-identical across
backends; composites that draw their own random numbers have no error column).

    python -m benchmarks.bench_ops [--quick | --gpu-quick] [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from . import common

BACKENDS = ("reference", "cpp", "cuda", "triton")


@dataclass
class Case:
    op: str                      # e.g. "ensemble_linear fwd"
    shape: str                   # human-readable shape
    dtype: torch.dtype
    flops: Optional[float]       # useful floating-point operations per call
    nbytes: float                # minimum bytes moved per call
    make: Callable[[], dict]     # builds the inputs (on the device)
    faststeal: Callable[[dict], Any]               # the public faststeal op
    composites: dict[str, Callable[[dict], Any]]   # plain PyTorch baselines
    deterministic_composites: tuple[str, ...] = ()  # composites comparable to the reference
    out: Callable[[Any], torch.Tensor] = lambda r: r  # the tensor compared for the error
    tags: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- cases

def _el(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _grads(out: torch.Tensor, inputs, g: torch.Tensor):
    return torch.autograd.grad(out, inputs, g)


def linear_cases(s: int, b: int, k: int, n: int, dtype, device, p: float, size: str) -> list[Case]:
    el = _el(dtype)
    flops = 2.0 * s * b * k * n

    def make():
        x = torch.randn(s, b, k, device=device, dtype=dtype)
        w = torch.randn(s, n, k, device=device, dtype=dtype) / math.sqrt(k)
        bias = torch.randn(s, n, device=device, dtype=dtype) * 0.1
        g = torch.randn(s, b, n, device=device, dtype=dtype)
        return {"x": x, "w": w, "b": bias, "g": g}

    def fs(d):
        from faststeal import ops
        return ops.ensemble_linear(d["x"], d["w"], d["b"], "relu", p, 7)

    def composite(d):  # what a user writes: bmm + bias + activation + dropout, four kernels
        z = torch.baddbmm(d["b"].unsqueeze(1), d["x"], d["w"].transpose(1, 2))
        return F.dropout(torch.relu(z), p, training=p > 0)

    def bmm(d):
        return torch.bmm(d["x"], d["w"].transpose(1, 2))

    shape = f"S={s} B={b} K={k} N={n} relu p={p:g} {str(dtype)[6:]}"
    fwd_bytes = el * (s * b * k + s * n * k + s * n + s * b * n)
    fwd = Case("ensemble_linear fwd", shape, dtype, flops, fwd_bytes, make, fs,
               {"torch composite": composite, "torch.bmm only": bmm},
               deterministic_composites=("torch composite",) if p == 0 else (),
               tags={"size": size, "S": s, "B": b, "K": k, "N": n, "p": p})

    def with_grad(d):
        d = dict(d)
        for key in ("x", "w", "b"):
            d[key] = d[key].detach().requires_grad_(True)
        return d

    def fs_bwd(d):
        y = fs(d)
        return _grads(y, (d["x"], d["w"], d["b"]), d["g"])

    def composite_bwd(d):
        return _grads(composite(d), (d["x"], d["w"], d["b"]), d["g"])

    def bmm_bwd(d):
        return _grads(bmm(d), (d["x"], d["w"]), d["g"])

    bwd_bytes = fwd_bytes + el * (s * b * n + s * b * k + s * n * k + s * b * k + s * n * k + s * n)
    fb = Case("ensemble_linear fwd+bwd", shape, dtype, 3 * flops, bwd_bytes,
              lambda: with_grad(make()), fs_bwd,
              {"torch composite": composite_bwd, "torch.bmm only": bmm_bwd},
              deterministic_composites=("torch composite",) if p == 0 else (),
              out=lambda r: r[1], tags=dict(fwd.tags))
    return [fwd, fb]


def bayes_cases(s: int, b: int, k: int, n: int, dtype, device, size: str,
                backward: bool = True) -> list[Case]:
    el = _el(dtype)
    flops = 2.0 * s * b * k * n

    def make():
        return {"x": torch.randn(b, k, device=device, dtype=dtype),
                "mu": torch.randn(n, k, device=device, dtype=dtype) / math.sqrt(k),
                "rho": torch.full((n, k), -5.0, device=device, dtype=dtype),
                "bmu": torch.zeros(n, device=device, dtype=dtype),
                "brho": torch.full((n,), -5.0, device=device, dtype=dtype),
                "g": torch.randn(s, b, n, device=device, dtype=dtype)}

    def fs(d):
        from faststeal import ops
        return ops.bayes_linear(d["x"], d["mu"], d["rho"], d["bmu"], d["brho"], seed=3, samples=s)

    def materialise(d):  # sample S weight sets in memory, then one bmm
        w = d["mu"] + F.softplus(d["rho"]) * torch.randn(s, n, k, device=device, dtype=dtype)
        bias = d["bmu"] + F.softplus(d["brho"]) * torch.randn(s, n, device=device, dtype=dtype)
        return torch.baddbmm(bias.unsqueeze(1), d["x"].expand(s, b, k), w.transpose(1, 2))

    shape = f"S={s} B={b} K={k} N={n} shared x {str(dtype)[6:]}"
    nbytes = el * (b * k + 2 * n * k + 2 * n + s * b * n)
    tags = {"size": size, "S": s, "B": b, "K": k, "N": n}
    cases = [Case("bayes_linear fwd", shape, dtype, flops, nbytes, make, fs,
                  {"materialise + bmm": materialise}, tags=tags)]
    if backward:
        keys = ("x", "mu", "rho", "bmu", "brho")

        def with_grad(d):
            d = dict(d)
            for key in keys:
                d[key] = d[key].detach().requires_grad_(True)
            return d

        cases.append(Case(
            "bayes_linear fwd+bwd", shape, dtype, 3 * flops,
            nbytes + el * (s * b * n + b * k + 4 * n * k + 4 * n), lambda: with_grad(make()),
            lambda d: _grads(fs(d), tuple(d[k_] for k_ in keys), d["g"]),
            {"materialise + bmm": lambda d: _grads(materialise(d), tuple(d[k_] for k_ in keys),
                                                   d["g"])},
            out=lambda r: r[1], tags=tags))
    return cases


def user_member_stats(logits: torch.Tensor, targets: torch.Tensor):
    """The eager composite a user writes for the across-member statistics (≈10 kernels)."""
    p = logits.float().softmax(-1)
    mean_p = p.mean(0)
    variance = p.var(0, unbiased=False).mean(-1)
    ent_mean = -(mean_p * mean_p.clamp_min(1e-30).log()).sum(-1)
    mean_ent = -(p * p.clamp_min(1e-30).log()).sum(-1).mean(0)
    pred = mean_p.argmax(-1)
    member_pred = p.argmax(-1)
    disagreement = (member_pred != pred).float().mean(0)
    correct = (pred == targets).float()
    member_correct = (member_pred == targets).float().mean(1)
    return mean_p, variance, ent_mean, mean_ent, ent_mean - mean_ent, pred, disagreement, \
        correct, member_correct


def stats_cases(s: int, b: int, c: int, device, size: str) -> list[Case]:
    def make():
        # shifted logits: the statistics must stay stable for large offsets
        return {"logits": torch.randn(s, b, c, device=device) * 3 + 20,
                "t": torch.randint(0, c, (b,), device=device)}

    def fs(d):
        from faststeal import ops
        return ops.member_stats(d["logits"], d["t"])

    nbytes = 4 * s * b * c + 4 * b * c + (6 * 4 + 8) * b + 4 * s + 8 * b
    return [Case("member_stats", f"S={s} B={b} C={c} float32", torch.float32, None, nbytes, make,
                 fs, {"torch composite": lambda d: user_member_stats(d["logits"], d["t"])},
                 deterministic_composites=("torch composite",),
                 out=lambda r: torch.stack([r[1], r[4]]), tags={"size": size, "S": s, "B": b,
                                                                "C": c})]


def xent_cases(s: int, b: int, c: int, device, size: str) -> list[Case]:
    def make():
        return {"logits": torch.randn(s, b, c, device=device).requires_grad_(True),
                "t": torch.randint(0, c, (b,), device=device)}

    def fs(d):
        from faststeal import ops
        loss = ops.ensemble_cross_entropy(d["logits"], d["t"]).sum()
        return torch.autograd.grad(loss, d["logits"])[0]

    def composite(d):  # vectorised over members: one cross_entropy on (S*B, C)
        lg = d["logits"]
        loss = F.cross_entropy(lg.reshape(-1, c), d["t"].repeat(s), reduction="none")
        return torch.autograd.grad(loss.view(s, b).mean(1).sum(), lg)[0]

    nbytes = 4 * 3 * s * b * c + 8 * b
    return [Case("ensemble_cross_entropy fwd+bwd", f"S={s} B={b} C={c} float32", torch.float32,
                 None, nbytes, make, fs, {"torch composite": composite},
                 deterministic_composites=("torch composite",),
                 tags={"size": size, "S": s, "B": b, "C": c})]


def pool_cases(n: int, c: int, h: int, w: int, dtype, device, size: str) -> list[Case]:
    """max_pool2d(2) forward+backward on an (N, C, H, W) activation (a stacked CNN's folded
    S*B batch): faststeal's op against ``F.max_pool2d`` (the reference: ATen's kernel)."""
    el = _el(dtype)

    def make():
        x = torch.randn(n, c, h, w, device=device, dtype=dtype).relu().requires_grad_(True)
        return {"x": x, "g": torch.randn(n, c, h // 2, w // 2, device=device, dtype=dtype)}

    def fs(d):
        from faststeal import ops
        return _grads(ops.max_pool2d(d["x"], 2), (d["x"],), d["g"])[0]

    def composite(d):
        return _grads(F.max_pool2d(d["x"], 2), (d["x"],), d["g"])[0]

    # forward: x read, y written; backward: dy and x read (the window's maximum is found again),
    # dx written
    nbytes = el * (3 * n * c * h * w + 2 * n * c * (h // 2) * (w // 2))
    return [Case("max_pool2d fwd+bwd", f"N={n} C={c} H={h} W={w} k=2 {str(dtype)[6:]}", dtype,
                 None, nbytes, make, fs, {"F.max_pool2d": composite},
                 deterministic_composites=("F.max_pool2d",),
                 tags={"size": size, "N": n, "C": c, "H": h, "W": w})]


def conv_cases(s: int, b: int, c: int, o: int, hw: int, k: int, pad: int, x_grad: bool, device,
               size: str) -> list[Case]:
    """A stacked conv's forward+backward as in a training step (the weight and bias gradients,
    and the input's where it needs one): faststeal's ``ensemble_conv2d`` with the strategy the
    tuner picks on this host (``direct``, ``loop``, ``grouped`` or ``unfold``) against the two
    ATen formulations a user writes — one ``F.conv2d`` per member (the reference) and one grouped
    ``F.conv2d`` over the member-folded channels."""
    ho = hw + 2 * pad - k + 1

    def make():
        return {"x": torch.randn(s, b, c, hw, hw, device=device).requires_grad_(x_grad),
                "w": (torch.randn(s, o, c, k, k, device=device) / math.sqrt(c * k * k))
                .requires_grad_(True),
                "b": torch.randn(s, o, device=device).requires_grad_(True),
                "g": torch.randn(s, b, o, ho, ho, device=device)}

    def grads(d, y):
        inputs = ((d["x"],) if x_grad else ()) + (d["w"], d["b"])
        return torch.cat([t.reshape(-1) for t in _grads(y, inputs, d["g"])])

    def fs(d):
        from faststeal.nn.layers import ensemble_conv2d
        return grads(d, ensemble_conv2d(d["x"], d["w"], d["b"], (1, 1), (pad, pad)))

    def loop(d):
        return grads(d, torch.stack([F.conv2d(d["x"][i], d["w"][i], d["b"][i], padding=pad)
                                     for i in range(s)]))

    def grouped(d):
        xt = d["x"].transpose(0, 1).reshape(b, s * c, hw, hw)
        y = F.conv2d(xt, d["w"].reshape(s * o, c, k, k), d["b"].reshape(-1), padding=pad,
                     groups=s)
        return grads(d, y.view(b, s, o, ho, ho).transpose(0, 1))

    flops = 2.0 * s * b * o * c * k * k * ho * ho * (3 if x_grad else 2)
    nbytes = 4 * s * b * (2 * c * hw * hw + 2 * o * ho * ho) + 8 * s * o * c * k * k
    return [Case("ensemble_conv2d fwd+bwd",
                 f"S={s} B={b} {c}->{o} {hw}x{hw} k={k} pad={pad}"
                 f"{'' if x_grad else ' (no dx)'} float32", torch.float32, flops, nbytes, make,
                 fs, {"F.conv2d per member": loop, "F.conv2d grouped": grouped},
                 deterministic_composites=("F.conv2d per member",),
                 tags={"size": size, "S": s, "B": b})]


PRESETS = {
    # (linear (S, B, K, N, p, size, dtypes), bayes (S, B, K, N, size), stats (S, B, C, size),
    #  xent (S, B, C, size), optional pool (N, C, H, W, size; CPU: the lenet S=5 batch-128
    #  pooling), optional conv (S, B, C, O, HW, k, pad, x_grad, size), min_run_time t, optional
    #  interleaved rounds (default 3))
    "smoke": dict(linear=[(2, 8, 16, 8, 0.1, "small")], bayes=[(2, 8, 16, 8, "small")],
                  stats=[(2, 64, 10, "small")], xent=[(2, 64, 10, "small")],
                  pool=[(8, 3, 8, 8, "small")], conv=[(2, 4, 1, 3, 8, 3, 1, False, "small")],
                  t=0.01),
    "cpu-quick": dict(linear=[(16, 32, 784, 512, 0.1, "small"), (16, 128, 784, 512, 0.0, "large")],
                      bayes=[(16, 128, 784, 512, "small")],
                      stats=[(16, 8192, 10, "target")], xent=[(16, 128, 10, "small")],
                      pool=[(640, 6, 28, 28, "large")], t=0.2, bf16=True),
    # the measured-dispatch goal's shapes (the S=16 MLP's layers at batch 128 and 1024), fp32 and
    # bf16, forward and forward+backward
    "cpu-dispatch": dict(linear=[(16, 128, 784, 512, 0.0, "large"),
                                 (16, 128, 512, 256, 0.0, "large"),
                                 (16, 1024, 784, 512, 0.0, "large"),
                                 (16, 1024, 512, 256, 0.0, "large")],
                         bayes=[], stats=[], xent=[], t=0.6, bf16=True, bf16_bwd=True,
                         # many short interleaved rounds (an odd number, so the median per-round
                         # ratio is one round's): these VMs change speed by up to 5x for seconds
                         # at a time (docs/benchmarks.md)
                         rounds=13),
    # the zoo lenet's two convolutions at S=5, batch 128, as in its training step (the first
    # without an input gradient)
    "cpu-conv": dict(linear=[], bayes=[], stats=[], xent=[],
                     conv=[(5, 128, 1, 6, 28, 5, 2, False, "large"),
                           (5, 128, 6, 16, 14, 5, 0, True, "small")], t=0.3, rounds=7),
    # the zoo lenet's two poolings at S=5, batch 128 (the member-folded 640-row batch)
    "cpu-pool": dict(linear=[], bayes=[], stats=[], xent=[],
                     pool=[(640, 6, 28, 28, "large"), (640, 16, 10, 10, "small")], t=0.3,
                     bf16=True, rounds=7),
    "cpu": dict(linear=[(4, 32, 256, 256, 0.1, "small"), (16, 32, 784, 512, 0.1, "small"),
                        (16, 128, 784, 512, 0.0, "large"), (16, 1024, 512, 256, 0.0, "large"),
                        (64, 128, 512, 256, 0.0, "large")],
                bayes=[(16, 32, 256, 256, "small"), (16, 128, 784, 512, "large")],
                # "pool": the active study scoring a 30,000-image pool with a 3-member ensemble
                stats=[(16, 1024, 10, "small"), (16, 8192, 10, "target"), (64, 8192, 100, "large"),
                       (3, 30000, 10, "pool")],
                xent=[(16, 128, 10, "small"), (16, 8192, 10, "large")],
                pool=[(640, 6, 28, 28, "large"), (640, 16, 10, 10, "small")], t=0.5, bf16=True),
    "gpu-quick": dict(linear=[(16, 32, 256, 256, 0.1, "small"), (16, 128, 784, 512, 0.1, "small"),
                              (16, 4096, 1024, 1024, 0.0, "large")],
                      bayes=[(16, 128, 784, 512, "small"), (16, 2048, 1024, 1024, "large")],
                      stats=[(16, 8192, 10, "small"), (16, 1 << 20, 10, "large")],
                      xent=[(16, 8192, 10, "small"), (16, 1 << 20, 10, "large")], t=0.1,
                      bf16=True),
    "gpu": dict(linear=[(16, 32, 256, 256, 0.1, "small"), (16, 128, 784, 512, 0.1, "small"),
                        (64, 128, 512, 256, 0.1, "small"), (16, 4096, 1024, 1024, 0.0, "large"),
                        (64, 8192, 1024, 1024, 0.0, "large")],
                bayes=[(16, 128, 784, 512, "small"), (16, 2048, 1024, 1024, "large"),
                       (64, 4096, 1024, 1024, "large")],
                stats=[(16, 8192, 10, "small"), (16, 1 << 20, 10, "large"),
                       (64, 1 << 18, 100, "large"), (3, 30000, 10, "pool")],
                xent=[(16, 8192, 10, "small"), (16, 1 << 20, 10, "large")], t=0.3, bf16=True),
}


def build_cases(preset: str, device: torch.device) -> list[Case]:
    cfg = PRESETS[preset]
    cases: list[Case] = []
    # member_stats first: the cheapest case holds a target, and a time budget may cut the tail
    for s, b, c, size in cfg["stats"]:
        cases += stats_cases(s, b, c, device, size)
    for s, b, k, n, p, size in cfg["linear"]:
        cases += linear_cases(s, b, k, n, torch.float32, device, p, size)
        if cfg.get("bf16") and size == "large":
            cases += linear_cases(s, b, k, n, torch.bfloat16, device, p, size)[
                :2 if cfg.get("bf16_bwd") else 1]
    for s, b, k, n, size in cfg["bayes"]:
        cases += bayes_cases(s, b, k, n, torch.float32, device, size)
    for s, b, c, size in cfg["xent"]:
        cases += xent_cases(s, b, c, device, size)
    for args in cfg.get("conv", ()):
        cases += conv_cases(*args[:-1], device, args[-1])
    for n, c, h, w, size in cfg.get("pool", ()):
        cases += pool_cases(n, c, h, w, torch.float32, device, size)
        if cfg.get("bf16"):
            cases += pool_cases(n, c, h, w, torch.bfloat16, device, size)
    return cases


# ----------------------------------------------------------------------------- running

def available_backends(op: str, device: torch.device) -> tuple[list[str], dict[str, str]]:
    """Backends that can run ``op`` here (Triton on CPU only runs interpreted: never timed)."""
    from faststeal.ops import dispatch

    names, refused = [], {}
    for b in BACKENDS:
        if b == "triton" and device.type == "cpu":
            refused[b] = "interpreter only on CPU (not a speed path)"
            continue
        reason = dispatch.unavailable_reason(b, op, device.type)
        if reason is None:
            names.append(b)
        else:
            refused[b] = reason
    return names, refused


def _in_backend(fn: Callable[[], Any], backend: str) -> Callable[[], Any]:
    """Run under ``backend`` (``cpp:PATH``: the cpp backend with that GEMM path forced)."""
    import os

    from faststeal import ops

    backend, _, path = backend.partition(":")

    def run():
        prev = os.environ.get("FASTSTEAL_CPU_GEMM")
        if path:
            os.environ["FASTSTEAL_CPU_GEMM"] = path
        try:
            with ops.use_backend(backend):
                return fn()
        finally:
            if path:
                if prev is None:
                    os.environ.pop("FASTSTEAL_CPU_GEMM", None)
                else:
                    os.environ["FASTSTEAL_CPU_GEMM"] = prev
    return run


def _max_err(a: Any, ref: Any) -> Optional[float]:
    try:
        return float((a.detach().double() - ref.detach().double()).abs().max())
    except Exception:
        return None


def ceilings(device, quick: bool = False, tiny: bool = False) -> dict[str, Any]:
    """Measured copy bandwidth and matmul rates (fp32; on GPU also tf32 and bf16).

    ``tiny`` (smoke runs only) measures small sizes: fast, but not a real ceiling.
    """
    device = torch.device(device)
    out: dict[str, Any] = {"copy": common.copy_bandwidth(device, 2**22 if tiny else None,
                                                         min_run_time=0.05 if tiny else 0.5),
                           "gemm": {}}
    t = 0.05 if tiny else 0.3 if quick else 1.0
    if tiny:
        out["gemm"]["float32"] = common.gemm_rate(device, torch.float32, n=256, min_run_time=t)
        return out
    out["gemm"]["float32"] = common.gemm_rate(device, torch.float32, min_run_time=t)
    if device.type == "cuda":
        prev = torch.backends.cuda.matmul.allow_tf32
        try:
            torch.backends.cuda.matmul.allow_tf32 = True
            out["gemm"]["tf32"] = common.gemm_rate(device, torch.float32, min_run_time=t)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
    # bfloat16 on CPUs too: AMX / AVX512-BF16 hosts multiply it several times faster than float32
    out["gemm"]["bfloat16"] = common.gemm_rate(device, torch.bfloat16, min_run_time=t)
    return out


def run(device="cpu", preset: str = "cpu-quick", ceil: Optional[dict] = None,
        deadline: Optional[common.Deadline] = None, log=print) -> dict[str, Any]:
    """Run every case of ``preset``; returns {"ceilings", "rows", "refused"}."""
    from faststeal import ops
    from faststeal.ops import cpp_backend, dispatch

    device = torch.device(device)
    deadline = deadline or common.Deadline(None)
    ceil = ceil or ceilings(device, quick=preset != "cpu" and preset != "gpu")
    t_min = PRESETS[preset]["t"]
    rows: list[dict[str, Any]] = []
    refused_all: dict[str, dict[str, str]] = {}
    for case in build_cases(preset, device):
        if deadline.expired():
            rows.append({"op": case.op, "shape": case.shape, "variant": "*",
                         "error": "skipped: time budget spent"})
            continue
        op_name = case.op.split()[0]
        if op_name in dispatch.OPS:
            backends, refused = available_backends(op_name, device)
            refused_all[op_name] = refused
        else:  # not a dispatched op (ensemble_conv2d: its strategies are tuned, not backends)
            backends = []
        torch.manual_seed(0)
        try:
            d = case.make()
        except Exception as exc:  # e.g. out of memory
            rows.append({"op": case.op, "shape": case.shape, "variant": "*",
                         "error": common.short_error(exc)})
            continue
        ref_out = None
        try:
            with ops.use_backend("reference"):
                ref_out = case.out(case.faststeal(d))
        except Exception as exc:
            log(f"  reference failed on {case.op} {case.shape}: {common.short_error(exc)}")
        variants: list[tuple[str, Callable[[], Any], Any]] = []
        # faststeal[auto]: the measured dispatch as users get it (tuned on its first call, before
        # the timed rounds); then each backend, and on CPU each GEMM path of the cpp backend
        variants.append(("faststeal[auto]", (lambda d=d: case.faststeal(d)), "auto"))
        for b in backends:
            variants.append((f"faststeal[{b}]", (lambda d=d: case.faststeal(d)), b))
            if b == "cpp" and op_name in ("ensemble_linear", "bayes_linear"):
                for path in cpp_backend.GEMM_PATHS:
                    # not a path that repeats another for this dtype (upcast for float32, ...)
                    if not cpp_backend.variant_applies(path, (torch.empty(0, dtype=case.dtype),)):
                        continue
                    variants.append((f"faststeal[cpp:{path}]", (lambda d=d: case.faststeal(d)),
                                     f"cpp:{path}"))
        for name, fn in case.composites.items():
            variants.append((name, (lambda d=d, fn=fn: fn(d)), None))
        results: dict[str, dict[str, Any]] = {}
        timed: dict[str, Callable[[], Any]] = {}
        for name, fn, backend in variants:
            row: dict[str, Any] = {"op": case.op, "shape": case.shape, "variant": name,
                                   "dtype": str(case.dtype).replace("torch.", ""), **case.tags}
            results[name] = row
            rows.append(row)
            fn = _in_backend(fn, backend) if backend else fn
            try:
                out = case.out(fn())
                if backend is not None or name in case.deterministic_composites:
                    row["max_err"] = _max_err(out, ref_out) if ref_out is not None else None
                timed[name] = fn
            except Exception as exc:
                row["error"] = common.short_error(exc)
        for name, t in common.bench_many(timed, device, min_run_time=t_min,
                                         rounds=PRESETS[preset].get("rounds", 3)).items():
            row = results[name]
            if isinstance(t, BaseException):
                row["error"] = common.short_error(t)
                continue
            row.update(t.as_dict())
            sec = t.median_ms * 1e-3
            row["gbps"] = case.nbytes / sec / 1e9
            row["frac_copy_bw"] = row["gbps"] / ceil["copy"]["gbps"]
            if case.flops is not None:
                row["gflops"] = case.flops / sec / 1e9
                key = "bfloat16" if case.dtype == torch.bfloat16 else "float32"
                if key in ceil["gemm"]:
                    row["frac_gemm"] = row["gflops"] / ceil["gemm"][key]["gflops"]
        # speed-ups paired per interleaved round (common.paired_ratio)
        comp = next(iter(case.composites))
        timed_rows = {n: r for n, r in results.items() if r.get("median_ms")}
        for row in timed_rows.values():
            row["x_vs_reference"] = common.paired_ratio(timed_rows.get("faststeal[reference]"),
                                                        row)
            row["x_vs_composite"] = common.paired_ratio(timed_rows.get(comp), row)
            if "torch.bmm only" in results:
                row["x_vs_bmm"] = common.paired_ratio(timed_rows.get("torch.bmm only"), row)
            # the measured-dispatch goal: faststeal at least as fast as the best plain-torch
            # variant (each round's fastest)
            row["x_vs_best_torch"] = common.paired_ratio(
                [r for n, r in timed_rows.items() if not n.startswith("faststeal")], row)
        for row in results.values():
            row["composite"] = comp
        best = min((r for r in results.values() if r.get("median_ms") and
                    r["variant"].startswith("faststeal")), key=lambda r: r["median_ms"],
                   default=None)
        auto = results.get("faststeal[auto]", {})
        if auto.get("median_ms"):
            log(f"  {case.op:32s} {case.shape:40s} auto {auto['median_ms']:.3f} ms, "
                f"{common.fmt_x(auto.get('x_vs_best_torch'))} vs the best torch variant")
        log(f"  {case.op:32s} {case.shape:40s} " + (
            f"best {best['variant']} {best['median_ms']:.3f} ms, "
            f"{common.fmt_x(best.get('x_vs_composite'))} vs composite" if best else "no result"))
        del d
    return {"ceilings": ceil, "rows": rows, "refused": refused_all,
            "auto": dispatch.report((device.type,))[device.type]}


def markdown(result: dict[str, Any], device_type: str = "cpu") -> str:
    ceil = result["ceilings"]
    def libs(v: dict) -> str:
        by = v.get("by_library", {})
        return "".join(f"; {lib} {common.fmt(r['gflops'])}" for lib, r in by.items()
                       if len(by) > 1)

    gemm = ", ".join(f"{k} {common.fmt(v['gflops'])} GFLOP/s (n={v['n']}, "
                     f"{v.get('library', 'torch.mm')}{libs(v)})" for k, v in ceil["gemm"].items())
    lines = [f"Measured ceilings: copy {common.fmt(ceil['copy']['gbps'])} GB/s (read+write), "
             f"matmul {gemm}.", ""]
    headers = ["op", "shape", "variant", "median ms (p20–p80)", "GB/s", "GFLOP/s", "% copy BW",
               "% matmul", "× reference", "× composite", "× bmm", "× best torch", "max err"]
    body = []
    for r in result["rows"]:
        if "error" in r:
            body.append([r["op"], r["shape"], r["variant"], r["error"]] + [""] * 9)
            continue
        body.append([
            r["op"], r["shape"], r["variant"],
            f"{common.fmt(r['median_ms'])} ({common.fmt(r['p20_ms'])}–{common.fmt(r['p80_ms'])})",
            common.fmt(r.get("gbps")), common.fmt(r.get("gflops")),
            _pct(r.get("frac_copy_bw")), _pct(r.get("frac_gemm")),
            common.fmt_x(r.get("x_vs_reference")), common.fmt_x(r.get("x_vs_composite")),
            common.fmt_x(r.get("x_vs_bmm")), common.fmt_x(r.get("x_vs_best_torch")),
            "—" if r.get("max_err") is None else f"{r['max_err']:.1e}"])
    lines.append(common.markdown_table(headers, body))
    refused = {op: r for op, r in result.get("refused", {}).items() if r}
    if refused:
        lines += ["", "Backends not run: " + "; ".join(
            f"{op}: " + ", ".join(f"{b} ({why[:80]})" for b, why in r.items())
            for op, r in refused.items())]
    return "\n".join(lines)


def _pct(v: Optional[float]) -> str:
    return "—" if v is None else f"{100 * v:.0f}%"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", choices=tuple(PRESETS), default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    preset = args.preset or ("gpu" if dev.type == "cuda" else "cpu")
    if args.quick and args.preset is None:
        preset += "-quick"
    res = run(dev, preset)
    res["meta"] = common.env_metadata(dev)
    print(markdown(res, dev.type))
    if args.json:
        common.write_json(args.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
