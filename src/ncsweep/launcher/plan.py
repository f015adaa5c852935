"""Planning a sweep: its run folders, ensemble groups, and runs packed into tasks."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, OmegaConf, open_dict

from ncsweep.config import RUN_KEY_SUBDIR, ConfigError, run_key
from ncsweep.launcher.hydra_compat import overrides_dirname
from ncsweep.launcher.overrides import parse

log = logging.getLogger(__name__)


JOBS_FILE = ".ncsweep-jobs.jsonl"
WATCH_KEYS = ("detach", "leave_running_on_interrupt", "poll_s", "log_every_s")
PACKING_KEYS = ("runs_per_task", "runs_in_parallel")
RANK_KEYS = ("rank_timeout_s",)
AUTO_DEFAULTS = {"cpus_per_task": 4, "gpus_per_node": 1, "mem_gb": 32}
REASONS = {
    "PartitionConfig": "the request exceeds what partition {p} allows",
    "PartitionDown": "partition {p} is DOWN",
    "PartitionInactive": "partition {p} is INACTIVE",
    "PartitionTimeLimit": "the time limit exceeds partition {p}'s MaxTime",
    "PartitionNodeLimit": "the node count is outside partition {p}'s limits",
    "ReqNodeNotAvail": "no node of partition {p} is up",
    "InvalidAccount": "the account is unknown or not allowed here",
    "InvalidQOS": "the QoS is unknown or not allowed here",
}


def status_command(sweep_dir: Path) -> str:
    return f"python -m ncsweep.status {sweep_dir}"


def job_folders(config: DictConfig, job_overrides: Sequence[Sequence[str]],
                initial_job_idx: int) -> list[Path]:
    """Each job's run folder, resolved as Hydra will resolve it in the job: conf/'s subdir
    (``RUN_KEY_SUBDIR``) as the run key itself, any other through OmegaConf's interpolation
    (about 1 ms a job, 10 s at 10,000 runs, where the run key takes microseconds)."""
    sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
    naming = config.hydra.job.config.override_dirname
    dirnames = [overrides_dirname([o for o in parse(overrides) if not o.is_hydra_override()],
                                  naming) for overrides in job_overrides]
    if OmegaConf.to_container(config.hydra.sweep).get("subdir") == RUN_KEY_SUBDIR:
        return [sweep_dir / run_key(name) for name in dirnames]
    scratch = copy.deepcopy(config)
    folders = []
    with open_dict(scratch):
        for idx, name in enumerate(dirnames):
            scratch.hydra.job.override_dirname = name
            scratch.hydra.job.num = initial_job_idx + idx
            folders.append(sweep_dir / str(OmegaConf.select(scratch, "hydra.sweep.subdir")))
    return folders


@dataclass(frozen=True)
class Job:
    """One run of the sweep: its overrides, Hydra job number and run folder."""

    overrides: tuple[str, ...]
    num: int
    folder: str


Unit = list[Job]  # one run, or the members of an ensemble (jobs differing only in seed)


def ensemble_on(config: DictConfig, overrides: Sequence[Override]) -> bool:
    """Whether a job asks ``trainer.ensemble``: its own override, else the sweep's config."""
    for override in overrides:
        if override.key_or_group == "trainer.ensemble":
            return not override.is_delete() and override.value() is True
    return bool(OmegaConf.select(config, "trainer.ensemble", default=False))


def plan_units(config: DictConfig, job_overrides: Sequence[Sequence[str]], initial_job_idx: int,
               folders: Sequence[Path]) -> list[Unit]:
    """The sweep's jobs as units: under trainer.ensemble, jobs differing only in seed are one."""
    units: list[Unit] = []
    groups: dict[tuple[str, ...], Unit] = {}
    for idx, (overrides, folder) in enumerate(zip(job_overrides, folders, strict=True)):
        job = Job(tuple(overrides), initial_job_idx + idx, str(folder))
        parsed = parse(overrides)
        if not ensemble_on(config, parsed):
            units.append([job])
            continue
        key = tuple(sorted(o.input_line for o in parsed if o.key_or_group != "seed"))
        if key in groups:
            groups[key].append(job)
        else:
            groups[key] = [job]
            units.append(groups[key])
    return units


def pack(units: Sequence[Unit], runs_per_task: int) -> list[list[Unit]]:
    """Units into tasks of at most ``runs_per_task`` runs each (an ensemble is never split)."""
    tasks: list[list[Unit]] = []
    current: list[Unit] = []
    size = 0
    for unit in units:
        if current and size + len(unit) > runs_per_task:
            tasks.append(current)
            current, size = [], 0
        current.append(unit)
        size += len(unit)
    if current:
        tasks.append(current)
    return tasks


def ranks(params: dict[str, Any], kind: str, parallel: int, units: Sequence[Unit]) -> int:
    """The ranks a task spans (tasks_per_node x nodes), refusing what cannot use them."""
    counts = []
    for key in ("tasks_per_node", "nodes"):
        value = 1 if params.get(key) is None else params[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"hydra.launcher.{key}", value, "an integer >= 1")
        counts.append(value)
    tasks, nodes = counts
    if kind == "local" and nodes > 1:
        raise ConfigError("hydra.launcher.nodes", nodes, "1 on launcher=local (one machine; "
                          "use tasks_per_node for several ranks)")
    world = tasks * nodes
    if world > 1 and parallel > 1:
        raise ConfigError("hydra.launcher.runs_in_parallel", parallel,
                          f"1 when each run spans {world} ranks (tasks_per_node x nodes)")
    if world > 1 and any(len(unit) > 1 for unit in units):
        raise ConfigError("trainer.ensemble", True, f"false when each run spans {world} ranks "
                          "(an ensemble trains its seeds on one device)")
    timeout = params.get("rank_timeout_s", 600)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError("hydra.launcher.rank_timeout_s", timeout, "a number of seconds > 0")
    return world


def packing(params: dict[str, Any]) -> tuple[int, int]:
    """``runs_per_task`` and ``runs_in_parallel`` from the launcher's parameters, checked."""
    values = []
    for key in PACKING_KEYS:
        value = params.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"hydra.launcher.{key}", value, "an integer >= 1")
        values.append(value)
    return values[0], values[1]


