"""faststeal.oracle: output modes, exact budget accounting, caching, refusal, black-box boundary."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from faststeal.oracle import OUTPUT_MODES, Answers, BudgetExceededError, Oracle

N_POOL, C = 40, 6


class CountingVictim(nn.Module):
    """A fixed small classifier that counts every image it is run on."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, C))
        with torch.no_grad():
            self.net[1].weight.mul_(4.0)  # spread the logits so the top-k order is clear
        self.images = 0
        self.calls = 0

    def forward(self, x):
        self.images += x.shape[0]
        self.calls += 1
        return self.net(x)


@pytest.fixture
def pool():
    return torch.randn(N_POOL, 1, 4, 4, generator=torch.Generator().manual_seed(7))


def reference_logits(victim: CountingVictim, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return victim.net(x)


# -- output modes ---------------------------------------------------------------------------------
def test_label_mode(pool):
    v = CountingVictim()
    o = Oracle(v, pool, budget=20)
    idx = torch.tensor([3, 0, 17, 3])
    a = o.query(idx)
    ref = reference_logits(v, pool[idx]).argmax(1)
    assert a.labels.dtype == torch.int64 and torch.equal(a.labels, ref)
    assert a.probs is None and a.logits is None and a.topk_indices is None
    assert torch.equal(a.indices, idx)
    assert torch.equal(o.targets(a), ref)
    assert o.num_classes == C


def test_topk_mode_with_and_without_scores(pool):
    v = CountingVictim()
    idx = torch.arange(10)
    probs = torch.softmax(reference_logits(v, pool[idx]) / 2.0, dim=1)
    ref_scores, ref_top = probs.topk(3, dim=1)

    o = Oracle(v, pool, budget=20, output_mode="topk", k=3, temperature=2.0)
    a = o.query(idx)
    assert torch.equal(a.topk_indices, ref_top)
    torch.testing.assert_close(a.topk_scores, ref_scores)
    t = o.targets(a)
    assert t.shape == (10, C)
    torch.testing.assert_close(t.sum(1), torch.ones(10))
    mask = torch.zeros(10, C, dtype=torch.bool).scatter_(1, ref_top, True)
    assert (t[~mask] == 0).all()
    torch.testing.assert_close(t.gather(1, ref_top), ref_scores / ref_scores.sum(1, keepdim=True))

    o2 = Oracle(v, pool, budget=20, output_mode="topk", k=2, with_scores=False)
    a2 = o2.query(idx)
    assert a2.topk_scores is None and torch.equal(a2.topk_indices, ref_top[:, :2])
    tt = o2.targets(a2)
    assert tt.dtype == torch.int64 and torch.equal(tt, ref_top[:, 0])


def test_probs_mode_temperature_and_rounding(pool):
    v = CountingVictim()
    idx = torch.tensor([5, 6, 7, 8])
    ref = torch.softmax(reference_logits(v, pool[idx]) / 3.0, dim=1)
    a = Oracle(v, pool, 10, output_mode="probs", temperature=3.0).query(idx)
    torch.testing.assert_close(a.probs, ref)

    o = Oracle(v, pool, 10, output_mode="probs", decimals=2)
    a = o.query(idx)
    ref1 = torch.softmax(reference_logits(v, pool[idx]), dim=1)
    torch.testing.assert_close(a.probs, torch.round(ref1, decimals=2))
    assert not torch.equal(a.probs, ref1)  # rounding really happened
    t = o.targets(a)
    torch.testing.assert_close(t.sum(1), torch.ones(4))
    torch.testing.assert_close(t, a.probs / a.probs.sum(1, keepdim=True))
    assert torch.equal(a.labels, a.probs.argmax(1))


def test_logits_mode(pool):
    v = CountingVictim()
    idx = torch.tensor([1, 2])
    o = Oracle(v, pool, 10, output_mode="logits")
    a = o.query(idx)
    ref = reference_logits(v, pool[idx])
    torch.testing.assert_close(a.logits, ref)
    torch.testing.assert_close(o.targets(a), torch.softmax(ref, 1))


def test_probability_victim_callable(pool):
    v = CountingVictim()

    def probs_victim(x):
        return torch.softmax(v.net(x), dim=1)

    idx = torch.arange(6)
    p = torch.softmax(reference_logits(v, pool[idx]), 1)
    a = Oracle(probs_victim, pool, 10, output_mode="probs", victim_outputs="probs").query(idx)
    torch.testing.assert_close(a.probs, p)
    a = Oracle(probs_victim, pool, 10, output_mode="probs", victim_outputs="probs",
               temperature=2.0).query(idx)
    sharp = p.sqrt() / p.sqrt().sum(1, keepdim=True)  # softmax(log p / 2)
    torch.testing.assert_close(a.probs, sharp)
    lab = Oracle(probs_victim, pool, 10, victim_outputs="probs").query(idx)
    assert torch.equal(lab.labels, p.argmax(1))


def test_soft_targets_support_backward(pool):
    # answers computed without grad must still be usable as targets of a training loss
    o = Oracle(CountingVictim(), pool, 10, output_mode="probs")
    t = o.targets(o.query(torch.arange(4)))
    w = torch.randn(16, C, requires_grad=True)
    loss = -(t * torch.log_softmax(pool[:4].flatten(1) @ w, 1)).sum()
    loss.backward()
    assert w.grad is not None


# -- budget accounting ----------------------------------------------------------------------------
def test_cache_and_exact_charging(pool):
    v = CountingVictim()
    o = Oracle(v, pool, budget=10, batch_size=3)
    first = o.query([0, 1, 2, 2])
    assert (o.used, v.images, first.charged) == (3, 3, 3)
    again = o.query(torch.tensor([2, 1, 3, 3, 3]))
    assert (o.used, o.remaining, v.images, again.charged) == (4, 6, 4, 1)
    assert torch.equal(again.labels[:2], torch.stack([first.labels[2], first.labels[1]]))
    free = o.query(torch.tensor([0, 1, 2, 3]))
    assert free.charged == 0 and v.images == 4 and o.used == 4
    assert torch.equal(o.answered_indices, torch.tensor([0, 1, 2, 3]))
    o.query(torch.arange(4, 10))  # 6 new images in batches of 3
    assert (o.used, v.images, o.remaining) == (10, 10, 0)
    assert v.calls == 1 + 1 + 2  # [0,1,2]; [3]; [4,5,6],[7,8,9]


def test_refusal_is_whole_and_charges_nothing(pool):
    v = CountingVictim()
    o = Oracle(v, pool, budget=5)
    o.query(torch.arange(4))
    with pytest.raises(BudgetExceededError,
                       match=r"needs 2 new images \(3 requested, 1 already answered\) but the "
                             r"budget is 5 with 4 used \(1 remaining\)"):
        o.query(torch.tensor([3, 4, 5]))
    assert (o.used, v.images) == (4, 4)
    assert not o._answered[4] and not o._answered[5]  # neither new image was answered
    assert o.log[-1]["refused"] and o.log[-1]["charged"] == 0
    o.query(torch.tensor([4]))
    o.query(torch.arange(5))  # all cached: free even with nothing remaining
    assert (o.used, o.remaining, v.images) == (5, 0, 5)
    with pytest.raises(BudgetExceededError):
        o.query([5])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budget=st.integers(1, 25),
       batches=st.lists(st.lists(st.integers(0, 29), max_size=12), max_size=12))
