"""run_comparison's per-epoch cell checkpoints and member blocks (--member-chunk).

A run interrupted in the middle of a cell's training keeps that cell's checkpoint under
OUT/checkpoints/; the rerun resumes the cell from its last finished epoch and ends with the same
table as an uninterrupted run, and no checkpoint is left once every row is committed.
"""

import json
import os

import pytest
import torch

import faststeal
from faststeal.runs import Config
from faststeal.runs.runner import cell_checkpoint
from faststeal.methods.deep_ensemble import DeepEnsemble

TINY = dict(dataset="digits", victim_arch="mlp", surrogate_arch="mlp", victim_epochs=5,
            budget=300, seeds=1, epochs=3, methods=("baseline", "deep-ensemble"),
            member_sweep=(), probe_size=32, record_every=4, progress=False,
            method_params={"deep-ensemble": {"members": 3}})


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("full")
    faststeal.run_comparison(Config(**TINY, out=str(out), cache_dir=str(cache)))
    return _table(out)


def _table(out):
    res = json.loads((out / "results.json").read_text())
    return {m: {k: v for k, v in d.items() if k not in ("train_seconds",)}
            for m, d in res["methods"].items()}


def test_interrupted_cell_resumes_from_its_checkpoint(tmp_path, cache, uninterrupted,
                                                      monkeypatch, capsys):
    real = DeepEnsemble._on_epoch_start

    def interrupt(self, epoch, optimizer):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(self, epoch, optimizer)

    monkeypatch.setattr(DeepEnsemble, "_on_epoch_start", interrupt)
    cfg = Config(**TINY, out=str(tmp_path), cache_dir=str(cache))
    with pytest.raises(KeyboardInterrupt):
        faststeal.run_comparison(cfg)
    monkeypatch.undo()
    ckpt = cell_checkpoint(str(tmp_path), "main/deep-ensemble/seed=0")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [os.path.basename(ckpt)]
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1  # baseline's file is gone
    epochs_run = []

    def spy(self, epoch, optimizer):
        epochs_run.append(epoch)
        return real(self, epoch, optimizer)

    monkeypatch.setattr(DeepEnsemble, "_on_epoch_start", spy)
    faststeal.run_comparison(Config(**TINY, out=str(tmp_path), cache_dir=str(cache)))
    assert epochs_run == [2]  # only the epoch after the checkpoint was trained again
    assert "resuming: 1 finished cells kept" in capsys.readouterr().out
    assert _table(tmp_path) == uninterrupted
    assert not (tmp_path / "checkpoints").exists()


def test_stale_checkpoint_is_discarded(tmp_path, cache, uninterrupted, capsys):
    ckpt = cell_checkpoint(str(tmp_path), "main/baseline/seed=0")
    os.makedirs(os.path.dirname(ckpt))
    with open(ckpt, "wb") as fh:
        fh.write(b"garbage from a crashed disk")
    faststeal.run_comparison(Config(**TINY, out=str(tmp_path), cache_dir=str(cache)))
    out = capsys.readouterr().out
    assert "corrupt or unreadable" in out and "training it from the start" in out
    assert _table(tmp_path) == uninterrupted
    assert not (tmp_path / "checkpoints").exists()


def test_member_chunk_trains_blocks(tmp_path, cache, uninterrupted, monkeypatch):
    ranges = []
    real = DeepEnsemble.fit

    def spy(self, *a, **kw):
        ranges.append(self.hparams()["member_range"])
        return real(self, *a, **kw)

    monkeypatch.setattr(DeepEnsemble, "fit", spy)
    cfg = Config(**TINY, out=str(tmp_path), cache_dir=str(cache), member_chunk=2)
    faststeal.run_comparison(cfg)
    assert ranges == [(0, 2), (2, 3)]
    got = _table(tmp_path)
    assert got.keys() == uninterrupted.keys()
    # same members; CPU fused Adam may move the last ulp (see test_member_chunk)
    for method, metrics in got.items():
        for name, value in metrics.items():
            if isinstance(value, dict) and "mean" in value:
                assert value["mean"] == pytest.approx(uninterrupted[method][name]["mean"],
                                                      abs=1e-4), (method, name)
    assert got["deep-ensemble"]["members"] == 3


def test_member_chunk_does_not_change_the_config_hash():
    a = Config(**TINY).result_affecting()
    assert a == Config(**TINY, member_chunk="auto").result_affecting()
    assert "member_chunk" not in a
