"""The studies beyond the paper on the one runner: active stealing, diversity, defences (and the
PRADA replay), small on the offline digits dataset: results, resume, settings pinned, report."""

import json
import sqlite3

import pytest
import torch

from faststeal.cli import main
from faststeal.results.store import StoreMismatchError
from faststeal.runs import (ActiveSettings, ActiveStudy, DefenseSettings, DefenseStudy,
                            DiversitySettings, DiversityStudy, run_study)

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = dict(dataset="digits", victim_arch="mlp", victim_epochs=15, seeds=1, members=2,
              epochs=1, probe_size=64, progress=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _finished_at(out):
    con = sqlite3.connect(out / "results.sqlite")
    rows = dict(con.execute("SELECT cell_id, finished_at FROM cells").fetchall())
    con.close()
    return rows


@pytest.fixture(scope="module")
def active_run(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("active")
    s = ActiveSettings(**COMMON, strategies=("random", "bald"), milestones=(30, 60),
                       round_size=15, out=str(out), cache_dir=cache)
    return out, s, run_study(ActiveStudy(s))


def test_active_study_table_and_files(active_run):
    out, _, summary = active_run
    assert set(summary["fidelity"]) == {"random", "bald"}
    bald = summary["fidelity"]["bald"]["retrained"]["60"]
    assert bald["n"] == 1 and bald["paired"] == 1 and 0.1 < bald["mean"] <= 1.0
    for f in ("results.sqlite", "results.json", "results.md", "fidelity_vs_budget.png"):
        assert (out / f).stat().st_size > 0, f
    assert "| bald |" in (out / "results.md").read_text()
    assert json.loads((out / "results.json").read_text())["study"] == "active"


def test_active_study_resumes_and_pins_its_settings(active_run, capsys):
    out, s, _ = active_run
    before = _finished_at(out)
    run_study(ActiveStudy(s))
    assert "resuming: 2 finished cells kept, 0 to run" in capsys.readouterr().out
    assert _finished_at(out) == before  # nothing recomputed
    changed = ActiveSettings(**{**s.__dict__, "epochs": 2})
    with pytest.raises(StoreMismatchError, match="another configuration"):
        run_study(ActiveStudy(changed))
    assert _finished_at(out) == before


def test_report_rebuilds_any_study(active_run, capsys):
    out, _, summary = active_run
    (out / "results.md").unlink()
    assert main(["report", str(out)]) == 0
    assert "# Active stealing" in capsys.readouterr().out
    assert "| random |" in (out / "results.md").read_text()


def test_diversity_study(tmp_path, cache):
    s = DiversitySettings(**COMMON, variants=("deep-ensemble", "ncl-ensemble", "hetero-ensemble"),
                          budget=200, record_every=2, out=str(tmp_path), cache_dir=cache)
    summary = run_study(DiversityStudy(s))
    t = summary["table"]
    assert list(t) == ["deep-ensemble", "ncl-ensemble", "hetero-ensemble"]
    assert t["ncl-ensemble"]["wins_vs_de"][1] == 1  # paired with the Deep Ensemble's seed
    assert t["deep-ensemble"]["v_ratio_vs_de"]["mean"] == pytest.approx(1.0)
    assert t["ncl-ensemble"]["fidelity"]["mean"] > 0.2
    assert t["ncl-ensemble"]["v_peak"]["n"] == 1  # the trace came back from the store
    assert (tmp_path / "variance_over_training.png").stat().st_size > 0
    assert "| hetero-ensemble |" in (tmp_path / "results.md").read_text()


def test_defense_study_with_prada_replay(tmp_path, cache, active_run):
    active_out, _, _ = active_run
    # mc-dropout has no `members`: the study must not pass it one (a TypeError before)
    s = DefenseSettings(**COMMON, defenses={"none": {}, "rounding": {"decimals": 1},
                                            "prada": {"delta": 0.9}},
                        methods=("baseline", "mc-dropout"), budget=200,
                        replay_from=str(active_out), out=str(tmp_path), cache_dir=cache)
    summary = run_study(DefenseStudy(s))
    t = summary["table"]
    assert set(t) == {"none", "rounding", "prada"}
    assert t["none"]["answered"] == 200 and not t["none"]["refused"]
    assert t["rounding"]["methods"]["mc-dropout"]["delta_vs_none"]["n"] == 1
    assert t["none"]["methods"]["baseline"]["fidelity"]["mean"] > 0.5
    assert set(summary["prada_replay"]) == {"random/seed=0", "bald/seed=0"}
    assert all(r["queries"] == 60 for r in summary["prada_replay"].values())
    assert "PRADA on the active study" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "fidelity_by_defense.png").stat().st_size > 0


def test_prada_replay_matches_the_detector():
    from faststeal.defenses import PradaDetector
    from faststeal.runs.defense import prada_replay

    g = torch.Generator().manual_seed(0)
    pool = torch.randn(400, 1, 4, 4, generator=g)
    victim = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    order = torch.randperm(400, generator=g)[:300].tolist()
    res = prada_replay({"s": order}, pool, victim)["s"]
    det = PradaDetector()
    labels = victim(pool[order]).argmax(-1)
    flagged_at = None
    for start in range(0, 300, 100):
        if det.observe(pool[order][start:start + 100], labels[start:start + 100]):
            flagged_at = next(q for q, _, w in det.history if w < det.delta)
            break
    assert res["flagged"] == det.flagged and res["flagged_at"] == flagged_at
    assert res["queries"] == 300
    ws = [w for _, _, w in det.history]
    assert res["min_w"] == (min(ws) if ws else None)


@pytest.mark.parametrize("study,settings,match", [
    (ActiveStudy, ActiveSettings(strategies=("random", "psychic")), "psychic"),
    (ActiveStudy, ActiveSettings(milestones=(50, 20)), "ascending"),
    (DiversityStudy, DiversitySettings(variants=("deep-ensemble", "nope")), "nope"),
    (DiversityStudy, DiversitySettings(variant_params={"ncl-ensemble": {"strength": -1.0}}),
     "strength"),
    (DefenseStudy, DefenseSettings(defenses={"firewall": {}}), "defense must be one of"),
    (DefenseStudy, DefenseSettings(budget=0), "budget must be a positive integer"),
    (DefenseStudy, DefenseSettings(seeds=-1), "seeds must be a positive integer"),
    (DiversityStudy, DiversitySettings(lr=float("nan")), "lr must be finite"),
    (DiversityStudy, DiversitySettings(lr="fast"), "lr must be a number"),
    (ActiveStudy, ActiveSettings(victim_fraction=1.0), r"victim_fraction must be in \(0, 1\)"),
    (ActiveStudy, ActiveSettings(arch="vgg"), "arch must be one of"),
    (ActiveStudy, ActiveSettings(device="tpu"), "device must be"),
])
def test_bad_study_settings_rejected_before_anything(tmp_path, study, settings, match):
    settings.out = str(tmp_path / "run")
    with pytest.raises((ValueError, TypeError), match=match):
        run_study(study(settings))
    assert not (tmp_path / "run").exists()


def test_study_command_line_rejects_bad_values(tmp_path, capsys):
    assert main(["study", "active", "--milestones", "10,x", "--out", str(tmp_path)]) == 2
    assert "--milestones" in capsys.readouterr().err
    assert main(["study", "diversity", "--budget", "0", "--out", str(tmp_path / "d")]) == 2
    assert "budget must be a positive integer" in capsys.readouterr().err
