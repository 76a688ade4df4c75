"""Steal your own model with your own data.

Trains a small victim on scikit-learn's digits (8×8), then steals it through a label-only
oracle with a 600-image budget, comparing a single surrogate with a Deep Ensemble.

    python examples/steal_your_own_model.py [--epochs 10]
"""

import argparse

import torch
from sklearn.datasets import load_digits

import faststeal


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--budget", type=int, default=600)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x))
    vic_idx, pool_idx, test_idx = perm[:600], perm[600:1400], perm[1400:]

    # your model: any nn.Module (or a callable returning logits)
    victim = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                 torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(victim.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(victim(x[vic_idx]), y[vic_idx]).backward()
        opt.step()

    res = faststeal.steal(victim, pool=x[pool_idx], test=(x[test_idx], y[test_idx]),
                          budget=args.budget, methods=["baseline", "deep-ensemble"],
                          epochs=args.epochs, surrogate_arch="mlp", progress=False)
    print(f"victim test accuracy: {100 * res['victim_test_accuracy']:.1f}%")
    print(f"queries used: {res['queries']['used']} of {res['queries']['budget']}")
    for method, runs in res["results"].items():
        r = runs[0]
        print(f"{method:15s} fidelity {100 * r['fidelity']:.1f}%  accuracy {100 * r['accuracy']:.1f}%"
              f"  members {r['members']}")
    return res


if __name__ == "__main__":
    main()
