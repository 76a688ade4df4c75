"""Every figure faststeal draws: the comparison's (``faststeal report``) and the studies'.

Each function takes plain data (per-seed values, traces, summary tables), draws one figure in the
one style of :mod:`faststeal.results.style` and writes ``STEM.pdf`` and ``STEM.png``; it returns
the paths ([] when matplotlib is missing). Conventions, the same in every figure:

- a series over seeds shows its mean, with its spread (± sample std, ddof 1) only where n > 1
  and n in the legend or the labels; single seeds are drawn as small open circles beside the mean;
- fidelity is in percent on an axis that spans at least :data:`MIN_SPAN` points, so seed noise
  is not blown up to fill the plot; dot plots instead of bars (no bar starting at an arbitrary
  value);
- diversity curves use a log axis over training epochs and leave out points where V <= 1e-12 (a
  single network up to rounding: the baseline, SWAG before its second snapshot, Laplace before its
  posterior exists).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from . import style

#: smallest span (percentage points) of a fidelity axis
MIN_SPAN = 4.0
#: V at or below this is one network up to float rounding (SWAG's first snapshot: ~1e-15)
V_ZERO = 1e-12


def _stats(values: Any) -> tuple[float, float, int]:
    """(mean, sample std, n) in the units given; ``values``: per-seed values, or a summary
    ``{"mean", "std", "n"}`` (a published table) taken as it is."""
    if isinstance(values, Mapping):
        return float(values["mean"]), float(values["std"]), int(values["n"])
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if not len(v):
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, int(len(v))


def _pct(values: Any) -> tuple[float, float, int]:
    """:func:`_stats` of fractions, in percent."""
    m, sd, n = _stats(values)
    return 100 * m, 100 * sd, n


def _span(lo: float, hi: float, minimum: float = MIN_SPAN, pad: float = 0.6,
          top: float = 100.0) -> tuple[float, float]:
    """Axis limits around [lo, hi] with ``pad`` margin and at least ``minimum`` wide."""
    lo, hi = lo - pad, hi + pad
    if hi - lo < minimum:
        mid = (lo + hi) / 2
        lo, hi = mid - minimum / 2, mid + minimum / 2
    if hi > top:
        lo, hi = lo - (hi - top), top
    return lo, hi


def _same_n(ns: Sequence[int]) -> Optional[int]:
    ns = [n for n in ns if n]
    return ns[0] if ns and all(n == ns[0] for n in ns) else None


# ------------------------------------------------------------------------------ building blocks

def _draw_variance(ax: Any, curves: Mapping[str, Sequence[Sequence[dict]]],
                   reference: Optional[str] = None) -> list[str]:
    """V(t) per series on ``ax`` (log scale, x = training epoch); returns the series left out
    because V = 0 at every recorded point."""
    left_out, lows = [], []
    for i, (name, traces) in enumerate(curves.items()):
        traces = [t for t in traces if t]
        if not traces:
            continue
        its = sorted(set.intersection(*[{r["iteration"] for r in t} for t in traces]))
        by_it = [{r["iteration"]: r for r in t} for t in traces]
        xs, vals = [], []
        for it in its:
            v = [float(b[it]["variance"]) for b in by_it]
            if all(x > V_ZERO for x in v):
                xs.append(float(by_it[0][it].get("epoch", it)))
                vals.append(v)
        if not vals:
            left_out.append(name)
            continue
        arr = np.asarray(vals)  # (points, seeds)
        n = arr.shape[1]
        mean = arr.mean(1)
        ref = name == reference
        kw = dict(color=style.REFERENCE_COLOR if ref else style.color(name, i),
                  lw=2.0 if ref else 1.3, label=f"{name} (n = {n})")
        if len(xs) <= 3:
            kw.update(marker="o", ms=4)
        ax.plot(xs, mean, **kw)
        if n > 1:
            sd = arr.std(1, ddof=1)
            ax.fill_between(xs, mean - sd, mean + sd, color=kw["color"], alpha=0.15, lw=0)
            lows.extend(x for x in mean - sd if x > 0)
        lows.extend(mean)
    ax.set_yscale("log")
    if lows:  # bands reaching 0 are cut at the axis rather than stretching it to 1e-12
        ax.set_ylim(bottom=0.5 * min(lows))
    ax.set_xlabel("training epoch")
    ax.set_ylabel("prediction variance V (probe set)")
    return left_out


def _draw_dots(ax: Any, rows: Mapping[str, Any], reference: Optional[str],
               xlabel: str, colors: bool = True, legend_columns: int = 3) -> None:
    """Horizontal dot plot on ``ax``: per row the single values (open circles), the mean (filled)
    and ± std where n > 1; a dashed line at the reference row's mean. Values are fractions."""
    names = list(rows)
    stats = {k: _pct(rows[k]) for k in names}
    common_n = _same_n([stats[k][2] for k in names])
    ys = np.arange(len(names))[::-1]
    lo, hi = math.inf, -math.inf
    for y, (i, name) in zip(ys, enumerate(names)):
        m, sd, n = stats[name]
        if n == 0:
            continue
        c = style.REFERENCE_COLOR if (name == reference or not colors) else style.color(name, i)
        vals = ([] if isinstance(rows[name], Mapping) else
                [100 * v for v in rows[name] if v is not None and not math.isnan(v)])
        if n > 1:
            ax.errorbar([m], [y], xerr=[sd], fmt="none", ecolor=c, elinewidth=1.2, zorder=2)
        if n > 1 and vals:
            ax.scatter(vals, [y + 0.22] * len(vals), s=10, facecolors="none", edgecolors=c,
                       linewidths=0.7, zorder=3)
        ax.plot([m], [y], "o", color=c, ms=5, zorder=4)
        lo, hi = min(lo, *vals, m - sd), max(hi, *vals, m + sd)
    if reference in stats and stats[reference][2]:
        ax.axvline(stats[reference][0], color=style.REFERENCE_COLOR, ls="--", lw=0.8,
                   zorder=1)
    labels = [name if common_n else f"{name} (n = {stats[name][2]})" for name in names]
    ax.set_yticks(ys)
    ax.set_yticklabels(labels)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.grid(axis="y", visible=False)
    if math.isfinite(lo):
        ax.set_xlim(*_span(lo, hi))
    ax.set_xlabel(xlabel)
    if common_n:  # legend entries drawn nowhere (no empty artists on the axes)
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], marker="o", ms=5, color="0.3", lw=1.2 if common_n > 1 else 0,
                          label=style.n_label(common_n))]
        if common_n > 1 and not any(isinstance(v, Mapping) for v in rows.values()):
            handles.append(Line2D([], [], marker="o", ms=3.5, mfc="none", mec="0.3", lw=0,
                                  label="single seeds"))
        if reference in stats and stats[reference][2]:
            handles.append(Line2D([], [], color=style.REFERENCE_COLOR, ls="--", lw=0.8,
                                  label=f"{reference} mean"))
        ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=legend_columns,
                  borderaxespad=0.2, handletextpad=0.3)


