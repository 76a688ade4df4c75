"""Train (or load from cache) the victim classifier of a stealing experiment.

The victim is a plain zoo model (``faststeal.models.build_model``) trained with Adam (cosine
learning-rate decay to 0, per step) and cross-entropy on ``splits.victim_train``. Checkpoints
are cached under ``<cache>/victims`` (``$FASTSTEAL_CACHE/victims``, default
``~/.cache/faststeal/victims``) in a file whose name carries a hash of everything that
determines the weights: the victim's training data (a content digest, so a changed data folder
never reuses a stale victim), the split seed/fraction, the architecture (name and module
structure), the training seed, epochs, batch size, learning rate and schedule. A second call
with the same inputs loads instead of retraining. Writes are atomic (temporary file +
``os.replace``); an unreadable or mismatched checkpoint is reported with a warning that names
the file, and the victim is retrained and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .checks import positive_int
from .data import cache_root
from .data.registry import ArrayDataset
from .data.splits import Splits
from .files import atomic_write

# Default epochs (used when epochs=None). Measured on Fashion-MNIST, victim_fraction=0.5 (30k
# images), seed 0, batch 128, Adam lr 1e-3 with the cosine decay below, one CPU thread of a
# shared (contended) 2-core machine:
#   lenet:    12 epochs -> 88.7% test accuracy, 100 s (10 -> 88.2%, 8 -> 87.4%, 5 -> 86.0%);
#   cnn-wide:  3 epochs -> 89.4%, 640 s (4 -> 90.0%, 750 s).
# (Constant lr instead: cnn-wide swung 87.6/80.2/86.0/89.7/81.5/86.9% over epochs 3-8.)
# mlp and resnet-small are not measured; their values are guesses.
DEFAULT_EPOCHS: dict[str, int] = {"mlp": 10, "lenet": 12, "cnn-wide": 3, "resnet-small": 6}
FALLBACK_EPOCHS = 8
DEFAULT_BATCH_SIZE, DEFAULT_LR = 128, 1e-3

# Per-dataset overrides of those defaults: the small offline datasets give only ~6 (digits, 719
# victim images) or ~16 (mnist5k) steps per epoch at batch 128. Measured (1 thread, contended
# 2-core machine, split/training seeds 0, 1, 2):
#   digits lenet: 12 epochs, batch 128, lr 1e-3 -> 51.8% (seed 0); 40 epochs, batch 32, lr 1e-3 ->
#     96.1/95.0/96.4%; batch 32, lr 3e-3: 30 epochs -> 97.2/95.3/96.9%, 40 -> 97.2/95.8/-%;
#   digits mlp 40 epochs, batch 32, lr 1e-3 -> 97.2/96.4/97.2%; digits cnn-wide / resnet-small 20
#     epochs, batch 32, lr 1e-3 -> 99.2% / 98.3% (seed 0);
#   mnist5k lenet 12 epochs: batch 128 -> 91.8%, batch 32 -> 95.9% (seed 0).
DATASET_DEFAULTS: dict[str, dict] = {
    "digits": {"batch_size": 32, "lr": 3e-3,
               "epochs": {"mlp": 40, "lenet": 40, "cnn-wide": 20, "resnet-small": 20}},
    "mnist5k": {"batch_size": 32},
}
_FORMAT = "faststeal-victim-v1"

ModelFn = Callable[[tuple[int, ...], int], nn.Module]


@dataclass
class VictimResult:
    """model: the trained victim in eval mode; test_accuracy on ``splits.test`` in [0, 1];
    cache_path: checkpoint file (None with caching off); trained: False if loaded from cache;
    seconds: wall time of this call; train_seconds: time the training itself took (also for a
    cached victim, from its checkpoint)."""

    model: nn.Module
    test_accuracy: float
    cache_path: str | None
    trained: bool
    seconds: float
    train_seconds: float = 0.0


def victim_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "victims"


def data_digest(ds: ArrayDataset) -> str:
    """Content hash of a dataset's images and labels (blake2b, ~0.1 s per 100 MB)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(ds.x.shape), str(ds.x.dtype))).encode())
    h.update(ds.x.detach().cpu().contiguous().numpy().tobytes())
    h.update(ds.y.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def accuracy(model: nn.Module, ds: ArrayDataset, batch_size: int = 1024,
             device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` on ``ds`` (labels must be >= 0)."""
    if len(ds) == 0:
        return float("nan")
    model.eval()
    correct = 0
    for i in range(0, len(ds), batch_size):
        out = model(ds.x[i:i + batch_size].to(device))
        correct += int((out.argmax(dim=1).cpu() == ds.y[i:i + batch_size]).sum())
    return correct / len(ds)


def _default_model_fn(arch: str) -> ModelFn:
    from .models import ARCHS, build_model

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid choices: {', '.join(ARCHS)}")
    return lambda input_shape, num_classes: build_model(arch, input_shape, num_classes)


def _build(model_fn: ModelFn, splits: Splits, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_fn(tuple(splits.input_shape), splits.num_classes)


def _load_checkpoint(path: Path, key: dict) -> dict | None:
    """The checkpoint's contents, or None (with a warning naming the file) if unusable."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated/corrupt files
        first = (str(e).splitlines() or [""])[0][:160]  # torch's messages run to many lines
        warnings.warn(f"victim checkpoint {path} is unreadable ({type(e).__name__}: {first}); "
                      "retraining and overwriting it", RuntimeWarning, stacklevel=3)
        return None
    if not isinstance(ckpt, dict) or ckpt.get("format") != _FORMAT or ckpt.get("key") != key:
        warnings.warn(f"victim checkpoint {path} does not match this victim's configuration "
                      "(different format or key); retraining and overwriting it",
                      RuntimeWarning, stacklevel=3)
        return None
    return ckpt


def _train(model: nn.Module, ds: ArrayDataset, *, seed: int, epochs: int, batch_size: int,
           lr: float, device: torch.device, progress: bool) -> None:
    from .progress import progress_bar

    gen = torch.Generator().manual_seed(seed)
    n = len(ds)
    steps = math.ceil(n / batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # cosine decay to 0 over the run, per step: with a constant lr the test accuracy of the
    # BatchNorm nets swings by points from one epoch to the next (cnn-wide: 89.7% -> 81.5%)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    with torch.random.fork_rng(devices=[]), progress_bar(total=epochs * steps,
                                                         disable=not progress, desc="victim",
                                                         unit="batch") as bar:
        torch.manual_seed(seed + 1)  # dropout etc. inside the model
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, batch_size):
                b = perm[i:i + batch_size]
                x, y = ds.x[b].to(device), ds.y[b].to(device)
                loss = loss_fn(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                if bar.n % 20 == 0:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    model.eval()


def train_victim(splits: Splits, arch: str = "cnn-wide", *, seed: int = 0,
                 epochs: int | None = None, batch_size: int | None = None,
                 lr: float | None = None,
                 device: str | torch.device = "cpu",
                 cache_dir: str | os.PathLike | None = None, progress: bool = True,
                 model_fn: ModelFn | None = None, use_cache: bool = True) -> VictimResult:
    """Train the victim on ``splits.victim_train`` (or load it from the cache) and test it.

    arch: zoo architecture (``faststeal.models.ARCHS``); ``model_fn(input_shape, num_classes)``
    overrides how the model is built (``arch`` then only labels the checkpoint).
    epochs, batch_size, lr: default ``DATASET_DEFAULTS[splits.name]`` where the dataset has
    an entry, else ``DEFAULT_EPOCHS[arch]``, ``DEFAULT_BATCH_SIZE``, ``DEFAULT_LR``.
    use_cache=False trains and writes nothing. A victim whose test accuracy is below its
    dataset's ``DatasetInfo.min_victim_accuracy`` gets a RuntimeWarning.
    """
    t_start = time.perf_counter()
    if not isinstance(splits, Splits):
        raise TypeError(f"splits must be a faststeal.data.Splits, got {type(splits).__name__}")
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"arch must be a non-empty string, got {arch!r}")
    if model_fn is None:
        model_fn = _default_model_fn(arch)
    elif not callable(model_fn):
        raise TypeError(f"model_fn must be callable, got {type(model_fn).__name__}")
    own = DATASET_DEFAULTS.get(splits.name, {})
    if epochs is None:
        epochs = own.get("epochs", {}).get(arch, DEFAULT_EPOCHS.get(arch, FALLBACK_EPOCHS))
    batch_size = own.get("batch_size", DEFAULT_BATCH_SIZE) if batch_size is None else batch_size
    lr = own.get("lr", DEFAULT_LR) if lr is None else lr
    positive_int("epochs", epochs)
    positive_int("batch_size", batch_size)
    positive_int("seed", seed, minimum=0)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 < lr < math.inf):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if len(splits.victim_train) == 0 or not splits.victim_train.labeled:
        raise ValueError("splits.victim_train must hold labelled images")
    device = torch.device(device)

    model = _build(model_fn, splits, seed)
    structure = hashlib.blake2b(str(model).encode(), digest_size=8).hexdigest()
    key = {"dataset": splits.name, "split_seed": splits.seed,
           "victim_fraction": splits.victim_fraction, "max_train": splits.max_train,
           "victim_data": data_digest(splits.victim_train), "arch": arch,
           "model_structure": structure, "seed": seed, "epochs": epochs,
           "batch_size": batch_size, "lr": float(lr), "schedule": "cosine"}
    key_hash = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = (victim_cache_dir(cache_dir) / f"{splits.name}-{arch}-s{seed}-e{epochs}-{key_hash}.pt"
            if use_cache else None)
    test_digest = data_digest(splits.test)

    if path is not None and path.exists():
        ckpt = _load_checkpoint(path, key)
        if ckpt is not None:
            try:
                model.load_state_dict(ckpt["state_dict"])
            except (RuntimeError, KeyError) as e:
                warnings.warn(f"victim checkpoint {path} does not fit the model ({e}); "
                              "retraining and overwriting it", RuntimeWarning, stacklevel=2)
            else:
                model.to(device).eval()
                acc = (float(ckpt["test_accuracy"]) if ckpt.get("test_digest") == test_digest
                       else accuracy(model, splits.test, device=device))
                _warn_if_weak(splits.name, arch, acc)
                return VictimResult(model, acc, str(path), False,
                                    time.perf_counter() - t_start,
                                    float(ckpt.get("train_seconds", 0.0)))
            model = _build(model_fn, splits, seed)  # fresh init after a failed load

    model.to(device)
    t0 = time.perf_counter()
    _train(model, splits.victim_train, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
           device=device, progress=progress)
    train_seconds = time.perf_counter() - t0
    acc = accuracy(model, splits.test, device=device)
    _warn_if_weak(splits.name, arch, acc)
    if path is not None:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        _save_checkpoint({"format": _FORMAT, "key": key, "state_dict": state,
                          "test_accuracy": acc, "test_digest": test_digest,
                          "train_seconds": train_seconds}, path)
    return VictimResult(model, acc, None if path is None else str(path), True,
                        time.perf_counter() - t_start, train_seconds)


def _warn_if_weak(dataset: str, arch: str, acc: float) -> None:
    from .data.registry import DATASET_INFO

    info = DATASET_INFO.get(dataset)
    if info is not None and acc < info.min_victim_accuracy:
        warnings.warn(
            f"the {arch} victim reaches only {100 * acc:.1f}% test accuracy on {dataset} (a "
            f"trained victim reaches >= {100 * info.min_victim_accuracy:.0f}% there): numbers "
            "measured against a weak victim mean little; train it longer (--victim-epochs) or "
            "choose another --victim-arch", RuntimeWarning, stacklevel=3)


def victim_logits(model: nn.Module, x: Tensor, batch_size: int = 1024,
                  device: str | torch.device = "cpu") -> Tensor:
    """The victim's logits on ``x`` in batches (experimenter's view, e.g. for fidelity)."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size].to(device)).float().cpu()
                          for i in range(0, x.shape[0], batch_size)])


def _save_checkpoint(obj: dict, path: Path) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh))
