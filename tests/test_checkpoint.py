"""Per-epoch fit checkpoints (faststeal.methods.checkpoint): a fit killed after epoch k and
restarted with the same checkpoint ends bit-identical to an uninterrupted fit, for every method;
checkpoints of another fit and corrupt files are refused with errors naming the file.

Data as in test_methods: Gaussian class prototypes on 1x8x8 "images", the zoo's MLP, 3 epochs of
3 steps, so the whole file runs in seconds on one thread.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from faststeal.methods import METHODS, build_method
from faststeal.methods.checkpoint import CheckpointError
from toydata import prototype_data

SHAPE = (1, 8, 8)
C = 10
EPOCHS = 3

# Small S; SWAG collects every step from the first third on, so its moments, its deviation ring
# and (record_iterates) its iterate list all change across the epochs a checkpoint splits.
TEST_HP = {
    "baseline": {},
    "deep-ensemble": {"members": 2},
    "mc-dropout": {"members": 3},
    "bbb": {"members": 3},
    "swag": {"members": 3, "rank": 3, "collect_every": 1, "swa_start": 0.3,
             "record_iterates": True},
    "laplace": {"members": 3},
    "bootstrap-ensemble": {"members": 2},
    "hetero-ensemble": {"members": 2, "archs": ["mlp", "lenet"]},
    "hparam-ensemble": {"members": 2},
    "ncl-ensemble": {"members": 2},
    "repulsive-ensemble": {"members": 2},
}
FIT = dict(epochs=EPOCHS, batch_size=32, lr=3e-3, record_every=2, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_data(n: int, seed: int, noise: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    return prototype_data(n, seed, SHAPE, C, noise)


X, Y = make_data(96, 1)  # 3 steps of 32 per epoch
XT, _ = make_data(40, 2)
PROBE = XT[:16]


def make(name: str, seed: int = 3, **kw):
    return build_method(name, "mlp", SHAPE, C, seed=seed, **{**TEST_HP[name], **kw})


class Killed(Exception):
    """Stands in for the process dying."""


def _kill_at(m, hook: str, when: int) -> None:
    """Make ``m`` raise Killed from ``hook`` at epoch (``_on_epoch_start``) or iteration
    (``_on_step``) ``when``; an instance attribute shadows the method's own hook."""
    original = getattr(m, hook)

    def hooked(*args):
        if args[0] == when:
            raise Killed(f"{hook} {when}")
        return original(*args)

    setattr(m, hook, hooked)


def _assert_same_fit(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key
    assert a.trace == b.trace
    assert a.hparams() == b.hparams()
    assert torch.equal(a.predict_members(XT), b.predict_members(XT))
    assert torch.equal(a.predict_proba(XT), b.predict_proba(XT))
    _assert_nested_equal(sa["extra"], sb["extra"])
    if hasattr(a, "iterates"):  # SWAG's record_iterates list is not part of state_dict
        _assert_nested_equal(a.iterates, b.iterates, "iterates")
        assert a.collected_at == b.collected_at


def _assert_nested_equal(a, b, where="extra") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_nested_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_nested_equal(u, v, f"{where}[{i}]")
    else:
        assert a == b, where


_REFERENCE: dict = {}


def uninterrupted(name: str):
    if name not in _REFERENCE:
        _REFERENCE[name] = make(name).fit(X, Y, probe=PROBE, **FIT)
    return _REFERENCE[name]


def test_every_registered_method_is_covered():
    assert set(TEST_HP) == set(METHODS)


# Kill points: before epoch 1 starts (checkpoint of epoch 0 on disk), and in the middle of the
# last epoch (checkpoint of epoch 1 on disk, the weights already moved past it).
KILLS = [("_on_epoch_start", 1), ("_on_step", 2 * 3 + 2)]


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("hook,when", KILLS, ids=["after-epoch-0", "mid-epoch-2"])
def test_killed_fit_resumes_bit_identical(name, hook, when, tmp_path):
    ckpt = tmp_path / f"{name}.pt"
    killed = make(name)
    _kill_at(killed, hook, when)
    with pytest.raises(Killed):
        killed.fit(X, Y, probe=PROBE, checkpoint=ckpt, **FIT)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["epoch"] == (0 if hook == "_on_epoch_start" else 1)
    # a fresh instance, as in a restarted process
    resumed = make(name).fit(X, Y, probe=PROBE, checkpoint=ckpt, **FIT)
    _assert_same_fit(resumed, uninterrupted(name))
    assert os.path.exists(ckpt)  # kept: the caller deletes it once the result is stored
    assert torch.load(ckpt, weights_only=True)["epoch"] == EPOCHS - 1
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.name]  # no temporary files left


@pytest.mark.parametrize("name", ["swag", "laplace", "deep-ensemble"])
def test_refit_from_finished_checkpoint_only_finalizes(name, tmp_path):
    """A kill between the last epoch and the stored result: the rerun skips every epoch."""
    ckpt = tmp_path / "c.pt"
    make(name).fit(X, Y, probe=PROBE, checkpoint=ckpt, **FIT)
    again = make(name)
    _kill_at(again, "_on_step", 1)  # any training step would raise
    again.fit(X, Y, probe=PROBE, checkpoint=ckpt, **FIT)
    _assert_same_fit(again, uninterrupted(name))


def test_checkpointed_fit_equals_plain_fit(tmp_path):
    m = make("mc-dropout").fit(X, Y, probe=PROBE, checkpoint=tmp_path / "c.pt", **FIT)
    _assert_same_fit(m, uninterrupted("mc-dropout"))


