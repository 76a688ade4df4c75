"""Plot the diversity curves V(t) of a finished run from its results database.

    python examples/plot_diversity.py runs/example [--out diversity.png] [--metric variance]
"""

import argparse
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from faststeal.results import ResultStore  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run_dir")
    ap.add_argument("--out", default=None)
    ap.add_argument("--metric", default="variance", choices=("variance", "mutual_info",
                                                              "disagreement"))
    args = ap.parse_args(argv)
    store = ResultStore(args.run_dir)
    curves = defaultdict(list)
    for cell in store.cells("main"):
        tr = store.trace(cell["cell_id"])
        if tr:
            curves[cell["method"]].append(([r["iteration"] for r in tr], [r[args.metric] for r in tr]))
    store.close()
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, runs in curves.items():
        for i, (it, v) in enumerate(runs):
            ax.plot(it, v, color=f"C{list(curves).index(method)}", alpha=0.7,
                    label=method if i == 0 else None)
    ax.set_xlabel("training iteration")
    ax.set_ylabel(args.metric)
    ax.set_yscale("symlog", linthresh=1e-6)
    ax.legend()
    out = args.out or os.path.join(args.run_dir, f"{args.metric}_per_seed.png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out} ({sum(len(r) for r in curves.values())} curves)")
    return out


if __name__ == "__main__":
    main()
