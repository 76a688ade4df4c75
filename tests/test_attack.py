"""faststeal.steal on victims that misbehave: every bad answer stops the run with a message
instead of becoming a plausible number."""

import pytest
import torch
from torch import nn

import faststeal
from faststeal.oracle import PREFLIGHT_ROWS, VictimError, VictimOutputError

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(classes=10, n_pool=200, n_test=60):
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(n_pool, 1, 4, 4, generator=g)
    test = (torch.randn(n_test, 1, 4, 4, generator=g),
            torch.randint(0, classes, (n_test,), generator=g))
    return pool, test


class Victim(nn.Module):
    def __init__(self, classes=10, post=None):
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, classes))
        self.post = post
        self.images = 0

    def forward(self, x):
        self.images += x.shape[0]
        out = self.net(x)
        return out if self.post is None else self.post(out)


def _steal(victim, pool, test, **kw):
    return faststeal.steal(victim, pool=pool, test=test, budget=100, methods=["baseline"],
                           epochs=1, progress=False, **kw)


def test_nan_victim_is_an_error_not_fidelity_one():
    def nan_rows(out):
        out[::3] = float("nan")
        return out

    pool, test = _data()
    with pytest.raises(VictimOutputError, match="non-finite values"):
        _steal(Victim(post=nan_rows), pool, test)


def test_test_labels_outside_the_victims_classes():
    pool, test = _data(classes=10)
    with pytest.raises(ValueError, match=r"test labels must lie in \[0, 7\) \(the victim answers "
                                         r"7 classes\), got labels from 0 to 9"):
        _steal(Victim(classes=7), pool, test)
    x, y = test
    with pytest.raises(ValueError, match=r"test labels must lie in \[0, 10\).*from 1 to 10"):
        _steal(Victim(), pool, (x, y + 1))  # labels shifted by one


def test_probability_victim_declared_as_logits_warns():
    pool, test = _data()
    with pytest.warns(RuntimeWarning, match="softmaxed a second time"):
        _steal(Victim(post=lambda o: o.softmax(-1)), pool, test)


def test_logit_victim_declared_as_probabilities_is_an_error():
    pool, test = _data()
    with pytest.raises(VictimOutputError, match="victim_outputs='probs' but the answers are not "
                                                "probabilities"):
        _steal(Victim(), pool, test, victim_outputs_kind="probs")


def test_pool_the_victim_cannot_take_fails_first_naming_it():
    pool, test = _data()
    victim = Victim()
    with pytest.raises(VictimError, match=r"pool_x: shape \(200, 1, 5, 5\), dtype "
                                          r"torch.float32.*mat1 and mat2 shapes cannot be"):
        _steal(victim, torch.randn(200, 1, 5, 5), test)
    assert victim.images == PREFLIGHT_ROWS  # a few images, before the test set or any training


def test_test_set_is_predicted_once_unless_the_method_has_its_own_predictive(monkeypatch):
    from faststeal.attack import _mean_softmax
    from faststeal.methods.base import Method

    calls = {"members": 0, "proba": 0}
    members, proba = Method.predict_members, Method.predict_proba
    pool, test = _data()

    def count_members(self, x, *a, **k):
        calls["members"] += len(x) == len(test[0])  # the test set (60 rows; probe: 100)
        return members(self, x, *a, **k)

    def count_proba(self, *a, **k):
        calls["proba"] += 1
        return proba(self, *a, **k)
    monkeypatch.setattr(Method, "predict_members", count_members)
    monkeypatch.setattr(Method, "predict_proba", count_proba)
    res = faststeal.steal(Victim(), pool=pool, test=test, budget=100,
                          methods=["deep-ensemble"], epochs=1, progress=False,
                          method_params={"deep-ensemble": {"members": 2}})
    # predict_proba is never called: the mean softmax is computed from the test set's members
    assert calls == {"members": 1, "proba": 0}
    m = res.stolen("deep-ensemble").method
    x = test[0]
    assert torch.equal(_mean_softmax(members(m, x)), proba(m, x))  # the same p̄, bit for bit
