"""The studies beyond the paper on the one runner: active stealing, diversity, defences (and the
PRADA replay), small on the offline digits dataset: results, resume, settings pinned, report."""

import json
import os
import shutil

import pytest
import torch

from faststeal.cli import main
from faststeal.methods.deep_ensemble import DeepEnsemble
from faststeal.oracle import JournalError, Oracle
from faststeal.results.store import StoreMismatchError
from faststeal.runs import (ActiveSettings, ActiveStudy, DefenseSettings, DefenseStudy,
                            DiversitySettings, DiversityStudy, run_study)
from runstore import finished_at

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = dict(dataset="digits", victim_arch="mlp", victim_epochs=15, seeds=1, members=2,
              epochs=1, probe_size=64, progress=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def victim_rows(monkeypatch):
    """Rows every Oracle of the test sends to its victim (the attacker's queries, nothing else)."""
    rows = []
    real = Oracle._victim_forward
    monkeypatch.setattr(Oracle, "_victim_forward",
                        lambda self, r: rows.append(int(r.numel())) or real(self, r))
    return rows


ACTIVE = dict(strategies=("random", "bald"), milestones=(30, 60), round_size=15,
              seed_fraction=0.1, round_epochs=2)


@pytest.fixture(scope="module")
def active_run(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("active")
    s = ActiveSettings(**{**COMMON, "epochs": 2}, **ACTIVE, out=str(out), cache_dir=cache)
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
    before = finished_at(out)
    run_study(ActiveStudy(s))
    assert "resuming: 2 finished cells kept, 0 to run" in capsys.readouterr().out
    assert finished_at(out) == before  # nothing recomputed
    changed = ActiveSettings(**{**s.__dict__, "epochs": 3})
    with pytest.raises(StoreMismatchError, match="another configuration"):
        run_study(ActiveStudy(changed))
    assert finished_at(out) == before


def test_report_rebuilds_any_study(active_run, capsys):
    out, _, summary = active_run
    (out / "results.md").unlink()
    assert main(["report", str(out)]) == 0
    assert "# Active stealing" in capsys.readouterr().out
    assert "| random |" in (out / "results.md").read_text()


@pytest.fixture(scope="module")
def diversity_run(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("diversity")
    s = DiversitySettings(**COMMON, variants=("deep-ensemble", "ncl-ensemble", "hetero-ensemble"),
                          budget=200, record_every=2, out=str(out), cache_dir=cache)
    return out, s, run_study(DiversityStudy(s))


def test_diversity_study(diversity_run):
    out, _, summary = diversity_run
    t = summary["table"]
    assert list(t) == ["deep-ensemble", "ncl-ensemble", "hetero-ensemble"]
    assert t["ncl-ensemble"]["wins_vs_de"][1] == 1  # paired with the Deep Ensemble's seed
    assert t["deep-ensemble"]["v_ratio_vs_de"]["mean"] == pytest.approx(1.0)
    assert t["ncl-ensemble"]["fidelity"]["mean"] > 0.2
    assert t["ncl-ensemble"]["v_peak"]["n"] == 1  # the trace came back from the store
    assert (out / "variance_over_training.png").stat().st_size > 0
    assert "| hetero-ensemble |" in (out / "results.md").read_text()


@pytest.fixture(scope="module")
def defense_run(tmp_path_factory, cache, active_run):
    out = tmp_path_factory.mktemp("defense")
    active_out, _, _ = active_run
    # mc-dropout has no `members`: the study must not pass it one (a TypeError before)
    s = DefenseSettings(**COMMON, defenses={"none": {}, "rounding": {"decimals": 1},
                                            "prada": {"delta": 0.9}},
                        methods=("baseline", "mc-dropout"), budget=200,
                        replay_from=str(active_out), out=str(out), cache_dir=cache)
    return out, s, run_study(DefenseStudy(s))


def test_defense_study_with_prada_replay(defense_run):
    out, _, summary = defense_run
    t = summary["table"]
    assert set(t) == {"none", "rounding", "prada"}
    assert t["none"]["answered"] == 200 and not t["none"]["refused"]
    assert t["rounding"]["methods"]["mc-dropout"]["delta_vs_none"]["n"] == 1
    # one epoch of 200 queries is two Adam steps: well above chance (0.1 on digits), not more
    assert t["none"]["methods"]["baseline"]["fidelity"]["mean"] > 0.3
    assert set(summary["prada_replay"]) == {"random/seed=0", "bald/seed=0"}
    assert all(r["queries"] == 60 for r in summary["prada_replay"].values())
    assert "PRADA on the active study" in (out / "results.md").read_text()
    assert (out / "fidelity_by_defense.png").stat().st_size > 0


# ------------------------------------------------------------------ the budget is spent once, ever

def _watch_fits(monkeypatch, interrupt=None):
    """Record (checkpoint file, rows, epoch) of every Deep Ensemble epoch started; raise
    KeyboardInterrupt (a kill) at the epoch ``interrupt`` names, while ``interrupt`` is set."""
    started, plan = [], {"at": interrupt}
    real_fit, real_epoch = DeepEnsemble.fit, DeepEnsemble._on_epoch_start

    def fit(self, x, y, **kw):
        self._tag = (os.path.basename(kw.get("checkpoint") or ""), int(x.shape[0]))
        return real_fit(self, x, y, **kw)

    def on_epoch_start(self, epoch, optimizer):
        started.append((*self._tag, epoch))
        if plan["at"] == started[-1]:
            raise KeyboardInterrupt
        return real_epoch(self, epoch, optimizer)

    monkeypatch.setattr(DeepEnsemble, "fit", fit)
    monkeypatch.setattr(DeepEnsemble, "_on_epoch_start", on_epoch_start)
    return started, plan


def test_active_cell_killed_mid_fit_resumes_from_its_last_epoch(tmp_path, active_run,
                                                                monkeypatch, victim_rows):
    _, s, summary = active_run
    s = ActiveSettings(**{**s.__dict__, "out": str(tmp_path)})
    # rounds of a cell: 6 seed images, then 15, 9 (milestone 30), 15, 15 (milestone 60); each
    # fit 2 epochs. The kill: epoch 1 of bald's running fit on 45 images (before its last round)
    started, plan = _watch_fits(monkeypatch, ("bald__seed=0.running.pt", 45, 1))
    with pytest.raises(KeyboardInterrupt):
        run_study(ActiveStudy(s))
    assert sum(victim_rows) == 60 + 45
    ckpts = tmp_path / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["bald__seed=0.pt", "bald__seed=0.running.pt"]
    assert torch.load(ckpts / "bald__seed=0.running.pt", weights_only=True)["epoch"] == 0
    plan["at"] = None
    started.clear()
    victim_rows.clear()
    again = run_study(ActiveStudy(s))
    # the loop went on from its last round: the rest of the interrupted fit, then the last round
    assert started == [("bald__seed=0.running.pt", 45, 1), ("bald__seed=0.running.pt", 60, 0),
                       ("bald__seed=0.running.pt", 60, 1), ("bald__seed=0.retrained.pt", 60, 0),
                       ("bald__seed=0.retrained.pt", 60, 1)]
    assert sum(victim_rows) == 15  # the last round's images, never asked before
    assert again["fidelity"] == summary["fidelity"]
    assert not ckpts.exists()
    assert sorted(os.listdir(tmp_path / "answers")) == ["bald__seed=0.journal",
                                                        "random__seed=0.journal"]


def test_active_cell_started_over_asks_the_victim_nothing(tmp_path, active_run, monkeypatch,
                                                          victim_rows, capsys):
    _, s, summary = active_run
    s = ActiveSettings(**{**s.__dict__, "out": str(tmp_path)})
    started, plan = _watch_fits(monkeypatch, ("bald__seed=0.retrained.pt", 60, 1))
    with pytest.raises(KeyboardInterrupt):  # killed after bald's last query
        run_study(ActiveStudy(s))
    assert sum(victim_rows) == 120
    ckpts = tmp_path / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["bald__seed=0.pt", "bald__seed=0.retrained.pt",
                                         "bald__seed=0.running.pt"]
    (ckpts / "bald__seed=0.pt").write_bytes(b"a damaged disk")  # the cell must start over
    plan["at"] = None
    victim_rows.clear()
    capsys.readouterr()
    again = run_study(ActiveStudy(s))
    out = capsys.readouterr().out
    assert "corrupt or unreadable" in out and "training it from the start" in out
    assert victim_rows == []  # every answer came from OUT/answers/bald__seed=0.journal
    assert "60 answers (60 images charged) loaded from" in out
    assert again["fidelity"] == summary["fidelity"]
    assert not ckpts.exists()  # the fits' checkpoints of the lost state went too


def test_active_checkpoint_needs_a_journaled_oracle(tmp_path):
    from faststeal.active import ActiveConfig, run_active

    pool = torch.randn(40, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    victim = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    labels = victim(pool[:8]).argmax(-1)
    with pytest.raises(ValueError, match="checkpoint needs a faststeal.oracle.Oracle with a "
                                         "journal"):
        run_active(Oracle(victim, pool, 20), ActiveConfig(), test_x=pool[:8],
                   victim_labels=labels, test_y=labels, checkpoint=str(tmp_path / "loop.pt"))


def _crash(*args, **kwargs):
    raise RuntimeError("killed after querying")


def test_diversity_rerun_asks_the_victim_nothing(tmp_path, diversity_run, monkeypatch,
                                                 victim_rows, capsys):
    _, s, summary = diversity_run
    s = DiversitySettings(**{**s.__dict__, "out": str(tmp_path)})
    run_cell = DiversityStudy.run_cell
    monkeypatch.setattr(DiversityStudy, "run_cell", _crash)
    with pytest.raises(RuntimeError, match="killed after querying"):
        run_study(DiversityStudy(s))
    assert sum(victim_rows) == 200
    monkeypatch.setattr(DiversityStudy, "run_cell", run_cell)
    victim_rows.clear()
    capsys.readouterr()
    again = run_study(DiversityStudy(s))
    assert victim_rows == []
    assert "200 answers (200 images charged) loaded from" in capsys.readouterr().out
    drop = lambda t: {v: {k: x for k, x in r.items() if k != "train_seconds"}  # noqa: E731
                      for v, r in t.items()}
    assert drop(again["table"]) == drop(summary["table"])
    # a journal of another output mode in a new folder is refused ...
    probs = DiversitySettings(**{**s.__dict__, "output_mode": "probs",
                                 "out": str(tmp_path / "other")})
    os.makedirs(probs.out)
    shutil.copy(tmp_path / "answers.journal", tmp_path / "other" / "answers.journal")
    with pytest.raises(JournalError, match="another victim, pool or output mode"):
        run_study(DiversityStudy(probs))
    # ... and set aside with --force (the victim is asked again)
    monkeypatch.setattr(DiversityStudy, "run_cell", _crash)
    victim_rows.clear()
    with pytest.raises(RuntimeError, match="killed after querying"):
        run_study(DiversityStudy(DiversitySettings(**{**probs.__dict__, "force": True})))
    assert sum(victim_rows) == 200
    assert list((tmp_path / "other").glob("answers.journal.set-aside-*"))


def test_defense_rerun_asks_the_victim_nothing(tmp_path, defense_run, monkeypatch, victim_rows):
    _, s, summary = defense_run
    s = DefenseSettings(**{**s.__dict__, "out": str(tmp_path)})
    run_cell = DefenseStudy.run_cell
    monkeypatch.setattr(DefenseStudy, "run_cell", _crash)
    with pytest.raises(RuntimeError, match="killed after querying"):
        run_study(DefenseStudy(s))
    assert sum(victim_rows) == sum(r["answered"] for r in summary["table"].values())
    assert sorted(os.listdir(tmp_path / "answers")) == ["none.journal", "prada.journal",
                                                        "rounding.journal"]
    monkeypatch.setattr(DefenseStudy, "run_cell", run_cell)
    victim_rows.clear()
    again = run_study(DefenseStudy(s))
    assert victim_rows == []
    assert again["table"] == summary["table"]


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
