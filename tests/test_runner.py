"""The runner's run folder: validated before it is touched, locked, atomic reports, clean
interrupts, clear errors for unusable --out, and rows whose content changed are detected."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from faststeal.cli import INTERRUPTED, main
from faststeal.files import atomic_write
from faststeal.results import ResultStore
from faststeal.results.store import StoreCorruptError

TINY = ["--dataset", "digits", "--victim-arch", "mlp", "--victim-epochs", "5", "--budget", "200",
        "--seeds", "1", "--epochs", "1", "--methods", "baseline", "--member-sweep", "",
        "--no-progress", "--preset", "quick"]


def _cell(store, key="main/baseline/seed=0", fid=0.8):
    store.add_cell(key, kind="main", method="baseline", seed=0, members=1,
                   metrics={"fidelity": fid}, hparams={"num_members": 1}, seconds=1.0,
                   trace=[{"iteration": i, "epoch": i / 4, "variance": 0.1 / (i + 1),
                           "mutual_info": 0.0, "disagreement": 0.0} for i in range(3)],
                   payload={"note": "x"})


# ------------------------------------------------------------------ per-row digest

@pytest.mark.parametrize("sql", [
    "UPDATE cells SET metrics = '{\"fidelity\": 0.99}'",
    "UPDATE cells SET seed = 7",
    "UPDATE cells SET payload = '{}'",
    "UPDATE traces SET variance = 0.5 WHERE iteration = 1",
])
def test_altered_row_is_detected(tmp_path, sql):
    s = ResultStore(str(tmp_path), {"a": 1})
    _cell(s)
    assert s.cells()[0]["payload"] == {"note": "x"}
    s.close()
    con = sqlite3.connect(tmp_path / "results.sqlite")
    con.execute(sql)
    con.commit()
    con.close()
    s = ResultStore(str(tmp_path), {"a": 1})
    with pytest.raises(StoreCorruptError, match="main/baseline/seed=0.*changed after it was"):
        s.cells()
    s.close()


def test_report_refuses_an_altered_row(tmp_path, capsys):
    s = ResultStore(str(tmp_path), {"a": 1})
    _cell(s)
    s.close()
    con = sqlite3.connect(tmp_path / "results.sqlite")
    con.execute("UPDATE cells SET metrics = '{\"fidelity\": 0.99}'")
    con.commit()
    con.close()
    assert main(["report", str(tmp_path)]) == 2
    assert "changed after it was written" in capsys.readouterr().err


def test_version_1_database_is_upgraded_with_digests(tmp_path):
    con = sqlite3.connect(tmp_path / "results.sqlite")
    con.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE cells (cell_id TEXT PRIMARY KEY, kind TEXT NOT NULL, method TEXT NOT NULL,
            seed INTEGER NOT NULL, members INTEGER, config_hash TEXT NOT NULL,
            metrics TEXT NOT NULL, hparams TEXT NOT NULL, seconds REAL NOT NULL,
            finished_at REAL NOT NULL);
        CREATE TABLE traces (cell_id TEXT NOT NULL, iteration INTEGER NOT NULL, epoch REAL,
            variance REAL, mutual_info REAL, disagreement REAL, PRIMARY KEY (cell_id, iteration));
        INSERT INTO meta VALUES ('schema_version', '1');
        INSERT INTO cells VALUES ('main/baseline/seed=0', 'main', 'baseline', 0, 1, 'h',
            '{"fidelity": 0.5}', '{}', 1.0, 0.0);
    """)
    con.commit()
    con.close()
    s = ResultStore(str(tmp_path))
    (c,) = s.cells()
    assert c["metrics"] == {"fidelity": 0.5} and c["payload"] == {}
    assert s.get_meta("schema_version") == 2
    s.close()


# ------------------------------------------------------------------ validated before touching

