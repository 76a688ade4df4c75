"""The one experiment runner: settings → cells → run each cell → one SQLite store → report.

Every study (the five-method comparison, active stealing, diversity, defences) is a subclass of
:class:`Study`: it validates its settings, lists its cells, runs one cell from the shared set-up,
and summarises the store into a table (and figures). :func:`run_study` owns everything the
studies share, in this order:

1. validate the settings and the ``out`` folder (a file, or a folder that cannot be created or
   written, is an error) — nothing is written yet;
2. load the data and let the study check it (e.g. a budget larger than the attacker pool) —
   still nothing written, so a rejected configuration leaves ``out`` as it was;
3. create ``out``, take an exclusive lock on it (``out/.faststeal.lock``; a second run on the
   same folder stops with the PID that holds it) and open ``out/results.sqlite`` (a folder
   holding another configuration's cells is refused unless ``force``);
4. train or load the victim (pinned: a folder whose cells were computed against another victim
   checkpoint is refused too), compute its test-set outputs and the probe set, and let the study
   do its one-off work (:meth:`Study.begin`, e.g. spend the query budget once); every oracle
   a study asks for (:meth:`Run.oracle`) journals its answers in ``out`` (``answers.journal``,
   ``answers/<name>.journal``), so a rerun re-queries nothing;
5. run every cell not yet in the store: per-epoch training checkpoints under
   ``out/checkpoints/`` (a killed run resumes the cell in progress), one atomic row per finished
   cell, the cell's checkpoints deleted once its row is committed, the tables rewritten after
   every cell and the figures at most once a minute; cells are dealt to ranks under
   ``torch.distributed``;
6. write the tables (``results.json``, ``results.md``, study extras) and the figures.

``write_report(dir)`` rebuilds step 6 from the store alone, for any study
(``faststeal report DIR``).
"""

from __future__ import annotations

import abc
import errno
import fcntl
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence

import torch

from ..files import atomic_write
from ..info import code_version
from ..models.surrogate import SurrogateLike

#: sub-folder of the run folder holding the training checkpoints of unfinished cells
CHECKPOINT_DIR = "checkpoints"
#: the answer journal of a study's oracle (:class:`faststeal.oracle.AnswerJournal`); a study with
#: several oracles keeps one journal per oracle in ``JOURNAL_DIR``
ANSWER_JOURNAL = "answers.journal"
JOURNAL_DIR = "answers"
LOCK_NAME = ".faststeal.lock"
#: during a run, the figures are redrawn after a cell when this many seconds have passed since
#: the last drawing (tables are rewritten after every cell; both once more at the end)
FIGURES_EVERY_S = 60.0


def log(msg: str) -> None:
    print(f"[faststeal] {msg}", flush=True)


def _quiet(msg: str) -> None:
    pass


# ------------------------------------------------------------------------------ cells

@dataclass(frozen=True)
class Cell:
    """One unit of work: ``key`` is its id in the store; the rest is stored with its row.
    ``params`` carries what the study needs to run it (not stored)."""

    key: str
    kind: str
    method: str
    seed: int
    members: Optional[int] = None
    params: dict = field(default_factory=dict, compare=False, hash=False)


def journal_path(out: str, name: Optional[str] = None) -> str:
    """``OUT/answers.journal`` (``name`` None) or ``OUT/answers/<name with '/' as '__'>.journal``:
    the answer journal of a study's oracle."""
    if name is None:
        return os.path.join(out, ANSWER_JOURNAL)
    return os.path.join(out, JOURNAL_DIR, name.replace("/", "__") + ".journal")


def cell_checkpoint(out: str, key: str) -> str:
    """``OUT/checkpoints/<cell key with '/' as '__'>.pt``: the per-epoch training checkpoint of a
    cell (member blocks add ``.members<a>-<b>``, :func:`faststeal.attack.member_checkpoint`)."""
    return os.path.join(out, CHECKPOINT_DIR, key.replace("/", "__") + ".pt")


