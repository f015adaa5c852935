"""Submitting a sweep: preflight, one submission, the record of what was submitted."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn
from omegaconf import OmegaConf

from ncsweep import cluster
from ncsweep.config import ConfigError
from ncsweep.console import setup_logging
from ncsweep.launcher.hydra_compat import job_return
from ncsweep.launcher.limits import describe, fit, read_limits, split
from ncsweep.launcher.plan import (
    AUTO_DEFAULTS,
    JOBS_FILE,
    PACKING_KEYS,
    RANK_KEYS,
    WATCH_KEYS,
    Unit,
    job_folders,
    pack,
    packing,
    plan_units,
    ranks,
    status_command,
)
from ncsweep.launcher.rerun import reserve, settle
from ncsweep.launcher.spec import Sweep, TaskSpec
from ncsweep.launcher.tasks import Task
from ncsweep.launcher.watch import Watcher, collect

log = logging.getLogger(__name__)


def _fail(err: BaseException) -> SystemExit:
    log.error("error: %s", err)
    return SystemExit(2)


def preflight(params: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Fill ``auto`` resources and the partition; refuse what can never run; what to say of
    each job."""

    if shutil.which("sbatch") is None:
        raise cluster.ClusterError("sbatch is not on PATH: launcher=slurm needs a SLURM client "
                                   "(on a machine without SLURM use launcher=local)")
    partition = cluster.read_partition(params.get("partition"))
    cluster.check_account_qos(params.get("account"), params.get("qos"), partition)
    cluster.check_time(int(params.get("timeout_min") or 0), partition)
    asked = {k: params.get(k) for k in (*cluster.RESOURCE_KEYS, "tasks_per_node", "nodes")}
    resolved: dict[str, Any] = cluster.resolve_resources(asked, AUTO_DEFAULTS, partition)
    autos = [k for k in cluster.RESOURCE_KEYS if params.get(k) == cluster.AUTO]
    gpus = resolved["gpus_per_node"]
    line = (f"on partition {partition.name}, each "
            f"{resolved['cpus_per_task'] or 'default'} CPU(s), "
            f"{resolved['mem_gb'] if resolved['mem_gb'] else 'default'} GB, "
            f"{gpus or 'no'} GPU(s), {params.get('timeout_min')} min"
            + (f" (auto: {', '.join(autos)})" if autos else ""))
    return {**resolved, "partition": partition.name}, line