@pytest.mark.parametrize("extra,match", [
    (["--budget", "100000"], "larger than the attacker pool"),
    (["--method-params", '{"baseline": {"members": 3}}'], "unknown hyperparameter"),
    (["--methods", "baseline,deep-ensemble", "--method-params",
      '{"deep-ensemble": {"members": 0}}'], "members must be"),
])
@pytest.mark.parametrize("exists", [False, True])
def test_rejected_configuration_leaves_the_folder_as_it_was(tmp_path, capsys, extra, match,
                                                            exists):
    out = tmp_path / "run"
    if exists:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    assert main(["run", *TINY, *extra, "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 2
    assert match in capsys.readouterr().err
    if exists:
        assert sorted(os.listdir(out)) == ["notes.txt"]
    else:
        assert not out.exists()
    assert not (tmp_path / "cache").exists()  # no victim was trained


def test_unusable_out_folder_is_a_clear_error(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["run", *TINY, "--out", str(f)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["run", *TINY, "--out", str(f / "sub")]) == 2
    assert "cannot be created" in capsys.readouterr().err
    assert f.read_text() == "x"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root may write into read-only folders")
def test_read_only_out_folder_is_a_clear_error(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["run", *TINY, "--out", str(ro)]) == 2
        assert "not writable" in capsys.readouterr().err
        assert main(["run", *TINY, "--out", str(ro / "sub")]) == 2
        assert "cannot be created" in capsys.readouterr().err
    finally:
        ro.chmod(0o755)


# ------------------------------------------------------------------ one run per folder

def test_second_run_on_a_locked_folder_names_the_pid(tmp_path, capsys):
    from faststeal.runs.runner import FolderLock

    out = tmp_path / "run"
    out.mkdir()
    lock = FolderLock(str(out))  # flock: a second open file description conflicts
    try:
        assert main(["run", *TINY, "--out", str(out), "--cache-dir",
                     str(tmp_path / "cache")]) == 2
        err = capsys.readouterr().err
        assert f"another faststeal run (PID {os.getpid()}) is using" in err
        assert not (out / "results.sqlite").exists()
    finally:
        lock.release()
    FolderLock(str(out)).release()  # free again once released


def test_concurrent_report_writes_never_collide(tmp_path):
    target = tmp_path / "results.md"
    errors = []

    def writer(tag):
        try:
            for i in range(200):
                atomic_write(target, f"{tag} {i}\n" * 50)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    lines = target.read_text().splitlines()
    assert len(lines) == 50 and len(set(lines)) == 1  # one complete version
    assert os.listdir(tmp_path) == ["results.md"]  # no temporaries left


# ------------------------------------------------------------------ interrupts

@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_turned_into_another_error_by_cleanup_still_exits_cleanly(
        monkeypatch, capsys, sig, code):
    # torch.save interrupted mid-record raises a RuntimeError from its zip writer's clean-up
    # (seen in CI): the exit path must still report the interruption, not a traceback
    from faststeal import cli

    def interrupted_while_saving(args, argv):
        try:
            os.kill(os.getpid(), sig)
            time.sleep(5)
        finally:
            raise RuntimeError("unexpected pos 1466304 vs 1466192")

    monkeypatch.setattr(cli, "_run", interrupted_while_saving)
    assert cli.main(["run"]) == code
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == INTERRUPTED and "RuntimeError" not in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_prints_one_line_and_exit_code(tmp_path, sig, code):
    args = [a for a in TINY]
    args[args.index("--epochs") + 1] = "200"  # long enough to be interrupted in training
    cmd = [sys.executable, "-m", "faststeal", "run", *args, "--out", str(tmp_path / "run"),
           "--cache-dir", str(tmp_path / "cache")]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    lines = []
    while time.time() < deadline:
        line = p.stdout.readline()
        lines.append(line)
        if "queried" in line or not line:
            break
    assert p.poll() is None, "".join(lines) + p.stderr.read()
    time.sleep(1.0)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    assert err.strip().splitlines()[-1] == INTERRUPTED
    assert "Traceback" not in err
    # the folder is left resumable: the lock is free again and the store opens
    from faststeal.runs.runner import FolderLock

    FolderLock(str(tmp_path / "run")).release()
    json.dumps(ResultStore(str(tmp_path / "run")).get_meta("config"))


@pytest.mark.parametrize("value,minimum,exc,match", [
    (0, 1, ValueError, "n must be a positive integer, got 0"),
    (-1, 0, ValueError, "n must be a non-negative integer, got -1"),
    (1, 2, ValueError, "n must be an integer >= 2, got 1"),
    (2.0, 1, TypeError, r"n must be a positive integer, got float \(2.0\)"),
    (True, 1, TypeError, "n must be a positive integer, got bool"),
    ("3", 1, TypeError, "n must be a positive integer, got str"),
    (None, 1, TypeError, "got NoneType"),
])
def test_positive_int_names_the_argument(value, minimum, exc, match):
    from faststeal.checks import positive_int

    with pytest.raises(exc, match=match):
        positive_int("n", value, minimum)


def test_positive_int_accepts_numpy_and_none_when_allowed():
    import numpy as np

    from faststeal.checks import positive_int

    assert positive_int("n", np.int64(3)) == 3 and type(positive_int("n", np.int64(3))) is int
    assert positive_int("n", None, allow_none=True) is None


def test_cells_of_another_victim_are_never_mixed(tmp_path):
    from faststeal.results.store import StoreMismatchError
    from faststeal.runs.runner import _pin_victim

    s = ResultStore(str(tmp_path), {"a": 1})
    s.set_meta("victim", {"checkpoint": "/cache/victims/digits-mlp-e15-aaa.pt"})
    _pin_victim(s, {"checkpoint": "/elsewhere/digits-mlp-e15-aaa.pt"}, force=False)  # same file
    _cell(s)
    with pytest.raises(StoreMismatchError, match="another victim.*digits-mlp-e10-bbb.pt"):
        _pin_victim(s, {"checkpoint": "/cache/victims/digits-mlp-e10-bbb.pt"}, force=False)
    assert len(s.cells()) == 1
    _pin_victim(s, {"checkpoint": "/cache/victims/digits-mlp-e10-bbb.pt"}, force=True)
    assert s.cells() == []
    s.close()
