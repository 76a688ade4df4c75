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

import warnings

from faststeal.oracle import (OUTPUT_MODES, PREFLIGHT_ROWS, Answers, BudgetExceededError,
                              JournalError, Oracle, VictimError, VictimOutputError)

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
        return 5.0 * torch.nn.functional.one_hot(x[:, 0].long() % 3, 3).float()

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


# -- every answer is checked ----------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_answers_are_refused(pool, bad):
    v = CountingVictim()

    def victim(x):
        out = v.net(x)
        out[1, 2] = bad
        return out

    o = Oracle(victim, pool, budget=20)
    with pytest.raises(VictimOutputError, match=r"non-finite values \(NaN or inf\) in 1 of 8 rows"):
        o.query(torch.arange(10))
    assert len(o.answered_indices) == 0  # nothing answered from an invalid batch ...
    assert o.used == PREFLIGHT_ROWS  # ... but the victim saw it: charged


def test_one_class_count_across_batches(pool):
    calls = []

    def victim(x):
        calls.append(x.shape[0])
        return torch.randn(x.shape[0], C if len(calls) == 1 else C + 1)

    o = Oracle(victim, pool, budget=40, batch_size=4)
    with pytest.raises(VictimOutputError, match=f"victim returned {C + 1} classes but "
                                                f"num_classes={C}"):
        o.query(torch.arange(12))
    assert o.used == 8 and len(o.answered_indices) == 4  # the first batch stays answered


def test_declared_probabilities_must_be_probabilities(pool):
    v = CountingVictim()
    with pytest.raises(VictimOutputError, match="victim_outputs='probs' but the answers are not "
                                                "probabilities"):
        Oracle(lambda x: v.net(x), pool, 10, victim_outputs="probs").query([0, 1])
    with pytest.raises(VictimOutputError, match="row sums off 1 by up to 0.5"):
        Oracle(lambda x: torch.full((x.shape[0], 2), 0.25), pool, 10,
               victim_outputs="probs").query([0])
    # rounded probabilities: accepted within a tolerance the caller declares
    rounded = Oracle(lambda x: torch.round(torch.softmax(v.net(x), 1), decimals=1), pool, 10,
                     victim_outputs="probs", probs_atol=0.5 * C * 0.1 + 1e-3)
    assert len(rounded.query([0, 1, 2])) == 3
    # ... or as a function of the class count, known only from the first answer
    seen = []
    per_c = Oracle(lambda x: torch.round(torch.softmax(v.net(x), 1), decimals=1), pool, 10,
                   victim_outputs="probs", probs_atol=lambda c: seen.append(c) or 0.05 * c + 1e-3)
    assert len(per_c.query([0, 1, 2])) == 3 and seen and set(seen) == {C}
    with pytest.raises(VictimOutputError, match="off 1 by up to 0.1 > probs_atol=0.03"):
        Oracle(lambda x: torch.full((x.shape[0], 3), 0.3), pool, 10,  # sums 0.9
               victim_outputs="probs", probs_atol=lambda c: 0.01 * c).query([0])
    with pytest.raises(ValueError, match="probs_atol must be a finite number > 0"):
        Oracle(v, pool, 10, probs_atol=0)
    with pytest.raises(ValueError, match="probs_atol must be a finite number > 0, got -1"):
        Oracle(lambda x: torch.full((x.shape[0], 2), 0.5), pool, 10, victim_outputs="probs",
               probs_atol=lambda c: -1).query([0])


