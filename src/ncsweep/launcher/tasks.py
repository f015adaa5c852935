"""Inside a task: its runs one after another (or in lanes), each with its own job runtime."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict

from ncsweep import distributed
from ncsweep.launcher.compose import composer
from ncsweep.launcher.plan import Job, Unit, job_folders, plan_units
from ncsweep.stopping import STOP_SIGNALS, hand_on
from ncsweep.tracking import RunFolder

log = logging.getLogger(__name__)


def launch_basic(plugin: Any, job_overrides: Sequence[Sequence[str]],
                 initial_job_idx: int) -> list[JobReturn]:
    """Hydra's basic launcher, one job after another here, with ensembles grouped."""
    setup_globals()
    config = plugin.config
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    log.info("Launching %d jobs locally", len(job_overrides))
    folders = job_folders(config, job_overrides, initial_job_idx)
    launched = time.time()
    returns: list[JobReturn] = []
    for unit in plan_units(config, job_overrides, initial_job_idx, folders):
        returns += run_unit(plugin.hydra_context, plugin.task_function, config, unit,
                            "hydra.sweep.dir", launched)
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    return returns


def _done_here(run: Job, launched: float) -> JobReturn | None:
    """A run this sweep already finished (before its task was requeued): its result, kept."""
    folder = RunFolder(run.folder)
    last = folder.last_attempt()
    if last is None or last["time"] < launched or last["outcome"] == "interrupted":
        return None
    return JobReturn(overrides=list(run.overrides), status=JobStatus.COMPLETED,
                     _return_value={"status": last["outcome"], "dir": run.folder})


def run_unit(hydra_context: Any, task_function: Callable, config: DictConfig, unit: Unit,
             job_dir_key: str, launched: float, job_id: str | None = None,
             launcher: dict[str, Any] | None = None) -> list[JobReturn]:
    """Run one unit in this process, each run with its own Hydra job runtime; one return each.

    A run that this sweep already ended (done, skipped, failed) is not run again; several
    runs (an ensemble) are admitted one by one and then trained together.
    """
    kept = {run.num: _done_here(run, launched) for run in unit}
    todo = [run for run in unit if kept[run.num] is None]
    ensemble = len(todo) > 1
    returns: dict[int, JobReturn] = {}
    compose = composer(hydra_context.config_loader, config)
    if ensemble:
        from ncsweep.ensemble import prepare

        task_function = prepare
    for run in todo:
        sweep_config = compose.load(run.overrides)
        with open_dict(sweep_config.hydra):
            sweep_config.hydra.job.id = run.num if job_id is None else job_id
            sweep_config.hydra.job.num = run.num
            for key, value in (launcher or {}).items():
                sweep_config.hydra.launcher[key] = value
            if not distributed.is_writer():  # rank 0 alone writes the run folder
                sweep_config.hydra.output_subdir = None
                sweep_config.hydra.job_logging = _console_only(sweep_config.hydra.job_logging)
        returns[run.num] = run_job(hydra_context=hydra_context, task_function=task_function,
                                   config=sweep_config, job_dir_key=job_dir_key,
                                   job_subdir_key="hydra.sweep.subdir")
    if ensemble:
        from ncsweep.ensemble import Member, run_group

        members = [(run.num, returns[run.num]) for run in todo
                   if returns[run.num].status == JobStatus.COMPLETED
                   and isinstance(returns[run.num].return_value, Member)]
        statuses = run_group([ret.return_value for _, ret in members])
        for (_, ret), status in zip(members, statuses, strict=True):
            ret.return_value = status
    return [kept[run.num] or returns[run.num] for run in unit]


def _console_only(logging_config: Any) -> dict:
    """Hydra's job logging without its file handlers (the run's log file is rank 0's)."""
    plain = OmegaConf.to_container(logging_config) or {"version": 1}
    files = {name for name, handler in plain.get("handlers", {}).items()
             if "filename" in handler}
    plain["handlers"] = {k: v for k, v in plain.get("handlers", {}).items() if k not in files}
    root = plain.setdefault("root", {})
    root["handlers"] = [h for h in root.get("handlers", []) if h not in files]
    return plain


