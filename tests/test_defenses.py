"""Oracle defences (faststeal.defenses): output perturbations, PRADA, and their oracle wiring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from faststeal.active import ActiveConfig, run_active
from faststeal.defenses import (DEFENSES, AdditiveNoise, DefendedVictim, PradaDetector,
                                PradaOracle, QueryRefusedError, ReverseSigmoid, Rounding, Top1,
                                build_defense, query_until_refused, shapiro_wilk_w)
from faststeal.oracle import Oracle


pytestmark = pytest.mark.usefixtures("one_thread")


def _probs(n: int = 200, c: int = 10, sharp: float = 3.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=g) * sharp).softmax(-1)


# ------------------------------------------------------------------ output defences

def test_top1_has_exactly_one_nonzero_at_the_argmax():
    p = _probs()
    out = Top1()(p)
    assert torch.equal((out != 0).sum(1), torch.ones(len(p), dtype=torch.long))
    assert torch.equal(out.argmax(1), p.argmax(1))
    assert torch.all(out.max(1).values == 1.0)


@pytest.mark.parametrize("decimals", [0, 1, 2, 3])
def test_rounding_rounds_to_n_decimals(decimals):
    p = _probs()
    out = Rounding(decimals)(p)
    scaled = out.double() * 10**decimals
    assert torch.allclose(scaled, scaled.round(), atol=1e-4)
    assert float((out - p).abs().max()) <= 0.5 * 10**-decimals + 1e-6


def test_noise_mostly_keeps_argmax_and_is_seeded():
    p = _probs(1000, sharp=4.0)
    a = AdditiveNoise(sigma=0.05, seed=3)(p)
    b = AdditiveNoise(sigma=0.05, seed=3)(p)
    assert torch.equal(a, b)
    assert torch.all(a >= 0) and torch.allclose(a.sum(1), torch.ones(len(p)), atol=1e-5)
    agree = float((a.argmax(1) == p.argmax(1)).float().mean())
    assert 0.9 < agree < 1.0  # mostly kept, yet the noise does flip some close calls
    assert torch.equal(AdditiveNoise(sigma=0.0)(p).argmax(1), p.argmax(1))


def test_reverse_sigmoid_matches_its_formula_on_a_hand_row():
    p = torch.tensor([[0.9, 0.1, 0.0]])
    out = ReverseSigmoid(beta=1.0, gamma=0.1)(p)

    def r(v):  # beta * (sigmoid(gamma * logit v) - 1/2), with ART's 1e-9 clip
        v = min(max(v, 1e-9), 1 - 1e-9)
        return 1 / (1 + math.exp(-0.1 * math.log(v / (1 - v)))) - 0.5

    raw = [min(max(v - r(v), 0.0), 1.0) for v in (0.9, 0.1, 0.0)]
    np.testing.assert_allclose(out[0].numpy(), np.array(raw) / sum(raw), rtol=1e-5)


def test_reverse_sigmoid_keeps_argmax_when_top_probability_above_half():
    p = _probs(2000, sharp=4.0)
    conf = p.max(1).values > 0.5
    out = ReverseSigmoid()(p)
    assert conf.sum() > 500
    assert torch.equal(out[conf].argmax(1), p[conf].argmax(1))
    assert torch.allclose(out.sum(1), torch.ones(len(p)), atol=1e-5)
    # and it really perturbs: the outputs are flattened towards uniform
    assert float((out - p).abs().sum(1).mean()) > 0.1


def test_reverse_sigmoid_can_flip_a_low_confidence_argmax():
    """Documented limit: a near-zero class is lifted above a top class of probability 0.3."""
    p = torch.tensor([[0.3, 0.29, 0.29, 0.12 - 1e-9, 1e-9]])
    out = ReverseSigmoid(beta=1.0, gamma=0.1)(p)
    assert int(out.argmax(1)) == 4


def test_defended_victim_through_the_oracle():
    torch.manual_seed(0)
    victim = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    pool = torch.randn(30, 1, 4, 4)
    d = build_defense("top1")
    wrapped, kind = d.wrap_victim(victim)
    assert kind == "probs" and isinstance(wrapped, DefendedVictim)
    oracle = d.wrap_oracle(Oracle(wrapped, pool, 10, output_mode="probs", victim_outputs=kind))
    a = oracle.query(torch.arange(10))
    assert torch.equal((a.probs != 0).sum(1), torch.ones(10, dtype=torch.long))
    with torch.no_grad():
        assert torch.equal(a.labels, victim(pool[:10]).argmax(1))
    # a defended API reveals no logits
    with pytest.raises(ValueError, match="logits"):
        Oracle(wrapped, pool, 10, output_mode="logits", victim_outputs=kind)
    # a probability-output callable victim works too
    probs_victim = DefendedVictim(lambda x: victim(x).softmax(-1), Rounding(1), "probs")
    out = probs_victim(pool[:4])
    assert torch.allclose(out * 10, (out * 10).round(), atol=1e-5)


def test_build_defense_validates():
    assert set(DEFENSES) == {"none", "top1", "rounding", "noise", "reverse-sigmoid", "prada"}
    with pytest.raises(ValueError, match="defense must be one of"):
        build_defense("watermark")
    with pytest.raises(TypeError, match="rounding"):
        build_defense("rounding", sigma=0.1)
    with pytest.raises(ValueError, match="decimals"):
        build_defense("rounding", decimals=-1)
    with pytest.raises(ValueError, match="delta"):
        build_defense("prada", delta=1.5)
    none = build_defense(None)
    v = object()
    assert none.wrap_victim(v) == (v, "logits") and none.wrap_oracle(v) is v
    assert build_defense("noise", sigma=0.2).params() == {"sigma": 0.2, "seed": 0}


# ------------------------------------------------------------------ Shapiro-Wilk and PRADA

def test_shapiro_wilk_statistic():
    rng = np.random.default_rng(0)
    normal, expo = rng.normal(size=400), rng.exponential(size=400)
    assert shapiro_wilk_w(normal) > 0.99 > 0.9 > shapiro_wilk_w(expo)
    assert shapiro_wilk_w(np.ones(10)) == 1.0
    # three equally spaced points are exactly "normal order statistics": W = 1
    assert math.isclose(shapiro_wilk_w([1.0, 2.0, 3.0]), 1.0, rel_tol=1e-9)
    scipy_stats = pytest.importorskip("scipy.stats")
    for x in (normal, expo, rng.uniform(size=37), rng.normal(size=7)):
        assert math.isclose(shapiro_wilk_w(x), scipy_stats.shapiro(x).statistic, rel_tol=1e-6)


def _gauss_problem(seed: int = 0, d: int = 32, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, classes, generator=g)
    victim = nn.Linear(d, classes, bias=False)
    with torch.no_grad():
        victim.weight.copy_(w.T)
    natural = torch.randn(500, d, generator=g)
    # JbDA-like synthetic stream: 10 seeds, then every round perturbs all queries so far
    cur = torch.randn(10, d, generator=g)
    parts = [cur]
    while sum(len(p) for p in parts) < 500:
        new = cur + 0.3 * torch.sign(torch.randn(cur.shape, generator=g))
        parts.append(new)
        cur = torch.cat([cur, new])
    attack = torch.cat(parts)[:500]
    return victim, natural, attack


def test_prada_detector_flags_synthetic_stream_not_natural_one():
    victim, natural, attack = _gauss_problem()
    with torch.no_grad():
        det_n, det_a = PradaDetector(), PradaDetector()
        assert not det_n.observe(natural, victim(natural).argmax(1))
        assert det_a.observe(attack, victim(attack).argmax(1))
    assert min(h[2] for h in det_n.history) > 0.9
    assert det_a.history[0][2] < 0.9
    assert det_n.queries_seen == 500


def test_prada_oracle_refuses_attack_and_answers_natural():
    victim, natural, attack = _gauss_problem()
    ok = PradaOracle(Oracle(victim, natural, 500))
    idx, tgt, refused = query_until_refused(ok, torch.arange(500), batch_size=50)
    assert not refused and len(idx) == 500 and ok.used == 500
    bad = build_defense("prada").wrap_oracle(Oracle(victim, attack, 500))
    idx, tgt, refused = query_until_refused(bad, torch.arange(500), batch_size=50)
    assert refused and 0 < len(idx) < 500 and len(tgt) == len(idx)
    used = bad.used
    assert bad.refused_at == used and bad.blocked
    with pytest.raises(QueryRefusedError, match="PRADA"):
        bad.query(torch.tensor([499]))
    assert bad.used == used  # a blocked client is charged nothing more


def test_active_loop_stops_at_a_refusal():
    victim, _, attack = _gauss_problem()
    pool = attack.reshape(500, 1, 4, 8)
    flat_victim = nn.Sequential(nn.Flatten(), victim)
    oracle = PradaOracle(Oracle(flat_victim, pool, 400))
    with torch.no_grad():
        vl = flat_victim(pool[:50]).argmax(1)

    class Tiny:
        def __init__(self, seed):
            torch.manual_seed(seed)
            self.model = nn.Linear(32, 4)
            self.device = torch.device("cpu")

        def fit(self, x, y, **kw):
            return self

        def predict_members(self, x, batch_size=1024):
            with torch.no_grad():
                return self.model(x.flatten(1))[None]

        def predict_proba(self, x, batch_size=1024):
            return self.predict_members(x)[0].softmax(-1)

    # a seed set below PRADA's 100-distance minimum passes; random rounds then get flagged
    cfg = ActiveConfig(strategy="random", milestones=[400], seed_size=60, round_size=30)
    res = run_active(oracle, cfg, test_x=pool[:50], victim_labels=vl, test_y=vl, progress=False,
                     method_factory=Tiny, eval_factory=Tiny)
    assert res["refused_at"] is not None and 60 < res["used"] < 400
    last = res["milestones"][-1]
    assert last["refused"] and last["used"] == len(res["queried"]) < res["used"]
