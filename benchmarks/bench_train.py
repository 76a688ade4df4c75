"""Training-step and inference throughput of an S-member ensemble, the ways people run it today
beside faststeal, in one run.

Methods (same architecture, same per-member data, Adam, lr 1e-3):

* ``loop``      a Python loop over S ``nn.Module`` s (the zoo's plain model), each with its own
                ``torch.optim.Adam`` (default settings) — what TorchUncertainty, torchensemble and
                bayesian-torch do;
* ``vmap``      ``torch.func.stack_module_state`` + ``functional_call`` under ``torch.func.vmap``,
                one default Adam over the stacked parameters;
* ``vmap+compile`` the same function under ``torch.compile`` (compile time reported separately);
* ``faststeal[reference]`` the zoo's stack (``faststeal.stack`` of the plain model) with
                ``faststeal.train_step`` (fused Adam, fused loss) on the pure-PyTorch reference ops;
* ``faststeal`` the same on the fused kernels (``auto`` backend: C++ on CPU, Triton/CUDA on GPU);
* ``faststeal+graph`` (CUDA only) the same step captured as one CUDA graph;
* ``faststeal[bf16]`` the ``faststeal`` step with ``precision="bf16"`` (bfloat16 compute in the
                stacked layers, float32 weights, fused Adam and loss — what ``--precision bf16``
                trains with); its GFLOP/s and '% GEMM' are still against the float32 GEMM rate.
                On the CPU its Adam update writes the weights' bfloat16 copies
                (faststeal.master_weights);
* ``faststeal[bf16-cast]`` the same step with those copies off (``FASTSTEAL_BF16_COPIES=0``): the
                weights cast to bfloat16 in every forward, their gradients back in every backward.

The ``cpu-precision`` preset is the bf16 comparison of docs/benchmarks.md: the S=16 MLP step at
batch 32/128/1024, bf16 vs fp32 faststeal vs the fp32 loop:

    python -m benchmarks.bench_train --preset cpu-precision

Training: each member gets its own (B, 1, 28, 28) batch (independent shuffles); the loss is the sum
of the members' mean cross-entropies. Inference: all members on one shared (B, 1, 28, 28) batch,
eval mode, no grad. Throughput is member-samples per second (S·B / step time); GFLOP/s counts the
step's matmul/conv FLOPs (torch.utils.flop_counter on one member, times S) against the GEMM rate
measured in the same run; peak memory is the extra memory one step allocates.

    python -m benchmarks.bench_train [--quick | --gpu-quick] [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import time
from typing import Any, Callable, Optional
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from . import common

ARCHS = {"mlp": "mlp", "cnn": "lenet"}  # benchmark name -> zoo arch
INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
LR = 1e-3

PRESETS: dict[str, dict[str, Any]] = {
    # grid: (arch, S, B) cases; compile: the cases that also run torch.compile; t: min run time
    "smoke": dict(grid=[("mlp", 2, 8), ("cnn", 2, 4)], compile=[], t=0.01, infer=True),
    "cpu-quick": dict(grid=[("mlp", 16, 32), ("mlp", 16, 128), ("mlp", 16, 1024),
                            ("cnn", 4, 128)], compile=[], t=0.3, infer=True),
    "cpu": dict(grid=[("mlp", s, b) for s in (1, 4, 16, 64) for b in (32, 128, 1024)]
                + [("cnn", s, b) for s in (1, 4, 16, 64) for b in (128, 1024) if s * b <= 16384],
                compile=[("mlp", 16, 128)], t=0.5, infer=True),
    # large ensembles on CPU (where freed stacked tensors exceed glibc's 32 MB mmap threshold)
    "cpu-large": dict(grid=[("mlp", 64, 32), ("mlp", 64, 128), ("mlp", 64, 1024),
                            ("cnn", 4, 1024), ("cnn", 16, 128)], compile=[], t=0.5, infer=False),
    # the zoo lenet CNN's step against the loop (its pooling, "The CNN pooling" in the docs)
    "cpu-cnn": dict(grid=[("cnn", 4, 128), ("cnn", 16, 128), ("cnn", 4, 1024)], compile=[],
                    t=0.5, infer=False, rounds=5, methods=("loop", "faststeal")),
    # many short interleaved rounds (an odd number): see bench_ops' cpu-dispatch preset
    "cpu-precision": dict(grid=[("mlp", 16, 32), ("mlp", 16, 128), ("mlp", 16, 1024)],
                          compile=[], t=1.0, infer=True, rounds=11,
                          methods=("loop", "faststeal", "faststeal[bf16]",
                                   "faststeal[bf16-cast]")),
    "gpu-quick": dict(grid=[("mlp", 16, 128), ("mlp", 16, 1024), ("mlp", 64, 128),
                            ("cnn", 16, 128)],
                      compile=[("mlp", 16, 128)], t=0.1, infer=True),
    "gpu": dict(grid=[(a, s, b) for a in ("mlp", "cnn") for s in (1, 4, 16, 64)
                      for b in (128, 1024)],
                compile=[("mlp", 16, 128), ("mlp", 64, 128), ("cnn", 16, 128)], t=0.3,
                infer=True),
}

METHODS = ("loop", "vmap", "vmap+compile", "faststeal[reference]", "faststeal", "faststeal+graph",
           "faststeal[bf16]", "faststeal[bf16-cast]")
DEFAULT_METHODS = METHODS[:-2]  # bf16 runs where asked (--methods, the cpu-precision preset)


# ----------------------------------------------------------------------------- models and data

def _zoo():
    from faststeal.models import zoo
    return zoo


def plain_models(arch: str, s: int, device) -> list[nn.Module]:
    zoo = _zoo()
    return [zoo.build_model(ARCHS[arch], INPUT_SHAPE, NUM_CLASSES).to(device) for _ in range(s)]


def step_flops(arch: str, b: int, device) -> tuple[float, float]:
    """(training-step FLOPs, forward FLOPs) of ONE member at batch b, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    m = plain_models(arch, 1, device)[0]
    x = torch.randn(b, *INPUT_SHAPE, device=device)
    y = torch.randint(0, NUM_CLASSES, (b,), device=device)
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(m(x), y).backward()
    train = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(x)
    return float(train), float(fc.get_total_flops())