def run_in_job(plugin: Any, units: Sequence[Unit], job_dir_key: str,
               singleton_state: dict[type, Singleton], launched: float) -> list[JobReturn]:
    """On the node: the task's runs, each with its own config and the resources the preflight
    chose, one after another or ``runs_in_parallel`` at a time in forked lanes."""
    import submitit

    Singleton.set_state(singleton_state)
    setup_globals()
    job_id = submitit.JobEnvironment().job_id
    resources = dict(plugin.resolved or {})
    lanes = min(int(plugin.params.get("runs_in_parallel") or 1), len(units))
    if lanes <= 1:
        joined = distributed.join_from_submitit(float(plugin.params.get("rank_timeout_s", 600)))
        returns = [ret for unit in units for ret in run_unit(
            plugin.hydra_context, plugin.task_function, plugin.config, unit, job_dir_key,
            launched, job_id, resources)]
        if joined:
            distributed.leave()
        return returns
    cpus = resources.get("cpus_per_task", plugin.params.get("cpus_per_task"))
    if isinstance(cpus, int) and not isinstance(cpus, bool):
        resources["cpus_per_task"] = max(1, cpus // lanes)
    shares = [list(units[i::lanes]) for i in range(lanes)]
    by_num = _run_lanes(plugin, shares, job_dir_key, launched, job_id, resources)
    return [by_num[run.num] for unit in units for run in unit]


def _run_lanes(plugin: Any, shares: list[list[Unit]], job_dir_key: str, launched: float,
               job_id: str, resources: dict[str, Any]) -> dict[int, JobReturn]:
    """Each share in a forked process sharing the task's devices; a stop signal reaches every
    lane (each checkpoints its running run), then the task is requeued as a sequential one."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    scratch = Path(tempfile.mkdtemp(prefix="ncsweep-lanes-"))
    received: list[int] = []
    children: list[Any] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        for child in children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signum)

    previous = {signum: signal.signal(signum, forward) for signum in STOP_SIGNALS}
    try:
        for index, share in enumerate(shares):
            child = context.Process(target=_lane, args=(plugin, share, job_dir_key, launched,
                                                        job_id, resources,
                                                        scratch / f"{index}.pkl"))
            child.start()
            children.append(child)
        for child in children:
            child.join()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        shutil.rmtree(scratch, ignore_errors=True)
        hand_on(received[0], previous.get(received[0]))
    returns: dict[int, JobReturn] = {}
    for index, (share, child) in enumerate(zip(shares, children, strict=True)):
        path = scratch / f"{index}.pkl"
        lost = RuntimeError(f"lane {index} of the task exited with code {child.exitcode}")
        results = pickle.loads(path.read_bytes()) if path.exists() else None
        for position, run in enumerate(run for unit in share for run in unit):
            returns[run.num] = results[position] if results is not None else JobReturn(
                overrides=list(run.overrides), status=JobStatus.FAILED, _return_value=lost)
    shutil.rmtree(scratch, ignore_errors=True)
    return returns


def _lane(plugin: Any, share: list[Unit], job_dir_key: str, launched: float, job_id: str,
          resources: dict[str, Any], result_file: Path) -> None:
    """A forked lane: its runs one after another; a stop signal ends it after the checkpoint."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    returns = [ret for unit in share for ret in run_unit(
        plugin.hydra_context, plugin.task_function, plugin.config, unit, job_dir_key, launched,
        job_id, resources)]
    slim = [JobReturn(overrides=ret.overrides, status=ret.status, hydra_cfg=ret.hydra_cfg,
                      _return_value=ret._return_value) for ret in returns]
    result_file.write_bytes(pickle.dumps(slim))
