"""Metric definitions against hand-computed cases."""

import math

import pytest
import torch

from faststeal import metrics


def _logits_from_probs(p):
    return torch.log(torch.tensor(p, dtype=torch.float32))


def test_hand_case_two_members_two_rows():
    # member 0: row0 -> [0.9, 0.1], row1 -> [0.2, 0.8]; member 1: row0 -> [0.6, 0.4], row1 -> [0.7, 0.3]
    p = [[[0.9, 0.1], [0.2, 0.8]], [[0.6, 0.4], [0.7, 0.3]]]
    logits = _logits_from_probs(p)
    victim = torch.tensor([0, 1])
    y = torch.tensor([0, 0])
    r = metrics.evaluate(logits, victim, y)
    # p̄ row0 = [0.75, 0.25] -> 0 ; row1 = [0.45, 0.55] -> 1
    assert r["fidelity"] == pytest.approx(1.0)
    assert r["accuracy"] == pytest.approx(0.5)
    # member 0 preds [0, 1] -> fid 1.0 ; member 1 preds [0, 0] -> fid 0.5
    assert r["mean_member_fidelity"] == pytest.approx(0.75)
    assert r["ensemble_gain"] == pytest.approx(0.25)
    # Var_s over 2 members = ((a-b)/2)^2 ; row0: 0.15^2 both classes, row1: 0.25^2
    assert r["variance"] == pytest.approx((0.15**2 + 0.25**2) / 2, rel=1e-5)
    h = lambda q: -sum(v * math.log(v) for v in q)  # noqa: E731
    mi0 = h([0.75, 0.25]) - (h([0.9, 0.1]) + h([0.6, 0.4])) / 2
    mi1 = h([0.45, 0.55]) - (h([0.2, 0.8]) + h([0.7, 0.3])) / 2
    assert r["mutual_info"] == pytest.approx((mi0 + mi1) / 2, rel=1e-5)
    # row0: both members say 0 = pred -> 0; row1: member 1 says 0 != pred 1 -> 1/2
    assert r["disagreement"] == pytest.approx(0.25)


def test_variance_matches_torch_var():
    logits = torch.randn(7, 33, 5) * 3
    p = logits.softmax(-1)
    expected = p.var(0, unbiased=False).mean()
    assert metrics.prediction_variance(logits) == pytest.approx(float(expected), rel=1e-5)


def test_kl_hand_case_and_identity():
    pv = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    ps = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    expected = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75) + math.log(2.0)) / 2
    assert metrics.kl_divergence(pv, ps) == pytest.approx(expected, rel=1e-9)
    assert metrics.kl_divergence(ps, ps) == pytest.approx(0.0, abs=1e-12)


def test_mean_probs_override_changes_prediction():
    logits = _logits_from_probs([[[0.6, 0.4]]])
    r = metrics.evaluate(logits, torch.tensor([1]), torch.tensor([1]),
                         mean_probs=torch.tensor([[0.3, 0.7]]))
    assert r["fidelity"] == 1.0 and r["accuracy"] == 1.0


def test_evaluate_rejects_bad_shapes():
    with pytest.raises(ValueError, match="member_logits must be"):
        metrics.evaluate(torch.randn(3, 4), torch.zeros(3, dtype=torch.long),
                         torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="victim_labels must be"):
        metrics.evaluate(torch.randn(2, 3, 4), torch.zeros(4, dtype=torch.long),
                         torch.zeros(3, dtype=torch.long))
