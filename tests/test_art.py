"""Adversarial Robustness Toolbox interop (optional extra faststeal[art])."""

import numpy as np
import pytest
import torch
from torch import nn

import faststeal
from toydata import prototype_data

art = pytest.importorskip("art")
from art.attacks.evasion import FastGradientMethod  # noqa: E402
from art.estimators.classification import PyTorchClassifier  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _victim():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x, y = prototype_data(300, 0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(50):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval(), x, y


def test_art_classifier_as_victim_and_to_art():
    net, x, y = _victim()
    clf = PyTorchClassifier(net, loss=nn.CrossEntropyLoss(), input_shape=(1, 8, 8),
                            nb_classes=10)
    res = faststeal.steal(clf, pool=x[:200].numpy(), test=(x[200:].numpy(), y[200:].numpy()),
                          budget=150, surrogate="mlp", methods=["deep-ensemble"], epochs=3,
                          progress=False, method_params={"deep-ensemble": {"members": 2}})
    direct = faststeal.steal(net, pool=x[:200], test=(x[200:], y[200:]), budget=150,
                             surrogate="mlp", methods=["deep-ensemble"], epochs=3,
                             progress=False, method_params={"deep-ensemble": {"members": 2}})
    # the ART victim answers exactly like the module it wraps
    assert res["results"] == direct["results"] or all(
        abs(a["fidelity"] - b["fidelity"]) < 1e-6 for a, b in zip(
            res["results"]["deep-ensemble"], direct["results"]["deep-ensemble"]))
    sm = res.stolen("deep-ensemble")
    est = sm.to_art(clip_values=(-5.0, 5.0))
    xt = x[200:230].numpy()
    np.testing.assert_allclose(est.predict(xt), np.log(sm(xt).detach().numpy()), atol=1e-5)
    adv = FastGradientMethod(est, eps=0.5).generate(xt)
    assert adv.shape == xt.shape and np.abs(adv - xt).max() <= 0.5 + 1e-6
    # the attack raises the stolen model's loss on the victim's labels
    yv = torch.as_tensor(clf.predict(xt).argmax(-1))
    before = nn.functional.nll_loss(torch.log(sm(xt)), yv)
    after = nn.functional.nll_loss(torch.log(sm(adv)), yv)
    assert float(after) > float(before)