# ----------------------------------------------------------------------------- the methods

class Runner:
    """One method on one (arch, S, B) case: ``train()`` and ``infer()`` callables."""

    train: Callable[[], Any]
    infer: Optional[Callable[[], Any]] = None
    setup_s: float = 0.0
    note: str = ""


def make_loop(arch, s, x, y, xs) -> Runner:
    models = plain_models(arch, s, x.device)
    opts = [torch.optim.Adam(m.parameters(), lr=LR) for m in models]
    r = Runner()

    def train():
        for i, (m, o) in enumerate(zip(models, opts)):
            o.zero_grad(set_to_none=True)
            F.cross_entropy(m(x[i]), y[i]).backward()
            o.step()

    def infer():
        with torch.no_grad():
            return torch.stack([m(xs) for m in models])

    for m in models:
        m.train()
    r.train, r.note = train, "Adam() per member"
    r.infer = lambda: _eval(models, infer)
    return r


def _eval(models, fn):
    for m in models:
        m.eval()
    try:
        return fn()
    finally:
        for m in models:
            m.train()


def _vmap_parts(arch, s, device):
    from torch.func import functional_call, stack_module_state

    models = plain_models(arch, s, device)
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def fmodel(p, b, xx):
        return functional_call(base, (p, b), (xx,))

    return params, buffers, fmodel


