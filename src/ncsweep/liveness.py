"""Whether a process or a SLURM job is still alive, asked of /proc, the kernel and squeue."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

from ncsweep.cluster import FINISHED_STATES

log = logging.getLogger(__name__)

SQUEUE_TIMEOUT_S = 10.0
SQUEUE_BATCH = 500
NOT_QUEUED = "not in the queue"


def boot_id() -> str | None:
    """This machine's boot id, so a pid recorded before a reboot is known to be dead."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """When a process started (clock ticks since boot, from /proc), telling a reused pid apart."""
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in ticks) of a process from /proc, or None where unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], fields[19]


def pid_gone(pid: int, started: str | None = None) -> str | None:
    """Why process `pid` on this host is gone ("is gone", "is now another process"), else None."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "is gone"
    except PermissionError:
        pass
    stat = _proc_stat(pid)
    if stat is not None and stat[0] == "Z":
        return "is gone"
    if stat is not None and started and stat[1] != started:
        return "is now another process"
    return None


def slurm_job() -> tuple[str | None, int]:
    """This process's SLURM job ('15_0' for an array task) and how often it was requeued."""
    env = os.environ
    array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    job = f"{array}_{task}" if array and task else env.get("SLURM_JOB_ID")
    return job, int(env.get("SLURM_RESTART_COUNT", "0") or 0)


def job_state(job: str) -> str | None:
    """The job's state as squeue reports it, NOT_QUEUED, or None when squeue cannot tell."""
    states = job_states([job])
    return None if states is None else states[job]


def job_states(jobs: Iterable[str]) -> dict[str, str] | None:
    """Each job's squeue state or NOT_QUEUED, in few squeue calls; None when squeue cannot tell."""
    wanted = sorted(set(jobs))
    states = dict.fromkeys(wanted, NOT_QUEUED)
    if shutil.which("squeue") is None:
        return None
    for start in range(0, len(wanted), SQUEUE_BATCH):
        chunk = ",".join(wanted[start : start + SQUEUE_BATCH])
        try:
            res = subprocess.run(["squeue", "-h", "-r", "-j", chunk, "-o", "%i %T"],
                                 capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as error:
            log.warning("squeue could not tell whether jobs %s still run: %s", chunk[:80], error)
            return None
        if res.returncode != 0 and "Invalid job id" not in res.stderr:
            log.warning("squeue could not tell whether jobs %s still run: %s", chunk[:80],
                        (res.stderr.strip().splitlines() or ["no message"])[-1])
            return None
        for line in res.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] in states:
                states[parts[0]] = parts[1]
    return states


def job_over(state: str) -> bool:
    """Whether a job in this squeue state will never write again (finished or not queued)."""
    return state == NOT_QUEUED or state.split()[0] in FINISHED_STATES
