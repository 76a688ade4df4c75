"""MNIST and CIFAR-10 through torchvision, from a user-given root (download only when asked).

``import torchvision`` costs seconds, so it happens inside these functions, never at
``import faststeal``. Lookup: the explicit ``root`` (strict), else ``$FASTSTEAL_DATA`` and an
earlier download under ``<cache>/datasets``; with ``download=True``, torchvision fetches the
files into ``root`` (or ``<cache>/datasets``). Folder layout is torchvision's own:
``<root>/MNIST/raw/...`` and ``<root>/cifar-10-batches-py/...``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import DatasetNotFoundError, RawSplit, cache_root, env_data_root

_TORCHVISION_CLASSES = {"mnist": "MNIST", "cifar10": "CIFAR10"}
_LAYOUT = {"mnist": "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
           "cifar10": "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}"}


def _torchvision_datasets():
    try:
        import torchvision.datasets as tvd
    except ImportError as e:
        raise DatasetNotFoundError(
            "this dataset is loaded through torchvision, which is not installed: "
            "`pip install torchvision`") from e
    return tvd


def _to_raw(ds) -> RawSplit:
    data = ds.data.numpy() if hasattr(ds.data, "numpy") else np.asarray(ds.data)
    if data.ndim == 3:  # MNIST: (N, H, W)
        images = data[:, None]
    else:  # CIFAR: (N, H, W, C)
        images = np.ascontiguousarray(data.transpose(0, 3, 1, 2))
    targets = ds.targets.numpy() if hasattr(ds.targets, "numpy") else np.asarray(ds.targets)
    return RawSplit(images.astype(np.uint8, copy=False), targets.astype(np.int64), 255.0)


def _try_load(cls, folder: Path, download: bool) -> tuple[RawSplit, RawSplit] | None:
    try:
        train = cls(str(folder), train=True, download=download)
        test = cls(str(folder), train=False, download=False)
    except RuntimeError as e:
        if "not found" in str(e).lower() or "corrupted" in str(e).lower():
            return None
        raise
    return _to_raw(train), _to_raw(test)


def load_torchvision_raw(name: str, root: str | Path | None = None,
                         download: bool = False) -> tuple[RawSplit, RawSplit]:
    """Raw train/test splits of ``name`` ("mnist" or "cifar10") via torchvision."""
    if name not in _TORCHVISION_CLASSES:
        raise ValueError(f"torchvision source supports {tuple(_TORCHVISION_CLASSES)}, got {name!r}")
    download_dir = cache_root() / "datasets"
    if root is not None:
        searched = [Path(root).expanduser()]
        download_dir = searched[0]
    else:
        env = env_data_root()
        searched = ([env] if env is not None else []) + [download_dir]
    existing = [f for f in searched if f.is_dir()]
    if existing or download:
        cls = getattr(_torchvision_datasets(), _TORCHVISION_CLASSES[name])
        for folder in existing:
            got = _try_load(cls, folder, download=False)
            if got is not None:
                return got
        if download:
            got = _try_load(cls, download_dir, download=True)
            if got is not None:
                return got
    where = "\n".join(f"  - {p}" for p in searched)
    raise DatasetNotFoundError(
        f"{name} not found. Looked in:\n{where}\n"
        f"Expected torchvision's layout under the root: {_LAYOUT[name]}.\n"
        f"Pass root=/path (or set FASTSTEAL_DATA=/path) to a folder that holds it, or, when "
        f"online, pass download=True (command line: --download) to fetch it with torchvision.\n"
        f"Offline alternatives: `--dataset fashion-mnist` (apt-get install dataset-fashion-mnist)"
        f" or `--dataset digits`.")


def download_fashion_mnist(folder: Path) -> None:
    """Fetch Fashion-MNIST with torchvision into ``folder/FashionMNIST/raw`` (needs network)."""
    tvd = _torchvision_datasets()
    try:
        tvd.FashionMNIST(str(folder), train=True, download=True)
        tvd.FashionMNIST(str(folder), train=False, download=True)
    except Exception as e:  # network errors come in many types (URLError, HTTPError, OSError)
        raise DatasetNotFoundError(
            f"downloading Fashion-MNIST into {folder} failed ({type(e).__name__}: {e}). "
            "Offline: `sudo apt-get install dataset-fashion-mnist`, or set FASTSTEAL_DATA to a "
            "folder holding the four IDX files, or use `--dataset digits`.") from e