def make_vmap(arch, s, x, y, xs, compile_: bool = False) -> Runner:
    from torch.func import vmap

    params, buffers, fmodel = _vmap_parts(arch, s, x.device)
    opt = torch.optim.Adam(list(params.values()), lr=LR)
    b = x.shape[1]

    def loss_fn(p, bu, xx, yy):
        logits = vmap(fmodel)(p, bu, xx)  # (S, B, C)
        return F.cross_entropy(logits.flatten(0, 1), yy.flatten(), reduction="sum") / b

    def infer_fn(p, bu, xx):
        return vmap(fmodel, in_dims=(0, 0, None))(p, bu, xx)

    r = Runner()
    if compile_:
        torch._dynamo.reset()  # each case compiles afresh (no recompile-limit fallback to eager)
        loss_fn = torch.compile(loss_fn)
        infer_fn = torch.compile(infer_fn)
        t0 = time.perf_counter()
        loss_fn(params, buffers, x, y).backward()  # compile forward + backward graphs
        with torch.no_grad():
            infer_fn(params, buffers, xs)
        common.synchronize(x.device)
        r.setup_s = time.perf_counter() - t0
        opt.zero_grad(set_to_none=True)

    def train():
        opt.zero_grad(set_to_none=True)
        loss_fn(params, buffers, x, y).backward()
        opt.step()

    def infer():
        with torch.no_grad():
            return infer_fn(params, buffers, xs)

    r.train, r.infer, r.note = train, infer, "one Adam() over stacked params"
    return r


def make_faststeal(arch, s, x, y, xs, backend: str, cuda_graph: bool = False,
                   precision: str = "fp32", bf16_copies: bool = True) -> Runner:
    from faststeal import master_weights, ops
    from faststeal.train_step import autocast, make_optimizer, make_train_step

    zoo = _zoo()
    model = zoo.build_model(ARCHS[arch], INPUT_SHAPE, NUM_CLASSES, members=s).to(x.device)
    opt = make_optimizer(model.parameters(), lr=LR, capturable=cuda_graph)
    with mock.patch.dict(os.environ, {} if bf16_copies else {master_weights.ENV: "0"}):
        step = make_train_step(model, opt, cuda_graph=cuda_graph, precision=precision)
    r = Runner()

    def train():
        with ops.use_backend(backend):
            return step(x, y)

    def infer():
        model.eval()
        try:
            with ops.use_backend(backend), torch.no_grad(), \
                    autocast(x.device.type, precision):
                return model(xs)
        finally:
            model.train()

    if cuda_graph:
        t0 = time.perf_counter()
        train()  # capture
        common.synchronize(x.device)
        r.setup_s = time.perf_counter() - t0
    r.train, r.infer = train, (None if cuda_graph else infer)
    r.note = f"fused Adam ({type(opt).__name__}, " + ("fused" if opt.defaults.get("fused")
                                                      else "foreach") + "), backend " + backend \
        + ("" if precision == "fp32" else f", {precision}") \
        + (", bf16 copies" if step.master_weights is not None else "")
    return r


def make_runner(method: str, arch, s, x, y, xs) -> Runner:
    if method == "loop":
        return make_loop(arch, s, x, y, xs)
    if method == "vmap":
        return make_vmap(arch, s, x, y, xs)
    if method == "vmap+compile":
        return make_vmap(arch, s, x, y, xs, compile_=True)
    if method == "faststeal[reference]":
        return make_faststeal(arch, s, x, y, xs, "reference")
    if method == "faststeal":
        return make_faststeal(arch, s, x, y, xs, "auto")
    if method == "faststeal[bf16]":
        return make_faststeal(arch, s, x, y, xs, "auto", precision="bf16")
    if method == "faststeal[bf16-cast]":
        return make_faststeal(arch, s, x, y, xs, "auto", precision="bf16", bf16_copies=False)
    if method == "faststeal+graph":
        return make_faststeal(arch, s, x, y, xs, "auto", cuda_graph=True)
    raise ValueError(f"unknown method {method!r}")


# ----------------------------------------------------------------------------- running

GEMM_KEY = "__gemm__"


