"""faststeal.progress: a tqdm bar on a terminal, plain lines (no \\r, no escape codes) elsewhere."""

import io
import subprocess
import sys

from faststeal.progress import LineProgress, progress_bar


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_when_not_a_terminal():
    buf = io.StringIO()
    bar = progress_bar(range(50), desc="training", unit="step", file=buf)
    assert isinstance(bar, LineProgress)
    assert sum(1 for _ in bar) == 50
    text = buf.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[-1] == "training: 50/50 step (100%)"
    assert 2 <= len(lines) <= 11  # at most one line per 10% of the total


def test_manual_updates_postfix_and_close():
    buf = io.StringIO()
    with progress_bar(total=4, desc="cells", unit="cell", file=buf) as bar:
        bar.update(2)
        bar.set_postfix(fid="0.912")
        bar.update(2)
    assert bar.n == 4
    assert buf.getvalue().splitlines()[-1] == "cells: 4/4 cell (100%) fid=0.912"
    silent = progress_bar(total=3, disable=True, file=buf)
    silent.update(3)
    silent.close()
    assert silent.n == 3 and buf.getvalue().count("\n") == 2


def test_tqdm_on_a_terminal():
    from tqdm.auto import tqdm

    bar = progress_bar(total=3, desc="x", file=_Terminal())
    assert isinstance(bar, tqdm)
    bar.close()


def test_no_cursor_codes_in_a_log_file():
    """A real steal() run with progress on and stderr going to a pipe (a log file): the oracle's
    query bar and the surrogate's training bar write plain lines, no \\r or ESC[A."""
    code = (
        "import torch, faststeal\n"
        "torch.manual_seed(0)\n"
        "victim = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))\n"
        "pool = torch.randn(300, 1, 4, 4)\n"
        "test = (torch.randn(50, 1, 4, 4), torch.randint(0, 3, (50,)))\n"
        "faststeal.steal(victim, pool=pool, test=test, budget=200, methods=['baseline'],\n"
        "                epochs=2, batch_size=32, progress=True)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "\r" not in r.stderr and "\x1b" not in r.stderr, repr(r.stderr[-500:])
    assert "querying victim:" in r.stderr and "baseline:" in r.stderr, r.stderr[-2000:]
