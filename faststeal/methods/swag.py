"""SWAG (Maddox, Garipov, Izmailov, Vetrov & Wilson, NeurIPS 2019, "A Simple Baseline for
Bayesian Uncertainty in Deep Learning").

One network is trained with SGD; from ``swa_start`` on, its iterates theta_i are collected into a
Gaussian N(theta_SWA, (Sigma_diag + Sigma_lowrank) / 2) with
``theta_SWA = mean_i theta_i``, ``Sigma_diag = diag(mean_i theta_i^2 - theta_SWA^2)`` and
``Sigma_lowrank = D D^T / (K - 1)``, D the last K deviations theta_i - theta_SWA,i (the running
mean at collection time, as in the paper's code). S samples

    theta_s = theta_SWA + sqrt(scale) * (Sigma_diag^(1/2) z1 + D z2 / sqrt(K - 1)),
    z1 ~ N(0, I_P), z2 ~ N(0, I_K), scale = 1/2 (the paper's 1/sqrt(2) factors)

are drawn at once as an (S, P) matrix and loaded into ONE stack of S members (each
stacked parameter is (S, ...) and takes its slice of the sampled rows). BatchNorm statistics are
not part of the posterior: after sampling they are re-estimated for all S members at once by
running the stack in train mode (cumulative average, ``momentum=None``) over
``bn_update_batches`` training batches, as the paper's ``bn_update`` does with a full pass.

Defaults and their source:
* SGD with ``momentum=0.9`` (the paper's optimiser). The SGD learning rate ``sgd_lr`` defaults to
  50x the ``lr`` given to :meth:`fit` — 0.05 at the usual Adam rate 1e-3, the paper's initial
  rate for VGG-16 on CIFAR (its code's ``lr_init``); 10x under-fits our short runs (one seed,
  3k queries, 10 epochs: test accuracy 0.83 / 0.76 for MLP / LeNet at 10x, 0.85 / 0.83 at 50x).
  The paper's schedule: constant for the first half of the pre-collection phase, linear decay to
  ``swa_lr`` until 90% of it, then constant ``swa_lr`` while collecting. ``swa_lr`` defaults to
  ``sgd_lr / 2``: the paper's ratios lie between 0.1 and 0.5 over hundreds of epochs; our runs
  are a few epochs long and SWAG's spread comes from the SGD noise at ``swa_lr``, so we keep the
  gentle end.
* ``swa_start=0.75`` — collection begins once 75% of the epochs are done (the paper starts at
  161 of 300 epochs, i.e. ~54%, after a long pre-training; ours are short, so 75%).
* ``collect_every=None`` ("auto") — the paper's one snapshot per epoch (at the end of every
  epoch that ends at or after ``swa_start``) when that gives at least K + 1 snapshots; otherwise
  (short runs) about K + 1 snapshots evenly spaced in steps over the collection window, the last
  one the final weights, so the rank-K deviation matrix fills. ``"epoch"`` forces the per-epoch
  schedule, an int collects every that many optimizer steps (counted back from the last step).
  At least one snapshot is always collected. ``hparams()`` reports the resolved schedule and
  ``collected_at`` the steps.
* ``rank=10`` (K) — the paper uses K = 20; short runs rarely collect 20 snapshots. With fewer
  than K snapshots the K' collected are used (dividing by sqrt(K' - 1)).
* ``scale=0.5``, ``members=20`` (the paper averages 30 samples; 20 for parity with the other
  methods), ``bn_update_batches=10`` (skipped for architectures without BatchNorm).

Diversity trace V(t): before the first snapshot the method is one network (S = 1, V = 0); after
it, at every record point S samples are drawn from the *current* moments (same z every time:
common random numbers) with BatchNorm refreshed, and their diversity is recorded.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from .. import train_step
from .base import STREAM_BN, STREAM_PREDICT, Method, _check_float, _check_positive_int, subseed


class SWAG(Method):
    """Gaussian over SGD iterates (diagonal + rank-K); S weight samples are the members."""

    name: ClassVar[str] = "swag"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "members": 20, "rank": 10, "swa_start": 0.75, "collect_every": None, "sgd_lr": None,
        "swa_lr": None, "momentum": 0.9, "scale": 0.5, "bn_update_batches": 10,
        "record_iterates": False,
    }

    def _validate_hparams(self, hp: dict[str, Any]) -> None:
        _check_positive_int("members", hp["members"])
        _check_positive_int("rank", hp["rank"])
        hp["swa_start"] = _check_float("swa_start", hp["swa_start"], 0.0, 1.0, high_open=True)
        if hp["collect_every"] not in (None, "epoch"):
            if isinstance(hp["collect_every"], str):
                raise ValueError(f"collect_every must be None, 'epoch' or a positive int, "
                                 f"got {hp['collect_every']!r}")
            _check_positive_int("collect_every", hp["collect_every"])
        for key in ("sgd_lr", "swa_lr"):
            if hp[key] is not None:
                hp[key] = _check_float(key, hp[key], 0.0, low_open=True)
        hp["momentum"] = _check_float("momentum", hp["momentum"], 0.0, 1.0, high_open=True)
        hp["scale"] = _check_float("scale", hp["scale"], 0.0)
        _check_positive_int("bn_update_batches", hp["bn_update_batches"])
        if not isinstance(hp["record_iterates"], bool):
            raise ValueError(f"record_iterates must be a bool, got {hp['record_iterates']!r}")

    def _build(self) -> torch.nn.Module:
        model = self._make_stack(1)
        if getattr(model, "vmap_fallbacks", None):
            raise ValueError(f"SWAG samples into one stack of all parameters; submodule(s) "
                             f"{model.vmap_fallbacks} of {self.arch!r} have no stacked twin")
        self._reset_moments(model)
        self._sampled: Optional[torch.nn.Module] = None
        self._x_train: Optional[Tensor] = None
        return model

    @property
    def num_members(self) -> int:
        return self._hp["members"] if self._sampled is not None else 1

    # ------------------------------------------------------------------ moments
    def _reset_moments(self, model: torch.nn.Module) -> None:
        p = sum(q.numel() for q in model.parameters())
        dev = next(model.parameters()).device
        self.n_collected = 0
        # float64 moments: Var = E[theta^2] - E[theta]^2 cancels catastrophically in float32
        # (weights ~1e-1, iterate variances ~1e-8).
        self.mean = torch.zeros(p, dtype=torch.float64, device=dev)
        self.sq_mean = torch.zeros(p, dtype=torch.float64, device=dev)
        self._dev = torch.zeros(self._hp["rank"], p, device=dev)  # ring buffer of deviations
        self.iterates: list[Tensor] = []
        self.collected_at: list[int] = []  # optimizer step of every snapshot

    def flat_params(self) -> Tensor:
        """The training network's parameters as one (P,) vector (named_parameters order)."""
        return torch.cat([q.detach().reshape(-1) for q in self.model.parameters()])

    @property
    def deviations(self) -> Tensor:
        """(K', P) the last K' = min(n, K) deviations theta_i - mean_i, oldest first."""
        k = self._hp["rank"]
        n = self.n_collected
        if n <= k:
            return self._dev[:n]
        start = n % k
        return torch.cat([self._dev[start:], self._dev[:start]])

    @property
    def variance(self) -> Tensor:
        """(P,) float64 diagonal of Sigma_diag, clamped at 1e-30 as in the paper's code."""
        return (self.sq_mean - self.mean**2).clamp_min(1e-30)

    @property
    def sampled_model(self) -> Optional[torch.nn.Module]:
        """The (members=S) stack holding the current samples (None before the first snapshot)."""
        return self._sampled

    @torch.no_grad()
    def collect(self, iteration: int = -1) -> None:
        """Add the current weights to the running moments (called by the training loop)."""
        theta = self.flat_params().double()
        n = self.n_collected
        self.mean.mul_(n / (n + 1)).add_(theta, alpha=1.0 / (n + 1))
        self.sq_mean.mul_(n / (n + 1)).add_(theta * theta, alpha=1.0 / (n + 1))
        self._dev[n % self._hp["rank"]].copy_(theta - self.mean)
        self.n_collected = n + 1
        self.collected_at.append(iteration)
        if self._hp["record_iterates"]:
            self.iterates.append(theta.float())

    @torch.no_grad()
    def sample_flat(self, samples: int, generator: torch.Generator) -> Tensor:
        """(samples, P) float32 weight vectors from the SWAG Gaussian.

        Noise from the CPU ``generator``: z1 (samples, P) first, then z2 (samples, K').
        """
        if self.n_collected == 0:
            raise RuntimeError("SWAG has no collected iterates yet; call fit() first")
        p = self.mean.numel()
        dev = self.deviations
        k = dev.shape[0]
        z1 = torch.randn(samples, p, generator=generator).to(dev.device)
        noise = z1 * self.variance.sqrt().float()
        if k >= 2:
            z2 = torch.randn(samples, k, generator=generator).to(dev.device)
            noise = noise + (z2 @ dev) / math.sqrt(k - 1)
        return self.mean.float() + math.sqrt(self._hp["scale"]) * noise

    # ------------------------------------------------------------------ sampled stack
    @torch.no_grad()
    def _load_samples(self, flat: Tensor) -> torch.nn.Module:
        s = flat.shape[0]
        if self._sampled is None or getattr(self._sampled, "members", None) != s:
            self._sampled = self._make_stack(s, init="copy").to(self.device)
        mine = dict(self.model.named_parameters())
        offset = 0
        for name, q in self._sampled.named_parameters():
            ref = mine[name]
            if tuple(q.shape[1:]) != tuple(ref.shape[1:]) or ref.shape[0] != 1:
                raise RuntimeError(f"parameter {name}: stacked shape {tuple(q.shape)} does not "
                                   f"match the one-member shape {tuple(ref.shape)}")
            k = ref.numel()
            q.copy_(flat[:, offset:offset + k].reshape(q.shape))
            offset += k
        if offset != flat.shape[1]:
            raise RuntimeError(f"sampled {flat.shape[1]} weights but the stack holds {offset}")
        self._sampled.eval()
        return self._sampled

    @torch.no_grad()
    def _refresh_bn(self, x: Optional[Tensor], batch_size: int) -> None:
        from ..nn import EnsembleBatchNorm
        bns = [m for m in self._sampled.modules() if isinstance(m, EnsembleBatchNorm)]
        if not bns:
            return
        if x is None:
            raise RuntimeError("SWAG needs the training data to refresh BatchNorm statistics")
        n = x.shape[0]
        gen = torch.Generator().manual_seed(subseed(self.seed, STREAM_BN))
        order = torch.randperm(n, generator=gen).to(x.device)
        rows = order[:min(n, self._hp["bn_update_batches"] * batch_size)]
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the refresh batches
        self._sampled.train()
        for start in range(0, rows.numel(), batch_size):
            idx = rows[start:start + batch_size]
            if idx.numel() < 2:
                break
            self._sampled(x[idx])  # shared batch: all S members in one pass
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        self._sampled.eval()

    def _resample(self, x: Optional[Tensor], batch_size: int) -> None:
        gen = torch.Generator().manual_seed(subseed(self.seed, STREAM_PREDICT))
        self._load_samples(self.sample_flat(self._hp["members"], gen))
        self._refresh_bn(x, batch_size)

    # ------------------------------------------------------------------ training hooks
    def _on_train_start(self, x, y, epochs, steps_per_epoch, batch_size, lr) -> None:
        self._reset_moments(self.model)
        self._sampled = None
        self._x_train = x
        self._batch_size = batch_size
        self._epochs = epochs
        self._steps = steps_per_epoch
        sgd_lr = self._hp["sgd_lr"] if self._hp["sgd_lr"] is not None else 50.0 * lr
        swa_lr = self._hp["swa_lr"] if self._hp["swa_lr"] is not None else sgd_lr / 2.0
        self._resolved = {"sgd_lr": sgd_lr, "swa_lr": swa_lr}
        total = epochs * steps_per_epoch
        self._total = total
        # Per-epoch mode: snapshots at the end of epochs start_epoch .. epochs-1 (0-based), i.e.
        # of every epoch that ends at or after swa_start of training.
        self._start_epoch = min(epochs - 1, max(0, math.ceil(self._hp["swa_start"] * epochs) - 1))
        # Per-step mode: snapshots at steps >= start_step (1-based) that are a multiple of
        # `every` before the last step (so the final weights are always one of them).
        self._start_step = min(total, max(1, math.ceil(self._hp["swa_start"] * total)))
        every = self._hp["collect_every"]
        if every is None:  # auto: the paper's per-epoch schedule if it fills the rank
            if epochs - self._start_epoch >= self._hp["rank"] + 1:
                every = "epoch"
            else:
                every = max(1, (total - self._start_step + 1) // (self._hp["rank"] + 1))
        self._every = every
        self._resolved.update({"collect_every_resolved": every,
                               "collect_start": (self._start_epoch if every == "epoch"
                                                 else self._start_step)})

    def _make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        return train_step.make_optimizer(self.model.parameters(), self._resolved["sgd_lr"],
                                         kind="sgd", momentum=self._hp["momentum"],
                                         weight_decay=self._hp["weight_decay"])

    def lr_at_epoch(self, epoch: int) -> float:
        """The paper's schedule, with the collection start (in epochs) as its horizon."""
        horizon = max(self._hp["swa_start"] * self._epochs, 1e-12)
        t = epoch / horizon
        ratio = self._resolved["swa_lr"] / self._resolved["sgd_lr"]
        if t <= 0.5:
            factor = 1.0
        elif t <= 0.9:
            factor = 1.0 - (1.0 - ratio) * (t - 0.5) / 0.4
        else:
            factor = ratio
        return self._resolved["sgd_lr"] * factor

    def _on_epoch_start(self, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        lr = self.lr_at_epoch(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr

    def _on_step(self, iteration: int, epoch: int, step_in_epoch: int) -> None:
        every = self._every
        if every != "epoch" and iteration >= self._start_step and \
                (self._total - iteration) % every == 0:
            self.collect(iteration)

    def _on_epoch_end(self, epoch: int, iteration: int) -> None:
        if self._every == "epoch" and epoch >= self._start_epoch:
            self.collect(iteration)

    def _finalize(self, x: Tensor, y: Tensor, batch_size: int) -> None:
        if self.n_collected == 0:
            self.collect(self._total)
        self._resample(x, batch_size)
        self._resolved["collected"] = self.n_collected
        self._x_train = None

    def _trace_members(self, probe: Tensor) -> Tensor:
        if self._x_train is not None:  # during fit: sample from the current moments
            if self.n_collected == 0:
                self._sampled = None
            else:
                self._resample(self._x_train, self._batch_size)
        return self.predict_members(probe)

    def _predict_chunk(self, xb: Tensor) -> Tensor:
        model = self._sampled if self._sampled is not None else self.model
        return model(xb)

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        return {"n_collected": self.n_collected, "collected_at": list(self.collected_at),
                "mean": self.mean.clone(),
                "sq_mean": self.sq_mean.clone(), "dev": self._dev.clone(),
                "sampled": (None if self._sampled is None else
                            {k: v.detach().clone() for k, v in self._sampled.state_dict().items()})}

    def _checkpoint_state(self) -> dict[str, Any]:
        """The moments, the deviation ring, the current sample stack and (``record_iterates``)
        the iterates collected so far: everything later collection and ``_finalize`` read."""
        return {**self._extra_state(), "iterates": [t.clone() for t in self.iterates]}

    def _load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self._load_extra_state(state)
        self.iterates = [t.to(self.device) for t in state.get("iterates", [])]

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.n_collected = int(state["n_collected"])
        self.mean = state["mean"].to(self.device).clone()
        self.sq_mean = state["sq_mean"].to(self.device).clone()
        self._dev = state["dev"].to(self.device).clone()
        self.iterates = []
        self.collected_at = [int(i) for i in state.get("collected_at", [])]
        self._sampled = None
        if state.get("sampled") is not None:
            self._sampled = self._make_stack(self._hp["members"], init="copy").to(self.device)
            self._sampled.load_state_dict(state["sampled"])
            self._sampled.eval()