def run(device="cpu", preset: str = "cpu-quick", gemm: Optional[dict] = None,
        deadline: Optional[common.Deadline] = None, log=print,
        methods: Optional[tuple[str, ...]] = None) -> dict[str, Any]:
    """Every (arch, S, B) case of ``preset`` with every method; returns {"rows", "gemm"}."""
    device = torch.device(device)
    cfg = PRESETS[preset]
    deadline = deadline or common.Deadline(None)
    if gemm is None:
        gemm = common.gemm_rate(device, torch.float32, min_run_time=0.3)
    methods = methods or cfg.get("methods") or DEFAULT_METHODS
    # process-wide, so every variant (the loop, vmap, ...) runs with the same malloc settings
    retained = _retain_freed_cpu_memory() if device.type == "cpu" else None
    rows: list[dict[str, Any]] = []
    for arch, s, b in cfg["grid"]:
        case_methods = [m for m in methods
                        if (m != "vmap+compile" or (arch, s, b) in cfg["compile"])
                        and (m != "faststeal+graph" or device.type == "cuda")]
        torch.manual_seed(0)
        x = torch.randn(s, b, *INPUT_SHAPE, device=device)
        y = torch.randint(0, NUM_CLASSES, (s, b), device=device)
        xs = torch.randn(b, *INPUT_SHAPE, device=device)
        try:
            f_train, f_fwd = step_flops(arch, b, device)
        except Exception as exc:  # zoo missing, ...
            rows.append({"arch": arch, "S": s, "B": b, "method": "*",
                         "error": common.short_error(exc)})
            continue
        results: dict[str, dict[str, Any]] = {}
        runners: dict[str, Runner] = {}
        for method in case_methods:
            row: dict[str, Any] = {"arch": arch, "zoo_arch": ARCHS[arch], "S": s, "B": b,
                                   "method": method}
            results[method] = row
            rows.append(row)
            if deadline.expired():
                row["error"] = "skipped: time budget spent"
                continue
            try:
                r = make_runner(method, arch, s, x, y, xs)
                row["note"] = r.note
                if r.setup_s:
                    row["setup_s"] = r.setup_s
                runners[method] = r
            except Exception as exc:
                row["error"] = common.short_error(exc)
        # every method of the case timed in interleaved rounds (robust to load drift); on CPU a
        # large product by each GEMM library joins the rounds, so the % of GEMM rate compares
        # like with like: '% GEMM' is against torch.mm (the yardstick), '% best GEMM'
        # against the fastest library (oneDNN on AVX-512 AMD CPUs, ~2x torch.mm)
        fns = {m: r.train for m, r in runners.items()}
        case_rates = {lib: r["gflops"]
                      for lib, r in (gemm.get("by_library") or {"torch.mm": gemm}).items()}
        if device.type == "cpu" and runners:
            for lib in case_rates:
                fns[GEMM_KEY + lib] = common.matmul_fn(lib, gemm["n"])
        train_t = common.bench_many(fns, device, min_run_time=cfg["t"],
                                    rounds=cfg.get("rounds", 3))
        for lib in case_rates:
            t = train_t.pop(GEMM_KEY + lib, None)
            if isinstance(t, common.Timing):
                case_rates[lib] = 2 * gemm["n"] ** 3 / (t.median_ms * 1e-3) / 1e9
        case_gemm = case_rates.get("torch.mm", gemm["gflops"])
        best_gemm = max(case_rates.values())
        infer_t = common.bench_many({m: r.infer for m, r in runners.items()
                                     if cfg.get("infer") and r.infer is not None}, device,
                                    min_run_time=cfg["t"], rounds=cfg.get("rounds", 3))
        for method, r in runners.items():
            row = results[method]
            t = train_t[method]
            if isinstance(t, BaseException):
                row["error"] = common.short_error(t)
                continue
            row.update({f"train_{k}": v for k, v in t.as_dict().items()})
            sec = t.median_ms * 1e-3
            row["train_samples_per_s"] = s * b / sec
            row["train_gflops"] = s * f_train / sec / 1e9
            row["gemm_gflops"] = case_gemm
            row["train_frac_gemm"] = row["train_gflops"] / case_gemm
            row["best_gemm_gflops"] = best_gemm
            row["train_frac_best_gemm"] = row["train_gflops"] / best_gemm
            try:
                row["train_peak_bytes"] = common.peak_memory_bytes(r.train, device)
            except Exception as exc:
                row["train_peak_bytes"] = None
                row["memory_error"] = common.short_error(exc)
            ti = infer_t.get(method)
            if isinstance(ti, common.Timing):
                row.update({f"infer_{k}": v for k, v in ti.as_dict().items()})
                row["infer_samples_per_s"] = s * b / (ti.median_ms * 1e-3)
                row["infer_gflops"] = s * f_fwd / (ti.median_ms * 1e-3) / 1e9
            elif ti is not None:
                row["infer_error"] = common.short_error(ti)
            log(f"  {arch} S={s:<3d} B={b:<5d} {method:22s} train {row['train_median_ms']:9.2f} "
                f"ms ({row['train_gflops']:7.1f} GFLOP/s)" +
                (f", infer {row['infer_median_ms']:8.2f} ms" if "infer_median_ms" in row else ""))
        for method, row in results.items():
            if "error" in row:
                log(f"  {arch} S={s} B={b} {method}: {row['error']}")
        del runners
        for ref in ("loop", "vmap", "vmap+compile"):  # paired per interleaved round
            base = results.get(ref)
            for row in results.values():
                for kind in ("train", "infer"):
                    row[f"{kind}_x_vs_{ref}"] = common.paired_ratio(base, row, f"{kind}_")
        del x, y, xs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"rows": rows, "gemm": gemm, "flops_note": "matmul/conv FLOPs, torch.utils.flop_counter",
            "retain_freed_cpu_memory": retained}


