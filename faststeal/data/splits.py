"""Victim / attacker / test splits of one experiment.

- victim-train: ``victim_fraction`` of the dataset's training split (a seeded random subset);
- attacker pool: the rest of the training split (same distribution, disjoint from the victim's
  data), or with ``pool_dataset`` every image of another dataset, resized and channel-converted
  to the victim's input shape and normalised with the *victim* dataset's statistics;
- test: the dataset's test split (never trained on by either side).

The index bookkeeping (``victim_idx``, ``pool_idx``) is kept so disjointness can be checked and
so a result can name exactly which images each side saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import positive_int
from .registry import (DEFAULT_DATASET, ArrayDataset, check_name, load_dataset, load_raw,
                       normalise)

# ITU-R BT.601 luma weights for RGB -> grey
_LUMA = (0.299, 0.587, 0.114)


@dataclass
class Splits:
    """The three data sets of one experiment plus the indices that produced them.

    victim_idx: (n_victim,) int64 indices into the training split of ``name``.
    pool_idx: (n_pool,) int64 indices into the training split of ``name`` (same-dataset pool) or
    into the images of ``pool_name`` (train split followed by test split) for a cross-dataset
    pool. A cross-dataset pool is unlabeled (y = -1): its labels live in another label space.
    """

    victim_train: ArrayDataset
    pool: ArrayDataset
    test: ArrayDataset
    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    victim_idx: Tensor
    pool_idx: Tensor
    pool_name: str
    seed: int
    victim_fraction: float
    max_train: int | None = None
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    @property
    def cross_dataset(self) -> bool:
        return self.pool_name != self.name

    def describe(self) -> dict[str, Any]:
        """JSON-able summary (sizes, seed, sources, normalisation) for result files."""
        return {"dataset": self.name, "pool_dataset": self.pool_name, "seed": self.seed,
                "victim_fraction": self.victim_fraction, "max_train": self.max_train,
                "n_victim_train": len(self.victim_train), "n_pool": len(self.pool),
                "n_test": len(self.test), "input_shape": list(self.input_shape),
                "num_classes": self.num_classes, "mean": list(self.mean), "std": list(self.std)}


def adapt_images(x_unit: Tensor, input_shape: tuple[int, int, int],
                 mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Bring [0, 1] images of any (C, H, W) into another dataset's input space.

    x_unit: (N, C, H, W) float in [0, 1]. Channels: 1 -> 3 by repetition, 3 -> 1 by luma;
    size: bilinear ``F.interpolate`` (antialiased when shrinking); then per-channel
    normalisation with ``mean``/``std`` (the target dataset's training statistics).
    """
    c_out, h_out, w_out = input_shape
    c_in = x_unit.shape[1]
    if c_in != c_out:
        if c_in == 1:
            x_unit = x_unit.expand(-1, c_out, -1, -1)
        elif c_in == 3 and c_out == 1:
            w = torch.tensor(_LUMA, dtype=x_unit.dtype).view(1, 3, 1, 1)
            x_unit = (x_unit * w).sum(dim=1, keepdim=True)
        else:
            raise ValueError(f"cannot convert {c_in}-channel images to {c_out} channels")
    if tuple(x_unit.shape[2:]) != (h_out, w_out):
        shrink = x_unit.shape[2] > h_out or x_unit.shape[3] > w_out
        x_unit = F.interpolate(x_unit, size=(h_out, w_out), mode="bilinear",
                               align_corners=False, antialias=shrink).clamp_(0.0, 1.0)
    return normalise(x_unit.contiguous(), mean, std)


def make_splits(dataset: str = DEFAULT_DATASET, seed: int = 0, victim_fraction: float = 0.5,
                pool_dataset: str | None = None, root: str | Path | None = None,
                download: bool = False, max_test: int | None = None,
                max_train: int | None = None, pool_root: str | Path | None = None) -> Splits:
    """Deterministic (given ``seed``) victim-train / pool / test splits of ``dataset``.

    victim_fraction: share of the (possibly ``max_train``-capped) training split given to the
    victim, in (0, 1); the attacker's pool gets the rest. With a cross-dataset ``pool_dataset``
    the victim may take the whole training split (victim_fraction = 1).
    max_train: use a seeded random subset of this many training images (quick runs).
    max_test: keep the first ``max_test`` test images (the same for every seed).
    root / pool_root: data folders of the victim dataset / the pool dataset.
    """
    check_name(dataset)
    if pool_dataset is not None:
        check_name(pool_dataset, "pool_dataset")
    cross = pool_dataset is not None and pool_dataset != dataset
    seed = positive_int("seed", seed, 0)
    if isinstance(victim_fraction, bool) or not isinstance(victim_fraction, (int, float)):
        raise TypeError(f"victim_fraction must be a float, got {type(victim_fraction).__name__}")
    hi_ok = cross and victim_fraction == 1.0
    if not (0.0 < victim_fraction < 1.0 or hi_ok) or math.isnan(victim_fraction):
        allowed = "(0, 1]" if cross else "(0, 1) (the pool needs the rest)"
        raise ValueError(f"victim_fraction must be in {allowed}, got {victim_fraction}")
    max_test = positive_int("max_test", max_test, 1, allow_none=True)
    max_train = positive_int("max_train", max_train, 2, allow_none=True)

    train, test = load_dataset(dataset, root=root, download=download)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(train))
    if max_train is not None:
        perm = perm[:max_train]
    n_victim = int(round(len(perm) * float(victim_fraction)))
    if n_victim < 1 or (not cross and n_victim >= len(perm)):
        raise ValueError(f"victim_fraction={victim_fraction} of {len(perm)} training images "
                         f"leaves the victim {n_victim} and the pool {len(perm) - n_victim}; "
                         "both need at least one")
    victim_idx = torch.from_numpy(np.sort(perm[:n_victim])).to(torch.int64)
    victim_train = train.subset(victim_idx)

    if cross:
        raw_train, raw_test = load_raw(str(pool_dataset), pool_root, download)
        unit = np.concatenate([raw_train.to_unit(), raw_test.to_unit()])
        pool_x = adapt_images(torch.from_numpy(unit), train.input_shape, train.mean or (),
                              train.std or ())
        pool_idx = torch.arange(pool_x.shape[0], dtype=torch.int64)
        pool = ArrayDataset(pool_x, torch.full((pool_x.shape[0],), -1, dtype=torch.int64),
                            train.num_classes, str(pool_dataset), train.mean, train.std)
        pool_name = str(pool_dataset)
    else:
        pool_idx = torch.from_numpy(np.sort(perm[n_victim:])).to(torch.int64)
        pool = train.subset(pool_idx)
        pool_name = dataset

    if max_test is not None and max_test < len(test):
        test = test.subset(torch.arange(max_test))
    return Splits(victim_train=victim_train, pool=pool, test=test, name=dataset,
                  input_shape=train.input_shape, num_classes=train.num_classes,
                  victim_idx=victim_idx, pool_idx=pool_idx, pool_name=pool_name, seed=seed,
                  victim_fraction=float(victim_fraction), max_train=max_train,
                  mean=train.mean or (), std=train.std or ())
