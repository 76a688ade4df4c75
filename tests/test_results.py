"""The SQLite results store and the report built from it."""

import json
import multiprocessing as mp
import os

import pytest

from faststeal.results import ResultStore, StoreMismatchError

CFG = {"dataset": "digits", "budget": 100}


def _cell(store, method, seed, fid, kind="main", members=None):
    store.add_cell(f"{kind}/{method}/{seed}/{members}", kind=kind, method=method, seed=seed,
                   members=members or 1, metrics={"fidelity": fid, "accuracy": fid - 0.1,
                                                  "mean_member_fidelity": fid - 0.01,
                                                  "ensemble_gain": 0.01, "variance": 0.001,
                                                  "mutual_info": 0.01, "disagreement": 0.02},
                   hparams={"num_members": members or 1}, seconds=1.0,
                   trace=[{"iteration": i, "epoch": i / 10, "variance": 0.1 / (i + 1),
                           "mutual_info": 0.0, "disagreement": 0.0} for i in range(3)])


def test_roundtrip_aggregate_and_exports(tmp_path):
    from faststeal.runs import write_report

    s = ResultStore(str(tmp_path), CFG)
    s.set_meta("victim", {"arch": "mlp", "dataset": "digits", "test_accuracy": 0.9})
    for seed, (b, d) in enumerate([(0.80, 0.83), (0.82, 0.84)]):
        _cell(s, "baseline", seed, b)
        _cell(s, "deep-ensemble", seed, d)
    _cell(s, "deep-ensemble", 0, 0.85, kind="sweep", members=2)
    summary = write_report(str(tmp_path), s)
    s.close()
    de = summary["methods"]["deep-ensemble"]
    assert de["fidelity"]["mean"] == pytest.approx(0.835)
    assert de["fidelity"]["n"] == 2
    # paired by seed: (0.83-0.80, 0.84-0.82)
    assert de["gain_over_baseline"]["mean"] == pytest.approx(0.025)
    assert summary["member_sweep"]["deep-ensemble"]["2"]["mean"] == pytest.approx(0.85)
    for f in ("results.json", "results.csv", "results.md", "variance_curve.png", "fidelity.png",
              "fidelity_vs_members.png"):
        assert os.path.getsize(tmp_path / f) > 0, f
    j = json.loads((tmp_path / "results.json").read_text())
    assert j["methods"]["baseline"]["fidelity"]["std"] == pytest.approx(0.01414, rel=1e-3)
    assert "| deep-ensemble |" in (tmp_path / "results.md").read_text()
    assert "Machine:" not in (tmp_path / "results.md").read_text()  # the run never finished


def test_report_names_the_code_that_ran(tmp_path):
    # a finished run stores machine_info (with the code version); its report names both
    from faststeal import __version__
    from faststeal.info import code_version
    from faststeal.runs import write_report
    from faststeal.runs.runner import machine_info

    s = ResultStore(str(tmp_path), CFG)
    _cell(s, "baseline", 0, 0.8)
    info = machine_info("cpu")
    assert {k: info[k] for k in ("faststeal", "commit", "dirty")} == code_version()
    s.set_meta("run", {**info, "faststeal": "9.9.9", "commit": "0123456789abcdef",
                       "dirty": True})
    write_report(str(tmp_path), s)
    s.close()
    md = (tmp_path / "results.md").read_text()
    assert "; faststeal 9.9.9 at 0123456789abcdef + local changes." in md
    assert code_version()["faststeal"] == __version__


def test_code_version_falls_back_to_the_environment(monkeypatch):
    import subprocess

    from faststeal.info import code_version

    def no_git(*a, **k):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    monkeypatch.delenv("FASTSTEAL_GIT_COMMIT", raising=False)
    assert code_version()["commit"] is None and code_version()["dirty"] is None
    monkeypatch.setenv("FASTSTEAL_GIT_COMMIT", "feedbeef")
    assert code_version()["commit"] == "feedbeef"


def test_code_version_reads_this_checkout():
    import shutil
    import subprocess

    from faststeal.info import code_version

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if shutil.which("git") is None or not os.path.isdir(os.path.join(root, ".git")):
        pytest.skip("not a git checkout")
    import faststeal
    if os.path.dirname(os.path.dirname(os.path.abspath(faststeal.__file__))) != root:
        pytest.skip("faststeal is imported from an installed copy, not this checkout")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                          text=True).stdout.strip()
    assert code_version()["commit"] == head


def test_resume_keeps_cells_and_mismatch_refused(tmp_path):
    s = ResultStore(str(tmp_path), CFG)
    _cell(s, "baseline", 0, 0.8)
    s.close()
    s = ResultStore(str(tmp_path), CFG)
    assert s.has_cell("main/baseline/0/None")
    s.close()
    with pytest.raises(StoreMismatchError, match="another configuration"):
        ResultStore(str(tmp_path), {**CFG, "budget": 200})
    s = ResultStore(str(tmp_path), CFG)  # refused open left the data intact
    assert len(s.cells()) == 1
    s.close()
    s = ResultStore(str(tmp_path), {**CFG, "budget": 200}, force=True)
    assert s.cells() == []
    s.close()


def test_corrupt_database_named_in_error(tmp_path):
    (tmp_path / "results.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreMismatchError, match="results.sqlite"):
        ResultStore(str(tmp_path), CFG)


def test_report_on_non_run_folder(tmp_path):
    from faststeal.runs import write_report

    with pytest.raises(FileNotFoundError, match="results.sqlite"):
        write_report(str(tmp_path))


def _writer(directory, worker):
    s = ResultStore(directory, CFG)
    for i in range(20):
        _cell(s, f"m{worker}", i, 0.5)
    s.close()


def test_two_processes_write_one_store(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    s = ResultStore(str(tmp_path), CFG)
    cells = s.cells()
    assert len(cells) == 40
    assert all(len(s.trace(c["cell_id"])) == 3 for c in cells)
    assert s.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    s.close()