def _retain_freed_cpu_memory() -> bool:
    try:
        from faststeal.train_step import retain_freed_cpu_memory
    except ImportError:  # faststeal half-installed: the baselines still run
        return False
    return retain_freed_cpu_memory()


def markdown(result: dict[str, Any]) -> str:
    g = result["gemm"]
    libs = ", ".join(f"{k} {common.fmt(v['gflops'])}"
                     for k, v in g.get("by_library", {}).items())
    lib = g.get("library", "torch.mm")
    out = [f"GEMM rate measured in this run: {common.fmt(g['gflops'])} GFLOP/s ({g['dtype']} "
           f"{lib}, n={g['n']}{'; ' + libs if libs else ''}). On CPU the same products are also "
           f"timed inside every case's interleaved rounds: '% GEMM' is against that case's "
           f"torch.mm rate (column 'GEMM GFLOP/s'), '% best' against its fastest library's, so "
           f"machine load affects both alike."]
    if result.get("retain_freed_cpu_memory") is not None:
        out[0] += (" glibc keeps freed blocks in the process "
                   f"(`retain_freed_cpu_memory`, for every variant): "
                   f"{'yes' if result['retain_freed_cpu_memory'] else 'no'}.")
    headers = ["model", "S", "B/member", "method", "train ms (p20–p80)", "member-samples/s",
               "GFLOP/s", "GEMM GFLOP/s", "% GEMM", "% best", "× loop", "× vmap", "× compile", "peak MB",
               "infer ms",
               "infer member-samples/s", "infer × loop"]
    body = []
    for r in result["rows"]:
        label = f"{r['arch']} ({r.get('zoo_arch', ARCHS.get(r['arch'], '?'))})"
        if "error" in r:
            body.append([label, r["S"], r["B"], r["method"], r["error"]] + [""] * 12)
            continue
        body.append([
            label, r["S"], r["B"], r["method"] + (f" (setup {r['setup_s']:.0f} s)"
                                                  if r.get("setup_s", 0) > 1 else ""),
            f"{common.fmt(r['train_median_ms'])} ({common.fmt(r['train_p20_ms'])}–"
            f"{common.fmt(r['train_p80_ms'])})",
            common.fmt(r["train_samples_per_s"]), common.fmt(r["train_gflops"]),
            common.fmt(r.get("gemm_gflops")), f"{100 * r['train_frac_gemm']:.0f}%",
            f"{100 * r.get('train_frac_best_gemm', r['train_frac_gemm']):.0f}%",
            common.fmt_x(r.get("train_x_vs_loop")),
            common.fmt_x(r.get("train_x_vs_vmap")), common.fmt_x(r.get("train_x_vs_vmap+compile")),
            common.fmt_mb(r.get("train_peak_bytes")), common.fmt(r.get("infer_median_ms")),
            common.fmt(r.get("infer_samples_per_s")), common.fmt_x(r.get("infer_x_vs_loop"))])
    out += ["", common.markdown_table(headers, body)]
    return "\n".join(out)


# ----------------------------------------------------------------------------- user models

