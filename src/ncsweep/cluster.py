"""What a SLURM partition offers and what a sweep may ask of it, checked before submitting.

Every check asks SLURM's own client commands (``scontrol``, ``sinfo``, ``sacctmgr``, ``squeue``,
``sacct``); a request no node can ever satisfy is refused in one line naming the key.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ncsweep.config import ConfigError

AUTO = "auto"
RESOURCE_KEYS = ("cpus_per_task", "gpus_per_node", "mem_gb")
# Reasons a pending job never leaves on its own: the request or the partition must change.
NEVER_CLEARS = ("PartitionConfig", "PartitionDown", "PartitionInactive", "PartitionNodeLimit",
                "PartitionTimeLimit", "InvalidAccount", "InvalidQOS", "BadConstraints",
                "DependencyNeverSatisfied", "AccountNotAllowed", "QOSNotAllowed")
PER_JOB_LIMIT = re.compile(r"^(QOS|Assoc)Max\w*PerJob")
FINISHED_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT")
DOWN_NODE_STATES = ("down", "drain", "drained", "draining", "fail", "failing", "future",
                    "maint", "unknown", "not_responding", "inval")
_GPU_GRES = re.compile(r"gpu(?::[^:(,]+)?:(\d+)")


class ClusterError(RuntimeError):
    """The cluster cannot take the sweep (no SLURM, a refused submission): one line for the user."""


def _run(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    """A SLURM client command, bounded in time; a missing command or a hang is a ClusterError."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise ClusterError(f"{args[0]} is not on PATH: launcher=slurm needs SLURM's client "
                           "commands (on a machine without SLURM use launcher=local)") from None
    except subprocess.TimeoutExpired:
        raise ClusterError(f"`{' '.join(args)}` did not answer within {timeout:.0f} s: is the "
                           "SLURM controller up?") from None


def first_error_line(text: str) -> str:
    """The line of a SLURM client's stderr that says what went wrong."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower() or "fatal" in line.lower():
            return line
    return lines[0] if lines else "no message"


def ask(args: list[str], timeout: float = 30) -> str:
    """stdout of a SLURM client command that must succeed; its own error line otherwise."""
    res = _run(args, timeout)
    if res.returncode != 0:
        message = first_error_line(res.stderr or res.stdout)
        raise ClusterError(f"`{' '.join(args)}` failed: {message}")
    return res.stdout


@dataclass
class Node:
    """One node as sinfo reports it."""

    name: str
    cpus: int
    mem_mb: int
    gpus: int
    state: str

    @property
    def usable(self) -> bool:
        return not any(s in self.state.lower() for s in DOWN_NODE_STATES)


@dataclass
class Partition:
    """A partition's limits (``scontrol show partition``) and its nodes (``sinfo``)."""

    name: str
    nodes: list[Node]
    state: str = "UP"
    max_time_min: int | None = None
    max_cpus_per_node: int | None = None
    max_mem_per_node_mb: int | None = None
    fields: dict[str, str] = field(default_factory=dict)

    def offers(self) -> str:
        """What the partition's largest node has, in the words a refusal uses."""
        if not self.nodes:
            return f"partition {self.name} has no nodes"
        return (f"partition {self.name}: {len(self.nodes)} node(s), the largest with "
                f"{self.cpus_max} CPUs, {self.mem_gb_max} GB, {self.gpus_max} GPUs")

    @property
    def cpus_max(self) -> int:
        most = max((n.cpus for n in self.nodes), default=0)
        return min(most, self.max_cpus_per_node) if self.max_cpus_per_node else most

    @property
    def mem_gb_max(self) -> int:
        most = max((n.mem_mb for n in self.nodes), default=0)
        if self.max_mem_per_node_mb:
            most = min(most, self.max_mem_per_node_mb)
        return most // 1024

    @property
    def gpus_max(self) -> int:
        return max((n.gpus for n in self.nodes), default=0)


def parse_fields(line: str) -> dict[str, str]:
    """``Key=Value`` pairs of one ``scontrol show ... -o`` line (values may hold ``=``)."""
    found = {}
    for match in re.finditer(r"(\w+)=(\S*)", line):
        found.setdefault(match.group(1), match.group(2))
    return found


def gres_gpus(gres: str) -> int:
    """GPUs per node in a sinfo ``%G`` string such as ``gpu:a100:4(S:0-1),gpu:2`` or ``(null)``."""
    return sum(int(n) for n in _GPU_GRES.findall(gres))


def _minutes(limit: str) -> int | None:
    """A SLURM time limit (``[days-]hours:minutes:seconds``, ``minutes``) in minutes."""
    if limit in ("", "UNLIMITED", "NONE", "INFINITE"):
        return None
    days, _, rest = limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 1:
        hours, minutes, seconds = 0, parts[0], 0
    elif len(parts) == 2:
        hours, minutes, seconds = 0, parts[0], parts[1]
    else:
        hours, minutes, seconds = parts[-3:]
    return (int(days or 0) * 24 + hours) * 60 + minutes + (1 if seconds else 0)