def test_sigkilled_process_resumes_bit_identical(tmp_path):
    """A real kill: a child process SIGKILLs itself at the start of epoch 2."""
    ckpt = tmp_path / "de.pt"
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        torch.set_num_threads(1)
        import test_checkpoint as t
        m = t.make("deep-ensemble")
        def die(epoch, optimizer):
            if epoch == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        m._on_epoch_start = die
        m.fit(t.X, t.Y, probe=t.PROBE, checkpoint={str(ckpt)!r}, **t.FIT)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    resumed = make("deep-ensemble").fit(X, Y, probe=PROBE, checkpoint=ckpt, **FIT)
    _assert_same_fit(resumed, uninterrupted("deep-ensemble"))


# ----------------------------------------------------------------------------- refusals

@pytest.fixture
def baseline_ckpt(tmp_path):
    ckpt = tmp_path / "base.pt"
    m = make("baseline")
    _kill_at(m, "_on_epoch_start", 1)
    with pytest.raises(Killed):
        m.fit(X, Y, probe=PROBE, checkpoint=ckpt, **FIT)
    return ckpt


@pytest.mark.parametrize("change,field", [
    (dict(fit={"lr": 1e-3}), "lr"),
    (dict(fit={"epochs": 4}), "epochs"),
    (dict(fit={"batch_size": 16}), "batch_size"),
    (dict(fit={"record_every": 3}), "record_every"),
    (dict(x=X.flip(0)), "x (contents differ)"),
    (dict(x=X[:64], y=Y[:64]), "x_shape"),
    (dict(y=(Y + 1) % C), "y (contents differ)"),
    (dict(probe=None), "probe"),
    (dict(method={"seed": 4}), "seed"),
    (dict(method={"weight_decay": 1e-4}), "hparams (weight_decay"),
])
def test_mismatched_checkpoint_refused(baseline_ckpt, change, field):
    kw = dict(FIT, **change.get("fit", {}))
    x, y = change.get("x", X), change.get("y", Y)
    probe = change["probe"] if "probe" in change else PROBE
    m = make("baseline", **change.get("method", {}))
    with pytest.raises(CheckpointError) as e:
        m.fit(x, y, probe=probe, checkpoint=baseline_ckpt, **kw)
    msg = str(e.value)
    assert str(baseline_ckpt) in msg and "different fit" in msg and field in msg, msg
    assert isinstance(e.value, ValueError)


def test_checkpoint_of_another_method_refused(baseline_ckpt):
    with pytest.raises(ValueError, match="method .*'baseline'.*'mc-dropout'"):
        make("mc-dropout").fit(X, Y, probe=PROBE, checkpoint=baseline_ckpt, **FIT)


def test_checkpoint_after_further_training_refused(baseline_ckpt):
    """Continuing training from other weights is another fit (initial_weights differ)."""
    m = make("baseline").fit(X, Y, epochs=1, batch_size=32, progress=False)
    with pytest.raises(CheckpointError, match="initial_weights"):
        m.fit(X, Y, probe=PROBE, checkpoint=baseline_ckpt, **FIT)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "truncated", "foreign"])
def test_corrupt_checkpoint_refused(baseline_ckpt, content):
    if content == "truncated":
        data = baseline_ckpt.read_bytes()
        baseline_ckpt.write_bytes(data[:len(data) // 2])
    elif content == "foreign":
        torch.save({"weights": torch.zeros(3)}, baseline_ckpt)
    else:
        baseline_ckpt.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        make("baseline").fit(X, Y, probe=PROBE, checkpoint=baseline_ckpt, **FIT)
    assert str(baseline_ckpt) in str(e.value)


def test_inconsistent_checkpoint_refused(baseline_ckpt):
    state = torch.load(baseline_ckpt, weights_only=True)
    state["iteration"] += 1
    torch.save(state, baseline_ckpt)
    with pytest.raises(CheckpointError, match="could not be restored"):
        make("baseline").fit(X, Y, probe=PROBE, checkpoint=baseline_ckpt, **FIT)


@pytest.mark.parametrize("value,exc,match", [
    (123, TypeError, "checkpoint must be a str"),
    ("", ValueError, "non-empty"),
])
def test_bad_checkpoint_argument(value, exc, match):
    with pytest.raises(exc, match=match):
        make("baseline").fit(X, Y, checkpoint=value, **FIT)


def test_directory_as_checkpoint_refused(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        make("baseline").fit(X, Y, checkpoint=tmp_path, **FIT)


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """The write is atomic: a failure while writing epoch 1 leaves epoch 0's file intact."""
    ckpt = tmp_path / "c.pt"
    real_save = torch.save
    calls = []

    def flaky_save(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 2:  # f: the temporary file object faststeal.files.atomic_write opened
            f.write(b"half a checkpo")
            raise OSError("disk full")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        make("baseline").fit(X, Y, probe=PROBE, checkpoint=ckpt, **FIT)
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    assert torch.load(ckpt, weights_only=True)["epoch"] == 0
    resumed = make("baseline").fit(X, Y, probe=PROBE, checkpoint=ckpt, **FIT)
    _assert_same_fit(resumed, uninterrupted("baseline"))


def test_method_without_checkpoint_support_refuses(tmp_path, monkeypatch):
    m = make("baseline")
    monkeypatch.setattr(type(m), "supports_checkpoint", False)
    with pytest.raises(ValueError, match="cannot checkpoint its mid-training state"):
        m.fit(X, Y, checkpoint=tmp_path / "c.pt", **FIT)
    assert not (tmp_path / "c.pt").exists()