class FunctionalCNN(nn.Module):
    """A user's thief CNN written with ``torch.nn.functional`` and ``view(x.size(0), -1)``."""

    def __init__(self, classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


def _user_model(name: str) -> tuple[Callable[[], nn.Module], tuple[int, ...]]:
    if name == "resnet18":
        import torchvision

        return (lambda: torchvision.models.resnet18(num_classes=NUM_CLASSES)), (3, 32, 32)
    if name == "functional-cnn":
        return FunctionalCNN, (1, 28, 28)
    if name.startswith("zoo-") and name[4:] in ("mlp", "lenet"):
        return (lambda: _zoo().FACTORIES[name[4:]](INPUT_SHAPE, NUM_CLASSES)), INPUT_SHAPE
    raise ValueError(f"unknown user model {name!r}")


USER_GRIDS = {
    "smoke": [("functional-cnn", 2, 4)],
    "cpu": [(m, s, b) for m in ("functional-cnn", "resnet18", "zoo-mlp") for s in (4, 16)
            for b in (32, 128)],
    # a dense model (the zoo's plain mlp, an nn.Sequential, as a user would pass it) only
    "cpu-dense": [("zoo-mlp", s, b) for s in (4, 16) for b in (32, 128)],
    # the CNN with the stack's layout choice and both forced layouts beside it
    "cpu-cnn-layout": [("functional-cnn", s, b) for s in (4, 16) for b in (32, 128)],
    # what fits a loaded 2-core machine's time
    "cpu-quick": [("functional-cnn", 4, 32), ("functional-cnn", 4, 128),
                  ("functional-cnn", 16, 32), ("resnet18", 4, 32)],
}


def user_model_step(variant: str, model: str, s: int, b: int, device) -> Callable[[], Any]:
    """One training step (forward, summed per-member mean cross-entropy, backward, Adam) of S
    members of ``model`` with per-member batches of ``b``: ``stack`` = ``faststeal.stack``
    trained by ``faststeal.train_step`` (one module, fused Adam, fused loss: how ``steal()``
    trains it), ``loop`` = S plain modules each with its ``torch.optim.Adam``, ``vmap`` =
    ``torch.func`` over ``stack_module_state`` with one Adam,
    ``stack-nchw`` / ``stack-nhwc`` = ``stack`` with its memory layout forced to
    ``contiguous`` / ``channels_last`` (``FASTSTEAL_STACK_LAYOUT``) instead of measured."""
    import faststeal

    factory, shape = _user_model(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s, b, *shape, generator=g).to(device)
    y = torch.randint(0, NUM_CLASSES, (s, b), generator=g).to(device)
    torch.manual_seed(0)
    if variant in ("stack", "stack-nchw", "stack-nhwc"):
        # what faststeal trains a stack with (Method.fit, steal): its train step — the fused
        # Adam over the stacked parameters and the fused ensemble loss (the same objective:
        # the sum of the members' mean cross-entropies)
        from faststeal.nn.stack import LAYOUT_ENV
        from faststeal.train_step import make_train_step

        inner = make_train_step(faststeal.stack(factory, s, seed=0, input_shape=shape)
                                .to(device), lr=LR)
        if variant == "stack":
            return functools.partial(inner, x, y)
        layout = "contiguous" if variant == "stack-nchw" else "channels_last"

        def step():
            with mock.patch.dict(os.environ, {LAYOUT_ENV: layout}):
                inner(x, y)
        step.model = inner.model  # type: ignore[attr-defined]
        return step
    models = [factory().to(device) for _ in range(s)]
    if variant == "loop":
        opts = [torch.optim.Adam(m.parameters(), lr=LR) for m in models]

        def step():
            for i, (m, o) in enumerate(zip(models, opts)):
                o.zero_grad(set_to_none=True)
                F.cross_entropy(m(x[i]), y[i]).backward()
                o.step()
        return step
    if variant == "vmap":
        from torch.func import functional_call, stack_module_state, vmap

        params, buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")
        opt = torch.optim.Adam(list(params.values()), lr=LR)

        def f(p, bu, xx):
            return functional_call(base, (p, bu), (xx,))

        def step():
            opt.zero_grad(set_to_none=True)
            logits = vmap(f, randomness="different")(params, buffers, x)
            F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").div(b).backward()
            opt.step()
        return step
    raise ValueError(f"unknown variant {variant!r}")


def run_user_models(device="cpu", grid: str = "cpu", min_run_time: float = 1.0,
                    log=print, on_case: Optional[Callable[[dict], None]] = None
                    ) -> dict[str, Any]:
    """``faststeal.stack`` vs a Python loop vs ``torch.func`` vmap on user models; each case's
    variants timed interleaved in one run (:func:`common.bench_many`, 5 rounds), × loop paired
    per round."""
    rows = []
    variants = ("stack", "loop", "stack-nchw", "stack-nhwc") if grid == "cpu-cnn-layout" \
        else ("stack", "loop", "vmap")
    cases = [(m, s, b, variants) for m, s, b in USER_GRIDS[grid]]
    for model, s, b, variants in cases:
        fns = {}
        for v in variants:
            try:
                fns[v] = user_model_step(v, model, s, b, device)
            except Exception as exc:  # e.g. torchvision missing
                rows.append({"model": model, "S": s, "B": b, "variant": v,
                             "error": common.short_error(exc)})
        timings = common.bench_many(fns, device, min_run_time=min_run_time, rounds=5)
        base = timings.get("loop")
        for v, t in timings.items():
            if isinstance(t, Exception):
                rows.append({"model": model, "S": s, "B": b, "variant": v,
                             "error": common.short_error(t)})
                continue
            ok = base is not None and not isinstance(base, Exception)
            rows.append({"model": model, "S": s, "B": b, "variant": v, "median_ms": t.median_ms,
                         "p20_ms": t.p20_ms, "p80_ms": t.p80_ms,
                         "member_samples_per_s": s * b / (t.median_ms / 1e3),
                         # paired per interleaved round (common.paired_ratio)
                         "speedup_vs_first": (common.paired_ratio(base.as_dict(), t.as_dict())
                                              if ok else None)})
        log(f"user models: {model} S={s} B={b} done")
        if on_case is not None:  # e.g. write the JSON so far: long grids keep finished cases
            on_case({"rows": rows})
    return {"rows": rows}


def user_markdown(result: dict[str, Any]) -> str:
    rows = []
    for r in result["rows"]:
        if "error" in r:
            rows.append([r["model"], r["S"], r["B"], r["variant"], "error: " + r["error"],
                         "", ""])
            continue
        rows.append([r["model"], r["S"], r["B"], r["variant"],
                     f"{r['median_ms']:.1f} ({r['p20_ms']:.1f}-{r['p80_ms']:.1f})",
                     f"{r['member_samples_per_s']:.0f}", common.fmt_x(r["speedup_vs_first"])])
    return common.markdown_table(["model", "S", "B/member", "variant", "train ms (p20-p80)",
                                  "member-samples/s", "x loop"], rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", choices=tuple(PRESETS), default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--methods", default=None, help=f"comma-separated subset of {METHODS}")
    ap.add_argument("--json", default=None)
    ap.add_argument("--user-models", choices=tuple(USER_GRIDS), default=None,
                    help="instead: faststeal.stack vs loop vs vmap on user models "
                         "(resnet18 32x32, a functional CNN, the zoo's plain mlp)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if args.user_models:
        meta = common.env_metadata(dev)
        save = (lambda r: common.write_json(args.json, {**r, "meta": meta})) if args.json \
            else None
        res = run_user_models(dev, args.user_models,
                              min_run_time={"smoke": 0.05, "cpu-quick": 0.5}.get(
                                  args.user_models, 1.0),
                              on_case=save)
        res["meta"] = common.env_metadata(dev)
        print(user_markdown(res))
        if args.json:
            common.write_json(args.json, res)
        return 0
    preset = args.preset or ("gpu" if dev.type == "cuda" else "cpu")
    if args.quick and args.preset is None:
        preset += "-quick"
    methods = tuple(args.methods.split(",")) if args.methods else None
    res = run(dev, preset, methods=methods)
    res["meta"] = common.env_metadata(dev)
    print(markdown(res))
    if args.json:
        common.write_json(args.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
