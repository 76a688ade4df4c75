"""The one interface every UQ surrogate implements, and the shared batched training loop.

A method is a stack of S members with a leading member axis: :meth:`Method.predict_members`
returns (S, B, C) logits and the training step updates all members with ONE optimizer step over
the stacked parameters. The loop here owns everything the methods share — input checks, data on
the device, per-member index orders, seeding, the progress bar, the diversity trace — and calls a
few hooks (``_build``, ``_train_loss``, ``_make_optimizer``, ``_on_step``, ``_on_epoch_end``,
``_finalize``, ``_predict_chunk``, ``_trace_members``, ``_extra_state``) that each method fills in.

Randomness. Everything random is a function of ``seed``: initialisation runs under
``torch.manual_seed(sub-seed 0)``; data orders come from a CPU :class:`torch.Generator` (so they
are the same on every device); the stochastic layers (dropout masks, Bayesian weight noise) draw
from torch's global RNG, which ``fit`` seeds for its duration inside :func:`torch.random.fork_rng`
(the caller's RNG state is restored afterwards); prediction-time sampling re-seeds a fixed
``prediction seed`` for every chunk, so the S members of a stochastic method are the same S
networks on every call and ``predict_members`` is a deterministic function of the inputs.
On CUDA, convolutional architectures are bit-reproducible only with
``torch.use_deterministic_algorithms(True)`` (and ``CUBLAS_WORKSPACE_CONFIG=:4096:8``): cuDNN's
backward uses atomics. The methods do not flip that global switch — the caller (experiment, CLI)
does. Measured on an H200 (torch 2.11, Triton backends): MLPs rerun bit-identically either way;
LeNet / small-ResNet reruns differ without the switch and are bit-identical with it.

Diversity trace (the paper's curve). When ``fit`` gets a ``probe`` set it records, at iteration 0,
every ``record_every`` optimizer steps and once more after training has finished,
``{"iteration", "epoch", "members", "variance", "mutual_info", "disagreement", "loss"}`` where
``variance`` = mean_x mean_c Var_s p_s(c|x) (population variance), ``mutual_info`` = mean_x BALD,
``disagreement`` = mean_x fraction of members disagreeing with the ensemble argmax (all from
:func:`faststeal.ops.member_stats` on the members the method would predict with at that moment)
and ``loss`` the training loss of the latest step (None at iteration 0). The last entry always
describes the prediction-time members (for SWAG and Laplace: the posterior samples).

Checkpoints. ``fit(..., checkpoint=PATH)`` writes a checkpoint after every finished epoch and,
when PATH already holds one written by the same fit, resumes with the epoch after it; the result
is bit-identical to an uninterrupted fit (:mod:`faststeal.methods.checkpoint`). State a method
accumulates during training (SWAG's moments) travels through ``_checkpoint_state`` /
``_load_checkpoint_state``; a method whose mid-training state cannot be captured sets
``supports_checkpoint = False``, and ``fit`` then refuses a checkpoint with a ValueError.
"""

from __future__ import annotations

import abc
import contextlib
import math
import os
import warnings
from typing import Any, ClassVar, Iterator, Optional

import torch
from torch import Tensor

from .. import ops, train_step
from ..checks import positive_int as _check_positive_int  # noqa: F401 (methods import it)
from . import checkpoint as _ckpt

# Sub-seed streams derived from the method seed.
STREAM_INIT, STREAM_ORDER, STREAM_TRAIN_NOISE, STREAM_PREDICT, STREAM_BN = 0, 1, 2, 3, 4


def subseed(seed: int, stream: int) -> int:
    """A distinct non-negative 63-bit seed per (seed, stream)."""
    return (seed * 1_000_003 + stream * 7_919 + 17) % (2**63)