# ------------------------------------------------------------------------------ the comparison

def variance_curves(curves: Mapping[str, Sequence[Sequence[dict]]], stem: str, *,
                    title: Optional[str] = None) -> list[str]:
    """V(t) per method: ``curves[method]`` = one trace per seed (dicts with ``iteration``,
    ``epoch``, ``variance``); mean over seeds, ± std band where n > 1."""
    if not style.available():
        return []
    with style.plotting() as plt:
        fig, ax = plt.subplots(figsize=(style.WIDTH_FULL * 0.62, 3.1))
        left_out = _draw_variance(ax, curves)
        ax.set_title(title or "Member diversity over training")
        if left_out:
            ax.text(0.99, 0.02, "V = 0 throughout (one network): " + ", ".join(left_out),
                    transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="0.35")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        return style.save(fig, stem)


def fidelity_by_method(rows: Mapping[str, Any], stem: str, *,
                       reference: Optional[str] = "baseline",
                       title: Optional[str] = None) -> list[str]:
    """Fidelity per method: ``rows[method]`` = the per-seed fidelities (fractions), or their
    summary ``{"mean", "std", "n"}`` (then without the single seeds)."""
    if not style.available():
        return []
    with style.plotting() as plt:
        fig, ax = plt.subplots(figsize=(style.WIDTH_COLUMN + 0.4, 0.38 * len(rows) + 1.1))
        _draw_dots(ax, rows, reference, "fidelity to the victim (%)")
        if title:
            ax.set_title(title, pad=16)
        return style.save(fig, stem)