def _limit(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() and int(value) > 0 else None


def read_partition(name: str | None) -> Partition:
    """The partition a job without ``--partition`` gets (the default) or the one named."""
    res = _run(["scontrol", "show", "partition", "-o", *([name] if name else [])])
    if res.returncode != 0 or not res.stdout.strip():
        message = first_error_line(res.stderr or res.stdout)
        if name and "not found" in message.lower():
            known = [parse_fields(line).get("PartitionName", "?")
                     for line in ask(["scontrol", "show", "partition", "-o"]).splitlines()]
            raise ConfigError("hydra.launcher.partition", name,
                              "a partition of this cluster: " + ", ".join(known))
        raise ClusterError(f"SLURM does not answer: `scontrol show partition` says: {message}")
    rows = [parse_fields(line) for line in res.stdout.splitlines() if line.strip()]
    if name is None:
        defaults = [r for r in rows if r.get("Default") == "YES"] or (rows if len(rows) == 1
                                                                        else [])
        if not defaults:
            raise ConfigError("hydra.launcher.partition", None, "a partition name: this cluster "
                              "has no default partition (" + ", ".join(
                                  r.get("PartitionName", "?") for r in rows) + ")")
        rows = defaults[:1]
    row = rows[0]
    part_name = row.get("PartitionName", name or "")
    nodes = []
    for line in ask(["sinfo", "-h", "-N", "-p", part_name, "-o", "%n|%c|%m|%G|%T"]).splitlines():
        parts = line.strip().split("|")
        if len(parts) != 5 or any(n.name == parts[0] for n in nodes):
            continue
        cpus = int(re.sub(r"\D", "", parts[1]) or 0)
        mem = int(re.sub(r"\D", "", parts[2]) or 0)
        nodes.append(Node(parts[0], cpus, mem, gres_gpus(parts[3]), parts[4]))
    mem_node = _limit(row.get("MaxMemPerNode"))
    return Partition(name=part_name, nodes=nodes, state=row.get("State", "UP"),
                     max_time_min=_minutes(row.get("MaxTime", "")),
                     max_cpus_per_node=_limit(row.get("MaxCPUsPerNode")),
                     max_mem_per_node_mb=mem_node, fields=row)


def _fits(node: Node, cpus: int, mem_gb: int, gpus: int, limits: Partition) -> bool:
    cpu_cap = min(node.cpus, limits.max_cpus_per_node or node.cpus)
    mem_cap = min(node.mem_mb, limits.max_mem_per_node_mb or node.mem_mb)
    return cpus <= cpu_cap and mem_gb * 1024 <= mem_cap and gpus <= node.gpus


def resolve_resources(asked: Mapping[str, Any], defaults: Mapping[str, int],
                      partition: Partition) -> dict[str, int | None]:
    """Fill ``auto`` resources from the partition; refuse what no node can ever give.

    ``auto`` asks a GPU per task (tasks_per_node) where the partition's nodes have GPUs (else
    none), and the default CPUs and memory, trimmed to what one node has. Values the user set
    are kept as they are.
    """
    def number(key: str) -> int | None:
        value = asked.get(key)
        if value is None or value == AUTO:
            return None if value is None else -1
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"hydra.launcher.{key}", value, f"{AUTO}, null or an integer >= 0")
        return value

    cpus, gpus, mem = number("cpus_per_task"), number("gpus_per_node"), number("mem_gb")
    tasks = int(asked.get("tasks_per_node") or 1)
    nodes = int(asked.get("nodes") or 1)
    where = f"({partition.offers()})"
    if not partition.nodes:
        raise ClusterError(f"{partition.offers()}: nothing can run there")
    if nodes > len(partition.nodes):
        raise ConfigError("hydra.launcher.nodes", nodes, f"at most {len(partition.nodes)} "
                          f"{where}")
    if gpus is not None and gpus > partition.gpus_max:
        raise ConfigError("hydra.launcher.gpus_per_node", gpus, f"at most {partition.gpus_max} "
                          f"{where}")
    if cpus is not None and cpus > 0 and cpus * tasks > partition.cpus_max:
        raise ConfigError("hydra.launcher.cpus_per_task", cpus,
                          f"at most {partition.cpus_max // tasks} with {tasks} task(s) per node "
                          f"{where}")
    if mem is not None and mem > partition.mem_gb_max:
        raise ConfigError("hydra.launcher.mem_gb", mem, f"at most {partition.mem_gb_max} {where}")
    if gpus == -1:
        gpus = min(tasks, partition.gpus_max) if partition.gpus_max > 0 else None
    if gpus and tasks > gpus:
        raise ConfigError("hydra.launcher.tasks_per_node", tasks,
                          f"at most gpus_per_node={gpus} (each rank binds one GPU of its node)")
    candidates = [n for n in partition.nodes if n.gpus >= (gpus or 0)]
    if cpus == -1:
        most = max(min(n.cpus, partition.max_cpus_per_node or n.cpus) for n in candidates)
        cpus = max(1, min(defaults["cpus_per_task"], most // tasks))
    if mem == -1:
        fitting = [n for n in candidates if _fits(n, (cpus or 1) * tasks, 0, gpus or 0, partition)]
        most = max((min(n.mem_mb, partition.max_mem_per_node_mb or n.mem_mb) for n in fitting),
                   default=0) // 1024
        mem = max(1, min(defaults["mem_gb"], most)) if most else None
    if not any(_fits(n, (cpus or 1) * tasks, mem or 0, gpus or 0, partition)
               for n in partition.nodes):
        raise ConfigError("hydra.launcher.cpus_per_task/gpus_per_node/mem_gb",
                          f"{cpus}/{gpus}/{mem}", f"a combination one node can give {where}")
    return {"cpus_per_task": cpus, "gpus_per_node": gpus, "mem_gb": mem}


def check_time(timeout_min: int, partition: Partition) -> None:
    """A time limit beyond the partition's MaxTime is refused by SLURM or pends forever."""
    if partition.max_time_min is not None and timeout_min > partition.max_time_min:
        raise ConfigError("hydra.launcher.timeout_min", timeout_min,
                          f"at most {partition.max_time_min} (partition {partition.name}'s "
                          f"MaxTime={partition.fields.get('MaxTime')})")


def _allowed(partition: Partition, key: str, value: str) -> bool:
    allowed = partition.fields.get(key, "ALL")
    return allowed == "ALL" or value in allowed.split(",")


def check_account_qos(account: str | None, qos: str | None, partition: Partition) -> None:
    """An account or QoS the accounting database does not know, or the partition refuses."""
    for key, value, allow, entity, column in (
            ("account", account, "AllowAccounts", "account", "account"),
            ("qos", qos, "AllowQos", "qos", "name")):
        if not value:
            continue
        if not _allowed(partition, allow, value):
            raise ConfigError(f"hydra.launcher.{key}", value,
                              f"one of partition {partition.name}'s "
                              f"{allow}={partition.fields.get(allow)}")
        if shutil.which("sacctmgr") is None:
            continue
        res = _run(["sacctmgr", "-n", "-P", "show", entity, f"format={column}"], timeout=15)
        if res.returncode != 0:
            continue
        known = sorted({line.strip() for line in res.stdout.splitlines() if line.strip()})
        if known and value not in known:
            raise ConfigError(f"hydra.launcher.{key}", value,
                              f"one this cluster knows: {', '.join(known)}")


def never_clears(reason: str, partition: Partition | None = None) -> bool:
    """A pending reason that waiting will not fix (the request or the partition must change)."""
    head = reason.split(",")[0].strip()
    if head in NEVER_CLEARS or PER_JOB_LIMIT.match(head):
        return True
    if head == "ReqNodeNotAvail" and partition is not None:
        return not any(n.usable for n in partition.nodes)
    return False


@dataclass
class JobState:
    """One array task as squeue/sacct see it."""

    job_id: str
    state: str
    reason: str = ""

    @property
    def kind(self) -> str:
        """``pending``, ``running``, ``done``, ``failed`` or ``interrupted`` (submitit's view)."""
        state = self.state.split()[0] if self.state else ""
        if state in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD",
                     "SUSPENDED"):
            return "pending"
        if state == "COMPLETED":
            return "done"
        if state in ("FAILED", "OUT_OF_MEMORY", "BOOT_FAIL"):
            return "failed"
        if state in FINISHED_STATES:
            return "interrupted"
        return "running"

    @property
    def finished(self) -> bool:
        return (self.state.split()[0] if self.state else "") in FINISHED_STATES


def _array_ids(job_ids: Iterable[str]) -> list[str]:
    return sorted({j.split("_")[0] for j in job_ids})


def queue_states(job_ids: Iterable[str]) -> dict[str, JobState]:
    """Every listed array task's state: one squeue call, one sacct call for those it lacks."""
    wanted = list(job_ids)
    if not wanted:
        return {}
    arrays = ",".join(_array_ids(wanted))
    states: dict[str, JobState] = {}
    res = _run(["squeue", "-h", "-r", "-j", arrays, "-o", "%i|%T|%r"], timeout=30)
    if res.returncode == 0:
        for line in res.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3 and parts[0] in wanted:
                states[parts[0]] = JobState(parts[0], parts[1],
                                            "" if parts[2] == "None" else parts[2])
    if len(states) < len(wanted):
        res = _run(["sacct", "-n", "-P", "-X", "-j", arrays, "-o", "JobID,State"], timeout=30)
        if res.returncode == 0:
            for line in res.stdout.splitlines():
                parts = line.strip().split("|")
                if len(parts) == 2 and parts[0] in wanted and parts[0] not in states:
                    states[parts[0]] = JobState(parts[0], parts[1])
    return states


def cancel(job_ids: Iterable[str]) -> None:
    """scancel the sweep's arrays (one call)."""
    arrays = _array_ids(job_ids)
    if arrays:
        _run(["scancel", *arrays], timeout=30)
