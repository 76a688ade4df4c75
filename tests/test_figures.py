"""The figures: both formats at print resolution, spread drawn only where n > 1, n in the legend,
readable axes (faststeal.results.figures / style)."""

import pytest

pytest.importorskip("matplotlib")

from matplotlib.container import ErrorbarContainer  # noqa: E402
from PIL import Image  # noqa: E402

from faststeal.results import ResultStore, figures, style  # noqa: E402


@pytest.fixture
def drawn(monkeypatch):
    """Keep every figure handed to style.save (it still writes and closes it)."""
    figs = []
    save = style.save

    def keep(fig, stem):
        figs.append(fig)
        return save(fig, stem)

    monkeypatch.setattr(style, "save", keep)
    return figs


def _legend_texts(fig) -> str:
    return " | ".join(t.get_text() for ax in fig.axes if ax.get_legend()
                      for t in [*ax.get_legend().get_texts(), ax.get_legend().get_title()])


def _errorbars(ax) -> list:
    return [c for c in ax.containers if isinstance(c, ErrorbarContainer)]


def _trace(values):
    return [{"iteration": 10 * i, "epoch": i / 4, "variance": v} for i, v in enumerate(values)]


def test_pdf_and_png_at_print_resolution(tmp_path, drawn):
    paths = figures.fidelity_by_method({"baseline": [0.8, 0.82], "deep-ensemble": [0.85, 0.86]},
                                       str(tmp_path / "fid"))
    assert paths == [str(tmp_path / "fid.pdf"), str(tmp_path / "fid.png")]
    assert (tmp_path / "fid.pdf").read_bytes()[:5] == b"%PDF-"
    dpi = Image.open(tmp_path / "fid.png").info["dpi"]
    assert min(dpi) >= 200 - 0.5 and style.DPI >= 200
    assert not list(tmp_path.glob(".*tmp*"))  # written through temporary files, then renamed


def test_spread_only_where_n_above_one(tmp_path, drawn):
    figures.fidelity_by_method({"baseline": [0.80], "swag": [0.83]}, str(tmp_path / "one"))
    figures.fidelity_by_method({"baseline": [0.80, 0.81, 0.79], "swag": [0.83, 0.84, 0.835]},
                               str(tmp_path / "three"))
    one, three = drawn
    assert _errorbars(one.axes[0]) == []
    assert "n = 1" in _legend_texts(one) and "±" not in _legend_texts(one)
    assert len(_errorbars(three.axes[0])) == 2 and "mean ± std, n = 3" in _legend_texts(three)
    # unequal n: each label carries its own n
    figures.fidelity_by_method({"baseline": [0.80, 0.81], "swag": [0.83]}, str(tmp_path / "mix"))
    labels = [t.get_text() for t in drawn[-1].axes[0].get_yticklabels()]
    assert labels == ["baseline (n = 2)", "swag (n = 1)"]
    assert len(_errorbars(drawn[-1].axes[0])) == 1


def test_member_sweep_axis_is_not_stretched(tmp_path, drawn):
    # values 0.3 points apart: the axis still spans MIN_SPAN points
    figures.fidelity_vs_members({1: [0.900], 2: [0.902], 5: [0.903]}, str(tmp_path / "s"),
                                method="deep-ensemble", baseline=[0.89, 0.891, 0.892])
    ax = drawn[0].axes[0]
    lo, hi = ax.get_ylim()
    assert hi - lo >= figures.MIN_SPAN - 1e-9 and lo <= 89.0 and hi >= 90.3
    assert _errorbars(ax) == []  # n = 1 per S
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "5"]
    text = _legend_texts(drawn[0])
    assert "n = 1" in text and "single surrogate (mean ± std, n = 3)" in text