def _executor(kind: str, params: dict[str, Any]) -> Any:
    """submitit's executor with the launcher's parameters, mapped as the upstream launcher maps."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    init = {"folder": params["submitit_folder"]}
    if "max_num_timeout" in params:
        init[f"{kind}_max_num_timeout"] = params["max_num_timeout"]
    executor = submitit.AutoExecutor(cluster=kind, **init)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{
        k if k in base else f"{kind}_{k}": v for k, v in params.items()
        if k not in ("submitit_folder", "max_num_timeout")})
    return executor


def _record(sweep_dir: Path, jobs: Sequence[Any], tasks: Sequence[list[Unit]],
            kind: str) -> None:
    """Append this launch's job ids and run folders to the sweep's job list (for status)."""
    now = time.time()
    with open(sweep_dir / JOBS_FILE, "a") as handle:
        for job, task in zip(jobs, tasks, strict=True):
            for run in (run for unit in task for run in unit):
                handle.write(json.dumps({"job_id": str(job.job_id),
                                         "folder": Path(run.folder).name,
                                         "launcher": kind, "submitted": now}) + "\n")


def _array_summary(jobs: Sequence[Any]) -> str:
    ids = [str(j.job_id) for j in jobs]
    arrays = sorted({i.split("_")[0] for i in ids})
    return f"{len(ids)} job(s): {ids[0]}" + (f" .. {ids[-1]}" if len(ids) > 1 else "") + (
        f" (array {arrays[0]})" if len(arrays) == 1 and "_" in ids[0] else "")


def launch(sweep: Sweep, job_overrides: Sequence[Sequence[str]],
           initial_job_idx: int) -> list[JobReturn]:
    """Submit every job of the batch once, watch them, and hand Hydra one result per job."""
    setup_logging()
    kind = sweep.kind
    config = sweep.config
    params = dict(sweep.params)
    watch = {k: params.pop(k) for k in WATCH_KEYS if k in params}
    sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
    started = time.time()
    folders = job_folders(config, job_overrides, initial_job_idx)
    try:
        per_task, parallel = packing({k: params.pop(k, 1) for k in PACKING_KEYS})
        units = plan_units(config, job_overrides, initial_job_idx, folders)
        rank_params = {k: params.pop(k) for k in RANK_KEYS if k in params}
        world = ranks({**params, **rank_params}, kind, parallel, units)
        settled = settle(config, job_overrides, units)
        units = [unit for unit in units if settled.keeps(unit)]
        runs = sum(len(unit) for unit in units)
        if settled:
            log.info("%s", settled.line(kind, runs))
        if not units:
            return _in_order(settled.returns())
        tasks = pack(units, per_task)
        resolved: dict[str, Any] = {}
        sizes = [len(tasks)]
        if kind == "slurm":
            resolved, each = preflight(params)
            params.update(resolved)
            scheduler = read_limits(params.get("qos"), params.get("account"))
            asked, per_task = per_task, fit(units, per_task, scheduler)
            tasks = pack(units, per_task)
            sizes = split(len(tasks), scheduler)
            how = describe(asked, per_task, sizes, scheduler)
            line = f"slurm: {len(tasks)} job(s) {each}" + (f"; {how}" if how else "")
        else:
            line = (f"local: {len(tasks)} job(s) as subprocesses of this one, each "
                    f"{params.get('cpus_per_task') or 1} CPU(s), {params.get('timeout_min')} min")
        if world > 1:
            line += f"; each run on {world} ranks"

        executor = _executor(kind, params)
    except (ConfigError, cluster.ClusterError) as err:
        raise _fail(err) from None
    if len(tasks) < runs:
        line += (f"; {runs} runs, up to {per_task} a job"
                 + (f", {parallel} at once" if parallel > 1 else ""))
    log.info("%s", line)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in config.hydra.sweep:
        os.chmod(sweep_dir, mode=int(str(config.hydra.sweep.mode), 8))
    cpus = params.get("cpus_per_task")
    spec = TaskSpec(sweep.hydra_context, sweep.task_function, config, launched=started,
                    singleton_state=Singleton.get_state(), resources=resolved,
                    cpus_per_task=cpus if isinstance(cpus, int) and not isinstance(cpus, bool)
                    else None, runs_in_parallel=parallel,
                    rank_timeout_s=float(rank_params.get("rank_timeout_s", 600)))
    jobs = _submit(executor, Task(spec), tasks, sizes, kind)
    keep = watch.get("leave_running_on_interrupt", False)
    watcher = Watcher(kind, jobs, poll_s=float(watch.get("poll_s", 10.0)),
                      log_every_s=float(watch.get("log_every_s", 60.0)),
                      partition=params.get("partition"))
    try:
        _record(sweep_dir, jobs, tasks, kind)
        if watch.get("detach"):
            log.info("%s: submitted %s, detached; `%s` shows their state, re-running the same "
                     "command skips, resumes or retries them", kind, _array_summary(jobs),
                     status_command(sweep_dir))
            return _in_order({**settled.returns(), **{
                run.num: job_return(run.overrides, {"status": "submitted", "dir": run.folder})
                for task in tasks for unit in task for run in unit}})
        log.info("%s: submitted %s; Ctrl-C %s", kind, _array_summary(jobs),
                 "leaves them running" if keep else
                 "cancels them (hydra.launcher.leave_running_on_interrupt=true leaves them "
                 "running)")
        states = watcher.run()
    except KeyboardInterrupt:
        watcher.progress.clear()
        open_jobs = [j for j in jobs if not watcher.finished(j)]
        if keep:
            log.warning("interrupted: leaving %d job(s) running; `%s` shows them",
                        len(open_jobs), status_command(sweep_dir))
        else:
            log.warning("interrupted: cancelling the sweep's %d unfinished job(s)",
                        len(open_jobs))
            watcher.cancel(open_jobs)
        raise SystemExit(130) from None
    nums = sorted(run.num for task in tasks for unit in task for run in unit)
    ended = dict(zip(nums, collect(jobs, tasks, states, started), strict=True))
    return _in_order({**settled.returns(), **ended})


def _in_order(results: dict[int, JobReturn]) -> list[JobReturn]:
    """Hydra's one result per job, in job order."""
    return [results[num] for num in sorted(results)]


def _submit(executor: Any, task: Task, tasks: list[list[Unit]], sizes: Sequence[int],
            kind: str) -> list[Any]:
    """One array per size (within MaxArraySize); each submitted run's folder marked queued.

    sbatch's refusal becomes one line, exit 2, with the arrays already submitted cancelled."""
    from submitit.core.utils import FailedJobError

    jobs: list[Any] = []
    start = 0
    for size in sizes:
        chunk = tasks[start:start + size]
        captured = io.StringIO()
        try:
            with contextlib.redirect_stderr(captured):
                submitted = executor.map_array(task, chunk)
        except (FailedJobError, OSError) as err:
            if jobs:
                cluster.cancel(str(job.job_id) for job in jobs)
            if isinstance(err, OSError):
                raise _fail(cluster.ClusterError(f"the sweep could not be submitted: {err}")
                            ) from None
            message = cluster.first_error_line(str(err) or captured.getvalue())
            raise _fail(cluster.ClusterError(f"sbatch refused the sweep: {message}")) from None
        if kind == "slurm":
            reserve(submitted, chunk)
        jobs.extend(submitted)
        start += size
    return jobs
