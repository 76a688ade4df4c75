"""Query strategies (faststeal.query) and the active loop's budget accounting (faststeal.active)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from faststeal.active import ActiveConfig, run_active
from faststeal.oracle import Oracle
from faststeal.query import (STRATEGIES, Strategy, kcenter_greedy, member_features, score_pool,
                             top_k, uncertainty_scores)



pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ hand-computed scores

def _np_entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(p)).sum(-1)


def _case() -> tuple[torch.Tensor, np.ndarray]:
    """Three members, two inputs, three classes, with probabilities chosen by hand."""
    probs = np.array([
        [[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]],
        [[0.6, 0.3, 0.1], [0.1, 0.1, 0.8]],
        [[0.1, 0.8, 0.1], [0.3, 0.3, 0.4]],
    ])  # (S=3, B=2, C=3)
    return torch.tensor(np.log(probs), dtype=torch.float32), probs


def test_uncertainty_scores_match_hand_computation():
    logits, p = _case()
    sc = uncertainty_scores(logits)
    pbar = p.mean(0)
    entropy = _np_entropy(pbar)
    bald = entropy - _np_entropy(p).mean(0)
    variance = p.var(0).mean(-1)  # population variance over members, mean over classes
    votes = p.argmax(-1)  # (S, B)
    disagreement = (votes != pbar.argmax(-1)[None]).mean(0)
    np.testing.assert_allclose(sc["entropy"].numpy(), entropy, rtol=1e-5)
    np.testing.assert_allclose(sc["bald"].numpy(), bald, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(sc["variance"].numpy(), variance, rtol=1e-5)
    np.testing.assert_allclose(sc["disagreement"].numpy(), disagreement, atol=1e-6)
    # the hand values themselves: input 0's ensemble argmax is class 0 (0.467 > 0.433), member 2
    # votes class 1 -> 1/3 disagreement; input 1's is class 2, member 0 votes 1 -> 1/3
    np.testing.assert_allclose(disagreement, [1 / 3, 1 / 3])


def test_one_member_has_zero_bald_variance_disagreement():
    logits = torch.randn(1, 7, 4)
    sc = uncertainty_scores(logits)
    for name in ("bald", "variance", "disagreement"):
        assert torch.allclose(sc[name], torch.zeros(7), atol=1e-6), name
    p = logits[0].softmax(-1)
    assert torch.allclose(sc["entropy"], -(p * p.log()).sum(-1), atol=1e-5)


def test_uncertainty_scores_rejects_bad_shape():
    with pytest.raises(ValueError, match="members, batch, classes"):
        uncertainty_scores(torch.randn(4, 3))


# ------------------------------------------------------------------ top-k and k-center

def test_top_k_picks_largest_and_breaks_ties_randomly():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.9, 0.2])
    g = torch.Generator().manual_seed(0)
    assert set(top_k(scores, 2, g).tolist()) <= {1, 3, 4}
    assert set(top_k(scores, 4, g).tolist()) == {1, 3, 4, 2}
    firsts = {int(top_k(scores, 1, torch.Generator().manual_seed(s))[0]) for s in range(40)}
    assert firsts == {1, 3, 4}  # every tied maximum gets picked first for some seed


def test_kcenter_picks_farthest_point():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [10.0, 0.0], [5.0, 0.0]])
    centres = torch.tensor([[0.0, 0.0]])
    # farthest from 0 is 10 (index 3); then, from {0, 10}, the farthest is 5 (index 4)
    assert kcenter_greedy(pts, 2, centres).tolist() == [3, 4]
    # 2-D hand case: centre at the origin, the corner (3, 4) at distance 5 beats (4, 0)
    pts2 = torch.tensor([[4.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
    assert kcenter_greedy(pts2, 1, torch.zeros(1, 2)).tolist() == [1]


def test_kcenter_without_centres_and_distinct_picks():
    g = torch.Generator().manual_seed(3)
    pts = torch.randn(50, 4)
    picks = kcenter_greedy(pts, 50, None, g)
    assert sorted(picks.tolist()) == list(range(50))  # k = M picks everything exactly once
    dup = torch.zeros(6, 3)  # all identical points: still distinct picks
    assert len(set(kcenter_greedy(dup, 6, torch.zeros(1, 3)).tolist())) == 6


def test_kcenter_greedy_is_gonzalez_on_random_points():
    """Each pick maximises the distance to the centres chosen so far (brute force check)."""
    g = torch.Generator().manual_seed(1)
    pts = torch.randn(40, 5, generator=g)
    centres = torch.randn(3, 5, generator=g)
    picks = kcenter_greedy(pts, 6, centres)
    chosen = centres.clone()
    for j in picks.tolist():
        d = torch.cdist(pts, chosen).min(1).values
        assert math.isclose(float(d[j]), float(d.max()), rel_tol=1e-4)
        chosen = torch.cat([chosen, pts[j:j + 1]])


# ------------------------------------------------------------------ a tiny stand-in surrogate

class _TinyStack(nn.Module):
    """S linear members on flattened inputs: features (S, B, F), logits (S, B, C)."""

    def __init__(self, members: int, d_in: int, classes: int, feat: int = 6) -> None:
        super().__init__()
        self.body = nn.Parameter(torch.randn(members, d_in, feat) * 0.5)
        self.head = nn.Parameter(torch.randn(members, feat, classes))
        self.members = members

    def features(self, x):
        return torch.relu(torch.matmul(x.flatten(1), self.body))  # (S, B, F)

    def forward(self, x):
        return torch.matmul(self.features(x), self.head)


class TinyMethod:
    """The slice of the Method interface the active loop uses, at negligible cost."""

    def __init__(self, seed: int, d_in: int, classes: int, members: int = 3) -> None:
        torch.manual_seed(seed)
        self.model = _TinyStack(members, d_in, classes)
        self.device = torch.device("cpu")
        self.num_members = members
        self.fits = 0

    def fit(self, x, y, *, epochs, batch_size=128, lr=1e-3, progress=False, **kw):
        self.fits += 1
        opt = torch.optim.SGD(self.model.parameters(), lr=0.05)
        for _ in range(epochs):
            logits = self.model(x)
            if y.dtype.is_floating_point:
                loss = -(y * logits.log_softmax(-1)).sum(-1).mean() * logits.shape[0]
            else:
                loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.repeat(logits.shape[0]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return self

    @torch.no_grad()
    def predict_members(self, x, batch_size=1024):
        return self.model(x)

    @torch.no_grad()
    def predict_proba(self, x, batch_size=1024):
        return self.model(x).softmax(-1).mean(0)


def _problem(n_pool: int = 120, seed: int = 0, shape=(1, 4, 4), classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(n_pool, *shape, generator=g)
    test = torch.randn(40, *shape, generator=g)
    victim = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(shape)), classes))
    with torch.no_grad():
        vl = victim(test).argmax(-1)
    return victim, pool, test, vl


def test_score_pool_and_select_top_uncertain():
    victim, pool, _, _ = _problem()
    m = TinyMethod(0, 16, 3)
    cand = torch.arange(0, 120, 2)
    ps = score_pool(m, pool, cand, batch_size=7)  # chunks of 7: exercises concatenation
    direct = uncertainty_scores(m.predict_members(pool[cand]))
    for k in ("entropy", "bald", "variance", "disagreement"):
        assert torch.allclose(ps.scores[k], direct[k], atol=1e-6)
    assert set(ps.seconds) == {"forward", "stats"}
    g = torch.Generator().manual_seed(0)
    picks, secs = Strategy("bald").select(m, pool, cand, torch.tensor([1, 3]), 5, g)
    best = cand[torch.argsort(direct["bald"], descending=True)[:5]]
    assert set(picks.tolist()) == set(best.tolist())
    assert secs["total"] >= secs["forward"] >= 0


@pytest.mark.parametrize("name", STRATEGIES)
def test_select_returns_distinct_unlabeled(name):
    _, pool, _, _ = _problem()
    m = TinyMethod(0, 16, 3)
    unl = torch.arange(30, 120)
    lab = torch.arange(0, 30)
    picks, _ = Strategy(name, mix_factor=2, proj_dim=4).select(
        m, pool, unl, lab, 25, torch.Generator().manual_seed(1))
    assert picks.numel() == 25 and len(set(picks.tolist())) == 25
    assert set(picks.tolist()) <= set(unl.tolist())
    more, _ = Strategy(name).select(m, pool, unl[:10], lab, 25, torch.Generator().manual_seed(1))
    assert sorted(more.tolist()) == unl[:10].tolist()  # k larger than the candidates: all of them


def test_member_features_concatenates_members():
    m = TinyMethod(0, 16, 3, members=4)
    x = torch.randn(9, 1, 4, 4)
    f = member_features(m, x, batch_size=4)
    per = m.model.features(x)  # (4, 9, 6)
    assert f.shape == (9, 24)
    assert torch.allclose(f[:, 6:12], per[1])


def test_strategy_rejects_bad_arguments():
    with pytest.raises(ValueError, match="strategy must be one of"):
        Strategy("margin")
    with pytest.raises(ValueError, match="mix_score"):
        Strategy("mix", mix_score="margin")
    with pytest.raises(ValueError, match="candidates"):
        Strategy("bald", candidates=0)


# ------------------------------------------------------------------ the budget is never exceeded

class SpyOracle(Oracle):
    """An Oracle that records, per call, the number of new images asked and what remained."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls: list[tuple[int, int]] = []

    def query(self, indices):
        idx = torch.as_tensor(indices)
        new = int((~self._answered[idx]).sum())
        self.calls.append((new, self.remaining))
        return super().query(indices)


