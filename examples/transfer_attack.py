"""Use the stolen model: transfer adversarial examples from the stolen copy to the victim.

Trains a small victim on scikit-learn's digits (8x8), wraps it as an Adversarial Robustness
Toolbox (ART) classifier (faststeal accepts ART classifiers as victims), steals it with a user
CNN as a single surrogate and as a Deep Ensemble, then crafts FGSM and PGD adversarial examples
on each stolen model (``StolenModel.to_art()``) and reports how often they fool the victim
(transfer rate, on test images the victim classifies correctly).

    pip install 'faststeal[art]'
    python examples/transfer_attack.py [--epochs 10] [--eps 0.2]
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import faststeal


class ThiefCNN(nn.Module):
    """The attacker's own architecture (any nn.Module works)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


def main(argv=None):
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--budget", type=int, default=600)
    ap.add_argument("--eps", type=float, default=0.2)
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--images", type=int, default=200, help="test images to attack")
    ap.add_argument("--pgd-steps", type=int, default=10)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x))
    vic_idx, pool_idx, test_idx = perm[:600], perm[600:1400], perm[1400:]
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(net(x[vic_idx]), y[vic_idx]).backward()
        opt.step()
    victim = PyTorchClassifier(net.eval(), loss=nn.CrossEntropyLoss(), input_shape=(1, 8, 8),
                               nb_classes=10, clip_values=(0.0, 1.0))

    res = faststeal.steal(victim, pool=x[pool_idx].numpy(), test=(x[test_idx], y[test_idx]),
                          budget=args.budget, surrogate=ThiefCNN,
                          methods=["baseline", "deep-ensemble"], epochs=args.epochs,
                          method_params={"deep-ensemble": {"members": args.members}},
                          progress=False)

    xt = x[test_idx].numpy()
    v_pred = victim.predict(xt).argmax(-1)
    keep = v_pred == y[test_idx].numpy()  # attack images the victim gets right
    xt, v_pred = xt[keep][:args.images], v_pred[keep][:args.images]
    rows = []
    for method in ("baseline", "deep-ensemble"):
        art_model = res.stolen(method).to_art(clip_values=(0.0, 1.0))
        attacks = {"FGSM": FastGradientMethod(art_model, eps=args.eps, batch_size=256),
                   "PGD": ProjectedGradientDescent(art_model, eps=args.eps,
                                                   eps_step=args.eps / 4,
                                                   max_iter=args.pgd_steps, batch_size=256,
                                                   verbose=False)}
        for name, attack in attacks.items():
            adv = attack.generate(xt.astype(np.float32))
            fooled = float((victim.predict(adv).argmax(-1) != v_pred).mean())
            white = float((art_model.predict(adv).argmax(-1) != v_pred).mean())
            rows.append({"surrogate": method, "attack": name, "transfer_rate": fooled,
                         "surrogate_fooled": white,
                         "fidelity": res["results"][method][0]["fidelity"]})
    print(f"{len(xt)} test images the victim classifies correctly, eps={args.eps}")
    print("| surrogate | attack | fidelity | fools the surrogate | fools the victim |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['surrogate']} | {r['attack']} | {100 * r['fidelity']:.1f}% | "
              f"{100 * r['surrogate_fooled']:.1f}% | {100 * r['transfer_rate']:.1f}% |")
    return rows


if __name__ == "__main__":
    main()
