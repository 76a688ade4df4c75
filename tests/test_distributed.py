"""Two Gloo ranks on CPU give the same comparison table as one process (same member seeds →
same members), with the oracle budget counted once."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from faststeal import distributed

# the member sweep's S=1 ensemble is smaller than the world: one rank trains it whole (it hung)
ARGS = ["run", "--preset", "quick", "--dataset", "digits", "--victim-arch", "mlp",
        "--victim-epochs", "10", "--budget", "300", "--seeds", "2", "--epochs", "2",
        "--methods", "baseline,deep-ensemble", "--member-sweep", "1", "--no-progress",
        "--method-params", '{"deep-ensemble": {"members": 3}}']


def _run(out, cache, extra=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    r = subprocess.run([sys.executable, "-m", "faststeal", *ARGS, *extra, "--out", str(out),
                        "--cache-dir", str(cache)], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), r.stdout + r.stderr


def _table(res):
    return {m: {k: v for k, v in d.items() if k not in ("train_seconds", "hparams")}
            for m, d in res["methods"].items()}


def _close(a, b):
    """Equal tables, floats to 1e-6 relative: a rank's member shard trains the same members
    (same seeds, same data), yet not always to the last bit — seen: one head-bias element of a
    one-member shard one ulp off after 20 steps of make_train_step in a process that also
    trained other stacks (the same steps alone, and the gradients, were bit-identical; the
    cause is not pinned down). That moved the Brier score by ~1e-12 and its std over seeds by a
    relative 3e-9; any real difference (another member, a lost cell) moves a fidelity by at
    least 1/N."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-6, abs=1e-9)
    return a == b


@pytest.mark.slow
def test_two_gloo_ranks_match_single_process(tmp_path):
    cache = tmp_path / "cache"
    single, _ = _run(tmp_path / "single", cache)
    dist_res, text = _run(tmp_path / "dist", cache, ["--nproc", "2", "--shard-members"])
    assert "rank 1" in text  # the second rank really trained cells
    assert dist_res["queries"] == single["queries"]
    assert dist_res["queries"]["used"] == dist_res["queries"]["budget"] == 300
    log = json.loads((tmp_path / "dist" / "query_log.json").read_text())
    assert log["used"] == 300  # asked once, by rank 0
    assert _close(_table(dist_res), _table(single)), (_table(dist_res), _table(single))
    assert dist_res["methods"]["deep-ensemble"]["members"] == 3


def test_member_shards_cover_members_exactly():
    for world in (1, 2, 3, 5):
        for members in (1, 2, 5, 7, 16):
            if members < world:
                assert not distributed.can_shard(distributed.Context(0, world), members)
                with pytest.raises(ValueError, match=f"cannot split {members} member"):
                    distributed.member_shard(distributed.Context(world - 1, world), members)
                continue
            assert distributed.can_shard(distributed.Context(0, world), members)
            blocks = [distributed.member_shard(distributed.Context(r, world), members)
                      for r in range(world)]
            assert blocks[0][0] == 0 and blocks[-1][1] == members
            assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
            sizes = [b - a for a, b in blocks]
            assert max(sizes) - min(sizes) <= 1


def test_round_robin_cells():
    cells = list(range(7))
    got = sorted(c for r in range(3) for c in distributed.my_cells(distributed.Context(r, 3), cells))
    assert got == cells


_FAILING_RANK = textwrap.dedent("""
    import os, sys, time
    import faststeal.attack as attack
    from faststeal import cli

    real = attack.train_and_evaluate

    def train(*args, **kw):  # rank 1 fails in its first cell; rank 0 goes on to a collective
        if os.environ["RANK"] == "1":
            with open(os.environ["RAISED_AT"], "w") as fh:
                fh.write(repr(time.time()))
            raise ValueError("injected failure in rank 1")
        return real(*args, **kw)

    attack.train_and_evaluate = train
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_a_failing_rank_ends_the_whole_job_with_its_message(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_FAILING_RANK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAISED_AT": str(tmp_path / "raised_at")}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(script), *ARGS, "--shard-members", "--epochs", "1",
           "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
    # own session: a hung job is killed whole (torchrun and both workers) when the test gives up
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    ended = time.time()
    assert proc.returncode != 0, text[-3000:]
    assert "faststeal: error (rank 1 of 2): injected failure in rank 1" in text, text[-3000:]
    raised = float((tmp_path / "raised_at").read_text())
    assert ended - raised < 30, f"the job ran {ended - raised:.0f}s after rank 1 failed"
