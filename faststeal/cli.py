"""The ``faststeal`` command: a thin layer over the Python API.

    faststeal run [--preset quick|default|full] [--methods all|a,b] [--dataset ...] ...
    faststeal study {active,diversity,defense} [--quick] [--out DIR] ...
    faststeal report DIR     rebuild tables and figures of any run folder from its results.sqlite
    faststeal info           versions, extension, CUDA/Triton, backend per op

Ctrl-C (SIGINT) or SIGTERM stops a run with one line and exit code 130 / 143; rerunning the
same command resumes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import typing
from typing import Any, Optional, Sequence

INTERRUPTED = "faststeal: interrupted; rerun the same command to resume"


class _Terminated(Exception):
    """Raised in the main thread by the SIGTERM handler."""


def _parser() -> argparse.ArgumentParser:
    from .methods import METHODS, PAPER_METHODS
    from .runs import OUTPUT_MODES, PRESETS, STUDIES

    p = argparse.ArgumentParser(prog="faststeal", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or resume) the stealing comparison")
    r.add_argument("--preset", choices=tuple(PRESETS), default="default",
                   help="budget/epochs/seeds bundle (default: %(default)s)")
    r.add_argument("--methods", default=None,
                   help=f"'all' (= {','.join(PAPER_METHODS)}) or a comma-separated list of "
                        f"{','.join(METHODS)}")
    r.add_argument("--dataset", default=None, help="victim dataset (default fashion-mnist)")
    r.add_argument("--pool-dataset", default=None, help="attacker pool from another dataset")
    r.add_argument("--data-root", default=None, help="dataset folder (or FASTSTEAL_DATA)")
    r.add_argument("--ood-dataset", default=None, metavar="NAME|auto|none",
                   help="out-of-distribution set of the OOD AUROCs (default auto: mnist5k for "
                        "fashion-mnist, none for digits)")
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
    r.add_argument("--precision", default=None, choices=("fp32", "bf16"),
                   help="compute dtype of the surrogates' stacked layers (bf16: float32 weights, "
                        "optimizer and loss; fast on CPUs with AMX/AVX512-BF16 and on GPUs)")
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
    st = sub.add_parser("study", help="run (or resume) a study beyond the paper")
    studies = st.add_subparsers(dest="study", required=True)
    for name, cls in STUDIES.items():
        if name == "comparison":
            continue  # that is `faststeal run`
        doc = sys.modules[cls.__module__].__doc__ or name
        sp = studies.add_parser(name, help=" ".join(doc.strip().split("\n\n")[0].split()),
                                description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_settings_arguments(sp, _settings_class(cls))
        sp.add_argument("--quick", action="store_true",
                        help="smoke-test scale (minutes on a CPU): " +
                             ", ".join(f"{k}={v}" for k, v in
                                       _settings_class(cls).QUICK.items()))
        sp.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    rep = sub.add_parser("report", help="rebuild results files and figures from a run folder")
    rep.add_argument("dir")
    sub.add_parser("info", help="versions, extension, CUDA/Triton and the backend of each op")
    return p


def _settings_class(study_cls: Any) -> Any:
    return typing.get_type_hints(study_cls)["settings"]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_settings_arguments(p: argparse.ArgumentParser, cls: Any) -> None:
    """One option per settings field (``--no-progress`` for ``progress``), default None: only
    the options given override the dataclass defaults."""
    for f in dataclasses.fields(cls):
        if f.name == "progress":
            p.add_argument("--no-progress", action="store_true")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool):
            p.add_argument(_flag(f.name), action="store_true", default=None)
            continue
        if isinstance(default, (list, tuple)):
            shown = ",".join(str(v) for v in default)
        elif isinstance(default, dict):
            shown = json.dumps(default)
        else:
            shown = default
        p.add_argument(_flag(f.name), default=None, metavar=f.name.upper(),
                       help=f"default: {shown}")


def _convert(cls: Any, name: str, text: str) -> Any:
    """A command-line string as the type of settings field ``name``; ValueError naming it."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = typing.get_origin(hint) or hint
    if base is typing.Union:  # Optional[X]
        hint = args[0]
        base = typing.get_origin(hint) or hint
        args = list(typing.get_args(hint))
    try:
        if base in (dict,):
            if not text.lstrip().startswith("{") and hasattr(cls, "named"):
                return cls.named(name, text)
            return json.loads(text)
        if base in (list, tuple) or base is getattr(typing, "Sequence") or \
                str(base).endswith("Sequence'>"):
            item = args[0] if args and args[0] in (int, float, str) else str
            return tuple(item(v.strip()) for v in text.split(",") if v.strip())
        if base in (int, float, str):
            return base(text)
    except (ValueError, json.JSONDecodeError) as exc:
        raise ValueError(f"{_flag(name)}: cannot read {text!r} ({exc})") from None
    return text