def test_declared_logits_that_look_like_probabilities_warn(pool):
    v = CountingVictim()
    with pytest.warns(RuntimeWarning, match="look like probabilities"):
        Oracle(lambda x: torch.softmax(v.net(x), 1), pool, 10).query([0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Oracle(v, pool, 10).query([0, 1])  # real logits: no warning


def test_incompatible_pool_fails_on_a_few_images_naming_shape_and_dtype(pool):
    v = CountingVictim()
    wrong = torch.randn(N_POOL, 3, 5, 5, dtype=torch.float64)
    o = Oracle(v, wrong, budget=40)
    with pytest.raises(VictimError, match=r"pool_x: shape \(40, 3, 5, 5\), dtype torch.float64"
                                          r".*RuntimeError: mat1 and mat2"):
        o.query(torch.arange(40))
    assert o.used == v.images == PREFLIGHT_ROWS  # only the small first batch, charged
    v = CountingVictim()
    ok = Oracle(v, pool, budget=40)
    ok.query(torch.arange(40))
    assert v.calls == 2 and v.images == 40  # PREFLIGHT_ROWS first, then the rest in one batch


def test_victim_failing_part_way_never_sees_more_than_the_budget(pool):
    """Budget 40, batches of 16, the victim fails on its second call: the retries must not make
    the victim see more than 40 images (it saw 56 when failed batches were not charged)."""
    seen = []
    v = CountingVictim()

    def flaky(x):
        seen.append(x.shape[0])
        if len(seen) == 2:
            raise RuntimeError("service unavailable")
        return v.net(x)

    o = Oracle(flaky, pool, budget=40, batch_size=16)
    with pytest.raises(VictimError, match="service unavailable"):
        o.query(torch.arange(40))
    assert o.used == PREFLIGHT_ROWS + 16 and o.log[-1]["charged"] == PREFLIGHT_ROWS + 16
    for _ in range(3):  # an attacker retrying the same batch
        try:
            o.query(torch.arange(40))
        except BudgetExceededError:
            pass
    assert sum(seen) <= 40 and o.used <= 40
    a = o.query(torch.arange(PREFLIGHT_ROWS))  # what was answered stays answered, free
    assert a.charged == 0


# -- the answer journal ---------------------------------------------------------------------------
def test_journal_answers_a_restart_without_the_victim(pool, tmp_path):
    path = tmp_path / "answers.journal"
    v = CountingVictim()
    o = Oracle(v, pool, budget=30, output_mode="probs", journal=path, journal_key="v1")
    first = o.query(torch.arange(20))
    o.save_log(tmp_path / "log.json")
    v2 = CountingVictim()
    o2 = Oracle(v2, pool, budget=30, output_mode="probs", journal=path, journal_key="v1")
    assert (o2.used, o2.answered_from_journal, o2.remaining) == (20, 20, 10)
    again = o2.query(torch.arange(20))
    assert v2.images == 0 and again.charged == 0
    assert torch.equal(again.probs, first.probs) and torch.equal(again.labels, first.labels)
    o2.query(torch.arange(20, 25))  # new images: asked, and journaled too
    assert v2.images == 5
    with pytest.raises(BudgetExceededError):
        o2.query(torch.arange(25, 31))  # the budget counts across restarts
    o2.save_log(tmp_path / "log.json")  # appended, not overwritten
    doc = json.loads((tmp_path / "log.json").read_text())
    assert [e["charged"] for e in doc["queries"]] == [20, 0, 5, 0] and doc["used"] == 25
    o3 = Oracle(CountingVictim(), pool, budget=30, output_mode="probs", journal=path,
                journal_key="v1")
    assert o3.used == 25 and len(o3.answered_indices) == 25


def test_journal_charges_what_was_sent_but_never_answered(pool, tmp_path):
    path = tmp_path / "answers.journal"
    v = CountingVictim()
    calls = []

    def dies(x):  # the process is killed while the victim works on the second batch
        calls.append(x.shape[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return v.net(x)

    with pytest.raises(KeyboardInterrupt):
        Oracle(dies, pool, budget=40, batch_size=10, journal=path).query(torch.arange(30))
    o = Oracle(v, pool, budget=40, batch_size=10, journal=path)
    assert o.used == PREFLIGHT_ROWS + 10 and o.answered_from_journal == PREFLIGHT_ROWS


@pytest.mark.parametrize("change, differs", [
    (dict(pool_shift=1.0), "pool"), (dict(output_mode="label"), "output_mode"),
    (dict(journal_key="another victim"), "victim"), (dict(temperature=2.0), "temperature")])
def test_journal_of_another_victim_pool_or_mode_is_refused(pool, tmp_path, change, differs):
    path = tmp_path / "answers.journal"
    Oracle(CountingVictim(), pool, 10, output_mode="probs", journal=path,
           journal_key="v1").query([0, 1])
    kw = dict(output_mode="probs", journal_key="v1")
    shift = change.pop("pool_shift", 0.0)
    kw.update(change)
    with pytest.raises(JournalError, match=f"another victim, pool or output mode \\(differs in: "
                                           f"{differs}\\)"):
        Oracle(CountingVictim(), pool + shift, 10, journal=path, **kw)


def test_journal_torn_tail_is_ignored_with_a_warning_and_damage_is_an_error(pool, tmp_path):
    path = tmp_path / "answers.journal"
    o = Oracle(CountingVictim(), pool, 40, batch_size=10, journal=path)
    o.query(torch.arange(18))  # records: sent 8, answer 8, sent 10, answer 10
    whole = path.read_bytes()
    path.write_bytes(whole[:-7])  # a crash in the middle of writing the last answer
    with pytest.warns(RuntimeWarning, match="ends with a truncated record"):
        o2 = Oracle(CountingVictim(), pool, 40, batch_size=10, journal=path)
    assert o2.used == 18 and o2.answered_from_journal == 8  # sent, never answered: charged
    assert list(tmp_path.glob("answers.journal.torn-*"))  # the file as it was is kept
    v = CountingVictim()
    o3 = Oracle(v, pool, 40, batch_size=10, journal=path)
    o3.query(torch.arange(18))  # the lost 10 are asked again (and journaled after the cut)
    assert v.images == 10 and o3.used == 28
    assert Oracle(v, pool, 40, journal=path).used == 28
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # inside a record in the middle, not at the end
    path.write_bytes(bytes(damaged))
    with pytest.raises(JournalError, match="is damaged at byte"):
        Oracle(v, pool, 40, journal=path)
    path.write_bytes(b"something else entirely")
    with pytest.raises(JournalError, match="not a faststeal answer journal"):
        Oracle(v, pool, 40, journal=path)