# ------------------------------------------------------------------------------ shared set-up

@dataclass
class Setup:
    """The experimenter's side, shared by every cell: data, victim, evaluation tensors.

    victim_probs / victim_labels: the (undefended) victim on ``test_x``; probe: a fixed random
    subset of the test set (``probe_size`` images, seeded by ``split_seed + 2``) for the
    diversity traces."""

    splits: Any
    victim: torch.nn.Module
    victim_info: dict[str, Any]
    test_x: torch.Tensor
    test_y: torch.Tensor
    victim_probs: torch.Tensor
    victim_labels: torch.Tensor
    probe: torch.Tensor
    device: str

    @property
    def num_classes(self) -> int:
        return int(self.splits.num_classes)


@dataclass
class Run:
    """What a study's hooks see while the runner runs it."""

    study: "Study"
    out: str
    store: Any
    ctx: Any
    device: str
    progress: bool
    setup: Optional[Setup] = None
    timing: dict[str, float] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)  # the study's own (begin → cells)

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    def log(self, msg: str) -> None:
        if self.ctx.is_main:
            log(msg)

    def checkpoint(self, cell: Cell) -> str:
        return cell_checkpoint(self.out, cell.key)

    def oracle(self, victim: Any, budget: int, *, name: Optional[str] = None,
               key: Optional[dict[str, Any]] = None, **kwargs: Any) -> Any:
        """A :class:`faststeal.oracle.Oracle` on the attacker pool whose answers are journaled in
        the run folder (:func:`journal_path` of ``name``) before they are used, so a rerun asks
        ``victim`` only for images it never answered: the budget is spent once, ever.

        The journal is keyed by the victim checkpoint, the pool, the output settings and
        ``key`` (what else decides the answers or the queries, e.g. a defence); a journal of
        another identity raises :class:`faststeal.oracle.JournalError`, or with ``force`` is set
        aside (renamed, never deleted) and a new one started. ``kwargs`` go to ``Oracle``.
        One process per journal: under ranks, rank 0 asks and broadcasts, or every rank owns
        its own names."""
        from ..oracle import JournalError, Oracle, set_aside

        path = journal_path(self.out, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if self.setup is None:
            raise RuntimeError("internal error: an oracle is asked for before the set-up")
        victim_file = os.path.basename(self.setup.victim_info.get("checkpoint") or "")
        kw = dict(device=self.device, **kwargs, journal=path,
                  journal_key={"victim": victim_file, **(key or {})})
        pool = self.setup.splits.pool.x
        try:
            oracle = Oracle(victim, pool, budget, **kw)
        except JournalError:  # the answers of another victim, pool, mode or key
            if not self.study.settings.force:
                raise
            self.log(f"--force: moved the answer journal of another configuration to "
                     f"{set_aside(path)}")
            oracle = Oracle(victim, pool, budget, **kw)
        if oracle.answered_from_journal:
            self.log(f"{oracle.answered_from_journal} answers ({oracle.used} images charged) "
                     f"loaded from {path}; only images it lacks go to the victim")
        return oracle


# ------------------------------------------------------------------------------ settings

@dataclass
class StudySettings:
    """Settings every study beyond the comparison shares: the set-up (data and victim), the
    surrogate and its training, and the run fields (``out``, ``device``, ``cache_dir``,
    ``progress``, ``force``: not hashed into the store)."""

    dataset: str = "fashion-mnist"
    data_root: Optional[str] = None
    download: bool = False  # let torchvision fetch a missing dataset (mnist, cifar10, fashion)
    victim_arch: str = "lenet"
    victim_epochs: Optional[int] = None  # None: faststeal.victim.DEFAULT_EPOCHS[victim_arch]
    victim_fraction: float = 0.5
    split_seed: int = 0
    max_test: Optional[int] = None  # the first N test images only (saves CPU)
    probe_size: int = 1000
    # the surrogates' architecture: a zoo name, "torchvision:NAME", "module.path:factory", an
    # nn.Module template or a zero-argument factory (hashed by faststeal.models.surrogate_key)
    arch: SurrogateLike = "mlp"
    seeds: int = 3
    members: int = 5
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    output_mode: str = "label"
    out: str = "runs/study"
    device: str = "cpu"
    cache_dir: Optional[str] = None
    progress: bool = True
    force: bool = False

    RUN_FIELDS: ClassVar[tuple[str, ...]] = ("out", "device", "cache_dir", "progress", "force",
                                             "download")
    #: ``faststeal study NAME --quick``: a smoke-test scale (minutes on a CPU)
    QUICK: ClassVar[dict[str, Any]] = {"seeds": 1, "epochs": 2, "members": 3, "max_test": 1000,
                                       "probe_size": 256}

    def validate(self) -> "StudySettings":
        """Raise ValueError/TypeError naming the field before anything runs."""
        from ..checks import positive_int
        from ..data import DATASETS
        from ..models import ARCHS, check_surrogate
        from ..oracle import OUTPUT_MODES

        def choice(name: str, value: Any, valid: Sequence[str]) -> None:
            if not isinstance(value, str) or value not in valid:
                raise ValueError(f"{name} must be one of {tuple(valid)}, got {value!r}")

        choice("dataset", self.dataset, DATASETS)
        choice("victim_arch", self.victim_arch, ARCHS)
        check_surrogate(self.arch, "arch")
        choice("output_mode", self.output_mode, OUTPUT_MODES)
        for name in ("seeds", "members", "epochs", "batch_size", "probe_size"):
            positive_int(name, getattr(self, name))
        positive_int("victim_epochs", self.victim_epochs, allow_none=True)
        positive_int("max_test", self.max_test, allow_none=True)
        positive_int("split_seed", self.split_seed, minimum=0)
        for name in ("victim_fraction", "lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(v).__name__} ({v!r})")
            if not math.isfinite(v):
                raise ValueError(f"{name} must be finite, got {v!r}")
        if not 0.0 < self.victim_fraction < 1.0:
            raise ValueError(f"victim_fraction must be in (0, 1), got {self.victim_fraction}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        dev = str(self.device)
        if not (dev == "cpu" or dev.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {dev!r}")
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {dev!r} requested but CUDA is not available; use cpu")
        return self

    def result_affecting(self) -> dict[str, Any]:
        """The fields hashed into the store (everything but the run fields); an in-memory
        surrogate appears as its :func:`faststeal.models.surrogate_key`."""
        from ..models import asdict_keyed

        d = asdict_keyed(self, "arch")
        for k in self.RUN_FIELDS:
            d.pop(k)
        return json.loads(json.dumps(d, default=list))  # tuples -> lists: one canonical form

    def members_for(self, method: str) -> dict[str, Any]:
        """``{"members": self.members}`` for methods with a member count, else ``{}``."""
        from ..methods import method_class

        return {"members": self.members} if "members" in method_class(method).DEFAULTS else {}


# ------------------------------------------------------------------------------ the interface

class Study(abc.ABC):
    """A study: settings (a dataclass with ``validate()`` and ``result_affecting()`` and the
    run fields ``out``, ``device``, ``cache_dir``, ``progress``, ``force``, plus the set-up
    fields ``dataset``, ``victim_arch``, ``victim_epochs``, ``split_seed``, ``victim_fraction``
    and optionally ``pool_dataset``, ``data_root``, ``max_test``, ``probe_size``)."""

    #: the name of ``faststeal study NAME`` and of the store's ``study`` meta entry
    name: ClassVar[str] = ""

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    # -- before anything is written ---------------------------------------------------------
    def validate(self) -> None:
        self.settings.validate()

    def result_affecting(self) -> dict[str, Any]:
        return self.settings.result_affecting()

    def check_splits(self, splits: Any) -> None:
        """Reject data the settings cannot use (called before the folder is touched)."""

    # -- the work -----------------------------------------------------------------------------
    def begin(self, run: Run) -> None:
        """One-off work after the set-up, before the cells (e.g. spend the query budget)."""

    @abc.abstractmethod
    def cells(self, run: Run) -> list[Cell]:
        """Every cell of the study, in run order."""

    def assign(self, run: Run, todo: list[Cell]) -> list[Cell]:
        """This rank's share of the unfinished cells (default: round-robin)."""
        from .. import distributed

        return distributed.my_cells(run.ctx, todo)

    def reuse(self, run: Run, cell: Cell) -> Optional[dict[str, Any]]:
        """A result for ``cell`` that needs no training (e.g. equal to another stored cell)."""
        return None

    @abc.abstractmethod
    def run_cell(self, run: Run, cell: Cell, checkpoint: str) -> Optional[dict[str, Any]]:
        """Run one cell; returns ``{"metrics", "hparams", "seconds"}`` and optionally
        ``"trace"``, ``"payload"`` and ``"members"``, or None when another rank commits it.
        ``checkpoint``: the path for the per-epoch training checkpoints of this cell."""

    def describe(self, cell: Cell, result: dict[str, Any]) -> str:
        m = result["metrics"]
        return (f"{cell.key}: fidelity {100 * m['fidelity']:.2f}% "
                f"[{result['seconds']:.1f}s]")

    # -- reporting (from the store alone) ---------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def summarise(cls, store: Any) -> dict[str, Any]:
        """The study's results (``results.json``) from its store."""

    @classmethod
    @abc.abstractmethod
    def markdown(cls, summary: dict[str, Any]) -> str:
        """``results.md``."""

    @classmethod
    def extra_files(cls, summary: dict[str, Any], directory: str) -> None:
        """Other exports next to results.json (e.g. the comparison's results.csv)."""

    @classmethod
    def figures(cls, store: Any, summary: dict[str, Any], directory: str) -> list[str]:
        return []


#: name -> Study subclass; filled by :mod:`faststeal.runs` (``faststeal study NAME``)
STUDIES: dict[str, type[Study]] = {}


def register(cls: type[Study]) -> type[Study]:
    STUDIES[cls.name] = cls
    return cls


# ------------------------------------------------------------------------------ the run folder

class RunFolderError(ValueError):
    """The run folder cannot be used (a file, not writable, or locked by another run)."""


def check_out(out: str) -> None:
    """Raise :class:`RunFolderError` when ``out`` is a file, or a folder that does not exist and
    cannot be created (a parent is a file or not writable), or exists but is not writable.
    Writes nothing."""
    if not isinstance(out, (str, os.PathLike)) or not str(out):
        raise RunFolderError(f"--out must be a folder path, got {out!r}")
    path = os.path.abspath(os.fspath(out))
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise RunFolderError(f"--out {out!r} is a file, not a folder; choose a folder path")
        if not os.access(path, os.W_OK | os.X_OK):
            raise RunFolderError(f"--out {out!r} is not writable; choose another folder")
        return
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise RunFolderError(f"--out {out!r} cannot be created: {parent!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunFolderError(f"--out {out!r} cannot be created: {parent!r} is not writable")


class FolderLock:
    """An exclusive ``flock`` on ``out/.faststeal.lock`` held for the whole run; the file holds
    the owner's PID (for the error message of the second run). The kernel drops the lock when
    the process dies, so a killed run never leaves a stale lock."""

    def __init__(self, out: str) -> None:
        self.path = os.path.join(out, LOCK_NAME)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(self.fd)
                raise
            try:
                pid = os.pread(self.fd, 64, 0).decode().strip() or "unknown"
            finally:
                os.close(self.fd)
            raise RunFolderError(
                f"another faststeal run (PID {pid}) is using {out!r}; wait for it to finish or "
                "choose another --out") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _open_folder(out: str) -> FolderLock:
    try:
        os.makedirs(out, exist_ok=True)
        return FolderLock(out)
    except RunFolderError:
        raise
    except OSError as exc:
        raise RunFolderError(f"--out {out!r} cannot be used: {exc.strerror or exc}") from None


# ------------------------------------------------------------------------------ the loop

def run_study(study: Study) -> dict[str, Any]:
    """Run (or resume) ``study``; returns its summary (empty on ranks other than 0)."""
    from .. import attack, distributed
    from ..methods.checkpoint import CheckpointError
    from ..results import ResultStore

    s = study.settings
    study.validate()
    out = os.fspath(s.out)
    check_out(out)
    ctx = distributed.init(s.device)
    dev = str(s.device)
    if ctx.enabled and dev == "cuda":
        dev = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if dev.startswith("cuda"):
        # bit-reproducible convolutions (cuDNN backward uses atomics otherwise)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    say = log if ctx.is_main else _quiet
    progress = bool(s.progress) and ctx.is_main
    t_start = time.perf_counter()
    lock: Optional[FolderLock] = None
    store = None
    failed = True  # until the run returns: a failing rank must not wait in the final barrier
    try:
        t0 = time.perf_counter()
        splits = load_splits(s)
        timing = {"data_s": time.perf_counter() - t0}
        say(f"data: {splits.name}, victim-train {len(splits.victim_train)}, pool "
            f"{len(splits.pool)}, test {len(splits.test)}, input {splits.input_shape}")
        study.check_splits(splits)
        # -- from here on the folder is written ------------------------------------------------
        if ctx.is_main:
            lock = _open_folder(out)
            store = ResultStore(out, study.result_affecting(), force=s.force)
            store.set_meta("study", study.name)
        distributed.barrier(ctx)
        if not ctx.is_main:
            store = ResultStore(out, study.result_affecting())
        run = Run(study, out, store, ctx, dev, progress, timing=timing)
        run.setup = prepare_setup(run, splits)
        study.begin(run)
        cells = study.cells(run)
        keys = [c.key for c in cells]
        if len(set(keys)) != len(keys):
            raise RuntimeError(f"internal error: study {study.name!r} lists a cell twice")
        todo = [c for c in cells if not store.has_cell(c.key)]
        if ctx.is_main:  # checkpoints of cells committed just before a kill
            for c in cells:
                if c not in todo:
                    attack.remove_checkpoints(run.checkpoint(c))
        distributed.barrier(ctx)  # every rank sees the same todo list before anyone writes
        if len(todo) < len(cells):
            say(f"resuming: {len(cells) - len(todo)} finished cells kept, {len(todo)} to run")
        committed_elsewhere = []  # this rank's checkpoints of collective cells rank 0 commits
        last_figures = time.perf_counter()
        from ..progress import progress_bar

        for cell in progress_bar(study.assign(run, todo), desc="cells", unit="cell",
                                 disable=not progress):
            reused = study.reuse(run, cell)
            if reused is not None:
                _commit(store, cell, {**reused, "seconds": 0.0})
                say(f"{cell.key}: reused the equal cell {reused['reused_from']}")
                continue
            ckpt = run.checkpoint(cell)
            try:
                r = study.run_cell(run, cell, ckpt)
            except CheckpointError as exc:  # stale (another configuration) or unreadable
                log(f"{exc}; discarding the cell's checkpoints and training it from the start")
                attack.remove_checkpoints(ckpt)
                r = study.run_cell(run, cell, ckpt)
            if r is None:
                committed_elsewhere.append(ckpt)
                continue
            _commit(store, cell, r)
            attack.remove_checkpoints(ckpt)  # the row is committed: the cell is safe
            timing[f"cell:{cell.key}"] = r["seconds"]
            log(study.describe(cell, r) + (f" (rank {ctx.rank})" if ctx.enabled else ""))
            if ctx.is_main:  # tables after every cell; figures at most once a minute
                figures = time.perf_counter() - last_figures >= FIGURES_EVERY_S
                write_report(out, store, with_figures=figures)
                if figures:
                    last_figures = time.perf_counter()
        distributed.barrier(ctx)  # rank 0 has committed every collective cell
        for ckpt in committed_elsewhere:
            attack.remove_checkpoints(ckpt)
        distributed.barrier(ctx)
        summary: dict[str, Any] = {}
        if ctx.is_main:
            try:
                os.rmdir(os.path.join(out, CHECKPOINT_DIR))
            except OSError:  # absent, or holds files of another run's cells
                pass
            timing["total_s"] = time.perf_counter() - t_start
            store.set_meta("run", {"timing": timing, **machine_info(dev),
                                   "world_size": ctx.world_size})
            summary = write_report(out, store)
            summary["timing"] = timing
            atomic_write(os.path.join(out, "timing.json"), json.dumps(timing, indent=2))
        failed = False
        return summary
    finally:
        if store is not None:
            store.close()
        if lock is not None:
            lock.release()
        distributed.shutdown(ctx, failed=failed)


def _commit(store: Any, cell: Cell, r: dict[str, Any]) -> None:
    members = r.get("members", cell.members)
    store.add_cell(cell.key, kind=cell.kind, method=cell.method, seed=cell.seed,
                   members=members, metrics=r["metrics"], hparams=r.get("hparams", {}),
                   seconds=r["seconds"], trace=r.get("trace", ()), payload=r.get("payload"))


def check_surrogate_fits(spec: Any, splits: Any) -> None:
    """Resolve the surrogate setting ``spec`` for the data of ``splits``: a non-zoo model runs
    once on two zero inputs of the data's shape, so one that cannot take them (or returns the
    wrong class count) fails before the victim is trained or queried."""
    from ..models import resolve_surrogate

    resolve_surrogate(spec, tuple(splits.input_shape), splits.num_classes)


def load_splits(s: Any) -> Any:
    """The data of settings ``s`` (no victim, nothing written)."""
    from ..data import make_splits

    return make_splits(s.dataset, seed=s.split_seed, victim_fraction=s.victim_fraction,
                       pool_dataset=getattr(s, "pool_dataset", None),
                       root=getattr(s, "data_root", None), max_test=getattr(s, "max_test", None),
                       download=getattr(s, "download", False))


def prepare_setup(run: Run, splits: Any) -> Setup:
    """Train or load the victim (rank 0 first, the others load its checkpoint), pin it in the
    store, and compute its test-set outputs and the probe set."""
    from .. import distributed
    from ..attack import check_labels, victim_outputs
    from ..victim import train_victim

    s, ctx = run.study.settings, run.ctx
    t0 = time.perf_counter()
    vic = None
    for turn in (0, 1):
        if (turn == 0) == ctx.is_main:
            vic = train_victim(splits, s.victim_arch, seed=s.split_seed, epochs=s.victim_epochs,
                               device=run.device, cache_dir=s.cache_dir, progress=run.progress)
        distributed.barrier(ctx)
    run.timing["victim_s"] = time.perf_counter() - t0
    run.log(f"victim {s.victim_arch}: test accuracy {100 * vic.test_accuracy:.2f}% "
            f"({'trained' if vic.trained else 'loaded from cache'} in "
            f"{run.timing['victim_s']:.1f}s)")
    info = {"arch": s.victim_arch, "dataset": s.dataset, "test_accuracy": vic.test_accuracy,
            "checkpoint": vic.cache_path}
    if run.is_main:
        _pin_victim(run.store, info, force=s.force)
        run.store.set_meta("victim", info)
    victim = vic.model.to(run.device)
    test_x, test_y = splits.test.x.to(run.device), splits.test.y.to(run.device)
    vprobs = victim_outputs(victim, test_x)
    check_labels("test labels", test_y, vprobs.shape[-1])
    g = torch.Generator().manual_seed(s.split_seed + 2)
    probe_size = getattr(s, "probe_size", 512)
    probe = test_x[torch.randperm(len(test_x), generator=g)[:probe_size].to(run.device)]
    return Setup(splits, victim, info, test_x, test_y, vprobs, vprobs.argmax(-1), probe,
                 run.device)


def _pin_victim(store: Any, info: dict[str, Any], force: bool) -> None:
    """Cells computed against different victims are never mixed: a store whose cells came from
    another victim checkpoint is refused (or, with ``force``, emptied)."""
    from ..results.store import StoreMismatchError

    old = (store.get_meta("victim") or {}).get("checkpoint")
    new = info.get("checkpoint")
    if not (old and new) or os.path.basename(old) == os.path.basename(new):
        return
    if not store.cells():
        return
    if not force:
        raise StoreMismatchError(
            f"{store.path} holds cells computed against another victim ({os.path.basename(old)};"
            f" this run's is {os.path.basename(new)}); pin the victim with --victim-epochs, use "
            "another --out, or --force to discard them")
    store.clear()


def machine_info(device: str) -> dict[str, Any]:
    dev = torch.device(device)
    info = {"machine": platform.platform(), "processor": platform.processor() or
            platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": str(dev), **code_version()}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


# ------------------------------------------------------------------------------ reports

def study_of(store: Any) -> type[Study]:
    """The Study class that wrote ``store`` (folders from before studies: the comparison)."""
    import faststeal.runs  # noqa: F401  (importing the package registers every study)

    name = store.get_meta("study") or "comparison"
    if name not in STUDIES:
        raise ValueError(f"{store.path} was written by study {name!r}, which this faststeal does "
                         f"not know (known: {', '.join(STUDIES)})")
    return STUDIES[name]


def write_report(directory: str, store: Any = None, with_figures: bool = True) -> dict[str, Any]:
    """Rebuild ``results.json``, ``results.md`` (and the study's extra files and figures) in
    ``directory`` from its database; works for every study."""
    from ..results import ResultStore

    own = store is None
    if own:
        if not os.path.exists(os.path.join(directory, "results.sqlite")):
            raise FileNotFoundError(f"no results.sqlite in {directory!r}: not a faststeal run "
                                    "folder")
        store = ResultStore(directory)
    try:
        cls = study_of(store)
        summary = cls.summarise(store)
        atomic_write(os.path.join(directory, "results.json"),
                     json.dumps(summary, indent=2, default=json_default))
        cls.extra_files(summary, directory)
        atomic_write(os.path.join(directory, "results.md"), cls.markdown(summary))
        if with_figures:
            summary["figures"] = cls.figures(store, summary, directory)
        return summary
    finally:
        if own:
            store.close()


def json_default(o: Any) -> Any:
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    if isinstance(o, (tuple, set)):
        return list(o)
    return str(o)


# ------------------------------------------------------------------------------ small helpers

def mean_std(values: Sequence[Optional[float]]) -> dict[str, Any]:
    """``{"mean", "std", "n"}`` of the finite values (sample std; 0 for n = 1; NaN for n = 0)."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(v)}


def fmt(s: Optional[dict[str, Any]], pct: bool = True, digits: int = 2) -> str:
    """``mean ± std`` (× 100 with ``pct``); the std only when n > 1; ``–`` when empty."""
    if not s or s.get("n", 0) == 0 or s["mean"] is None or not math.isfinite(s["mean"]):
        return "–"
    k = 100.0 if pct else 1.0
    if s["n"] > 1:
        return f"{k * s['mean']:.{digits}f} ± {k * s['std']:.{digits}f}"
    return f"{k * s['mean']:.{digits}f}"

