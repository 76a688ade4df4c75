"""Member chunking (attack.train_and_evaluate(member_chunk=...)): a Deep Ensemble trained in
blocks of members equals the one-block ensemble, ``"auto"`` halves the block on CUDA
out-of-memory errors (simulated here on the CPU), and the per-epoch checkpoints of the blocks
resume a killed run.

Exactness. Member i's initial weights and data order depend only on i, and every step of the
stacked training is member-wise, so blocks give the same members. With the multi-tensor
(foreach) Adam the MLP members are bit-identical; torch's fused CPU Adam (make_optimizer's
choice) moves them by about an ulp depending on where a member sits in the stacked parameter
(measured: logits differ by ~1e-7 after two epochs). The exactness test therefore runs the
foreach Adam, and a second test checks the default optimizer to a tight tolerance.
"""

from __future__ import annotations

import pytest
import torch

from faststeal import attack, train_step
from faststeal.methods.checkpoint import CheckpointError
from faststeal.methods.deep_ensemble import DeepEnsemble
from toydata import prototype_data

SHAPE = (1, 8, 8)
C = 10


pytestmark = pytest.mark.usefixtures("one_thread")


def make_data(n: int, seed: int, noise: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    return prototype_data(n, seed, SHAPE, C, noise)


X, Y = make_data(96, 1)
XT, YT = make_data(60, 2)
PROBE = XT[:16]


def run(method="deep-ensemble", members=5, **kw):
    hp = {"members": members} if attack.member_chunkable(method) else {}
    args = dict(test_x=XT, test_y=YT, victim_labels=YT, victim_probs=None, num_classes=C, seed=1,
                epochs=2, batch_size=32, lr=3e-3, device="cpu", probe=PROBE, record_every=2,
                hparams=hp, progress=False)
    args.update(kw)
    return attack.train_and_evaluate(method, "mlp", X, Y, **args)


def _foreach_adam(params, lr, *, kind="adam", **kw):
    cls = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[kind]
    return cls(list(params), lr=lr, foreach=True, **kw)


def _strip(r):
    metrics = {k: v for k, v in r["metrics"].items() if not k.endswith("_seconds")}
    trace = [{k: v for k, v in t.items() if k != "loss"} for t in r["trace"]]
    return metrics, trace, r["hparams"]


def _assert_same(a, b, exact=True):
    ma, ta, ha = _strip(a)
    mb, tb, hb = _strip(b)
    assert ha == hb
    la = [t["loss"] for t in a["trace"]]
    lb = [t["loss"] for t in b["trace"]]
    assert (la[0] is None) and (lb[0] is None)
    # the loss is a sum over members: blocks add their partial sums in another order
    torch.testing.assert_close(torch.tensor(la[1:]), torch.tensor(lb[1:]), rtol=1e-5, atol=1e-5)
    if exact:
        assert ma == mb and ta == tb
    else:
        assert ma.keys() == mb.keys() and len(ta) == len(tb)
        for k in ma:
            assert ma[k] == pytest.approx(mb[k], abs=1e-4), k
        for u, v in zip(ta, tb):
            assert u.keys() == v.keys()
            for k in u:
                assert u[k] == pytest.approx(v[k], abs=1e-5), k


_PLAIN: dict = {}


def plain(method, foreach):
    key = (method, foreach)
    if key not in _PLAIN:
        if foreach:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(train_step, "make_optimizer", _foreach_adam)
                _PLAIN[key] = run(method)
        else:
            _PLAIN[key] = run(method)
    return _PLAIN[key]


@pytest.mark.parametrize("method", ["deep-ensemble", "bootstrap-ensemble", "hparam-ensemble"])
def test_blocks_equal_one_block_exactly(method, monkeypatch):
    monkeypatch.setattr(train_step, "make_optimizer", _foreach_adam)
    ref = plain(method, foreach=True)
    for chunk in (2, 5, 7):  # blocks 0-1, 2-3, 4; one block of all; larger than the ensemble
        _assert_same(run(method, member_chunk=chunk), ref, exact=True)
    assert ref["hparams"]["num_members"] == 5 and ref["metrics"]["members"] == 5


def test_blocks_match_one_block_with_default_optimizer():
    _assert_same(run(member_chunk=2), plain("deep-ensemble", foreach=False), exact=False)


def test_hparam_ensemble_block_members_keep_their_hyperparameters():
    full = run("hparam-ensemble")["hparams"]
    block = attack.build_method("hparam-ensemble", "mlp", SHAPE, C, seed=1, members=5,
                                member_range=(2, 4))
    block.fit(X, Y, epochs=1, batch_size=32, lr=3e-3, progress=False)
    assert block.hparams()["member_lr"] == full["member_lr"]
    opt = block._make_optimizer(3e-3)
    assert opt.param_groups[0]["lr"].tolist() == pytest.approx(full["member_lr"][2:4])


def test_non_chunkable_method_ignores_member_chunk():
    assert not attack.member_chunkable("mc-dropout")
    assert not attack.member_chunkable("ncl-ensemble")  # members share the penalty
    logs = []
    _assert_same(run("mc-dropout", member_chunk=1, log=logs.append), run("mc-dropout"),
                 exact=True)
    assert logs == ["mc-dropout: --member-chunk ignored (only the Deep Ensemble family trains "
                    "its members independently)"]


# ------------------------------------------------------------------------ simulated OOM

def _oom_above(monkeypatch, limit, where="fit"):
    """Make Deep Ensemble blocks of more than ``limit`` members raise CUDA OOM: in fit's first
    call (``fit``) or at the start of epoch 1, after a checkpoint was written (``epoch``)."""
    attempts = []
    if where == "fit":
        real = DeepEnsemble.fit

        def fit(self, *a, **kw):
            attempts.append(self.hparams()["member_range"])
            if self.num_members > limit:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return real(self, *a, **kw)

        monkeypatch.setattr(DeepEnsemble, "fit", fit)
    else:
        real = DeepEnsemble._on_epoch_start

        def on_epoch_start(self, epoch, optimizer):
            if epoch == 1 and self.num_members > limit:
                attempts.append(self.hparams()["member_range"])
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return real(self, epoch, optimizer)

        monkeypatch.setattr(DeepEnsemble, "_on_epoch_start", on_epoch_start)
    return attempts


def test_auto_halves_block_on_oom(monkeypatch):
    attempts = _oom_above(monkeypatch, 2)
    logs = []
    r = run(member_chunk="auto", log=logs.append)
    assert attempts == [(0, 5), (0, 2), (2, 4), (4, 5)]  # 5 -> OOM -> blocks of 2
    assert len(logs) == 1 and "blocks of 2" in logs[0] and "members 0-4" in logs[0]
    monkeypatch.undo()
    _assert_same(r, run(member_chunk=2), exact=True)


def test_auto_keeps_finished_blocks_and_drops_failed_checkpoint(monkeypatch, tmp_path):
    attempts = _oom_above(monkeypatch, 1, where="epoch")
    ckpt = tmp_path / "cell.pt"
    logs = []
    r = run(member_chunk="auto", checkpoint=str(ckpt), log=logs.append)
    # 5 fails after epoch 0 -> blocks of 2: both fail -> blocks of 1 from member 0 on
    assert attempts == [(0, 5), (0, 2)]
    assert [m.split(";")[1].strip() for m in logs] == [
        "retrying in blocks of 2 member(s) (--member-chunk auto)",
        "retrying in blocks of 1 member(s) (--member-chunk auto)"]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"cell.members{i}-{i + 1}.pt" for i in range(5)]  # failed blocks removed
    monkeypatch.undo()
    _assert_same(r, run(member_chunk=1), exact=True)


