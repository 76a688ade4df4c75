"""Fashion-MNIST from IDX files (the format of the original MNIST distribution), read with numpy.

Lookup order (first hit wins):
1. an explicit ``root`` argument (strict: if the files are not there, that is an error, so a
   caller's folder is never silently replaced by another copy), else ``$FASTSTEAL_DATA``;
2. ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``);
3. an earlier torchvision download under ``<cache>/datasets``;
4. with ``download=True`` only: a torchvision download into ``root`` or ``<cache>/datasets``.

Inside each folder the four files may be gzipped or not, directly in the folder or in a
``fashion-mnist/`` or torchvision-style ``FashionMNIST/raw/`` sub-folder.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from .common import DatasetNotFoundError, RawSplit, cache_root, env_data_root

SYSTEM_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")

# IDX type byte -> big-endian numpy dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped if the name ends in ``.gz``) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"cannot read IDX file {path}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4]!r})")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes) but the file "
                         f"holds {len(data) - header} bytes of data")
    arr = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def _find_file(folder: Path, stem: str) -> Path | None:
    for sub in (folder, folder / "fashion-mnist", folder / "FashionMNIST" / "raw"):
        for name in (stem + ".gz", stem):
            if (sub / name).is_file():
                return sub / name
    return None


def find_fashion_mnist(folder: Path) -> dict[str, Path] | None:
    """The four Fashion-MNIST files under ``folder``, or None unless all four are there."""
    found = {key: _find_file(folder, stem) for key, stem in FASHION_FILES.items()}
    return None if any(p is None for p in found.values()) else found  # type: ignore[return-value]


def read_fashion_mnist(files: dict[str, Path]) -> tuple[RawSplit, RawSplit]:
    splits = []
    for part in ("train", "test"):
        images, labels = read_idx(files[f"{part}_images"]), read_idx(files[f"{part}_labels"])
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"Fashion-MNIST {part} files disagree: images {images.shape} from "
                             f"{files[f'{part}_images']}, labels {labels.shape} from "
                             f"{files[f'{part}_labels']}")
        splits.append(RawSplit(images[:, None], labels.astype(np.int64), 255.0))
    return splits[0], splits[1]


def not_found_message(searched: list[Path]) -> str:
    where = "\n".join(f"  - {p}" for p in searched)
    return (
        "Fashion-MNIST not found. Looked in:\n" + where + "\n"
        "Get it one of these ways:\n"
        "  1. Debian/Ubuntu: `sudo apt-get install dataset-fashion-mnist` "
        f"(installs {SYSTEM_FASHION_DIR});\n"
        "  2. put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz in a folder and set "
        "FASTSTEAL_DATA=/path/to/that/folder (or pass root=...);\n"
        "  3. when online, pass download=True (command line: --download) to fetch it with "
        "torchvision.\n"
        "Without any files, `--dataset digits` (scikit-learn's digits) works offline."
    )


def load_fashion_mnist(root: str | Path | None = None,
                       download: bool = False) -> tuple[RawSplit, RawSplit]:
    """Raw Fashion-MNIST (train 60k, test 10k; 1x28x28 uint8) following the lookup order above."""
    download_dir = cache_root() / "datasets"
    if root is not None:
        searched = [Path(root).expanduser()]
        download_dir = searched[0]
    else:
        env = env_data_root()
        searched = ([env] if env is not None else []) + [SYSTEM_FASHION_DIR, download_dir]
    for folder in searched:
        files = find_fashion_mnist(folder)
        if files is not None:
            return read_fashion_mnist(files)
    if download:
        from .torchvision_sets import download_fashion_mnist

        download_fashion_mnist(download_dir)
        files = find_fashion_mnist(download_dir)
        if files is not None:
            return read_fashion_mnist(files)
        searched.append(download_dir)
    raise DatasetNotFoundError(not_found_message(searched))
