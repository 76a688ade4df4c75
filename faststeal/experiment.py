"""The stealing comparison: config → cells (method × seed, member sweep) → results store.

``run_comparison(Config(...))`` trains (or loads) the victim, spends the query budget once through
the oracle (random queries from the attacker pool), then trains the baseline and every requested
UQ method for every seed on exactly that queried set with the same epochs and batch size, and
evaluates them on the held-out test set. Each finished cell is written to ``OUT/results.sqlite``
at once; the exports (``results.json/csv/md`` and figures) are rebuilt after every cell, so a
rerun of the same command resumes. Within a cell, training writes a checkpoint after every epoch
(``OUT/checkpoints/<cell>.pt``, one file per member block when the members are sharded over
ranks or trained in blocks), so a killed run also resumes the cell in progress from its last
finished epoch, with the same result as an uninterrupted run; the files of a cell are deleted
once its row is committed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch

ALL_METHODS = ("baseline", "deep-ensemble", "mc-dropout", "bbb", "swag", "laplace")
OUTPUT_MODES = ("label", "topk", "probs", "logits")

# Presets. "default" is the main job (README's first command): the whole comparison on
# Fashion-MNIST in under 10 minutes on a 2-core CPU (see docs/results.md for the measured time).
PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(budget=2000, seeds=1, epochs=3, member_sweep=(1, 2),
                  probe_size=256, record_every=10),
    "default": dict(budget=10000, seeds=3, epochs=8, member_sweep=(1, 2, 5, 10),
                    probe_size=512, record_every=25),
    "full": dict(budget=20000, seeds=5, epochs=20, victim_arch="cnn-wide", surrogate_arch="lenet",
                 member_sweep=(1, 2, 5, 10), sweep_seeds=3, probe_size=1000, record_every=50),
}


@dataclass
class Config:
    """Everything that defines a comparison run (validated by :meth:`validate`)."""

    dataset: str = "fashion-mnist"
    pool_dataset: Optional[str] = None
    data_root: Optional[str] = None
    download: bool = False  # let torchvision fetch a missing dataset (mnist, cifar10, fashion)
    victim_arch: str = "lenet"
    surrogate_arch: str = "mlp"  # a zoo name, "torchvision:NAME" or "module:factory"
    victim_epochs: Optional[int] = None  # None: faststeal.victim.DEFAULT_EPOCHS[victim_arch]
    victim_fraction: float = 0.5
    budget: int = 10000
    output_mode: str = "label"
    topk: int = 3
    temperature: float = 1.0
    decimals: Optional[int] = None
    methods: Sequence[str] = ALL_METHODS
    seeds: int = 3
    epochs: int = 8
    batch_size: int = 128
    lr: float = 1e-3
    member_sweep: Sequence[int] = (1, 2, 5, 10)
    sweep_method: str = "deep-ensemble"
    sweep_seeds: int = 1
    probe_size: int = 512
    record_every: int = 25
    split_seed: int = 0
    method_params: dict = field(default_factory=dict)
    shard_members: bool = False
    member_chunk: Union[int, str, None] = None  # Deep Ensemble members per block, or "auto"
    save_models: bool = False  # write every trained surrogate to OUT/models/<cell>.pt
    defense: Optional[str] = None
    defense_params: dict = field(default_factory=dict)
    device: str = "cpu"
    out: str = "runs/latest"
    cache_dir: Optional[str] = None
    preset: Optional[str] = None
    progress: bool = True
    force: bool = False

    @classmethod
    def from_preset(cls, preset: Optional[str] = None, **overrides: Any) -> "Config":
        """A config from a preset (``quick``, ``default``, ``full``) with explicit overrides."""
        base: dict[str, Any] = {}
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
            base.update(PRESETS[preset])
        base.update({k: v for k, v in overrides.items() if v is not None})
        from .data import DATASET_INFO

        info = DATASET_INFO.get(base.get("dataset", cls.dataset))
        if preset is not None and overrides.get("budget") is None and info is not None \
                and info.max_preset_budget is not None:  # presets are sized for Fashion-MNIST
            base["budget"] = min(base["budget"], info.max_preset_budget)
        unknown = set(base) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown config field(s): {sorted(unknown)}")
        return cls(preset=preset, **base)

    def validate(self) -> "Config":
        """Raise ValueError/TypeError with the valid choices before anything runs."""
        from .data import DATASETS
        from .models import ARCHS

        def choice(name, value, valid, where=""):
            if not isinstance(value, str) or value not in valid:
                raise ValueError(f"{name} must be one of {tuple(valid)}, got {value!r}{where}")

        def pos_int(name, value, allow_zero=False):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
                raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} "
                                 f"integer, got {value!r}")

        choice("dataset", self.dataset, DATASETS)
        if self.pool_dataset is not None:
            choice("pool_dataset", self.pool_dataset, DATASETS)
        choice("victim_arch", self.victim_arch, ARCHS)
        from .models import check_surrogate_name

        check_surrogate_name(self.surrogate_arch, "surrogate_arch")
        choice("output_mode", self.output_mode, OUTPUT_MODES)
        if isinstance(self.methods, str):
            self.methods = parse_methods(self.methods)
        if not isinstance(self.methods, (list, tuple)):
            raise TypeError(f"methods must be a list of method names or a comma-separated "
                            f"string, got {type(self.methods).__name__} ({self.methods!r})")
        if not self.methods:
            raise ValueError("methods must name at least one method")
        from .methods import METHODS

        for m in self.methods:
            choice("method", m, tuple(METHODS), " (in methods)")
        if self.defense is not None:
            from .defenses import DEFENSES, OUTPUT_DEFENSES, build_defense

            choice("defense", self.defense, DEFENSES)
            if not isinstance(self.defense_params, dict):
                raise TypeError("defense_params must be a dict")
            build_defense(self.defense, **self.defense_params)  # validates the parameters
            if self.defense in OUTPUT_DEFENSES and self.output_mode == "logits":
                raise ValueError(f"defense {self.defense!r} post-processes probabilities; use "
                                 "output_mode 'probs', 'topk' or 'label', not 'logits'")
        if self.sweep_method not in ALL_METHODS:
            choice("sweep_method", self.sweep_method, ALL_METHODS)
        for name in ("budget", "seeds", "epochs", "batch_size", "probe_size",
                     "record_every", "sweep_seeds", "topk"):
            pos_int(name, getattr(self, name))
        if self.victim_epochs is not None:
            pos_int("victim_epochs", self.victim_epochs)
        pos_int("split_seed", self.split_seed, allow_zero=True)
        if not isinstance(self.member_sweep, (list, tuple)):
            raise TypeError(f"member_sweep must be a list of member counts, got "
                            f"{type(self.member_sweep).__name__} ({self.member_sweep!r})")
        for s in self.member_sweep:
            pos_int("member_sweep entry", s)

        def real(name, value):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
            return float(value)

        if not 0.0 < real("victim_fraction", self.victim_fraction) < 1.0:
            raise ValueError(f"victim_fraction must be in (0, 1), got {self.victim_fraction}")
        if real("lr", self.lr) <= 0:
            raise ValueError(f"lr must be a positive float, got {self.lr!r}")
        if real("temperature", self.temperature) <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.decimals is not None:
            pos_int("decimals", self.decimals, allow_zero=True)
        from .attack import check_member_chunk

        check_member_chunk(self.member_chunk)
        dev = str(self.device)
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {dev!r} requested but CUDA is not available; use --device cpu")
        if not (dev == "cpu" or dev.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {dev!r}")
        if not isinstance(self.method_params, dict):
            raise TypeError(f"method_params must be a dict of per-method dicts, got "
                            f"{type(self.method_params).__name__}")
        for m, hp in self.method_params.items():
            choice("method_params key", m, tuple(METHODS))
            if not isinstance(hp, dict):
                raise TypeError(f"method_params[{m!r}] must be a dict, got {type(hp).__name__}")
        return self

    def result_affecting(self) -> dict[str, Any]:
        """The fields that change results (hashed into the store); not out/device/progress."""
        d = dataclasses.asdict(self)
        for k in ("out", "progress", "force", "cache_dir", "preset", "device", "shard_members",
                  "member_chunk", "download", "save_models"):
            d.pop(k)
        if d["defense"] is None:  # keep hashes of runs without a defence unchanged
            d.pop("defense")
            d.pop("defense_params")
        d["methods"] = list(d["methods"])
        d["member_sweep"] = list(d["member_sweep"])
        return d


def parse_methods(spec: str) -> tuple[str, ...]:
    """``all`` or a comma-separated subset (``baseline`` is always included for the gains)."""
    if spec.strip() == "all":
        return ALL_METHODS
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    bad = [n for n in names if n not in ALL_METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; valid: {ALL_METHODS} or 'all'")
    return names


def _log(msg: str) -> None:
    print(f"[faststeal] {msg}", flush=True)


def run_comparison(config: Config) -> dict[str, Any]:
    """Run (or resume) the comparison described by ``config``; returns the summary dict."""
    from . import attack
    from .data import make_splits
    from .methods.checkpoint import CheckpointError
    from .oracle import JournalError, Oracle, set_aside
    from .results import ResultStore
    from .results.report import write_report
    from .victim import train_victim

    config.validate()
    from . import distributed

    ctx = distributed.init(config.device)
    dev = config.device
    if ctx.enabled and dev == "cuda":
        dev = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if str(dev).startswith("cuda"):
        # bit-reproducible convolutions (cuDNN backward uses atomics otherwise)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    log = _log if ctx.is_main else (lambda msg: None)
    progress = config.progress and ctx.is_main
    t_start = time.perf_counter()
    methods = list(config.methods)
    if "baseline" not in methods:
        methods.insert(0, "baseline")  # every gain is measured against it
    os.makedirs(config.out, exist_ok=True)
    if ctx.is_main:
        store = ResultStore(config.out, config.result_affecting(), force=config.force)
    distributed.barrier(ctx)
    if not ctx.is_main:
        store = ResultStore(config.out, config.result_affecting())
    timing: dict[str, float] = {}
    failed = True  # until the run returns: a failing rank must not wait in the final barrier
    try:
        t0 = time.perf_counter()
        splits = make_splits(config.dataset, seed=config.split_seed,
                             victim_fraction=config.victim_fraction,
                             pool_dataset=config.pool_dataset, root=config.data_root,
                             download=config.download)
        timing["data_s"] = time.perf_counter() - t0
        log(f"data: {splits.name}, victim-train {len(splits.victim_train)}, pool "
            f"{len(splits.pool)}, test {len(splits.test)}, input {splits.input_shape}")
        if config.budget > len(splits.pool):
            raise ValueError(f"budget ({config.budget}) is larger than the attacker pool "
                             f"({len(splits.pool)} images)")
        t0 = time.perf_counter()
        vic = None
        for turn in (0, 1):  # rank 0 trains (or loads) first; the others load its checkpoint
            if (turn == 0) == ctx.is_main:
                vic = train_victim(splits, config.victim_arch, seed=config.split_seed,
                                   epochs=config.victim_epochs, device=dev,
                                   cache_dir=config.cache_dir, progress=progress)
            distributed.barrier(ctx)
        timing["victim_s"] = time.perf_counter() - t0
        log(f"victim {config.victim_arch}: test accuracy {100 * vic.test_accuracy:.2f}% "
            f"({'trained' if vic.trained else 'loaded from cache'} in {timing['victim_s']:.1f}s)")
        victim = vic.model.to(dev)

        # The oracle is asked once, by rank 0; the answers are broadcast (budget counted once).
        t0 = time.perf_counter()
        idx = attack.random_queries(len(splits.pool), config.budget, config.split_seed + 1)
        targets = None
        if ctx.is_main:
            store.set_meta("victim", {"arch": config.victim_arch, "dataset": config.dataset,
                                      "test_accuracy": vic.test_accuracy,
                                      "checkpoint": vic.cache_path})
            # Fidelity is always measured against the undefended victim; the attacker sees the
            # defended one (faststeal.defenses).
            from .defenses import build_defense, query_until_refused

            defense = build_defense(config.defense, **config.defense_params)
            served, kind = defense.wrap_victim(victim)
            # every answer is journaled in the run folder before it is used: a rerun asks the
            # victim only for images it never answered (the budget is spent once, ever)
            journal = os.path.join(config.out, ANSWER_JOURNAL)
            oracle_kw = dict(
                output_mode=config.output_mode,
                k=config.topk if config.output_mode == "topk" else 1,
                temperature=config.temperature, decimals=config.decimals, device=dev,
                victim_outputs=kind, probs_atol=defense.probs_atol(splits.num_classes),
                journal=journal, journal_key={"victim": os.path.basename(vic.cache_path or ""),
                                              "defense": defense.name,
                                              "defense_params": defense.params()})
            try:
                oracle = Oracle(served, splits.pool.x, config.budget, **oracle_kw)
            except JournalError:  # answers of another victim/pool/mode
                if not config.force:
                    raise
                log(f"--force: moved the answer journal of another configuration to "
                    f"{set_aside(journal)}")
                oracle = Oracle(served, splits.pool.x, config.budget, **oracle_kw)
            oracle = defense.wrap_oracle(oracle)
            if oracle.answered_from_journal:
                log(f"{oracle.answered_from_journal} answers ({oracle.used} images charged) "
                    f"loaded from {journal}; only images it lacks go to the victim")
            answered, targets, refused = query_until_refused(oracle, idx)
            if refused:
                log(f"defense {config.defense!r} refused after {len(answered)} answered queries; "
                    "training on what was answered")
            idx = answered
            oracle.save_log(os.path.join(config.out, "query_log.json"))
            store.set_meta("queries", {"used": oracle.used, "budget": oracle.budget,
                                       "output_mode": config.output_mode,
                                       "defense": config.defense, "refused": refused,
                                       "defense_params": defense.params()})
            log(f"queried {oracle.used} images ({config.output_mode} answers)")
        targets = distributed.broadcast_tensor(ctx, targets).to(dev)
        idx = distributed.broadcast_tensor(ctx, idx if ctx.is_main else None).cpu()
        timing["query_s"] = time.perf_counter() - t0

        x = splits.pool.x[idx].to(dev)
        test_x, test_y = splits.test.x.to(dev), splits.test.y.to(dev)
        vprobs = attack.victim_outputs(victim, test_x)
        attack.check_labels("test labels", test_y, vprobs.shape[-1])
        vlabels = vprobs.argmax(-1)
        g = torch.Generator().manual_seed(config.split_seed + 2)
        probe = test_x[torch.randperm(len(test_x), generator=g)[:config.probe_size].to(dev)]
        kl_probs = vprobs if config.output_mode in ("probs", "logits") else None

        cells = [("main", m, s, None) for m in methods for s in range(config.seeds)]
        sweep = [("sweep", config.sweep_method, s, k) for k in config.member_sweep
                 for s in range(config.sweep_seeds)] if config.member_sweep else []
        common = dict(test_x=test_x, test_y=test_y, victim_labels=vlabels, victim_probs=kl_probs,
                      num_classes=splits.num_classes, epochs=config.epochs,
                      batch_size=config.batch_size, lr=config.lr, device=dev, progress=progress)
        todo = [c for c in cells + sweep if not store.has_cell(cell_id(*c))]
        if ctx.is_main:  # checkpoints of cells committed just before a kill
            for c in cells + sweep:
                if c not in todo:
                    attack.remove_checkpoints(cell_checkpoint(config.out, cell_id(*c)))
        distributed.barrier(ctx)  # every rank sees the same todo list before anyone writes
        if len(todo) < len(cells) + len(sweep):
            log(f"resuming: {len(cells) + len(sweep) - len(todo)} finished cells kept, "
                f"{len(todo)} to run")
        shardable = {"deep-ensemble"} if (config.shard_members and ctx.enabled) else set()
        from .methods import METHODS

        def ensemble_size(c):  # an ensemble smaller than the world is trained by one rank
            return c[3] or config.method_params.get(c[1], {}).get(
                "members", METHODS[c[1]].DEFAULTS.get("members", 1))

        collective = [c for c in todo
                      if c[1] in shardable and distributed.can_shard(ctx, ensemble_size(c))]
        mine = collective + distributed.my_cells(ctx, [c for c in todo if c not in collective])
        committed_elsewhere = []  # this rank's checkpoints of collective cells rank 0 commits
        from .progress import progress_bar

        for kind, method, seed, members in progress_bar(mine, desc="cells", unit="cell",
                                                        disable=not progress):
            hp = dict(config.method_params.get(method, {}))
            if members is not None:
                hp["members"] = members
                main = [c for c in store.cells("main") if c["method"] == method
                        and c["seed"] == seed and c["members"] == members]
                if main and not ctx.enabled:
                    # the same training as the main cell (same seed, same hyperparameters):
                    # reuse its result instead of training it again
                    c = main[0]
                    store.add_cell(cell_id(kind, method, seed, members), kind=kind, method=method,
                                   seed=seed, members=members, metrics=c["metrics"],
                                   hparams=c["hparams"], seconds=0.0)
                    log(f"{method} (seed {seed}, S={members}): reused the main cell")
                    continue
            gather = None
            if (kind, method, seed, members) in collective:
                hp["member_range"] = distributed.member_shard(ctx, ensemble_size(
                    (kind, method, seed, members)))
                gather = lambda t: distributed.all_gather_members(ctx, t)  # noqa: E731
            ckpt = cell_checkpoint(config.out, cell_id(kind, method, seed, members))
            train = dict(probe=probe if kind == "main" else None,
                         record_every=config.record_every, hparams=hp, gather=gather,
                         member_chunk=config.member_chunk, checkpoint=ckpt, log=_log,
                         keep_model=config.save_models, **common)
            try:
                r = attack.train_and_evaluate(method, config.surrogate_arch, x, targets,
                                              seed=seed, **train)
            except CheckpointError as exc:  # stale (another configuration) or unreadable
                _log(f"{exc}; discarding the cell's checkpoints and training it from the start")
                attack.remove_checkpoints(ckpt)
                r = attack.train_and_evaluate(method, config.surrogate_arch, x, targets,
                                              seed=seed, **train)
            if gather is not None and not ctx.is_main:
                committed_elsewhere.append(ckpt)
                continue  # rank 0 writes the collective cell
            store.add_cell(cell_id(kind, method, seed, members), kind=kind, method=method,
                           seed=seed, members=r["hparams"]["num_members"], metrics=r["metrics"],
                           hparams=r["hparams"], seconds=r["seconds"], trace=r["trace"])
            attack.remove_checkpoints(ckpt)  # the row is committed: the cell is safe
            if r.get("stolen") is not None:  # --save-models
                r["stolen"].save(os.path.join(config.out, "models", cell_id(
                    kind, method, seed, members).replace("/", "_") + ".pt"))
            timing[f"{kind}:{method}:s{seed}" + (f":S{members}" if members else "")] = r["seconds"]
            m = r["metrics"]
            _log(f"{method} (seed {seed}{', S=' + str(members) if members else ''}"
                 f"{', rank ' + str(ctx.rank) if ctx.enabled else ''}): fidelity "
                 f"{100 * m['fidelity']:.2f}%, accuracy {100 * m['accuracy']:.2f}%, "
                 f"V {m['variance']:.2e} [{r['seconds']:.1f}s]")
            if ctx.is_main:
                write_report(config.out, store, with_figures=False)
        distributed.barrier(ctx)  # rank 0 has committed every collective cell
        for ckpt in committed_elsewhere:
            attack.remove_checkpoints(ckpt)
        distributed.barrier(ctx)
        if ctx.is_main:
            try:
                os.rmdir(os.path.join(config.out, CHECKPOINT_DIR))
            except OSError:  # absent, or holds files of another run's cells
                pass
        timing["total_s"] = time.perf_counter() - t_start
        summary = {}
        if ctx.is_main:
            store.set_meta("run", {"timing": timing, "machine": platform.platform(),
                                   "processor": platform.processor(), "torch": torch.__version__,
                                   "threads": torch.get_num_threads(), "device": str(dev),
                                   "world_size": ctx.world_size})
            summary = write_report(config.out, store)
            summary["timing"] = timing
            with open(os.path.join(config.out, "timing.json"), "w") as fh:
                json.dump(timing, fh, indent=2)
        failed = False
        return summary
    finally:
        store.close()
        distributed.shutdown(ctx, failed=failed)


def cell_id(kind: str, method: str, seed: int, members: Optional[int]) -> str:
    return f"{kind}/{method}/seed={seed}" + (f"/S={members}" if members is not None else "")


#: the oracle's answer journal in the run folder (:class:`faststeal.oracle.AnswerJournal`)
ANSWER_JOURNAL = "answers.journal"

#: sub-folder of the run folder holding the training checkpoints of unfinished cells
CHECKPOINT_DIR = "checkpoints"


def cell_checkpoint(out: str, cell: str) -> str:
    """``OUT/checkpoints/<cell id with '/' as '__'>.pt``: the per-epoch training checkpoint of a
    cell (member blocks add ``.members<a>-<b>``, :func:`faststeal.attack.member_checkpoint`)."""
    return os.path.join(out, CHECKPOINT_DIR, cell.replace("/", "__") + ".pt")
