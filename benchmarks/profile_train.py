"""torch.profiler views of the S-member training step: where the time of one step goes.

Profiles, for one (arch, S, B) case, a few steps of: the Python loop over S modules (default
Adam), the vmap step, faststeal's train step (:mod:`faststeal.train_step`) on the reference ops
and on the fused kernels, and the library's own training loop (``DeepEnsemble.fit``, one epoch),
then prints each one's top operators by self time, grouped into the buckets that matter for the
fix (GEMM, optimizer, loss, elementwise/activation, copies, other).

    python -m benchmarks.profile_train [--arch mlp] [--members 16] [--batch 128] [--steps 5]
    python -m benchmarks.profile_train --user-model functional-cnn --members 4 --methods stack,loop
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile

from . import bench_train, common

BUCKETS = (
    ("gemm", ("mm", "bmm", "addmm", "baddbmm", "matmul", "linear", "gemm", "conv", "mkldnn",
              "ensemble_linear_fwd_cpu", "ensemble_linear_bwd_cpu")),
    ("optimizer", ("adam", "_foreach", "_fused", "lerp", "addcdiv", "addcmul", "sqrt",
                   "optimizer")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss", "xent", "ensemble_cross_entropy")),
    ("copy/alloc", ("copy_", "clone", "contiguous", "empty", "zeros", "fill_", "to", "cat",
                    "stack", "index", "gather", "expand")),
    ("elementwise", ("relu", "threshold", "add", "mul", "div", "sum", "mean", "sub")),
)


def bucket(name: str) -> str:
    low = name.lower()
    for b, keys in BUCKETS:
        if any(k in low for k in keys):
            return b
    return "other"


def profile_fn(fn: Callable[[], Any], steps: int, device) -> dict[str, Any]:
    fn()
    common.synchronize(torch.device(device))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda"
                                     else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        common.synchronize(torch.device(device))
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events)
    buckets: dict[str, float] = defaultdict(float)
    for e in events:
        buckets[bucket(e.key)] += e.self_cpu_time_total
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {"step_ms": total_self / steps / 1e3,
            "buckets_ms": {k: v / steps / 1e3 for k, v in sorted(buckets.items(),
                                                                  key=lambda kv: -kv[1])},
            "top": [(e.key, e.count // steps, e.self_cpu_time_total / steps / 1e3) for e in top],
            "table": events.table(sort_by="self_cpu_time_total", row_limit=15)}


def fit_loop(arch: str, s: int, b: int, device) -> Callable[[], Any]:
    from faststeal.methods import build_method

    n = 8 * b  # 8 steps per epoch
    x = torch.randn(n, *bench_train.INPUT_SHAPE, device=device)
    y = torch.randint(0, bench_train.NUM_CLASSES, (n,), device=device)
    m = build_method("deep-ensemble", bench_train.ARCHS[arch], bench_train.INPUT_SHAPE,
                     bench_train.NUM_CLASSES, members=s, device=str(device))
    return lambda: m.fit(x, y, epochs=1, batch_size=b, progress=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", default="mlp", choices=tuple(bench_train.ARCHS))
    ap.add_argument("--members", type=int, default=16)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--methods", default=None,
                    help="default: loop,vmap,faststeal[reference],faststeal,fit; with "
                         "--user-model: stack,loop,vmap")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--tables", action="store_true", help="print the full profiler tables")
    ap.add_argument("--user-model", default=None,
                    help="instead of --arch: a user model of bench_train --user-models "
                         "(functional-cnn, resnet18, zoo-mlp, zoo-lenet); --methods then from "
                         "stack, loop, vmap, zoo")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    s, b = args.members, args.batch
    torch.manual_seed(0)
    x = torch.randn(s, b, *bench_train.INPUT_SHAPE, device=dev)
    y = torch.randint(0, bench_train.NUM_CLASSES, (s, b), device=dev)
    xs = torch.randn(b, *bench_train.INPUT_SHAPE, device=dev)
    print(f"{args.user_model or args.arch} S={s} B={b} on {dev}, {torch.get_num_threads()} "
          f"threads, load {common.loadavg()}")
    methods = args.methods or ("stack,loop,vmap" if args.user_model else
                               "loop,vmap,faststeal[reference],faststeal,fit")
    for method in methods.split(","):
        if args.user_model:
            fn, steps, per = bench_train.user_model_step(method, args.user_model, s, b, dev), \
                args.steps, 1
        elif method == "fit":
            fn, steps, per = fit_loop(args.arch, s, b, dev), 1, 8
        else:
            fn, steps, per = bench_train.make_runner(method, args.arch, s, x, y, xs).train, \
                args.steps, 1
        res = profile_fn(fn, steps, dev)
        scale = 1.0 / per
        print(f"\n== {method}: {res['step_ms'] * scale:.1f} ms profiled self time per step")
        print("   by bucket: " + ", ".join(f"{k} {v * scale:.1f}" for k, v in
                                           res["buckets_ms"].items()))
        for name, count, ms in res["top"][:8]:
            print(f"   {ms * scale:8.2f} ms  x{count * scale:<5.0f} {name}")
        if args.tables:
            print(res["table"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
