"""A rank that dies or hangs fails its run in one line: real gloo ranks through submitit local.

These run beside the other CPU tests (tests/suite.sh): each finds its own sweep's rank processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from ncsweep.tracking import RunFolder
from tests.support import DDP_MLP as MLP
from tests.support import LOCAL_RANKS, exits_within, wait_for_rows, wait_until


def long_two_rank_run(root: Path, rank_timeout_s: int) -> tuple[subprocess.Popen, Path]:
    """A long local 2-rank run, started and past its first eval row: (sweep process, sweep)."""
    args = [*MLP, "trainer.epochs=500", "trainer.eval_every=1", "trainer.deterministic=false",
            *LOCAL_RANKS, f"hydra.launcher.rank_timeout_s={rank_timeout_s}"]
    proc = subprocess.Popen([sys.executable, "-m", "ncsweep", "-m", *args], cwd=root,
                            env={**os.environ, "WANDB_ERROR_REPORTING": "false"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sweep_dir = root / "multirun" / "ddp"
    wait_for_rows(proc, sweep_dir, "*/metrics.jsonl", 1, timeout=120)
    return proc, sweep_dir


def test_a_killed_rank_fails_the_run_in_one_line_naming_it(tmp_path: Path) -> None:
    proc, sweep_dir = long_two_rank_run(tmp_path, 3600)
    os.kill(_rank_pid(1, sweep_dir), signal.SIGKILL)
    # gloo sees the closed socket: the run fails long before its collective timeout could
    out, _ = exits_within(proc, 300, "the sweep did not fail after rank 1 was killed")
    assert proc.returncode == 1
    assert ": 1 failed" in out, out
    [run] = [RunFolder(p.parent) for p in sweep_dir.glob("*/run.json")]
    assert run.status == "failed" and not run.file("DONE").exists()
    line = run.failure()
    assert line.startswith("RankLost: rank 1 of 2 died or stopped answering"), line
    assert "rank 0 saw:" in line and "\n" not in line
    assert line in out


def test_a_hung_rank_is_reported_while_waited_for_then_fails_the_run(tmp_path: Path) -> None:
    timeout = 12
    proc, sweep_dir = long_two_rank_run(tmp_path, timeout)
    [run] = [RunFolder(p.parent) for p in sweep_dir.glob("*/run.json")]
    rank1 = _rank_pid(1, sweep_dir)
    os.kill(rank1, signal.SIGSTOP)  # alive, holding its sockets, answering nothing
    try:
        wait_until(run.file("FAILED").exists, 300, "the run wrote no FAILED while rank 1 hung")
    finally:
        os.kill(rank1, signal.SIGKILL)
    out, _ = exits_within(proc, 120, "the sweep did not exit after its run failed")
    assert proc.returncode == 1 and ": 1 failed" in out, out
    assert not run.file("DONE").exists()
    line = run.failure()
    assert line.startswith(f"RankLost: rank 1 of 2 died or stopped answering (collective "
                           f"timeout {timeout} s)"), line
    assert "timed out" in line.split("rank 0 saw:")[1].lower(), line  # waited the timeout out
    [log] = sweep_dir.glob(".submitit/*/*_0_log.err")  # rank 0's own log, on the task's stderr
    beats = [ln for ln in log.read_text().splitlines()
             if "rank 0 of 2: nothing exchanged with the other ranks for" in ln]
    assert len(beats) >= 2, log.read_text()[-3000:]  # one every timeout / 4 s while it waits
    assert f"hydra.launcher.rank_timeout_s = {timeout} s" in beats[0]


def _rank_pid(rank: int, sweep_dir: Path) -> int:
    """The pid of the submitit task of the given global rank of the sweep in ``sweep_dir`` (its
    submission command names the sweep's folder, so other 2-rank runs are never picked)."""
    folder = str(sweep_dir).encode()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            values = environ.read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SUBMITIT_LOCAL_GLOBALID={rank}".encode() in values and \
                b"SUBMITIT_LOCAL_NTASKS=2" in values and \
                any(v.startswith(b"SUBMITIT_LOCAL_COMMAND=") and folder in v for v in values):
            return int(environ.parent.name)
    raise AssertionError(f"no process of rank {rank} in {sweep_dir}")