def _study(args) -> int:
    import torch

    from .runs import STUDIES, run_study

    cls = STUDIES[args.study]
    settings_cls = _settings_class(cls)
    values: dict[str, Any] = dict(settings_cls.QUICK) if args.quick else {}
    for f in dataclasses.fields(settings_cls):
        if f.name == "progress":
            values["progress"] = not args.no_progress
            continue
        given = getattr(args, f.name)
        if given is None:
            continue
        values[f.name] = given if isinstance(given, bool) else _convert(settings_cls, f.name,
                                                                        given)
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = run_study(cls(settings_cls(**values)))
    if summary:
        print(cls.markdown(summary))
        print(f"results written to {values.get('out', settings_cls.out)}/ (results.sqlite, "
              "results.json, results.md, figures)")
    return 0


def _run(args, argv: Optional[Sequence[str]] = None) -> int:
    from .runs import Config, run_comparison

    overrides = dict(
        dataset=args.dataset, pool_dataset=args.pool_dataset, data_root=args.data_root,
        victim_arch=args.victim_arch, surrogate_arch=args.surrogate_arch,
        victim_epochs=args.victim_epochs, budget=args.budget, output_mode=args.output_mode,
        topk=args.topk, temperature=args.temperature, decimals=args.decimals, seeds=args.seeds,
        epochs=args.epochs, batch_size=args.batch_size, precision=args.precision, lr=args.lr,
        device=args.device, out=args.out, cache_dir=args.cache_dir, methods=args.methods,
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
    if args.ood_dataset is not None:
        cfg.ood_dataset = None if args.ood_dataset == "none" else args.ood_dataset
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


#: the first SIGINT/SIGTERM received (None: none). Library code interrupted mid-write (e.g. inside
#: torch.save) may turn the KeyboardInterrupt into another exception while cleaning up, so the
#: exit path looks at this flag, not only at the exception's type.
_signalled: Optional[int] = None


def _on_signal(signum: int, frame: Any) -> None:
    global _signalled
    if _signalled is not None:  # a second signal during clean-up: let the clean-up finish
        return
    _signalled = signum
    raise KeyboardInterrupt() if signum == signal.SIGINT else _Terminated()


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .results.store import StoreMismatchError

    args = _parser().parse_args(argv)
    global _signalled
    _signalled = None
    previous = {}
    try:  # only the main thread may set handlers (tests may call main from another)
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _on_signal)
    except ValueError:
        pass
    try:
        if args.command == "info":
            from .info import collect, format_info

            print(format_info(collect()))
            return 0
        if args.command == "report":
            from .runs import STUDIES, write_report

            summary = write_report(args.dir)
            print(STUDIES[summary.get("study", "comparison")].markdown(summary))
            return 0
        if args.command == "study":
            return _study(args)
        return _run(args, argv)
    except BaseException as exc:
        if _signalled is not None or isinstance(exc, (KeyboardInterrupt, _Terminated)):
            sig = _signalled or (signal.SIGINT if isinstance(exc, KeyboardInterrupt)
                                 else signal.SIGTERM)
            print(INTERRUPTED, file=sys.stderr)
            return 128 + int(sig)
        # FloatingPointError: a diverged surrogate (NonFiniteError)
        if isinstance(exc, (ValueError, TypeError, FileNotFoundError, StoreMismatchError,
                            FloatingPointError)):
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = f" (rank {os.environ.get('RANK', '?')} of {world})" if world > 1 else ""
            print(f"faststeal: error{rank}: {exc}", file=sys.stderr, flush=True)
            return 2
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
