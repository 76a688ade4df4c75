"""Pieces shared by the dataset sources: the not-found error, cache paths, the raw-array container.

Every source module returns :class:`RawSplit` pairs of *unnormalised* uint8/float arrays in
``(N, C, H, W)`` layout with pixel values in ``[0, 1]`` after :func:`RawSplit.to_unit`; the
registry turns them into normalised :class:`~faststeal.data.registry.ArrayDataset` objects.
Keeping the raw stage separate lets a cross-dataset pool be resized and normalised with the
*victim's* statistics instead of its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ENV_DATA = "FASTSTEAL_DATA"
ENV_CACHE = "FASTSTEAL_CACHE"


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where faststeal looked; the message says how to get them."""


def cache_root() -> Path:
    """faststeal's cache folder: ``$FASTSTEAL_CACHE`` if set, else ``~/.cache/faststeal``.

    Sub-folders: ``datasets/`` (torchvision downloads), ``victims/`` (trained victim checkpoints).
    """
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "faststeal"


def env_data_root() -> Path | None:
    env = os.environ.get(ENV_DATA)
    return Path(env).expanduser() if env else None


@dataclass
class RawSplit:
    """Unnormalised images and labels of one split.

    images: (N, C, H, W) array, uint8 in [0, scale] or float; labels: (N,) integer array.
    ``scale`` is the value that maps to 1.0 (255 for 8-bit images, 16 for sklearn digits).
    """

    images: np.ndarray
    labels: np.ndarray
    scale: float = 255.0

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be ({self.images.shape[0]},), got {self.labels.shape}")
        # raw arrays may be cached and shared between callers: never modify them in place
        self.images.flags.writeable = False
        self.labels.flags.writeable = False

    def to_unit(self) -> np.ndarray:
        """Images as float32 in [0, 1]."""
        return self.images.astype(np.float32) / np.float32(self.scale)


def carve_test(raw: RawSplit, test_fraction: float, seed: int = 0) -> tuple[RawSplit, RawSplit]:
    """Deterministic held-out test part for sources that ship no test split.

    The permutation uses a fixed seed (not the experiment's split seed), so every experiment on
    such a dataset evaluates on the same held-out images.
    """
    n = raw.labels.shape[0]
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return (RawSplit(raw.images[train_idx], raw.labels[train_idx], raw.scale),
            RawSplit(raw.images[test_idx], raw.labels[test_idx], raw.scale))
