"""One look for every faststeal figure (the comparison's and the studies'): sizes, fonts,
colours, and how a figure is written (PDF for a paper, PNG for the docs).

Figures are drawn inside :func:`plotting` (matplotlib's rc settings of :data:`RC`, the Agg
backend) and written with :func:`save`. Method and variant names keep one colour in every figure
(:func:`color`), from the Okabe–Ito palette (distinguishable with colour-vision deficiencies).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

#: PNG resolution (the PDF is vector)
DPI = 220
#: figure widths in inches: one column / the full text width of a two-column paper
WIDTH_COLUMN = 3.5
WIDTH_FULL = 7.2

RC: dict[str, Any] = {
    "font.size": 8.5,
    "axes.titlesize": 9,
    "axes.labelsize": 8.5,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 7.5,
    "legend.frameon": False,
    "figure.titlesize": 9.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.4,
    "lines.markersize": 4,
    "errorbar.capsize": 2.5,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.03,
    "pdf.fonttype": 42,  # TrueType in the PDF: editable text, accepted by paper submission systems
    "ps.fonttype": 42,
}

# Okabe & Ito (2008); black is reserved for the reference series (random queries, the plain
# Deep Ensemble, the single surrogate)
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442",
           "#999999")
REFERENCE_COLOR = "#000000"
_FIXED = {"baseline": REFERENCE_COLOR, "deep-ensemble": PALETTE[0], "mc-dropout": PALETTE[1],
          "bbb": PALETTE[2], "swag": PALETTE[3], "laplace": PALETTE[4]}


def color(name: str, index: int = 0) -> str:
    """The colour of series ``name``: fixed for the five methods and the baseline, else the
    ``index``-th palette colour."""
    return _FIXED.get(name, PALETTE[index % len(PALETTE)])


def n_label(n: int) -> str:
    """How a series' spread is described in a legend: ``mean ± std, n = 3`` (``n = 1``: no
    spread is drawn)."""
    return f"mean ± std, n = {n}" if n > 1 else "n = 1, no spread"


def available() -> bool:
    """Whether matplotlib (the ``plot`` extra) is installed."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


@contextlib.contextmanager
def plotting() -> Iterator[Any]:
    """``with plotting() as plt:`` — matplotlib.pyplot on the Agg backend under :data:`RC`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context(RC):
        yield plt


def save(fig: Any, stem: str) -> list[str]:
    """Write ``stem.pdf`` and ``stem.png`` (:data:`DPI`) atomically, close ``fig``; returns the
    two paths."""
    import matplotlib.pyplot as plt

    paths = []
    try:
        for ext in ("pdf", "png"):
            path = f"{stem}.{ext}"
            tmp = os.path.join(os.path.dirname(path) or ".",
                               f".{os.path.basename(stem)}.tmp{os.getpid()}.{ext}")
            # no creation date in the PDF: the same figure gives the same file
            fig.savefig(tmp, dpi=DPI, format=ext,
                        metadata={"CreationDate": None} if ext == "pdf" else None)
            os.replace(tmp, path)
            paths.append(path)
    finally:
        plt.close(fig)
    return paths
