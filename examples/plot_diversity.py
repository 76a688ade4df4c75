"""Plot the diversity curves V(t) of a finished run, one line per seed, from its results database
(in the style of every faststeal figure; writes OUT.pdf and OUT.png).

    python examples/plot_diversity.py runs/example [--out diversity.png] [--metric variance]
"""

import argparse
import os
from collections import defaultdict

from faststeal.results import ResultStore
from faststeal.results import style


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
            curves[cell["method"]].append(([r["epoch"] for r in tr], [r[args.metric] for r in tr]))
    store.close()
    out = args.out or os.path.join(args.run_dir, f"{args.metric}_per_seed.png")
    with style.plotting() as plt:
        fig, ax = plt.subplots(figsize=(style.WIDTH_FULL * 0.62, 3.1))
        for k, (method, runs) in enumerate(curves.items()):
            for i, (epoch, v) in enumerate(runs):
                ax.plot(epoch, v, color=style.color(method, k), alpha=0.7, lw=1.0,
                        label=f"{method} ({len(runs)} seeds)" if i == 0 else None)
        ax.set_xlabel("training epoch")
        ax.set_ylabel(args.metric)
        ax.set_yscale("symlog", linthresh=1e-6)  # the baseline's V is 0
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        pdf, png = style.save(fig, os.path.splitext(out)[0])
    print(f"wrote {png} and {pdf} ({sum(len(r) for r in curves.values())} curves)")
    return png


if __name__ == "__main__":
    main()