def test_variance_curves_skip_zero_points_and_name_n(tmp_path, drawn):
    curves = {"baseline": [_trace([0.0] * 5)] * 2,
              "swag": [_trace([0.0, 0.0, 1e-3, 2e-3, 3e-3]), _trace([0.0, 0.0, 2e-3, 3e-3, 4e-3])],
              "deep-ensemble": [_trace([1e-3, 2e-3, 2e-3, 3e-3, 3e-3])]}
    figures.variance_curves(curves, str(tmp_path / "v"))
    ax = drawn[0].axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"swag (n = 2)", "deep-ensemble (n = 1)"}
    assert list(lines["swag (n = 2)"].get_xdata()) == [0.5, 0.75, 1.0]  # epochs with V > 0
    assert list(lines["swag (n = 2)"].get_ydata()) == pytest.approx([1.5e-3, 2.5e-3, 3.5e-3])
    assert len(ax.collections) == 1  # one ± std band: swag's; none for n = 1
    assert ax.get_yscale() == "log"
    assert any("baseline" in t.get_text() for t in ax.texts)


def test_study_figures_share_the_style(tmp_path, drawn):
    budgets = [100, 200]
    row = {"mean": 0.8, "std": 0.01, "n": 1}
    table = {s: {w: {str(b): row for b in budgets} for w in ("retrained", "running")}
             for s in ("random", "bald")}
    figures.active_fidelity_vs_budget(table, ["random", "bald"], budgets, str(tmp_path / "a"),
                                      dataset="digits")
    figures.diversity({"deep-ensemble": [_trace([1e-3, 2e-3])] * 2},
                      {"deep-ensemble": [0.8, 0.81]}, str(tmp_path / "d"), title="t")
    dtable = {d: {"methods": {"baseline": {"fidelity": (0.8, 0.02), "n": 2}}}
              for d in ("none", "top1")}
    figures.defense_fidelity(dtable, ["none", "top1"], ["baseline"], str(tmp_path / "f"),
                             title="t")
    active, div, defense = drawn
    assert all(len(ax.collections) == 0 for ax in active.axes)  # n = 1: no bands
    assert "n = 1" in _legend_texts(active)
    assert "mean ± std, n = 2" in _legend_texts(div) + _legend_texts(defense)
    assert len(_errorbars(defense.axes[0])) == 2
    for f in ("a", "d", "f"):
        assert (tmp_path / f"{f}.pdf").exists() and (tmp_path / f"{f}.png").exists()
    for fig in drawn:  # one font size everywhere: the style's
        for ax in fig.axes:
            assert ax.xaxis.label.get_size() == style.RC["axes.labelsize"]


def test_no_matplotlib_no_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(style, "available", lambda: False)
    assert figures.fidelity_by_method({"baseline": [0.8]}, str(tmp_path / "x")) == []
    assert not list(tmp_path.iterdir())


def test_report_writes_every_comparison_figure_in_both_formats(tmp_path):
    from faststeal.runs import write_report

    s = ResultStore(str(tmp_path), {"dataset": "digits", "budget": 100})
    for seed in (0, 1):
        for method, fid in (("baseline", 0.8), ("deep-ensemble", 0.84)):
            s.add_cell(f"main/{method}/{seed}", kind="main", method=method, seed=seed,
                       members=1, metrics={"fidelity": fid + seed / 100}, hparams={},
                       seconds=1.0, trace=[{"iteration": i, "epoch": i / 2,
                                            "variance": 1e-3 * i} for i in range(4)])
    s.add_cell("sweep/deep-ensemble/0/2", kind="sweep", method="deep-ensemble", seed=0,
               members=2, metrics={"fidelity": 0.83}, hparams={}, seconds=1.0)
    summary = write_report(str(tmp_path), s)
    s.close()
    names = sorted(p.rsplit("/", 1)[1] for p in summary["figures"])
    assert names == sorted(f"{n}.{e}" for n in ("variance_curve", "fidelity",
                                                 "fidelity_vs_members") for e in ("pdf", "png"))


def test_summaries_instead_of_seeds(tmp_path, drawn):
    # a published table (mean, std, n) draws the same spread, without single-seed circles
    rows = {"baseline": {"mean": 0.9187, "std": 0.0033, "n": 5},
            "deep-ensemble": {"mean": 0.9366, "std": 0.0030, "n": 5}}
    figures.fidelity_by_method(rows, str(tmp_path / "t"))
    ax = drawn[0].axes[0]
    assert len(_errorbars(ax)) == 2 and len(ax.collections) == 2  # the two error-bar lines only
    assert "single seeds" not in _legend_texts(drawn[0])