def _run(strategy, budget, seed_size, round_size, milestones, n_pool=120, mode="label",
         warm=True):
    victim, pool, test, vl = _problem(n_pool)
    oracle = SpyOracle(victim, pool, budget, output_mode=mode)
    cfg = ActiveConfig(strategy=strategy, strategy_params={"proj_dim": 4, "mix_factor": 2},
                       milestones=milestones, seed_size=seed_size, round_size=round_size,
                       epochs=1, round_epochs=1, warm_start=warm, seed=0)
    res = run_active(oracle, cfg, test_x=test, victim_labels=vl, test_y=vl, progress=False,
                     method_factory=lambda s: TinyMethod(s, 16, 3),
                     eval_factory=lambda s: TinyMethod(s, 16, 3))
    return oracle, res


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_active_loop_spends_exactly_the_budget(strategy):
    oracle, res = _run(strategy, 50, 8, 7, [10, 30, 50])
    assert oracle.used == 50 and res["used"] == 50
    assert [c["budget"] for c in res["milestones"]] == [10, 30, 50]
    assert len(res["queried"]) == 50 and len(set(res["queried"])) == 50
    for new, remaining in oracle.calls:
        assert new <= remaining
    assert all(0 <= c["retrained"]["fidelity"] <= 1 for c in res["milestones"])
    assert res["refused_at"] is None


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budget=st.integers(1, 40), seed_size=st.integers(1, 50), round_size=st.integers(1, 50),
       strategy=st.sampled_from(STRATEGIES), n_cps=st.integers(1, 3), data=st.data())
