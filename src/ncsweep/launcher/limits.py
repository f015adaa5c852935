"""The scheduler's limits on a sweep (MaxArraySize, MaxJobCount, MaxSubmitJobs), and the packing
and arrays that meet them."""

from __future__ import annotations

import getpass
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ncsweep import cluster
from ncsweep.launcher.plan import Unit, pack

log = logging.getLogger(__name__)

UNSET = ("", "-1", "None", "UNLIMITED")


@dataclass(frozen=True)
class Limits:
    """What the scheduler lets this sweep submit now: tasks per array, and tasks in all."""

    max_array_size: int | None = None
    max_tasks: int | None = None
    task_rule: str = ""


def _number(value: str) -> int | None:
    """A limit as sacctmgr or scontrol prints it; None where it is not set."""
    value = value.strip()
    return None if value in UNSET or not value.isdigit() else int(value)


def controller_limits() -> dict[str, int | None]:
    """MaxArraySize (tasks per array, indices 0..N-1) and MaxJobCount from `scontrol`."""
    found: dict[str, int | None] = {"MaxArraySize": None, "MaxJobCount": None}
    for line in cluster.ask(["scontrol", "show", "config"]).splitlines():
        key, _, value = line.partition("=")
        if key.strip() in found:
            found[key.strip()] = _number(value)
    return found


def _sacctmgr(args: list[str]) -> list[list[str]]:
    """Rows of a sacctmgr query; none when accounting cannot answer (then no limit applies)."""
    try:
        out = cluster.ask(["sacctmgr", "-n", "-P", *args], timeout=20)
    except cluster.ClusterError as err:
        log.debug("no submit limits read: %s", err)
        return []
    return [line.split("|") for line in out.splitlines() if line.strip()]


def submit_limits(qos: str | None, account: str | None,
                  user: str | None = None) -> list[tuple[int, str]]:
    """(limit, where it is set) for the association's MaxSubmitJobs and the QOS's per user."""
    user = user or getpass.getuser()
    found: list[tuple[int, str]] = []
    default_qos = None
    where = [f"user={user}", *([f"account={account}"] if account else [])]
    for row in _sacctmgr(["show", "assoc", *where, "format=account,maxsubmitjobs,defaultqos"]):
        if len(row) < 3:
            continue
        default_qos = default_qos or (row[2] or None)
        limit = _number(row[1])
        if limit is not None:
            found.append((limit, f"association {user}/{row[0]}'s MaxSubmitJobs {limit}"))
    name = qos or default_qos or "normal"
    for row in _sacctmgr(["show", "qos", name, "format=name,maxsubmitjobsperuser"]):
        limit = _number(row[1]) if len(row) > 1 else None
        if limit is not None:
            found.append((limit, f"QOS {row[0]}'s MaxSubmitJobsPerUser {limit}"))
    return found


def known_jobs(user: str | None = None) -> int:
    """Jobs the controller holds now (a user's, or everyone's with ended ones), each array task
    counted as the limits count it."""
    who = ["-u", user] if user else ["-t", "all"]
    out = cluster.ask(["squeue", "-h", "-r", *who, "-o", "%i"])
    return sum(1 for line in out.splitlines() if line.strip())


def read_limits(qos: str | None = None, account: str | None = None) -> Limits:
    """The limits a submission must meet, read from scontrol, sacctmgr and squeue."""
    config = controller_limits()
    room: list[tuple[int, str]] = []
    if config["MaxJobCount"] is not None:
        held = known_jobs()
        room.append(((config["MaxJobCount"] - held) // 2,
                      f"MaxJobCount {config['MaxJobCount']} ({held} jobs held by the controller; "
                      "a sweep takes at most half of the rest)"))
    rules = submit_limits(qos, account)
    if rules:
        queued = known_jobs(getpass.getuser())
        room += [(limit - queued, f"{rule} ({queued} queued now)") for limit, rule in rules]
    if not room:
        return Limits(config["MaxArraySize"])
    free, rule = min(room)
    return Limits(config["MaxArraySize"], max(free, 0), rule)


def fit(units: Sequence[Unit], runs_per_task: int, limits: Limits) -> int:
    """Runs per task that keep the sweep within ``max_tasks`` (the asked number if it does)."""
    room = limits.max_tasks
    if room is None or len(pack(units, runs_per_task)) <= room:
        return runs_per_task
    if room < 1:
        raise cluster.ClusterError(f"{limits.task_rule} leaves no room for another job: wait "
                                   "for queued jobs to end or choose another "
                                   "hydra.launcher.qos or account, then re-run")
    runs = sum(len(unit) for unit in units)
    per_task = max(runs_per_task, math.ceil(runs / room))
    while len(pack(units, per_task)) > room:
        per_task += 1
    return per_task


def split(tasks: int, limits: Limits) -> list[int]:
    """Array sizes for ``tasks`` tasks within MaxArraySize; a ClusterError where none can do."""
    size = limits.max_array_size
    if size is None or tasks <= size:
        return [tasks] if tasks else []
    if size < 1:
        raise cluster.ClusterError(f"job arrays are disabled on this cluster (MaxArraySize "
                                   f"{size}): launcher=slurm submits a sweep as arrays")
    return [min(size, tasks - start) for start in range(0, tasks, size)]


def describe(asked: int, per_task: int, sizes: list[int], limits: Limits) -> str:
    """The one phrase that says how the sweep was packed and split; empty when it was not."""
    parts = []
    if per_task > asked:
        parts.append(f"runs packed to stay within {limits.task_rule}")
    if len(sizes) > 1:
        parts.append(f"split into {len(sizes)} arrays of up to {max(sizes)} tasks "
                     f"(MaxArraySize {limits.max_array_size})")
    return "; ".join(parts)
