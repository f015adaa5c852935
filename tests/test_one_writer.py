"""One writer per run: concurrent launches of one run, a killed run's lease taken over, a held
run in a sweep, all through the real CLI in real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ncsweep.config import run_key
from ncsweep.lease import LEASE_FILE, Lease
from ncsweep.lifecycle import Attempt, admit, error_line, fail
from ncsweep.runguard import LeaseLost
from ncsweep.stopping import SIGNAL_AT_STEP
from ncsweep.tracking import RunFolder
from tests.support import FAST, compose_cfg, exits_within, run_cli, wait_until

RUN = [*FAST, "trainer.deterministic=true", "arch.width=32", "trainer.batch_size=64",
       "trainer.eval_every=10", "name=writer"]
STEPS_PER_EPOCH = 23  # the digits' 1437 train samples in batches of 64


def epochs_of(folder: RunFolder) -> list[int]:
    return [int(row["epoch"]) for row in folder.read_metrics()]


def launch(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ncsweep", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "WANDB_ERROR_REPORTING": "false",
                                 **(env or {})})


def test_two_concurrent_launches_of_one_run_train_it_once(tmp_path: Path) -> None:
    """Both start at once into one folder: one trains, the other refuses in one line."""
    folder = RunFolder(tmp_path / "run")
    args = [*RUN, "trainer.epochs=150", "trainer.eval_every=50", f"hydra.run.dir={folder.path}"]
    procs = [launch(args, tmp_path) for _ in range(2)]
    ends = [(p, *exits_within(p, 600, "a launch of the run did not end")) for p in procs]
    trained = [(p, out, err) for p, out, err in ends if p.returncode == 0]
    refused = [(p, out, err) for p, out, err in ends if p.returncode != 0]
    assert len(trained) == 1 and len(refused) == 1, [(p.returncode, e) for p, _, e in ends]
    _, out, err = refused[0]
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "not started" in lines[0] and str(folder.path) in lines[0], lines
    winner = trained[0][0].pid
    assert f"already running as pid {winner} on host" in lines[0] and " since " in lines[0]
    assert "done" not in out
    assert epochs_of(folder) == [0, 50, 100, 150]
    assert folder.status == "done" and not folder.file(LEASE_FILE).exists()


def test_a_killed_runs_lease_is_taken_over_and_the_run_resumes(tmp_path: Path) -> None:
    """SIGKILL leaves the lease behind; the next launch sees its pid gone, takes it, resumes."""
    folder = RunFolder(tmp_path / "run")
    args = [*RUN, "trainer.epochs=40", f"hydra.run.dir={folder.path}"]
    steps = 25 * STEPS_PER_EPOCH  # in epoch 26, after the rows of epochs 0, 10 and 20
    killed = run_cli(args, tmp_path, env={SIGNAL_AT_STEP: f"{steps}:SIGKILL"})
    assert killed.returncode == -signal.SIGKILL
    left = json.loads(folder.file(LEASE_FILE).read_text())
    assert left["pid"] is not None and epochs_of(folder) == [0, 10, 20]
    resumed = run_cli(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "taking over the lease" in resumed.stderr and f"pid {left['pid']}" in resumed.stderr
    assert epochs_of(folder) == [0, 10, 20, 30, 40]
    summary = folder.read_summary()
    assert summary["resumed_from_epoch"] == 20 and summary["attempts"] == 2
    assert not folder.file(LEASE_FILE).exists()


def test_a_run_held_elsewhere_counts_as_running_elsewhere_in_a_sweep(tmp_path: Path) -> None:
    """A live holder (this test process) keeps one run of a sweep: it is neither trained nor
    failed, the other run trains, and the summary names it."""
    sweep = ["-m", *RUN, "trainer.epochs=2", "seed=0,1"]
    root = tmp_path / "multirun" / "writer"
    held = RunFolder(root / run_key("arch.width=32,seed=1,trainer.batch_size=64,"
                                    "trainer.deterministic=True,trainer.epochs=2,"
                                    "trainer.eval_every=10"))
    with Lease.acquire(held.path):
        result = run_cli(sweep, tmp_path)
        assert held.file(LEASE_FILE).exists()
    assert result.returncode != 0
    assert "1 done, 1 running elsewhere" in result.stdout, result.stdout
    assert f"already running as pid {os.getpid()} on host" in result.stdout + result.stderr
    assert held.status == "new" and not held.file("FAILED").exists()
    assert not (held.path / ".hydra").exists() and not held.file("attempt.json").exists()
    again = run_cli(sweep, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "1 done, 1 skipped" in again.stdout and held.status == "done"


def test_a_run_whose_lease_is_taken_over_stops_writing(tmp_path: Path) -> None:
    """Another launch replaced the lease (this one stalled past the stale timeout): the next
    write is refused as running elsewhere, with no FAILED marker in the other's folder."""
    folder = RunFolder(tmp_path / "run")
    cfg = compose_cfg([*FAST, "trainer.epochs=1", "lease.heartbeat_s=0.05",
                       "lease.stale_after_s=1"], folder.path)
    attempt = admit(cfg)
    assert isinstance(attempt, Attempt) and (folder.path / ".hydra" / "config.yaml").exists()
    other = json.loads(folder.file(LEASE_FILE).read_text()) | {"pid": 1, "token": "other"}
    folder.file(LEASE_FILE).write_text(json.dumps(other))
    wait_until(lambda: attempt.lease.lost, 10, "the heartbeat did not notice the takeover")
    with pytest.raises(LeaseLost) as lost:
        attempt.save({"epoch": 0})
    with pytest.raises(SystemExit):
        fail(attempt.context, lost.value, error_line(attempt.context.key, lost.value))
    attempt.release()
    assert json.loads(folder.file(LEASE_FILE).read_text())["token"] == "other"
    assert not folder.file("FAILED").exists() and not folder.file("checkpoint.pt").exists()