def test_oom_messages_name_the_options(monkeypatch):
    _oom_above(monkeypatch, 0)
    for chunk in (None, 2, "auto"):
        with pytest.raises(RuntimeError) as e:
            run(member_chunk=chunk)
        msg = str(e.value)
        assert "--member-chunk" in msg and "--batch-size" in msg, msg
        assert isinstance(e.value.__cause__, torch.cuda.OutOfMemoryError)


@pytest.mark.parametrize("value,exc", [(0, ValueError), (-2, ValueError), ("half", TypeError),
                                       (2.0, TypeError), (True, TypeError)])
def test_member_chunk_validation(value, exc):
    with pytest.raises(exc, match="member_chunk"):
        run(member_chunk=value)


# ------------------------------------------------------------------------ checkpoints

def test_killed_chunked_run_resumes_identically(monkeypatch, tmp_path):
    """Block 1-2 is killed in epoch 1: the rerun takes block 0 from its finished checkpoint and
    block 1 from its epoch-0 checkpoint (with the probe logits recorded so far)."""
    ckpt = str(tmp_path / "cell.pt")
    real = DeepEnsemble._on_epoch_start

    def die(self, epoch, optimizer):
        if self.hparams()["member_range"] == (1, 2) and epoch == 1:
            raise KeyboardInterrupt
        return real(self, epoch, optimizer)

    monkeypatch.setattr(DeepEnsemble, "_on_epoch_start", die)
    with pytest.raises(KeyboardInterrupt):
        run(members=3, member_chunk=1, checkpoint=ckpt)
    monkeypatch.undo()
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == ["cell.members0-1.pt", "cell.members1-2.pt"]
    assert torch.load(tmp_path / saved[1], weights_only=True)["epoch"] == 0
    resumed = run(members=3, member_chunk=1, checkpoint=ckpt)
    _assert_same(resumed, run(members=3, member_chunk=1), exact=True)
    attack.remove_checkpoints(ckpt)
    assert list(tmp_path.iterdir()) == []


def test_remove_checkpoints_only_touches_its_cell(tmp_path):
    for name in ("a.pt", "a.members0-2.pt", "a.members2-5.pt", "ab.pt", "b.members0-1.pt",
                 "a.members.txt"):
        (tmp_path / name).write_bytes(b"x")
    attack.remove_checkpoints(str(tmp_path / "a.pt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.members.txt", "ab.pt",
                                                          "b.members0-1.pt"]
    attack.remove_checkpoints(None)
    assert attack.member_checkpoint("d/c.pt", (3, 7)) == "d/c.members3-7.pt"
    assert attack.member_checkpoint("d/c.pt", None) == "d/c.pt"
    assert attack.member_checkpoint(None, (0, 1)) is None


def test_block_checkpoint_of_unblocked_fit_refused(tmp_path):
    """Same file name and members, but a trace recorded without the block recorder cannot be
    continued by one (nor the reverse): the fingerprint's gather_members differs."""
    ckpt = str(tmp_path / "cell.pt")
    run(members=3, hparams={"members": 3, "member_range": (0, 3)}, checkpoint=ckpt)
    assert [p.name for p in tmp_path.iterdir()] == ["cell.members0-3.pt"]
    with pytest.raises(CheckpointError, match="gather_members"):
        run(members=3, member_chunk=3, checkpoint=ckpt)