def test_budget_accounting_property(budget, batches):
    pool_x = torch.arange(30, dtype=torch.float32).view(30, 1)
    seen_images = []

    def victim(x):
        seen_images.extend(x[:, 0].long().tolist())
        return torch.nn.functional.one_hot(x[:, 0].long() % 3, 3).float()

    o = Oracle(victim, pool_x, budget)
    answered: set[int] = set()
    for batch in batches:
        new = set(batch) - answered
        if len(answered) + len(new) > budget:
            with pytest.raises(BudgetExceededError):
                o.query(batch)
        else:
            a = o.query(batch)
            answered |= new
            assert a.charged == len(new)
            assert torch.equal(a.labels, torch.tensor(batch, dtype=torch.int64) % 3)
        assert o.used == len(answered) <= budget
        assert sorted(seen_images) == sorted(answered)  # each image run exactly once
    assert sum(e["charged"] for e in o.log) == o.used


# -- query log ------------------------------------------------------------------------------------
def test_log_and_save_log(pool, tmp_path):
    o = Oracle(CountingVictim(), pool, budget=6)
    o.query([0, 1])
    o.query([1, 2, 2])
    with pytest.raises(BudgetExceededError):
        o.query(list(range(10, 20)))
    log = o.log
    assert [(e["requested"], e["charged"], e["used"], e["refused"]) for e in log] == \
        [(2, 2, 2, False), (3, 1, 3, False), (10, 0, 3, True)]
    assert log[1]["indices"] == [1, 2, 2] and log[0]["time"] <= log[1]["time"]
    log[0]["indices"].append(99)  # a copy: the oracle's log is not modified
    assert o.log[0]["indices"] == [0, 1]
    doc = json.loads(o.save_log(tmp_path / "q" / "log.json").read_text())
    assert doc["budget"] == 6 and doc["used"] == 3 and len(doc["queries"]) == 3


