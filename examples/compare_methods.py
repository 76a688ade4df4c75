"""Run the five-method comparison and read its results.

    python examples/compare_methods.py --out runs/example            # Fashion-MNIST, quick preset
    python examples/compare_methods.py --dataset digits --budget 400   # offline, tiny
"""

import argparse
import json
import os

import faststeal


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--victim-arch", default=None)
    ap.add_argument("--out", default="runs/example")
    args = ap.parse_args(argv)

    cfg = faststeal.Config.from_preset(
        "quick", dataset=args.dataset, budget=args.budget, epochs=args.epochs,
        victim_arch=args.victim_arch, out=args.out, progress=False)
    faststeal.run_comparison(cfg)

    # results.json is the export of the run's SQLite store
    with open(os.path.join(args.out, "results.json")) as fh:
        results = json.load(fh)
    print(f"victim accuracy {100 * results['victim']['test_accuracy']:.1f}%")
    for name, m in results["methods"].items():
        f = m["fidelity"]
        print(f"{name:14s} S={m['members']:<3} fidelity {100 * f['mean']:.2f} ± {100 * f['std']:.2f}"
              f" (n={f['n']})  V={m['variance']['mean']:.2e}")
    return results


if __name__ == "__main__":
    main()
