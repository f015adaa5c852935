"""Inside a task: its runs one after another (or in lanes), each with its own job runtime."""

from __future__ import annotations

import functools
import logging
import os
import pickle
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job, setup_globals
from omegaconf import OmegaConf, open_dict

from ncsweep import distributed
from ncsweep.launcher.compose import composer
from ncsweep.launcher.hydra_compat import job_return, raw_return
from ncsweep.launcher.plan import Job, Unit, job_folders, plan_units
from ncsweep.launcher.spec import Sweep, TaskSpec
from ncsweep.stopping import STOP_SIGNALS, hand_on
from ncsweep.tracking import RunFolder

log = logging.getLogger(__name__)


def launch_basic(sweep: Sweep, job_overrides: Sequence[Sequence[str]],
                 initial_job_idx: int) -> list[JobReturn]:
    """Hydra's basic launcher, one job after another here, with ensembles grouped."""
    setup_globals()
    config = sweep.config
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    log.info("Launching %d jobs locally", len(job_overrides))
    folders = job_folders(config, job_overrides, initial_job_idx)
    spec = TaskSpec(sweep.hydra_context, sweep.task_function, config, launched=time.time())
    returns: list[JobReturn] = []
    for unit in plan_units(config, job_overrides, initial_job_idx, folders):
        returns += run_unit(spec, unit)
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    return returns


@dataclass(frozen=True)
class Task:
    """The callable submitit pickles for each task: its runs under the spec, requeued as is."""

    spec: TaskSpec

    def __call__(self, units: Sequence[Unit]) -> list[JobReturn]:
        return run_in_job(self.spec, units)

    @functools.cached_property
    def pickled_spec(self) -> bytes:
        """The spec pickled once: submitit pickles the task once per array task (10,000)."""
        import cloudpickle

        return cloudpickle.dumps(self.spec)

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        """Pickle as the spec's bytes, computed once however often the task is pickled."""
        return task_from_bytes, (self.pickled_spec,)

    def checkpoint(self, units: Sequence[Unit]) -> Any:
        """submitit's requeue on preemption or timeout: the same task again (runs resume)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, units)


def task_from_bytes(spec: bytes) -> Task:
    """The task a pickle holds (see ``Task.__reduce__``)."""
    return Task(pickle.loads(spec))


def _done_here(run: Job, launched: float) -> JobReturn | None:
    """A run this sweep already finished (before its task was requeued): its result, kept."""
    folder = RunFolder(run.folder)
    last = folder.last_attempt()
    if last is None or last["time"] < launched or last["outcome"] == "interrupted":
        return None
    return job_return(run.overrides, {"status": last["outcome"], "dir": run.folder})


def run_unit(spec: TaskSpec, unit: Unit, job_id: str | None = None) -> list[JobReturn]:
    """Run one unit in this process, each run with its own Hydra job runtime; one return each.

    A run that this sweep already ended (done, skipped, failed) is not run again; several
    runs (an ensemble) are admitted one by one and then trained together.
    """
    kept = {run.num: _done_here(run, spec.launched) for run in unit}
    todo = [run for run in unit if kept[run.num] is None]
    ensemble = len(todo) > 1
    returns: dict[int, JobReturn] = {}
    compose = composer(spec.hydra_context.config_loader, spec.config)
    task_function = spec.task_function
    if ensemble:
        from ncsweep.ensemble import prepare

        task_function = prepare
    for run in todo:
        sweep_config = compose.load(run.overrides)
        with open_dict(sweep_config.hydra):
            sweep_config.hydra.job.id = run.num if job_id is None else job_id
            sweep_config.hydra.job.num = run.num
            for key, value in spec.resources.items():
                sweep_config.hydra.launcher[key] = value
            if not distributed.is_writer():  # rank 0 alone writes the run folder
                sweep_config.hydra.output_subdir = None
                sweep_config.hydra.job_logging = _console_only(sweep_config.hydra.job_logging)
        returns[run.num] = run_job(hydra_context=spec.hydra_context, task_function=task_function,
                                   config=sweep_config, job_dir_key=spec.job_dir_key,
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


def run_in_job(spec: TaskSpec, units: Sequence[Unit]) -> list[JobReturn]:
    """On the node: the task's runs, each with its own config and the resources the preflight
    chose, one after another or ``runs_in_parallel`` at a time in forked lanes."""
    import submitit

    Singleton.set_state(spec.singleton_state)
    setup_globals()
    job_id = submitit.JobEnvironment().job_id
    lanes = min(spec.runs_in_parallel, len(units))
    if lanes <= 1:
        joined = distributed.join_from_submitit(spec.rank_timeout_s)
        returns = [ret for unit in units for ret in run_unit(spec, unit, job_id)]
        if joined:
            distributed.leave()
        return returns
    if spec.cpus_per_task is not None:
        spec = replace(spec, resources={**spec.resources,
                                        "cpus_per_task": max(1, spec.cpus_per_task // lanes)})
    shares = [list(units[i::lanes]) for i in range(lanes)]
    by_num = _run_lanes(spec, shares, job_id)
    return [by_num[run.num] for unit in units for run in unit]


def _run_lanes(spec: TaskSpec, shares: list[list[Unit]], job_id: str) -> dict[int, JobReturn]:
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
            child = context.Process(target=_lane,
                                    args=(spec, share, job_id, scratch / f"{index}.pkl"))
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
            returns[run.num] = results[position] if results is not None else job_return(
                run.overrides, lost, JobStatus.FAILED)
    shutil.rmtree(scratch, ignore_errors=True)
    return returns


def _lane(spec: TaskSpec, share: list[Unit], job_id: str, result_file: Path) -> None:
    """A forked lane: its runs one after another; a stop signal ends it after the checkpoint."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    returns = [ret for unit in share for ret in run_unit(spec, unit, job_id)]
    slim = [job_return(ret.overrides, raw_return(ret), ret.status, ret.hydra_cfg)
            for ret in returns]
    result_file.write_bytes(pickle.dumps(slim))