def _cuda_index(device: torch.device) -> Optional[int]:
    """The CUDA device index whose RNG a block on ``device`` uses (None off CUDA)."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block with torch's global RNG (CPU, and ``device`` if CUDA) seeded; restore after."""
    idx = _cuda_index(device)
    devices = [] if idx is None else [idx]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _check_float(name: str, value: Any, low: float, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    v = float(value)
    bad_low = v <= low if low_open else v < low
    bad_high = v >= high if high_open else v > high
    if math.isnan(v) or bad_low or bad_high:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}")
    return v


class Method(abc.ABC):
    """A UQ surrogate: S stacked members trained as one batched computation.

    ``Method(arch, input_shape, num_classes, *, seed=0, device="cpu", **hparams)`` or
    ``Method(surrogate=..., input_shape=..., num_classes=...)``: ``arch`` is one of
    :data:`faststeal.models.zoo.ARCHS`; ``surrogate`` is a zoo name, an ``nn.Module`` (a template:
    its architecture, re-initialised per member) or a zero-argument factory returning one (see
    :func:`faststeal.models.resolve_surrogate`). ``input_shape`` is one example's shape:
    (channels, height, width) for the zoo, any shape the user's model accepts (``(F,)`` for
    tabular data). Every method's member count is ``members``. Unknown hyperparameters raise
    ``TypeError`` naming them; bad values raise ``ValueError``. Defaults live in each subclass's
    ``DEFAULTS`` and are documented (with their source) in its module.
    """

    name: ClassVar[str] = ""
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    #: hyperparameters shared by every method; ``precision``: ``"fp32"`` or ``"bf16"`` (bfloat16
    #: compute in the stacked layers for training and prediction, float32 weights, optimizer
    #: state, loss and statistics: :mod:`faststeal.train_step`)
    COMMON_DEFAULTS: ClassVar[dict[str, Any]] = {"weight_decay": 0.0, "precision": "fp32"}
    #: whether ``fit(checkpoint=...)`` can capture everything training depends on mid-way; a
    #: subclass that accumulates state it cannot put in ``_checkpoint_state`` sets False
    supports_checkpoint: ClassVar[bool] = True

    def __init__(self, arch: Optional[str] = None, input_shape: Optional[tuple] = None,
                 num_classes: Optional[int] = None, *, surrogate: Any = None, seed: int = 0,
                 device="cpu", **hparams: Any) -> None:
        from ..models import resolve_surrogate

        if arch is not None and surrogate is not None:
            raise TypeError("give the surrogate once: arch (a zoo name) or surrogate= (a zoo "
                            "name, an nn.Module template or a zero-argument factory)")
        spec = resolve_surrogate(surrogate if surrogate is not None else arch, input_shape,
                                 num_classes)
        _check_positive_int("num_classes", num_classes, 2)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        defaults = {**self.COMMON_DEFAULTS, **self.DEFAULTS}
        if "samples" in hparams and "members" in defaults and "samples" not in defaults:
            # the member count used to be `samples` in the sampling methods: old keyword kept
            warnings.warn(f"{type(self).__name__}: hyperparameter 'samples' is now 'members'",
                          DeprecationWarning, stacklevel=2)
            if "members" in hparams:
                raise TypeError("give 'members' only (its deprecated alias 'samples' too)")
            hparams["members"] = hparams.pop("samples")
        unknown = sorted(set(hparams) - set(defaults))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown hyperparameter(s) {unknown}; "
                            f"valid: {sorted(defaults)}")
        #: the surrogate: a zoo architecture (``spec.zoo``) or the user's template/factory
        self.surrogate = spec
        self.arch = spec.name
        self.input_shape = spec.input_shape
        self.num_classes = int(num_classes)
        self.seed = seed
        self.device = torch.device(device)
        self._given = frozenset(hparams)  # hyperparameters the caller set explicitly
        self._hp: dict[str, Any] = {**defaults, **hparams}
        self._hp["weight_decay"] = _check_float("weight_decay", self._hp["weight_decay"], 0.0)
        train_step.check_precision(self._hp["precision"])
        self._validate_hparams(self._hp)
        self._resolved: dict[str, Any] = {}
        self.trace: list[dict] = []
        self.fitted = False
        self._last_loss: Optional[Tensor] = None
        with seeded(subseed(seed, STREAM_INIT), self.device):
            self.model = self._build().to(self.device)

    def _make_stack(self, members: int, *, dropout: float = 0.0, bayesian: bool = False,
                    prior_sigma: float = 1.0, init: str = "reset") -> torch.nn.Module:
        """The stacked model of this method's surrogate (:func:`faststeal.nn.stack` of the zoo's
        factory or the user's model; ``init="copy"``: every member starts from the template's
        weights, for stacks that are overwritten at once). ``dropout > 0`` adds dropout (zoo:
        its dropout positions; user model: before every Linear but the first parameterised
        layer)."""
        return self.surrogate.build(members, dropout=dropout, bayesian=bayesian,
                                    prior_sigma=prior_sigma, init=init,
                                    last_layer=self._hp.get("last_layer"))

    # ------------------------------------------------------------------ hooks
    @abc.abstractmethod
    def _validate_hparams(self, hp: dict[str, Any]) -> None:
        """Check (and normalise in place) the method's own hyperparameters; ValueError if bad."""

    @abc.abstractmethod
    def _build(self) -> torch.nn.Module:
        """The training model (a stack); called under the init seed."""

    @property
    @abc.abstractmethod
    def num_members(self) -> int:
        """S, the number of members :meth:`predict_members` returns."""

    def _data_members(self) -> int:
        """How many independent index orders the loop draws: 1 (shared batch) or S."""
        return 1

    def _make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        return train_step.make_optimizer(self.model.parameters(), lr, kind="adam",
                                         weight_decay=self._hp["weight_decay"])

    def _train_loss(self, xb: Tensor, yb: Tensor, n_train: int) -> Tensor:
        """Scalar training loss: the SUM over members of each member's mean cross-entropy.

        xb: (B, C, H, W) shared, or (S, B, C, H, W) with ``_data_members() == S``; yb: the matching
        labels (B,) / (S, B) or soft labels (B, K) / (S, B, K).
        """
        logits = self.model(xb)
        return member_loss_sum(logits, yb)

    def _on_train_start(self, x: Tensor, y: Tensor, epochs: int, steps_per_epoch: int,
                        batch_size: int, lr: float) -> None:
        """Reset per-fit state (SWAG moments, Laplace posterior)."""

    def _on_epoch_start(self, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        """E.g. a learning-rate schedule."""

    def _on_step(self, iteration: int, epoch: int, step_in_epoch: int) -> None:
        """After each optimizer step (``iteration`` counts from 1)."""

    def _on_epoch_end(self, epoch: int, iteration: int) -> None:
        """After the last step of ``epoch`` (0-based)."""

    def _finalize(self, x: Tensor, y: Tensor, batch_size: int) -> None:
        """After training: build the prediction-time members (SWAG samples, Laplace posterior)."""

    def _predict_chunk(self, xb: Tensor) -> Tensor:
        """(S, B, C) logits for one chunk; called in eval mode, under no_grad, seeded."""
        return self.model(xb)

    def _trace_members(self, probe: Tensor) -> Tensor:
        """The members whose diversity the trace records at this moment of training."""
        return self.predict_members(probe)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def _checkpoint_state(self) -> dict[str, Any]:
        """Method state accumulated during training that later epochs or ``_finalize`` read
        (stored in the per-epoch checkpoint); by default :meth:`_extra_state`."""
        return self._extra_state()

    def _load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`_checkpoint_state` when ``fit`` resumes from a checkpoint."""
        self._load_extra_state(state)

    # ------------------------------------------------------------------ public API
    def hparams(self) -> dict[str, Any]:
        """Resolved hyperparameters (defaults filled in, values derived during fit added)."""
        return {"method": self.name, "arch": self.arch, "input_shape": list(self.input_shape),
                "num_classes": self.num_classes, "seed": self.seed, "members": self.num_members,
                **self._hp, **self._resolved}

    def fit(self, x: Tensor, y: Tensor, *, epochs: int, batch_size: int = 128, lr: float = 1e-3,
            probe: Optional[Tensor] = None, record_every: int = 50,
            progress: bool = True,
            checkpoint: "str | os.PathLike | None" = None) -> "Method":
        """Train all members at once on (x, y).

        x: (N, C, H, W) float; y: (N,) int64 labels in [0, num_classes) or (N, num_classes)
        probabilities (soft labels from a probability-output victim); epochs >= 1; batch_size:
        rows per member per step (a last batch of one row is skipped that epoch, BatchNorm needs
        two); lr: the Adam learning rate (SWAG derives its SGD rate from it); probe: (P, C, H, W)
        inputs for the diversity trace, recorded every ``record_every`` steps. Training continues
        from the current weights; the trace and the posterior (SWAG/Laplace) are rebuilt.

        checkpoint: a file path; after every finished epoch the complete training state is
        written there atomically, and if the file already exists (a fit with the same arguments,
        data, hyperparameters and initial weights was killed) training resumes with the epoch
        after the saved one, bit-identical to an uninterrupted fit. A checkpoint of a different
        fit, or a corrupt file, raises :class:`faststeal.methods.checkpoint.CheckpointError` (a
        ValueError) naming the file and what differs. The file is kept after ``fit`` returns;
        delete it once the result is stored.
        """
        _check_positive_int("epochs", epochs)
        _check_positive_int("batch_size", batch_size)
        lr = _check_float("lr", lr, 0.0, low_open=True)
        _check_positive_int("record_every", record_every)
        x = self._check_inputs("x", x)
        y = self._check_targets(y, x.shape[0])
        if probe is not None:
            probe = self._check_inputs("probe", probe)
        ckpt = _ckpt.as_path(checkpoint)
        fingerprint: dict[str, Any] = {}
        saved = None
        if ckpt is not None:
            if not self.supports_checkpoint:
                raise ValueError(f"{type(self).__name__} cannot checkpoint its mid-training state; "
                                 f"call fit without checkpoint")
            fingerprint = self._fit_fingerprint(x, y, probe, epochs=epochs, batch_size=batch_size,
                                                lr=lr, record_every=record_every)
            if os.path.exists(ckpt):
                saved = _ckpt.load(ckpt)
                _ckpt.check_fingerprint(ckpt, saved.get("fingerprint"), fingerprint)
        n = x.shape[0]
        steps = math.ceil(n / batch_size)
        if steps > 1 and n - (steps - 1) * batch_size == 1:
            steps -= 1  # never a one-row batch (BatchNorm in train mode cannot take it)
        total = steps * epochs
        s_data = self._data_members()
        order_gen = torch.Generator().manual_seed(subseed(self.seed, STREAM_ORDER))

        self.trace = []
        self.fitted = False
        self._last_loss = None
        if self.device.type == "cpu":
            train_step.retain_freed_cpu_memory()
        with seeded(subseed(self.seed, STREAM_TRAIN_NOISE), self.device):
            self.model.train()
            self._on_train_start(x, y, epochs, steps, batch_size, lr)
            optimizer = self._make_optimizer(lr)
            pool = self._index_pool(order_gen, n, s_data)  # (s_data, n) or None
            first_epoch, it = 0, 0
            if saved is not None:
                first_epoch, it, pool = self._restore_checkpoint(ckpt, saved, optimizer, order_gen,
                                                                 epochs, steps)
            elif probe is not None:
                self._record(probe, 0, steps)
            bar = _progress(total, progress, self.name)
            bar.update(it)
            # the one training step (benchmarked in benchmarks/bench_train.py): forward and
            # loss under the method's precision, backward, optimizer step, grads set to None
            step_fn = train_step.TrainStep(
                self.model, optimizer, compute_loss=lambda xb, yb: self._train_loss(xb, yb, n),
                precision=self._hp["precision"])
            optimizer.zero_grad(set_to_none=True)  # the step clears them after each update
            for epoch in range(first_epoch, epochs):
                self._on_epoch_start(epoch, optimizer)
                order = self._epoch_order(order_gen, n, s_data, pool).to(self.device)
                for step in range(steps):
                    idx = order[:, step * batch_size:(step + 1) * batch_size]
                    xb, yb = _rows(x, idx, s_data), _rows(y, idx, s_data)
                    self._last_loss = step_fn(xb, yb)
                    it += 1
                    self._on_step(it, epoch, step)
                    if step == steps - 1:
                        self._on_epoch_end(epoch, it)
                    if probe is not None and it % record_every == 0:
                        self._record(probe, it, steps)
                        bar.set_postfix(loss=f"{self.trace[-1]['loss']:.3f}",
                                        V=f"{self.trace[-1]['variance']:.2e}", refresh=False)
                    bar.update(1)
                if ckpt is not None:
                    self._save_checkpoint(ckpt, fingerprint, epoch, it, optimizer, order_gen, pool)
            bar.close()
            self._finalize(x, y, batch_size)
            self.model.eval()
        self.fitted = True
        if probe is not None:
            if self.trace and self.trace[-1]["iteration"] == it:
                self.trace.pop()  # the final entry describes the prediction-time members
            self._record(probe, it, steps)
        return self

    @torch.no_grad()
    def predict_members(self, x: Tensor, batch_size: int = 1024) -> Tensor:
        """(S, B, C) member logits (eval mode, no grad, fixed sampling seed) on ``self.device``."""
        x = self._check_inputs("x", x)
        _check_positive_int("batch_size", batch_size)
        was_training = self.model.training
        self.model.eval()
        try:
            outs = []
            for start in range(0, x.shape[0], batch_size):
                with seeded(subseed(self.seed, STREAM_PREDICT), self.device), \
                        train_step.autocast(self.device.type, self._hp["precision"]):
                    outs.append(self._predict_chunk(x[start:start + batch_size]).float())
            if not outs:
                return x.new_empty(self.num_members, 0, self.num_classes)
            return torch.cat(outs, dim=1)
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def predict_proba(self, x: Tensor, batch_size: int = 1024) -> Tensor:
        """(B, C) predictive probabilities: the mean over members of softmax(member logits)."""
        return torch.softmax(self.predict_members(x, batch_size).float(), dim=-1).mean(0)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to predict again: weights, posterior, trace, hyperparameters."""
        return {"method": self.name, "arch": self.arch, "input_shape": list(self.input_shape),
                "num_classes": self.num_classes, "seed": self.seed, "hparams": dict(self._hp),
                "resolved": dict(self._resolved), "fitted": self.fitted,
                "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "extra": self._extra_state(), "trace": [dict(t) for t in self.trace]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` saved by an instance built with the same arguments."""
        if not isinstance(state, dict) or "method" not in state:
            raise TypeError("state must be a dict produced by Method.state_dict()")
        mine = {"method": self.name, "arch": self.arch, "input_shape": list(self.input_shape),
                "num_classes": self.num_classes, "hparams": dict(self._hp)}
        for key, value in mine.items():
            if state.get(key) != value:
                raise ValueError(f"state was saved with {key}={state.get(key)!r}, "
                                 f"this {type(self).__name__} has {key}={value!r}")
        self.model.load_state_dict(state["model"])
        self._resolved = dict(state.get("resolved", {}))
        self.fitted = bool(state.get("fitted", False))
        self.trace = [dict(t) for t in state.get("trace", [])]
        self._load_extra_state(state.get("extra", {}))

    # ------------------------------------------------------------------ checkpoints
    def _fit_fingerprint(self, x: Tensor, y: Tensor, probe: Optional[Tensor],
                         **fit_args: Any) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed: method, arguments, data, start weights,
        and how the trace sees the members (``gather_members``: this process's own members, a
        stateless cross-process gather, or a stateful hook such as attack's member-block
        recorder), since trace entries saved under one cannot continue under another."""
        g = self.gather_members
        gather = ("own" if g is Method.gather_members
                  else type(g).__name__ if hasattr(g, "state_dict") else "gathered")
        return {"method": self.name, "arch": self.arch, "input_shape": list(self.input_shape),
                "num_classes": self.num_classes, "seed": self.seed, "hparams": dict(self._hp),
                "device": self.device.type, "gather_members": gather, **fit_args,
                "x_shape": list(x.shape), "x": _ckpt.digest(x),
                "y_shape": list(y.shape), "y_dtype": str(y.dtype), "y": _ckpt.digest(y),
                "probe_shape": None if probe is None else list(probe.shape),
                "probe": _ckpt.digest(probe),
                "initial_weights": _ckpt.state_digest(self.model.state_dict())}

    def _save_checkpoint(self, path: str, fingerprint: dict[str, Any], epoch: int, it: int,
                         optimizer: torch.optim.Optimizer, order_gen: torch.Generator,
                         pool: Optional[Tensor]) -> None:
        """Write the state after ``epoch`` (called inside fit's seeded block)."""
        idx = _cuda_index(self.device)
        gather_state = getattr(self.gather_members, "state_dict", None)
        _ckpt.save(path, {
            "fingerprint": fingerprint, "epoch": epoch, "iteration": it,
            "model": self.model.state_dict(), "optimizer": optimizer.state_dict(),
            "order_gen": order_gen.get_state(), "rng_cpu": torch.get_rng_state(),
            "rng_cuda": None if idx is None else torch.cuda.get_rng_state(idx),
            "trace": [dict(t) for t in self.trace], "last_loss": self._last_loss,
            "pool": pool, "resolved": dict(self._resolved),
            "method_state": self._checkpoint_state(),
            "gather_state": None if gather_state is None else gather_state(),
        })

    def _restore_checkpoint(self, path: str, saved: dict[str, Any],
                            optimizer: torch.optim.Optimizer, order_gen: torch.Generator,
                            epochs: int, steps: int) -> tuple[int, int, Optional[Tensor]]:
        """Load a checkpoint into this fit; returns (first epoch to run, iteration, index pool)."""
        try:
            epoch, it = int(saved["epoch"]), int(saved["iteration"])
            if not 0 <= epoch < epochs or it != (epoch + 1) * steps:
                raise ValueError(f"epoch {epoch} / iteration {it} do not fit {epochs} epochs of "
                                 f"{steps} steps")
            self.model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            self._resolved = dict(saved["resolved"])
            self._load_checkpoint_state(saved["method_state"])
            load_gather = getattr(self.gather_members, "load_state_dict", None)
            if load_gather is not None and saved.get("gather_state") is not None:
                load_gather(saved["gather_state"])
            self.trace = [dict(t) for t in saved["trace"]]
            loss = saved["last_loss"]
            self._last_loss = None if loss is None else loss.to(self.device)
            order_gen.set_state(saved["order_gen"])
            # the global RNG last: restoring method state may draw from it (SWAG builds a stack)
            torch.set_rng_state(saved["rng_cpu"])
            idx = _cuda_index(self.device)
            if idx is not None:
                torch.cuda.set_rng_state(saved["rng_cuda"], idx)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise _ckpt.CheckpointError(
                f"checkpoint {path} could not be restored ({type(exc).__name__}: {exc}); delete "
                f"it to train from the start") from exc
        return epoch + 1, it, saved["pool"]

    # ------------------------------------------------------------------ internals
    def _check_inputs(self, name: str, x: Tensor) -> Tensor:
        x = as_tensor(name, x)
        if x.dim() != 1 + len(self.input_shape) or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"{name} must be (N, {', '.join(map(str, self.input_shape))}), got "
                             f"shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}")
        if x.dtype.is_floating_point:
            return x.to(self.device, torch.float32)
        if self.surrogate.zoo is None and x.dtype not in (torch.bool, torch.uint8):
            return x.to(self.device, torch.int64)  # token / category ids (nn.Embedding)
        raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}")

    def _check_targets(self, y: Tensor, n: int) -> Tensor:
        y = as_tensor("y", y)
        c = self.num_classes
        if y.dtype.is_floating_point:
            if tuple(y.shape) != (n, c):
                raise ValueError(f"soft labels y must be (N, num_classes) = {(n, c)}, got shape "
                                 f"{tuple(y.shape)}")
            if y.numel() and (bool((y < 0).any()) or
                              not torch.allclose(y.sum(-1), torch.ones_like(y[:, 0]), atol=1e-3)):
                raise ValueError("soft labels y must be non-negative rows that sum to 1")
            return y.to(self.device, torch.float32)
        if y.dtype == torch.bool or tuple(y.shape) != (n,):
            raise ValueError(f"y must be (N,) = ({n},) integer labels or (N, {c}) probabilities, "
                             f"got shape {tuple(y.shape)}, dtype {y.dtype}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= c):
            raise ValueError(f"labels y must lie in [0, {c}), got range [{int(y.min())}, "
                             f"{int(y.max())}]")
        return y.to(self.device, torch.int64)

    def _index_pool(self, gen: torch.Generator, n: int, s_data: int) -> Optional[Tensor]:
        """Per-member training sets as index rows (bootstrap); None = every member sees all data."""
        return None

    @staticmethod
    def _epoch_order(gen: torch.Generator, n: int, s_data: int, pool: Optional[Tensor]) -> Tensor:
        """(s_data, n) indices: an independent random permutation per row (of the pool rows)."""
        perm = torch.argsort(torch.rand(s_data, n, generator=gen), dim=1)
        return perm if pool is None else torch.gather(pool, 1, perm)

    #: Combines member predictions across processes (set by faststeal.distributed when the
    #: members are sharded over ranks); the identity in one process.
    gather_members = staticmethod(lambda logits: logits)

    def _record(self, probe: Tensor, iteration: int, steps_per_epoch: int) -> None:
        logits = self.gather_members(self._trace_members(probe))
        st = ops.member_stats(logits)
        values = [st.variance.mean(), st.mutual_info.mean(), st.disagreement.mean()]
        if self._last_loss is not None:
            values.append(self._last_loss.to(st.variance.device, torch.float32))
        values = torch.stack(values).tolist()  # the one host sync of a record point
        self.trace.append({"iteration": iteration, "epoch": iteration / steps_per_epoch,
                           "members": int(logits.shape[0]), "variance": values[0],
                           "mutual_info": values[1], "disagreement": values[2],
                           "loss": values[3] if len(values) > 3 else None})


def as_tensor(name: str, x: Any) -> Tensor:
    """``x`` as a tensor: tensors pass through, numpy arrays are wrapped once (no copy); anything
    else is a TypeError naming ``name``."""
    if isinstance(x, torch.Tensor):
        return x
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch
        np = None
    if np is not None and isinstance(x, np.ndarray):
        if x.dtype.kind not in "fiub":
            raise TypeError(f"{name} must be a numeric array, got numpy dtype {x.dtype}")
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


#: Scalar training loss: the sum over members of each member's mean cross-entropy (shared or
#: per-member targets); one implementation, :func:`faststeal.train_step.ensemble_loss`.
member_loss_sum = train_step.ensemble_loss


def _rows(t: Tensor, idx: Tensor, s_data: int) -> Tensor:
    """The rows ``idx`` (s_data, b) of ``t``: (b, ...) for one shared order, else (s_data, b,
    ...). ``index_select`` on the flat indices is what ``t[idx]`` computes, ~3x faster for the
    (5, 128) x 784 gather of a training step on the CPU (advanced indexing's general kernel)."""
    if s_data == 1:
        return t.index_select(0, idx[0])
    return t.index_select(0, idx.reshape(-1)).view(*idx.shape, *t.shape[1:])


def _progress(total: int, enabled: bool, name: str):
    from ..progress import progress_bar
    return progress_bar(total=total, disable=not enabled, desc=name, leave=False)