def test_no_strategy_ever_queries_past_the_budget(budget, seed_size, round_size, strategy, n_cps,
                                                  data):
    cps = sorted(set(data.draw(st.lists(st.integers(1, budget), min_size=n_cps - 1,
                                        max_size=n_cps - 1)) + [budget]))
    oracle, res = _run(strategy, budget, seed_size, round_size, cps, n_pool=50)
    assert oracle.used == budget
    assert all(new <= remaining for new, remaining in oracle.calls)
    assert len(set(res["queried"])) == len(res["queried"]) == budget
    assert [c["budget"] for c in res["milestones"]] == cps
    assert all(r["k"] <= round_size for r in res["rounds"])


def test_same_seed_set_for_every_strategy_and_soft_labels():
    _, r1 = _run("random", 40, 10, 10, [40], mode="probs")
    _, r2 = _run("entropy", 40, 10, 10, [40], mode="probs")
    assert r1["queried"][:10] == r2["queried"][:10]
    assert r1["queried"][10:] != r2["queried"][10:]


def test_cold_start_reuses_the_running_surrogate_as_retrained():
    _, res = _run("variance", 30, 10, 10, [20, 30], warm=False)
    for c in res["milestones"]:
        assert c["retrained"] == c["running"] and c["retrain_seconds"] == 0.0


def test_active_config_rejects_bad_milestones():
    victim, pool, test, vl = _problem()
    with pytest.raises(ValueError, match="exceeds the oracle's budget"):
        run_active(Oracle(victim, pool, 20), ActiveConfig(milestones=[10, 30]), test_x=test,
                   victim_labels=vl, test_y=vl, progress=False)
    with pytest.raises(ValueError, match="ascending"):
        run_active(Oracle(victim, pool, 20), ActiveConfig(milestones=[10, 5]), test_x=test,
                   victim_labels=vl, test_y=vl, progress=False)
    used = Oracle(victim, pool, 20)
    used.query([0, 1])
    with pytest.raises(ValueError, match="fresh oracle"):
        run_active(used, ActiveConfig(), test_x=test, victim_labels=vl, test_y=vl,
                   progress=False)


def test_active_loop_with_a_real_deep_ensemble():
    """End to end with the library's own surrogate (tiny inputs, one epoch)."""
    victim, pool, test, vl = _problem(80, shape=(1, 6, 6))
    oracle = Oracle(victim, pool, 30)
    cfg = ActiveConfig(strategy="mix", milestones=[15, 30], seed_size=10, round_size=10,
                       method="deep-ensemble", hparams={"members": 2}, epochs=1, round_epochs=1,
                       batch_size=16)
    res = run_active(oracle, cfg, test_x=test, victim_labels=vl, test_y=vl, progress=False)
    assert oracle.used == 30
    assert [c["budget"] for c in res["milestones"]] == [15, 30]
    r = res["rounds"][0]
    assert r["forward_seconds"] > 0 and r["features_seconds"] > 0