# -- the black-box boundary -----------------------------------------------------------------------
def test_victim_not_reachable_through_public_surface(pool):
    v = CountingVictim()
    o = Oracle(v, pool, budget=10, output_mode="probs")
    o.query([0, 1])
    params = {p.data_ptr() for p in v.parameters()}
    for name in dir(o):
        if name.startswith("_"):
            continue
        val = getattr(o, name)
        assert val is not v and not isinstance(val, nn.Module), name
        assert not (isinstance(val, torch.Tensor) and val.data_ptr() in params), name
    assert "Linear" not in repr(o) and "CountingVictim" not in repr(o)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(o)
    with pytest.raises(TypeError, match="cannot be pickled"):
        copy.deepcopy(o)
    assert not v.training  # the victim is run in eval mode


def test_num_classes_before_first_answer(pool):
    o = Oracle(CountingVictim(), pool, budget=3)
    with pytest.raises(RuntimeError, match="pass num_classes="):
        _ = o.num_classes
    assert Oracle(CountingVictim(), pool, budget=3, num_classes=C).num_classes == C
    with pytest.raises(ValueError, match="victim returned 6 classes but num_classes=4"):
        Oracle(CountingVictim(), pool, budget=3, num_classes=4).query([0])


def test_empty_query(pool):
    o = Oracle(CountingVictim(), pool, budget=3, output_mode="probs", num_classes=C)
    a = o.query([])
    assert isinstance(a, Answers) and len(a) == 0 and o.used == 0
    assert o.targets(a).shape == (0, C)


# -- argument validation --------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(budget=0), ValueError, "budget must be a positive int"),
    (dict(budget=2.5), TypeError, "budget must be a positive int"),
    (dict(budget=True), TypeError, "budget must be a positive int"),
    (dict(output_mode="soft"), ValueError, "valid choices: " + ", ".join(OUTPUT_MODES)),
    (dict(victim_outputs="scores"), ValueError, "valid choices: logits, probs"),
    (dict(output_mode="label", k=3), ValueError, "only applies to output_mode='topk'"),
    (dict(output_mode="topk", k=0), ValueError, "k must be a positive int"),
    (dict(output_mode="topk", k=9, num_classes=6), ValueError, "k=9 exceeds num_classes=6"),
    (dict(temperature=0.0), ValueError, "temperature must be"),
    (dict(decimals=-1), ValueError, "decimals must be None or an int"),
    (dict(batch_size=0), ValueError, "batch_size must be a positive int"),
    (dict(output_mode="logits", victim_outputs="probs"), ValueError, "needs a victim that outputs"),
])
def test_oracle_bad_arguments(pool, kwargs, exc, match):
    kwargs = {"budget": 5, **kwargs}
    budget = kwargs.pop("budget")
    with pytest.raises(exc, match=match):
        Oracle(CountingVictim(), pool, budget, **kwargs)


def test_bad_victim_pool_and_indices(pool):
    with pytest.raises(TypeError, match="victim must be"):
        Oracle(42, pool, 5)
    with pytest.raises(ValueError, match="pool_x must be an"):
        Oracle(CountingVictim(), torch.zeros(5), 5)
    o = Oracle(CountingVictim(), pool, 5)
    with pytest.raises(IndexError, match=r"pool of 40 images \(valid: 0..39\), got e.g. \[40\]"):
        o.query([1, 40])
    with pytest.raises(IndexError, match=r"got e.g. \[-1\]"):
        o.query(torch.tensor([-1]))
    with pytest.raises(ValueError, match="indices must be 1-D"):
        o.query(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="indices must be integers"):
        o.query(torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="indices must be integers"):
        o.query(torch.tensor([True, False]))
    assert o.used == 0
    with pytest.raises(ValueError, match="k=7 exceeds the victim's 6 classes"):
        Oracle(CountingVictim(), pool, 5, output_mode="topk", k=7).query([0])
    with pytest.raises(ValueError, match=r"victim must return \(2, num_classes\)"):
        Oracle(lambda x: x.sum(), pool, 5).query([0, 1])
