"""The stealing comparison (``faststeal run``): the paper's five UQ methods and the baseline.

``run_comparison(Config(...))`` runs :class:`ComparisonStudy` on the one runner
(:mod:`faststeal.runs.runner`): it trains (or loads) the victim, spends the query budget once
through the oracle (random queries from the attacker pool), then trains the baseline and every
requested method for every seed on exactly that queried set with the same epochs and batch size,
and evaluates them on the held-out test set. Cells: ``main/<method>/seed=<k>`` (with the
diversity trace on the probe set) and the member sweep ``sweep/<method>/seed=<k>/S=<S>``. Each
finished cell is one row of ``OUT/results.sqlite``; the tables are rebuilt after every cell and
the figures at the end, so a rerun of the same command resumes (a killed cell from its last
finished epoch, with the same result as an uninterrupted run).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch

from ..checks import positive_int
from ..methods import METHODS, PAPER_METHODS, check_hparams, parse_methods
from ..models.surrogate import SurrogateLike
from ..oracle import OUTPUT_MODES
from .runner import Cell, Run, Study, check_surrogate_fits, register, run_study


# Presets. "default" is the main job (README's first command): the whole comparison on
# Fashion-MNIST in under 10 minutes on a 2-core CPU (see docs/results.md for the measured time).
PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(budget=2000, seeds=1, epochs=3, member_sweep=(1, 2), probe_size=256),
    "default": dict(budget=10000, seeds=3, epochs=8, member_sweep=(1, 2, 5, 10),
                    probe_size=512),
    "full": dict(budget=20000, seeds=5, epochs=20, victim_arch="cnn-wide", surrogate_arch="lenet",
                 member_sweep=(1, 2, 5, 10), sweep_seeds=3, probe_size=1000),
}


@dataclass
class Config:
    """Everything that defines a comparison run (validated by :meth:`validate`)."""

    dataset: str = "fashion-mnist"
    pool_dataset: Optional[str] = None
    data_root: Optional[str] = None
    download: bool = False  # let torchvision fetch a missing dataset (mnist, cifar10, fashion)
    victim_arch: str = "lenet"
    # a zoo name, "torchvision:NAME", "module.path:factory", an nn.Module template or a
    # zero-argument factory (faststeal.models.resolve_surrogate); an in-memory model is hashed
    # into the store by faststeal.models.surrogate_key
    surrogate_arch: SurrogateLike = "mlp"
    victim_epochs: Optional[int] = None  # None: faststeal.victim.DEFAULT_EPOCHS[victim_arch]
    victim_fraction: float = 0.5
    budget: int = 10000
    output_mode: str = "label"
    topk: int = 3
    temperature: float = 1.0
    decimals: Optional[int] = None
    methods: Sequence[str] = PAPER_METHODS
    seeds: int = 3
    epochs: int = 8
    batch_size: int = 128
    lr: float = 1e-3
    member_sweep: Sequence[int] = (1, 2, 5, 10)
    sweep_method: str = "deep-ensemble"
    sweep_seeds: int = 1
    probe_size: int = 512
    # optimizer steps between diversity-trace records; None: about attack.TRACE_POINTS points
    # per fit (recording only reads the members: the training is the same either way)
    record_every: Optional[int] = None
    split_seed: int = 0
    # out-of-distribution set of the OOD AUROCs: a registry name, None (no OOD metrics) or
    # "auto" (faststeal.data.DEFAULT_OOD: MNIST-5k for Fashion-MNIST, none for digits)
    ood_dataset: Optional[str] = "auto"
    method_params: dict = field(default_factory=dict)
    shard_members: bool = False
    member_chunk: Union[int, str, None] = None  # Deep Ensemble members per block, or "auto"
    precision: str = "fp32"  # "bf16": bfloat16 compute, float32 weights/optimizer/loss
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
        from ..data import DATASET_INFO

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
        from ..data import DATASETS
        from ..models import ARCHS

        def choice(name, value, valid, where=""):
            if not isinstance(value, str) or value not in valid:
                raise ValueError(f"{name} must be one of {tuple(valid)}, got {value!r}{where}")

        choice("dataset", self.dataset, DATASETS)
        if self.pool_dataset is not None:
            choice("pool_dataset", self.pool_dataset, DATASETS)
        choice("victim_arch", self.victim_arch, ARCHS)
        from ..models import check_surrogate

        check_surrogate(self.surrogate_arch, "surrogate_arch")
        if self.save_models and not isinstance(self.surrogate_arch, str):
            import pickle

            from ..models import surrogate_label

            try:  # StolenModel.save pickles an in-memory surrogate: fail before any training
                pickle.dumps(self.surrogate_arch)
            except (pickle.PicklingError, AttributeError, TypeError) as exc:
                raise ValueError(
                    f"save_models: surrogate_arch {surrogate_label(self.surrogate_arch)} cannot "
                    f"be saved with the models ({exc}); faststeal.load unpickles it, so define "
                    "its class or factory at the top level of an importable module, or give "
                    "it as 'module.path:factory'") from exc
        choice("output_mode", self.output_mode, OUTPUT_MODES)
        from ..train_step import PRECISIONS

        choice("precision", self.precision, PRECISIONS)
        if self.ood_dataset not in (None, "auto"):
            choice("ood_dataset", self.ood_dataset, DATASETS + ("auto",), " (or None)")
            for what, name in (("dataset", self.dataset), ("pool_dataset", self.pool_dataset)):
                if self.ood_dataset == name:
                    raise ValueError(f"ood_dataset must differ from {what} ({name!r}): its "
                                     "images would not be out of distribution")
        if isinstance(self.methods, str):
            self.methods = parse_methods(self.methods)
        if not isinstance(self.methods, (list, tuple)):
            raise TypeError(f"methods must be a list of method names or a comma-separated "
                            f"string, got {type(self.methods).__name__} ({self.methods!r})")
        if not self.methods:
            raise ValueError("methods must name at least one method")
        for m in self.methods:
            choice("method", m, tuple(METHODS), " (in methods)")
        if self.defense is not None:
            from ..defenses import DEFENSES, OUTPUT_DEFENSES, build_defense

            choice("defense", self.defense, DEFENSES)
            if not isinstance(self.defense_params, dict):
                raise TypeError("defense_params must be a dict")
            build_defense(self.defense, **self.defense_params)  # validates the parameters
            if self.defense in OUTPUT_DEFENSES and self.output_mode == "logits":
                raise ValueError(f"defense {self.defense!r} post-processes probabilities; use "
                                 "output_mode 'probs', 'topk' or 'label', not 'logits'")
        choice("sweep_method", self.sweep_method, tuple(METHODS))
        for name in ("budget", "seeds", "epochs", "batch_size", "probe_size",
                     "record_every", "sweep_seeds", "topk"):
            if name != "record_every" or self.record_every is not None:
                positive_int(name, getattr(self, name))
        if self.victim_epochs is not None:
            positive_int("victim_epochs", self.victim_epochs)
        positive_int("split_seed", self.split_seed, minimum=0)
        if not isinstance(self.member_sweep, (list, tuple)):
            raise TypeError(f"member_sweep must be a list of member counts, got "
                            f"{type(self.member_sweep).__name__} ({self.member_sweep!r})")
        for s in self.member_sweep:
            positive_int("member_sweep entry", s)

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
            positive_int("decimals", self.decimals, minimum=0)
        from ..attack import check_member_chunk

        check_member_chunk(self.member_chunk)
        dev = str(self.device)
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {dev!r} requested but CUDA is not available; use --device "
                             "cpu")
        if not (dev == "cpu" or dev.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {dev!r}")
        if not isinstance(self.method_params, dict):
            raise TypeError(f"method_params must be a dict of per-method dicts, got "
                            f"{type(self.method_params).__name__}")
        for m, hp in self.method_params.items():
            choice("method_params key", m, tuple(METHODS))
            if not isinstance(hp, dict):
                raise TypeError(f"method_params[{m!r}] must be a dict, got {type(hp).__name__}")
            # the values too, now: a bad one must not surface after the victim and a cell
            check_hparams(m, hp, self.surrogate_arch)
        if self.member_sweep:
            if "members" not in METHODS[self.sweep_method].DEFAULTS:
                raise ValueError(f"sweep_method {self.sweep_method!r} has no member count to "
                                 "sweep; use a Deep Ensemble family method or member_sweep=()")
            check_hparams(self.sweep_method, {**self.method_params.get(self.sweep_method, {}),
                                              "members": max(self.member_sweep)},
                          self.surrogate_arch)
        return self

    def resolved_ood_dataset(self) -> Optional[str]:
        """The OOD dataset this run evaluates on (``"auto"`` resolved), or None."""
        if self.ood_dataset != "auto":
            return self.ood_dataset
        from ..data import DEFAULT_OOD

        name = DEFAULT_OOD.get(self.dataset)
        return None if name == self.pool_dataset else name

    def result_affecting(self) -> dict[str, Any]:
        """The fields that change results (hashed into the store); not out/device/progress.
        An in-memory surrogate appears as its :func:`faststeal.models.surrogate_key`."""
        from ..models import asdict_keyed

        d = asdict_keyed(self, "surrogate_arch")
        for k in ("out", "progress", "force", "cache_dir", "preset", "device", "shard_members",
                  "member_chunk", "download", "save_models"):
            d.pop(k)
        if d["precision"] == "fp32":  # keep hashes of float32 runs unchanged
            d.pop("precision")
        if d["defense"] is None:  # keep hashes of runs without a defence unchanged
            d.pop("defense")
            d.pop("defense_params")
        d["methods"] = list(d["methods"])
        d["member_sweep"] = list(d["member_sweep"])
        return d


def cell_id(kind: str, method: str, seed: int, members: Optional[int]) -> str:
    return f"{kind}/{method}/seed={seed}" + (f"/S={members}" if members is not None else "")


@register
class ComparisonStudy(Study):
    """The comparison as a study: main cells (method × seed) and the member sweep."""

    name = "comparison"
    settings: Config

    def check_splits(self, splits: Any) -> None:
        if self.settings.budget > len(splits.pool):
            raise ValueError(f"budget ({self.settings.budget}) is larger than the attacker pool "
                             f"({len(splits.pool)} images)")
        check_surrogate_fits(self.settings.surrogate_arch, splits)

    def begin(self, run: Run) -> None:
        """Ask the oracle once (rank 0) and broadcast the answers: the budget is counted once."""
        from .. import attack, distributed
        from ..defenses import build_defense, query_until_refused

        from ..data import ood_images

        config, setup, ctx = self.settings, run.setup, run.ctx
        ood_name = config.resolved_ood_dataset()
        run.state["ood_x"] = (None if ood_name is None
                              else ood_images(ood_name, setup.splits).to(run.device))
        if ctx.is_main:
            run.store.set_meta("ood", {"dataset": ood_name, "images": 0 if ood_name is None
                                       else len(run.state["ood_x"])})
            run.log("OOD set: " + ("none" if ood_name is None else
                                   f"{ood_name} test split ({len(run.state['ood_x'])} images)"))
        t0 = time.perf_counter()
        idx = attack.random_queries(len(setup.splits.pool), config.budget, config.split_seed + 1)
        targets = None
        if ctx.is_main:
            # Fidelity is always measured against the undefended victim; the attacker sees the
            # defended one (faststeal.defenses).
            defense = build_defense(config.defense, **config.defense_params)
            served, kind = defense.wrap_victim(setup.victim)
            # every answer is journaled in the run folder (OUT/answers.journal) before it is
            # used: a rerun asks the victim only for images it never answered
            oracle = run.oracle(
                served, config.budget, key={"defense": defense.name,
                                            "defense_params": defense.params()},
                output_mode=config.output_mode,
                k=config.topk if config.output_mode == "topk" else 1,
                temperature=config.temperature, decimals=config.decimals, victim_outputs=kind,
                probs_atol=defense.probs_atol(setup.num_classes))
            oracle = defense.wrap_oracle(oracle)
            answered, targets, refused = query_until_refused(oracle, idx)
            if refused:
                run.log(f"defense {config.defense!r} refused after {len(answered)} answered "
                        "queries; training on what was answered")
            idx = answered
            oracle.save_log(os.path.join(run.out, "query_log.json"))
            run.store.set_meta("queries", {"used": oracle.used, "budget": oracle.budget,
                                           "output_mode": config.output_mode,
                                           "defense": config.defense, "refused": refused,
                                           "defense_params": defense.params()})
            run.log(f"queried {oracle.used} images ({config.output_mode} answers)")
        targets = distributed.broadcast_tensor(ctx, targets).to(run.device)
        idx = distributed.broadcast_tensor(ctx, idx if ctx.is_main else None).cpu()
        run.timing["query_s"] = time.perf_counter() - t0
        run.state["x"] = setup.splits.pool.x[idx].to(run.device)
        run.state["targets"] = targets
        run.state["kl_probs"] = (setup.victim_probs if config.output_mode in ("probs", "logits")
                                 else None)

    def methods(self) -> list[str]:
        methods = list(self.settings.methods)
        if "baseline" not in methods:
            methods.insert(0, "baseline")  # every gain is measured against it
        return methods

    def cells(self, run: Run) -> list[Cell]:
        c = self.settings
        main = [Cell(cell_id("main", m, s, None), "main", m, s) for m in self.methods()
                for s in range(c.seeds)]
        sweep = [Cell(cell_id("sweep", c.sweep_method, s, k), "sweep", c.sweep_method, s, k)
                 for k in c.member_sweep for s in range(c.sweep_seeds)]
        return main + sweep

    def _ensemble_size(self, cell: Cell) -> int:
        return cell.members or self.settings.method_params.get(cell.method, {}).get(
            "members", METHODS[cell.method].DEFAULTS.get("members", 1))

    def _collective(self, run: Run, cell: Cell) -> bool:
        """Whether ``cell``'s members are split over the ranks (``--shard-members``); an ensemble
        smaller than the world is trained whole by one rank."""
        from .. import distributed

        return (self.settings.shard_members and run.ctx.enabled
                and cell.method == "deep-ensemble"
                and distributed.can_shard(run.ctx, self._ensemble_size(cell)))

    def assign(self, run: Run, todo: list[Cell]) -> list[Cell]:
        """Member-sharded cells run on every rank (collectively); the rest are dealt out."""
        from .. import distributed

        collective = [c for c in todo if self._collective(run, c)]
        return collective + distributed.my_cells(run.ctx, [c for c in todo
                                                           if c not in collective])

    def reuse(self, run: Run, cell: Cell) -> Optional[dict[str, Any]]:
        """A sweep cell equal to a main cell (same method, seed and members) is not trained
        again (single process only: under ranks the main cell may not be committed yet)."""
        if cell.kind != "sweep" or run.ctx.enabled:
            return None
        for c in run.store.cells("main"):
            if c["method"] == cell.method and c["seed"] == cell.seed and \
                    c["members"] == cell.members:
                return {"metrics": c["metrics"], "hparams": c["hparams"],
                        "members": cell.members, "reused_from": c["cell_id"]}
        return None

    def run_cell(self, run: Run, cell: Cell, checkpoint: str) -> Optional[dict[str, Any]]:
        from .. import attack, distributed
        from .runner import log

        c, setup, ctx = self.settings, run.setup, run.ctx
        hp = dict(c.method_params.get(cell.method, {}))
        if c.precision != "fp32":  # fp32 cells keep their hparams (and resume) as before
            hp.setdefault("precision", c.precision)
        if cell.members is not None:
            hp["members"] = cell.members
        gather = None
        if self._collective(run, cell):
            hp["member_range"] = distributed.member_shard(ctx, self._ensemble_size(cell))
            gather = lambda t: distributed.all_gather_members(ctx, t)  # noqa: E731
        r = attack.train_and_evaluate(
            cell.method, c.surrogate_arch, run.state["x"], run.state["targets"], seed=cell.seed,
            test_x=setup.test_x, test_y=setup.test_y, victim_labels=setup.victim_labels,
            victim_probs=run.state["kl_probs"], num_classes=setup.num_classes, epochs=c.epochs,
            batch_size=c.batch_size, lr=c.lr, device=run.device, progress=run.progress,
            probe=setup.probe if cell.kind == "main" else None, record_every=c.record_every,
            hparams=hp, gather=gather, member_chunk=c.member_chunk, checkpoint=checkpoint,
            log=log, ood_x=run.state.get("ood_x"), keep_model=c.save_models)
        if gather is not None and not ctx.is_main:
            return None  # rank 0 writes the collective cell
        if r.get("stolen") is not None:  # --save-models
            name = f"{cell.kind}_{cell.method}_seed={cell.seed}" + (
                f"_S={cell.members}" if cell.members is not None else "")
            r["stolen"].save(os.path.join(c.out, "models", name + ".pt"))
            r["stolen"] = None
        return {**r, "members": r["hparams"]["num_members"]}

    def describe(self, cell: Cell, result: dict[str, Any]) -> str:
        m = result["metrics"]
        return (f"{cell.method} (seed {cell.seed}"
                f"{', S=' + str(cell.members) if cell.members else ''}): fidelity "
                f"{100 * m['fidelity']:.2f}%, accuracy {100 * m['accuracy']:.2f}%, "
                f"V {m['variance']:.2e} [{result['seconds']:.1f}s]")

    @classmethod
    def summarise(cls, store: Any) -> dict[str, Any]:
        from ..results.report import aggregate

        return aggregate(store)

    @classmethod
    def markdown(cls, summary: dict[str, Any]) -> str:
        from ..results.report import markdown

        return markdown(summary)

    @classmethod
    def extra_files(cls, summary: dict[str, Any], directory: str) -> None:
        from ..results.report import write_csv

        write_csv(summary, os.path.join(directory, "results.csv"))

    @classmethod
    def figures(cls, store: Any, summary: dict[str, Any], directory: str) -> list[str]:
        from ..results.report import figures

        return figures(store, summary, directory)


def run_comparison(config: Config) -> dict[str, Any]:
    """Run (or resume) the comparison described by ``config``; returns the summary dict
    (empty on ranks other than 0)."""
    return run_study(ComparisonStudy(config))
