"""One writer per run folder: real processes race for, hold, die with and take over a lease."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from ncsweep.errors import ConfigError
from ncsweep.lease import (
    CLAIM_PREFIX,
    LEASE_FILE,
    Lease,
    LeaseError,
    RunHeld,
    holder,
    holders,
    reserve,
)

HOLD = """
import pathlib, sys, time
from ncsweep.lease import Lease, RunHeld
folder, go, done = sys.argv[1:4]
while time.time() < float(go):
    time.sleep(0.001)
try:
    lease = Lease.acquire(folder, heartbeat_s=0.2, stale_after_s=5)
except RunHeld as held:
    print("HELD", held, flush=True)
    sys.exit(3)
print("WON", flush=True)
deadline = time.monotonic() + 60
while not pathlib.Path(done).exists() and time.monotonic() < deadline:
    time.sleep(0.02)
lease.release()
"""


def _holder_process(folder: Path, go: float, done: Path) -> subprocess.Popen:
    """A python process that takes the folder's lease at `go` and holds it until `done` exists."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(go), str(done)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _write_lease(folder: Path, age_s: float = 0.0, **fields: object) -> Path:
    """A lease file as another holder would have left it, its heartbeat `age_s` old."""
    record = {"host": "node-elsewhere", "pid": 4242, "job": None, "node": "node-elsewhere",
              "started": time.time() - 3600, "token": uuid.uuid4().hex, "restarts": 0,
              "boot": None, "proc_start": None, **fields}
    path = folder / LEASE_FILE
    path.write_text(json.dumps(record) + "\n")
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def fake_squeue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `squeue` first on PATH that prints its file ('JOB STATE' lines) and logs each call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    answer = tmp_path / "squeue-answer"
    answer.write_text("15_0 RUNNING\n")
    script = bin_dir / "squeue"
    script.write_text(f'#!/bin/sh\necho "$*" >> "{answer}.calls"\nread -r line < "{answer}"\n'
                      'case "$line" in invalid) echo "slurm_load_jobs error: Invalid job id '
                      'specified" >&2; exit 1;; down) echo "error: unreachable" >&2; exit 1;; '
                      f'esac\ncat "{answer}"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID",
                "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    return answer


@pytest.mark.parametrize("left_behind", ["nothing", "a dead holder's lease"])
def test_concurrent_processes_exactly_one_wins(tmp_path: Path, left_behind: str) -> None:
    for round_ in range(4):
        folder = tmp_path / f"run-{round_}"
        folder.mkdir()
        if left_behind != "nothing":
            _write_lease(folder, host=socket.gethostname(), pid=_dead_pid())
        done = tmp_path / f"done-{round_}"
        go = time.time() + 1.5
        procs = [_holder_process(folder, go, done) for _ in range(3)]
        try:
            firsts = [p.stdout.readline().strip() for p in procs]
            winners = [p for p, line in zip(procs, firsts, strict=True) if line == "WON"]
            assert len(winners) == 1, firsts
            winner = winners[0]
            for proc, line in zip(procs, firsts, strict=True):
                if proc is winner:
                    continue
                out, err = proc.communicate(timeout=30)
                assert proc.returncode == 3, err
                assert out == "" and "\n" not in line
                assert re.fullmatch(f"HELD run folder {re.escape(str(folder.resolve()))} is "
                                    f"already running as pid {winner.pid} on host "
                                    f"{re.escape(socket.gethostname())} since \\d\\d:\\d\\d",
                                    line), line
        finally:
            done.touch()
            for proc in procs:
                proc.communicate(timeout=30)
        assert winner.returncode == 0
        assert not (folder / LEASE_FILE).exists()
        assert sorted(p.name for p in folder.iterdir()) == []


def test_lease_of_a_sigkilled_holder_is_taken_over(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    proc = _holder_process(tmp_path, time.time(), tmp_path / "never")
    assert proc.stdout.readline().strip() == "WON"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    with caplog.at_level(logging.WARNING, logger="ncsweep.lease"), Lease.acquire(tmp_path) as lease:
        assert holder(tmp_path) == lease.holder
        assert lease.holder.pid == os.getpid()
    taken = [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()]
    assert len(taken) == 1 and f"pid {proc.pid} on host {socket.gethostname()} is gone" in taken[0]
    assert not (tmp_path / LEASE_FILE).exists()


def test_a_live_holder_is_not_taken_over(tmp_path: Path) -> None:
    done = tmp_path / "done"
    proc = _holder_process(tmp_path, time.time(), done)
    try:
        assert proc.stdout.readline().strip() == "WON"
        with pytest.raises(RunHeld) as held:
            Lease.acquire(tmp_path, stale_after_s=3, heartbeat_s=1)
        message = str(held.value)
        assert "\n" not in message
        assert f"running as pid {proc.pid} on host {socket.gethostname()} since " in message
        assert holder(tmp_path).pid == proc.pid
        assert str(pickle.loads(pickle.dumps(held.value))) == message
    finally:
        done.touch()
        proc.communicate(timeout=30)
    assert proc.returncode == 0 and holder(tmp_path) is None


def test_same_host_leases_of_a_reused_pid_a_reboot_or_garbage_are_taken_over(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        here = socket.gethostname()
        leftovers = {f"pid {sleeper.pid} on host {here} is now another process":
                     {"host": here, "pid": sleeper.pid, "proc_start": "1"},
                     f"host {here} has rebooted since":
                     {"host": here, "pid": sleeper.pid, "boot": "an-earlier-boot"}}
        for reason, fields in leftovers.items():
            _write_lease(tmp_path, **fields)
            with caplog.at_level(logging.WARNING, logger="ncsweep.lease"), \
                    Lease.acquire(tmp_path):
                pass
            assert caplog.records[-1].getMessage().endswith(reason)
    finally:
        sleeper.kill()
        sleeper.wait()
    (tmp_path / LEASE_FILE).write_text("")
    os.utime(tmp_path / LEASE_FILE, (time.time() - 100, time.time() - 100))
    with caplog.at_level(logging.WARNING, logger="ncsweep.lease"), Lease.acquire(tmp_path):
        assert caplog.records[-1].getMessage().endswith("the lease file is unreadable")


def test_a_takeover_left_half_done_is_bounded_then_finished(tmp_path: Path) -> None:
    lease = _write_lease(tmp_path, host=socket.gethostname(), pid=_dead_pid())
    digest = hashlib.sha1(lease.read_text().encode()).hexdigest()[:16]
    claim = tmp_path / f"{CLAIM_PREFIX}{digest}.0"
    claim.touch()
    with pytest.raises(LeaseError, match=r"^could not settle the lease of .* within 0.3 s; "):
        Lease.acquire(tmp_path, wait_s=0.3)
    os.utime(claim, (time.time() - 100, time.time() - 100))
    with Lease.acquire(tmp_path) as held:
        assert held.holder.pid == os.getpid()
        assert sorted(p.name for p in tmp_path.iterdir()) == [LEASE_FILE]


def test_stale_heartbeat_on_another_host_is_taken_over(tmp_path: Path, fake_squeue: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    _write_lease(tmp_path, age_s=2)
    with pytest.raises(RunHeld, match="running as pid 4242 on host node-elsewhere since "):
        Lease.acquire(tmp_path, heartbeat_s=1, stale_after_s=30)
    _write_lease(tmp_path, age_s=100)
    assert holder(tmp_path, stale_after_s=30) is None
    with caplog.at_level(logging.WARNING, logger="ncsweep.lease"), \
            Lease.acquire(tmp_path, heartbeat_s=1, stale_after_s=30) as lease:
        assert lease.holder.pid == os.getpid()
    assert "heartbeat is 100 s old (stale after 30 s)" in caplog.text


def test_slurm_job_decides_for_holders_on_other_hosts(tmp_path: Path, fake_squeue: Path) -> None:
    _write_lease(tmp_path, age_s=1000, job="15_0", node="vm")
    with pytest.raises(RunHeld, match=r"already running in job 15_0 on node vm since \d\d:\d\d"):
        Lease.acquire(tmp_path)
    fake_squeue.write_text("down")
    assert holder(tmp_path) is None  # squeue cannot tell: the old heartbeat decides
    for answer in ("15_0 COMPLETED", "", "invalid"):
        _write_lease(tmp_path, age_s=0, job="15_0", node="vm")
        fake_squeue.write_text(answer)
        with Lease.acquire(tmp_path) as lease:
            assert lease.holder.pid == os.getpid()


def test_many_folders_are_judged_with_one_squeue_call(tmp_path: Path, fake_squeue: Path) -> None:
    folders = [tmp_path / f"run-{i}" for i in range(4)]
    for i, folder in enumerate(folders[:3]):
        folder.mkdir()
        _write_lease(folder, age_s=1000, job=f"15_{i}", node="vm")
    fake_squeue.write_text("15_0 RUNNING\n15_1 COMPLETED\n")
    live = holders(folders)
    assert list(live) == [folders[0]] and live[folders[0]].job == "15_0"
    calls = Path(f"{fake_squeue}.calls").read_text().splitlines()
    assert calls == ["-h -r -j 15_0,15_1,15_2 -o %i %T"]


def test_requeued_job_and_its_reservation_take_over(tmp_path: Path, fake_squeue: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    fake_squeue.write_text("15_0 PENDING")
    reserved = reserve(tmp_path, "15_0")
    assert reserved.reserved and holder(tmp_path) == reserved
    with pytest.raises(RunHeld, match=r"already queued in job 15_0 since \d\d:\d\d$"):
        Lease.acquire(tmp_path)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "15")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    with Lease.acquire(tmp_path) as lease:
        assert lease.holder.job == "15_0" and lease.holder.pid == os.getpid()
    fake_squeue.write_text("15_0 RUNNING")
    _write_lease(tmp_path, job="15_0", restarts=0)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with Lease.acquire(tmp_path) as lease:
        assert lease.holder.restarts == 1


def test_own_process_reacquire_is_harmless(tmp_path: Path) -> None:
    first = Lease.acquire(tmp_path)
    second = Lease.acquire(tmp_path)
    assert second is first
    second.release()
    assert holder(tmp_path) == first.holder
    first.release()
    assert not (tmp_path / LEASE_FILE).exists()
    _write_lease(tmp_path, host=socket.gethostname(), pid=os.getpid())
    with Lease.acquire(tmp_path) as lease:
        assert holder(tmp_path) == lease.holder


def test_heartbeat_refreshes_and_notices_a_lost_lease(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    lease = Lease.acquire(tmp_path, heartbeat_s=0.1, stale_after_s=1)
    path = tmp_path / LEASE_FILE
    os.utime(path, (time.time() - 50, time.time() - 50))
    deadline = time.monotonic() + 10
    while time.time() - path.stat().st_mtime > 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert time.time() - path.stat().st_mtime < 5
    with caplog.at_level(logging.ERROR, logger="ncsweep.lease"):
        _write_lease(tmp_path)
        while not lease.lost and time.monotonic() < deadline:
            time.sleep(0.05)
    assert lease.lost and "lost the lease of" in caplog.text
    lease.release()
    assert holder(tmp_path).host == "node-elsewhere"


def test_timing_that_would_look_dead_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"lease.stale_after_s=5 .*at least 3 x"):
        Lease.acquire(tmp_path, heartbeat_s=2, stale_after_s=5)
    with pytest.raises(ConfigError, match=r"lease\.heartbeat_s=0 "):
        Lease.acquire(tmp_path, heartbeat_s=0)


@pytest.mark.slurm
def test_real_slurm_job_holds_until_cancelled(local_slurm: str, tmp_path: Path) -> None:
    job = subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", "--wrap", "sleep 120"],
                         capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    try:
        _write_lease(tmp_path, job=job, node="elsewhere")
        with pytest.raises(RunHeld, match=f"in job {job} on node elsewhere"):
            Lease.acquire(tmp_path)
    finally:
        subprocess.run(["scancel", job], check=True)
    deadline = time.monotonic() + 30
    while holder(tmp_path) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    with Lease.acquire(tmp_path, wait_s=20) as lease:
        assert lease.holder.pid == os.getpid()
