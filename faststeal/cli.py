"""The ``faststeal`` command: a thin layer over the Python API.

    faststeal run [--preset quick|default|full] [--methods all|a,b] [--dataset ...] ...
    faststeal report DIR     rebuild tables and figures from DIR/results.sqlite
    faststeal info           versions, extension, CUDA/Triton, backend per op
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence


def _parser() -> argparse.ArgumentParser:
    from .experiment import ALL_METHODS, OUTPUT_MODES, PRESETS

    p = argparse.ArgumentParser(prog="faststeal", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or resume) the stealing comparison")
    r.add_argument("--preset", choices=tuple(PRESETS), default="default",
                   help="budget/epochs/seeds bundle (default: %(default)s)")
    r.add_argument("--methods", default=None,
                   help=f"'all' or comma-separated subset of {','.join(ALL_METHODS)}")
    r.add_argument("--dataset", default=None, help="victim dataset (default fashion-mnist)")
    r.add_argument("--pool-dataset", default=None, help="attacker pool from another dataset")
    r.add_argument("--data-root", default=None, help="dataset folder (or FASTSTEAL_DATA)")
    r.add_argument("--download", action="store_true",
                   help="download a missing mnist/cifar10/fashion-mnist with torchvision "
                        "(into --data-root, else the cache folder)")
    r.add_argument("--victim-arch", default=None)
    r.add_argument("--surrogate-arch", default=None,
                   help="zoo name (mlp, lenet, cnn-wide, resnet-small), torchvision:NAME (built "
                        "with the dataset's class count) or module.path:factory (importable "
                        "from the working directory)")
    r.add_argument("--victim-epochs", type=int, default=None)
    r.add_argument("--budget", type=int, default=None, help="query budget (images)")
    r.add_argument("--output-mode", choices=OUTPUT_MODES, default=None)
    r.add_argument("--topk", type=int, default=None)
    r.add_argument("--temperature", type=float, default=None)
    r.add_argument("--decimals", type=int, default=None)
    r.add_argument("--seeds", type=int, default=None, help="number of seeds per method")
    r.add_argument("--epochs", type=int, default=None, help="surrogate training epochs")
    r.add_argument("--batch-size", type=int, default=None)
    r.add_argument("--lr", type=float, default=None)
    r.add_argument("--member-sweep", default=None,
                   help="comma-separated member counts for the Deep Ensemble sweep ('' = none)")
    r.add_argument("--method-params", default=None,
                   help='JSON of per-method hyperparameters, e.g. \'{"deep-ensemble": {"members": 8}}\'')
    r.add_argument("--defense", default=None,
                   help="defended victim: top1, rounding, noise, reverse-sigmoid, prada")
    r.add_argument("--defense-param", action="append", default=[], metavar="KEY=VALUE",
                   help="defence parameter (repeatable), e.g. --defense-param decimals=2")
    r.add_argument("--device", default=None, help="cpu or cuda[:N]")
    r.add_argument("--nproc", type=int, default=None,
                   help="processes on this machine (re-launches under torch.distributed.run); "
                        "grid cells are dealt to ranks")
    r.add_argument("--shard-members", action="store_true",
                   help="with several processes: split each Deep Ensemble's members over ranks")
    r.add_argument("--member-chunk", default=None, metavar="N|auto",
                   help="train Deep Ensemble members in sequential blocks of N (same members, less "
                        "GPU memory); 'auto' halves the block after each out-of-memory error")
    r.add_argument("--out", default="runs/latest", help="run folder (resumes if it exists)")
    r.add_argument("--cache-dir", default=None, help="victim checkpoint cache")
    r.add_argument("--force", action="store_true",
                   help="discard results in --out that belong to another configuration")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--save-models", action="store_true",
                   help="write every trained surrogate to OUT/models/<cell>.pt "
                        "(faststeal.load reads them)")
    rep = sub.add_parser("report", help="rebuild results files and figures from a run folder")
    rep.add_argument("dir")
    sub.add_parser("info", help="versions, extension, CUDA/Triton and the backend of each op")
    return p


def _run(args, argv: Optional[Sequence[str]] = None) -> int:
    from .experiment import Config, run_comparison

    overrides = dict(
        dataset=args.dataset, pool_dataset=args.pool_dataset, data_root=args.data_root,
        victim_arch=args.victim_arch, surrogate_arch=args.surrogate_arch,
        victim_epochs=args.victim_epochs, budget=args.budget, output_mode=args.output_mode,
        topk=args.topk, temperature=args.temperature, decimals=args.decimals, seeds=args.seeds,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device=args.device,
        out=args.out, cache_dir=args.cache_dir, methods=args.methods,
        download=args.download or None)
    if args.member_sweep is not None:
        try:
            overrides["member_sweep"] = tuple(int(s) for s in args.member_sweep.split(",") if s)
        except ValueError:
            raise ValueError(f"--member-sweep must be comma-separated integers, got "
                             f"{args.member_sweep!r}") from None
    if args.member_chunk is not None:
        overrides["member_chunk"] = _member_chunk(args.member_chunk)
    if args.method_params is not None:
        try:
            overrides["method_params"] = json.loads(args.method_params)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--method-params is not valid JSON: {exc}") from None
    if args.defense is not None:
        overrides["defense"] = args.defense
        params = {}
        for item in args.defense_param:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"--defense-param must be KEY=VALUE, got {item!r}")
            try:
                params[key] = json.loads(value)
            except json.JSONDecodeError:
                params[key] = value
        overrides["defense_params"] = params
    cfg = Config.from_preset(args.preset, **overrides)
    cfg.force = args.force
    cfg.progress = not args.no_progress
    cfg.shard_members = args.shard_members
    cfg.save_models = args.save_models
    cfg.validate()
    if args.nproc is not None and "WORLD_SIZE" not in os.environ:
        from .distributed import relaunch_with_torchrun

        argv = list(sys.argv[1:]) if argv is None else list(argv)
        rest, skip = [], False
        for a in argv:  # drop "--nproc N" / "--nproc=N": the children are the N processes
            if skip:
                skip = False
            elif a == "--nproc":
                skip = True
            elif not a.startswith("--nproc="):
                rest.append(a)
        return relaunch_with_torchrun(args.nproc, rest)
    summary = run_comparison(cfg)
    if summary:  # rank 0 (or the only process)
        from .results.report import markdown

        print(markdown(summary))
        print(f"results written to {cfg.out}/ (results.json, results.csv, results.md, figures)")
    return 0


def _member_chunk(value: str):
    """``--member-chunk``: ``auto`` or a positive integer."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"--member-chunk must be a positive integer or 'auto', got {value!r}")
    return n


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .results.store import StoreMismatchError

    args = _parser().parse_args(argv)
    try:
        if args.command == "info":
            from .info import collect, format_info

            print(format_info(collect()))
            return 0
        if args.command == "report":
            from .results.report import markdown, write_report

            print(markdown(write_report(args.dir)))
            return 0
        return _run(args, argv)
    except (ValueError, TypeError, FileNotFoundError, StoreMismatchError) as exc:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = f" (rank {os.environ.get('RANK', '?')} of {world})" if world > 1 else ""
        print(f"faststeal: error{rank}: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
