"""A run killed with SIGKILL mid-way and restarted ends with the same table as an uninterrupted run."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

ARGS = ["run", "--dataset", "digits", "--victim-arch", "mlp", "--victim-epochs", "10",
        "--budget", "300", "--seeds", "2", "--epochs", "3", "--methods", "baseline,deep-ensemble",
        "--member-sweep", "", "--no-progress", "--preset", "quick"]


def _run(out, cache, wait=True):
    env = {**os.environ, "FASTSTEAL_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "faststeal", *ARGS, "--out", str(out), "--cache-dir", str(cache)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    if wait:
        out_text, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out_text
        return out_text
    return p


def _cells(db):
    if not os.path.exists(db):
        return 0
    try:
        con = sqlite3.connect(db, timeout=1)
        n = con.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
        con.close()
        return n
    except sqlite3.Error:
        return 0


def _table(out):
    res = json.loads((out / "results.json").read_text())
    return {m: {k: v for k, v in d.items() if k not in ("train_seconds", "hparams")}
            for m, d in res["methods"].items()}


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    cache = tmp_path / "cache"
    full, killed = tmp_path / "full", tmp_path / "killed"
    _run(full, cache)
    p = _run(killed, cache, wait=False)
    deadline = time.time() + 300
    while _cells(killed / "results.sqlite") < 1 and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    assert p.poll() is None, "run finished before it could be killed; make it longer"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    done_before = _cells(killed / "results.sqlite")
    assert 1 <= done_before < 4
    text = _run(killed, cache)
    assert "resuming" in text
    # the budget is spent once: the rerun took every answer from OUT/answers.journal
    assert "300 answers (300 images charged) loaded from" in text
    log = json.loads((killed / "query_log.json").read_text())
    assert log["used"] == 300 and sum(e["charged"] for e in log["queries"]) == 300
    assert log["queries"][-1]["charged"] == 0  # the rerun's own entries come last
    assert _cells(killed / "results.sqlite") == 4
    assert _table(killed) == _table(full)
