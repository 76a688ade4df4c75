"""faststeal.victim: training, the checkpoint cache (load, not retrain), corrupt files, args."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import faststeal.victim as victim_mod
from faststeal.data import make_splits
from faststeal.victim import VictimResult, train_victim


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def splits():
    return make_splits("digits", seed=0, max_test=200)


class Builder:
    """model_fn that counts how often a model is built (a tiny linear classifier)."""

    def __init__(self):
        self.builds = 0

    def __call__(self, input_shape, num_classes):
        self.builds += 1
        c, h, w = input_shape
        return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, num_classes))


@pytest.fixture
def count_training(monkeypatch):
    calls = []
    real = victim_mod._train

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(victim_mod, "_train", counted)
    return calls


def run(splits, tmp_path, **kw):
    kw = {"arch": "linear", "epochs": 3, "lr": 3e-2, "progress": False, "cache_dir": tmp_path,
          "model_fn": Builder(), **kw}
    return train_victim(splits, kw.pop("arch"), **kw)


def test_trains_and_second_call_loads(splits, tmp_path, count_training):
    r1 = run(splits, tmp_path)
    assert isinstance(r1, VictimResult) and r1.trained and len(count_training) == 1
    assert r1.test_accuracy > 0.8  # a linear model on digits gets ~0.9 in 3 epochs
    assert r1.cache_path is not None and r1.cache_path.startswith(str(tmp_path))
    assert not r1.model.training
    r2 = run(splits, tmp_path)
    assert not r2.trained and len(count_training) == 1  # loaded, not retrained
    assert r2.cache_path == r1.cache_path and r2.test_accuracy == r1.test_accuracy
    for a, b in zip(r1.model.state_dict().values(), r2.model.state_dict().values()):
        assert torch.equal(a, b)
    assert r2.train_seconds == pytest.approx(r1.train_seconds)
    assert [p.name for p in tmp_path.iterdir()] == [r1.cache_path.rsplit("/", 1)[1]]  # no tmp


def test_cache_key_covers_config_and_data(splits, tmp_path, count_training):
    base = run(splits, tmp_path).cache_path
    assert run(splits, tmp_path, epochs=2).cache_path != base
    assert run(splits, tmp_path, seed=1).cache_path != base
    assert run(splits, tmp_path, lr=1e-2).cache_path != base
    changed = make_splits("digits", seed=0, max_test=200)
    changed.victim_train.x[0, 0, 0, 0] += 1.0  # same split config, different data
    assert run(changed, tmp_path).cache_path != base
    assert len(count_training) == 5
    # a different test set re-evaluates the cached model instead of reusing the stored score
    other_test = make_splits("digits", seed=0, max_test=50)
    r = run(other_test, tmp_path)
    assert not r.trained and len(count_training) == 5


def test_training_is_deterministic_and_leaves_global_rng(splits, tmp_path):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = run(splits, tmp_path, use_cache=False)
    after = torch.rand(1)
    b = run(splits, tmp_path, use_cache=False)
    assert torch.equal(before, after)
    assert a.cache_path is None and list(tmp_path.iterdir()) == []
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(x, y)


def test_corrupt_checkpoint_is_retrained_with_warning(splits, tmp_path, count_training):
    path = run(splits, tmp_path).cache_path
    with open(path, "wb") as f:
        f.write(b"garbage, not a torch file")
    with pytest.warns(RuntimeWarning, match="unreadable.*retraining"):
        r = run(splits, tmp_path)
    assert r.trained and len(count_training) == 2 and str(path) in str(r.cache_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not run(splits, tmp_path).trained  # rewritten and loadable again


def test_mismatched_checkpoint_is_retrained_with_warning(splits, tmp_path, count_training):
    path = run(splits, tmp_path).cache_path
    ckpt = torch.load(path, weights_only=True)
    ckpt["key"]["epochs"] = 999
    torch.save(ckpt, path)
    with pytest.warns(RuntimeWarning, match=r"does not match .*retraining"):
        assert run(splits, tmp_path).trained
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"] = {"bogus": torch.zeros(1)}
    torch.save(ckpt, path)
    with pytest.warns(RuntimeWarning, match="does not fit the model"):
        r = run(splits, tmp_path)
    assert r.trained and len(count_training) == 3 and r.test_accuracy > 0.8


def test_default_cache_dir_from_env(splits, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSTEAL_CACHE", str(tmp_path / "fc"))
    r = run(splits, tmp_path, cache_dir=None, epochs=1)
    assert r.cache_path.startswith(str(tmp_path / "fc" / "victims"))


def test_zoo_architecture(splits, tmp_path):
    models = pytest.importorskip("faststeal.models")
    r = train_victim(splits, "lenet", epochs=1, progress=False, cache_dir=tmp_path)
    assert r.trained and 0.0 <= r.test_accuracy <= 1.0
    assert isinstance(r.model, nn.Module) and "lenet" in r.cache_path
    with pytest.raises(ValueError, match="unknown arch 'vgg'; valid choices: " +
                       ", ".join(models.ARCHS)):
        train_victim(splits, "vgg", progress=False, cache_dir=tmp_path)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(epochs=0), ValueError, "epochs must be a positive integer"),
    (dict(epochs=2.5), TypeError, "epochs must be a positive integer, got float"),
    (dict(batch_size=-3), ValueError, "batch_size must be a positive integer"),
    (dict(lr=0.0), ValueError, "lr must be a positive finite number"),
    (dict(seed=-1), ValueError, "seed must be a non-negative integer"),
    (dict(model_fn=5), TypeError, "model_fn must be callable"),
])
def test_bad_arguments(splits, tmp_path, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        run(splits, tmp_path, **kwargs)


def test_splits_type_checked(tmp_path):
    with pytest.raises(TypeError, match="splits must be a faststeal.data.Splits"):
        train_victim("digits", "mlp", cache_dir=tmp_path)


def test_digits_victim_is_strong_with_the_defaults(tmp_path):
    """The comparison's default victim (lenet) on digits with no training settings: >= 95%
    test accuracy (51.8% with the Fashion-MNIST defaults: 12 epochs of 6 steps), no warning."""
    from faststeal.runs import Config

    arch = Config().victim_arch
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        r = train_victim(make_splits("digits", seed=0), arch, progress=False, use_cache=False)
    assert r.test_accuracy >= 0.95, r.test_accuracy


def test_weak_victim_warns(splits):
    with pytest.warns(RuntimeWarning, match=r"the linear victim reaches only \d+\.\d% test "
                                            r"accuracy on digits \(a trained victim reaches "
                                            r">= 95%"):
        train_victim(splits, "linear", model_fn=Builder(), epochs=1, batch_size=1024, lr=1e-4,
                     progress=False, use_cache=False)