def fidelity_vs_members(points: Mapping[int, Any], stem: str, *, method: str,
                        baseline: Any = None) -> list[str]:
    """Fidelity against member count S: ``points[S]`` = per-seed fidelities (fractions) or
    their summary ``{"mean", "std", "n"}``;
    ``baseline``: the single surrogate's per-seed fidelities, drawn as a reference band."""
    if not style.available():
        return []
    with style.plotting() as plt:
        fig, ax = plt.subplots(figsize=(style.WIDTH_COLUMN, 2.6))
        s = sorted(int(k) for k in points)
        st = [_pct(points[k]) for k in s]
        ns = [x[2] for x in st]
        n = _same_n(ns)
        means = np.array([x[0] for x in st])
        sds = np.array([x[1] for x in st])
        lo, hi = float(np.min(means - sds)), float(np.max(means + sds))
        c = style.color(method)
        label = f"{method} ({style.n_label(n)})" if n else f"{method} (n = {ns})"
        if max(ns) > 1:
            ax.errorbar(s, means, yerr=sds, marker="o", color=c, label=label)
        else:
            ax.plot(s, means, marker="o", color=c, label=label)
        if baseline:
            bm, bsd, bn = _pct(baseline)
            ax.axhline(bm, color=style.REFERENCE_COLOR, ls="--", lw=0.9,
                       label=f"single surrogate ({style.n_label(bn)})")
            if bn > 1:
                ax.axhspan(bm - bsd, bm + bsd, color=style.REFERENCE_COLOR, alpha=0.08, lw=0)
            lo, hi = min(lo, bm - bsd), max(hi, bm + bsd)
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set_xticks(s)
        ax.set_xticklabels([str(k) for k in s])
        ax.set_ylim(*_span(lo, hi))
        ax.set_xlabel("members S")
        ax.set_ylabel("fidelity to the victim (%)")
        ax.legend(loc="lower right")
        return style.save(fig, stem)


# ------------------------------------------------------------------------------ the studies

def active_fidelity_vs_budget(table: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]],
                              strategies: Sequence[str], budgets: Sequence[int], stem: str, *,
                              dataset: str) -> list[str]:
    """Active stealing: fidelity against budget per strategy, retrained and running surrogate.
    ``table[strategy][which][str(budget)]`` = {"mean", "std", "n"} (fractions)."""
    if not style.available():
        return []
    with style.plotting() as plt:
        fig, axes = plt.subplots(1, 2, figsize=(style.WIDTH_FULL, 2.9), sharey=True)
        lo, hi, ns = math.inf, -math.inf, []
        for ax, which, title in ((axes[0], "retrained", "retrained on the queried set"),
                                 (axes[1], "running", "the strategy's running surrogate")):
            for i, s in enumerate(strategies):
                rows = [table[s][which][str(b)] for b in budgets]
                m = np.array([r["mean"] for r in rows]) * 100
                sd = np.array([r["std"] for r in rows]) * 100
                n = min(r["n"] for r in rows)
                ns.append(n)
                ref = s == "random"
                c = style.REFERENCE_COLOR if ref else style.PALETTE[(i - 1) % len(style.PALETTE)]
                ax.plot(budgets, m, marker="o", ms=3, color=c, lw=2.0 if ref else 1.2,
                        label=s, zorder=3 if ref else 2)
                if n > 1:
                    ax.fill_between(budgets, m - sd, m + sd, color=c, alpha=0.10, lw=0)
                else:
                    sd = np.zeros_like(m)
                lo = min(lo, float(np.nanmin(m - sd)))
                hi = max(hi, float(np.nanmax(m + sd)))
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(list(budgets))
            ax.set_xticklabels([str(b) for b in budgets])
            ax.set_xlabel("queries (budget)")
            ax.set_title(title)
        axes[0].set_ylabel("fidelity to the victim (%)")
        axes[0].set_ylim(*_span(lo, hi))
        n = _same_n(ns)
        axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
                       title=style.n_label(n) if n else "n varies by strategy")
        fig.suptitle(f"Active stealing, {dataset}", y=1.03)
        return style.save(fig, stem)


def diversity(curves: Mapping[str, Sequence[Sequence[dict]]],
              fidelity: Mapping[str, Sequence[float]], stem: str, *, title: str,
              reference: str = "deep-ensemble") -> list[str]:
    """Diversity study: V(t) per variant (one trace per seed) beside its fidelity (per-seed
    values, fractions), the plain Deep Ensemble as the black reference."""
    if not style.available():
        return []
    with style.plotting() as plt:
        fig, axes = plt.subplots(1, 2, figsize=(style.WIDTH_FULL, 3.3),
                                 gridspec_kw={"width_ratios": [1.3, 1], "wspace": 0.75})
        _draw_variance(axes[0], curves, reference=reference)
        axes[0].set_title("V(t): members' diversity over training")
        axes[0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2,
                       borderaxespad=0)
        _draw_dots(axes[1], fidelity, reference, "fidelity to the victim (%)", colors=False,
                   legend_columns=1)
        fig.suptitle(title, y=1.13)
        return style.save(fig, stem)


def defense_fidelity(table: Mapping[str, Mapping[str, Any]], defenses: Sequence[str],
                     methods: Sequence[str], stem: str, *, title: str) -> list[str]:
    """Defended victims: fidelity to the undefended victim per method (groups) and defence
    (markers). ``table[defence]["methods"][method]["fidelity"]`` = {"mean", "std", "n"} (or
    ``{"fidelity": (mean, std), "n"}``); a std of None (not recorded) draws the mean alone."""
    if not style.available():
        return []
    with style.plotting() as plt:
        fig, ax = plt.subplots(figsize=(style.WIDTH_FULL, 2.9))
        width = 0.8 / max(1, len(defenses))
        markers = "osD^vPX*"
        lo, hi, ns, unrecorded = math.inf, -math.inf, [], False
        for i, d in enumerate(defenses):
            xs, m, sd = [], [], []
            for j, meth in enumerate(methods):
                r = table[d]["methods"].get(meth)
                if r is None:
                    continue
                f = r["fidelity"]
                mean, std, n = ((f["mean"], f["std"], f["n"]) if isinstance(f, Mapping)
                                else (f[0], f[1], r["n"]))
                if mean is None or math.isnan(mean):
                    continue
                xs.append(j + (i - (len(defenses) - 1) / 2) * width)
                m.append(100 * mean)
                sd.append(100 * std if n > 1 and std is not None and not math.isnan(std)
                          else 0.0)
                unrecorded = unrecorded or (n > 1 and std is None)
                ns.append(n)
            if not xs:
                continue
            c = style.REFERENCE_COLOR if d == "none" else style.PALETTE[(i - 1) %
                                                                         len(style.PALETTE)]
            ax.errorbar(xs, m, yerr=sd if any(sd) else None, fmt=markers[i % len(markers)],
                        color=c, ms=4.5, label=d)
            lo, hi = min(lo, min(np.subtract(m, sd))), max(hi, max(np.add(m, sd)))
        for j in range(1, len(methods)):
            ax.axvline(j - 0.5, color="0.85", lw=0.6, zorder=0)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods)
        ax.set_xlim(-0.5, len(methods) - 0.5)
        ax.grid(axis="x", visible=False)
        if math.isfinite(lo):
            ax.set_ylim(*_span(lo, hi))
        ax.set_ylabel("fidelity to the undefended victim (%)")
        n = _same_n(ns)
        head = style.n_label(n) if n else "n varies"
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0,
                  title=head + ("\n(std where recorded)" if unrecorded else ""))
        ax.set_title(title)
        return style.save(fig, stem)
