"""Submitting a sweep and watching it: preflight, one submission, a live line, clean endings.

Used by the ``ncsweep_slurm`` / ``ncsweep_local`` Hydra launchers. Whatever happens to a job
(done, failed, cancelled, killed), the sweep ends in ncsweep's summary line, never a traceback;
submission problems are one line and exit 2 with nothing submitted.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, run_job, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict

from ncsweep import cluster
from ncsweep.config import ConfigError
from ncsweep.console import Progress, setup_logging
from ncsweep.tracking import RunFolder

log = logging.getLogger(__name__)
JOBS_FILE = ".ncsweep-jobs.jsonl"
WATCH_KEYS = ("detach", "leave_running_on_interrupt", "poll_s", "log_every_s")
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
    """Each job's run folder, resolved as Hydra will resolve it in the job."""
    sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
    naming = config.hydra.job.config.override_dirname
    exclude = set(naming.exclude_keys)
    parser = OverridesParser.create()
    scratch = copy.deepcopy(config)
    folders = []
    with open_dict(scratch):
        for idx, overrides in enumerate(job_overrides):
            parsed = [o for o in parser.parse_overrides(list(overrides))
                      if not o.key_or_group.startswith("hydra.")
                      and o.key_or_group not in exclude]
            line = naming.item_sep.join(sorted(str(o.input_line) for o in parsed))
            scratch.hydra.job.override_dirname = line.replace("=", naming.kv_sep)
            scratch.hydra.job.num = initial_job_idx + idx
            folders.append(sweep_dir / str(OmegaConf.select(scratch, "hydra.sweep.subdir")))
    return folders


def _fail(err: BaseException) -> SystemExit:
    log.error("error: %s", err)
    return SystemExit(2)


def _preflight(params: dict[str, Any], jobs: int) -> tuple[dict[str, Any], str]:
    """Fill ``auto`` resources and the partition; refuse what can never run; the line to say."""
    import shutil

    if shutil.which("sbatch") is None:
        raise cluster.ClusterError("sbatch is not on PATH: launcher=slurm needs a SLURM client "
                                   "(on a machine without SLURM use launcher=local)")
    partition = cluster.read_partition(params.get("partition"))
    cluster.check_account_qos(params.get("account"), params.get("qos"), partition)
    cluster.check_time(int(params.get("timeout_min") or 0), partition)
    asked = {k: params.get(k) for k in (*cluster.RESOURCE_KEYS, "tasks_per_node")}
    resolved: dict[str, Any] = cluster.resolve_resources(asked, AUTO_DEFAULTS, partition)
    autos = [k for k in cluster.RESOURCE_KEYS if params.get(k) == cluster.AUTO]
    gpus = resolved["gpus_per_node"]
    line = (f"slurm: {jobs} job(s) on partition {partition.name}, each "
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


def _record(sweep_dir: Path, jobs: Sequence[Any], folders: Sequence[Path], kind: str) -> None:
    """Append this launch's job ids and run folders to the sweep's job list (for status)."""
    now = time.time()
    with open(sweep_dir / JOBS_FILE, "a") as handle:
        for job, folder in zip(jobs, folders, strict=True):
            handle.write(json.dumps({"job_id": str(job.job_id), "folder": folder.name,
                                     "launcher": kind, "submitted": now}) + "\n")


def _array_summary(jobs: Sequence[Any]) -> str:
    ids = [str(j.job_id) for j in jobs]
    arrays = sorted({i.split("_")[0] for i in ids})
    return f"{len(ids)} job(s): {ids[0]}" + (f" .. {ids[-1]}" if len(ids) > 1 else "") + (
        f" (array {arrays[0]})" if len(arrays) == 1 and "_" in ids[0] else "")


def launch(plugin: Any, job_overrides: Sequence[Sequence[str]],
           initial_job_idx: int) -> list[JobReturn]:
    """Submit every job of the batch once, watch them, and hand Hydra one result per job."""
    setup_logging()
    kind = plugin._EXECUTOR
    config = plugin.config
    params = dict(plugin.params)
    watch = {k: params.pop(k) for k in WATCH_KEYS if k in params}
    sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
    started = time.time()
    try:
        if kind == "slurm":
            resolved, line = _preflight(params, len(job_overrides))
            params.update(resolved)
            plugin.resolved = resolved
        else:
            line = (f"local: {len(job_overrides)} job(s) as subprocesses of this one, each "
                    f"{params.get('cpus_per_task') or 1} CPU(s), {params.get('timeout_min')} min")
        executor = _executor(kind, params)
    except (ConfigError, cluster.ClusterError) as err:
        raise _fail(err) from None
    log.info("%s", line)
    folders = job_folders(config, job_overrides, initial_job_idx)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in config.hydra.sweep:
        os.chmod(sweep_dir, mode=int(str(config.hydra.sweep.mode), 8))
    singleton = Singleton.get_state()
    job_params = [(list(ov), "hydra.sweep.dir", initial_job_idx + i, f"job_id_for_{i}",
                   singleton) for i, ov in enumerate(job_overrides)]
    jobs = _submit(executor, plugin, job_params)
    keep = watch.get("leave_running_on_interrupt", False)
    watcher = Watcher(kind, jobs, poll_s=float(watch.get("poll_s", 10.0)),
                      log_every_s=float(watch.get("log_every_s", 60.0)),
                      partition=params.get("partition"))
    try:
        _record(sweep_dir, jobs, folders, kind)
        if watch.get("detach"):
            log.info("%s: submitted %s, detached; `%s` shows their state, re-running the same "
                     "command skips, resumes or retries them", kind, _array_summary(jobs),
                     status_command(sweep_dir))
            return [JobReturn(overrides=list(ov), status=JobStatus.COMPLETED,
                              _return_value={"status": "submitted", "dir": str(f)})
                    for ov, f in zip(job_overrides, folders, strict=True)]
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
    return collect(jobs, job_overrides, folders, states, started)


def _submit(executor: Any, plugin: Any, job_params: list[tuple]) -> list[Any]:
    """One submission for the whole batch; sbatch's refusal becomes one line, exit 2."""
    from submitit.core.utils import FailedJobError

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return executor.map_array(plugin, *zip(*job_params, strict=True))
    except FailedJobError as err:
        message = cluster.first_error_line(str(err) or captured.getvalue())
        raise _fail(cluster.ClusterError(f"sbatch refused the sweep: {message}")) from None
    except OSError as err:
        raise _fail(cluster.ClusterError(f"the sweep could not be submitted: {err}")) from None


class Watcher:
    """Waits for a sweep's jobs: a live line on a terminal, a log line a minute otherwise."""

    def __init__(self, kind: str, jobs: Sequence[Any], poll_s: float = 10.0,
                 log_every_s: float = 60.0, partition: str | None = None) -> None:
        self.kind, self.jobs = kind, list(jobs)
        self.poll_s, self.log_every_s = max(poll_s, 0.5), max(log_every_s, 1.0)
        self.partition_name = partition
        self.states: dict[str, cluster.JobState] = {}
        self.progress = Progress()
        self.started = time.monotonic()

    def finished(self, job: Any) -> bool:
        state = self.states.get(str(job.job_id))
        return state is not None and state.finished

    def _has_result(self, job: Any) -> bool:
        return job.paths.result_pickle.exists()

    def poll(self) -> None:
        """The scheduler's view of every unfinished job: one squeue (and sacct) call in all."""
        if self.kind == "slurm":
            open_ids = [str(j.job_id) for j in self.jobs if not self.finished(j)]
            self.states.update(cluster.queue_states(open_ids))
            return
        for job in self.jobs:
            if not self.finished(job):
                state = job.state
                if state == "FINISHED":
                    state = "COMPLETED" if self._has_result(job) else "FAILED"
                elif state == "INTERRUPTED":
                    state = "CANCELLED"
                self.states[str(job.job_id)] = cluster.JobState(str(job.job_id), state)

    def counts(self) -> Counter:
        """Jobs per kind; a job squeue has not shown yet counts as pending."""
        return Counter(self.states[str(j.job_id)].kind if str(j.job_id) in self.states
                       else "pending" for j in self.jobs)

    def line(self) -> str:
        counts = self.counts()
        reasons = Counter(s.reason for s in self.states.values() if s.kind == "pending"
                          and s.reason)
        pending = f"{counts['pending']} pending"
        if reasons:
            pending += " (" + ", ".join(f"{r}" + (f" x{n}" if n > 1 else "")
                                        for r, n in reasons.most_common(3)) + ")"
        parts = [f"{counts['done']} done", f"{counts['running']} running", pending,
                 f"{counts['failed']} failed"]
        if counts["interrupted"]:
            parts.append(f"{counts['interrupted']} interrupted")
        elapsed = int(time.monotonic() - self.started)
        return f"{self.kind}: {', '.join(parts)} [{elapsed // 60}:{elapsed % 60:02d}]"

    def _check_pending(self) -> None:
        """Stop at a pending reason that never clears: say why, cancel the sweep, exit 1."""
        stuck = [s for s in self.states.values() if s.kind == "pending" and s.reason]
        if not stuck:
            return
        partition = None
        for state in stuck:
            head = state.reason.split(",")[0].strip()
            if head == "ReqNodeNotAvail" and partition is None:
                partition = cluster.read_partition(self.partition_name)
            if cluster.never_clears(state.reason, partition):
                name = self.partition_name or (partition.name if partition else "default")
                why = REASONS.get(head, "it can never start as requested").format(p=name)
                self.progress.clear()
                log.error("error: job %s can never start: squeue says %s (%s); cancelling the "
                          "sweep's %d job(s)", state.job_id, state.reason, why, len(self.jobs))
                self.cancel(self.jobs)
                raise SystemExit(1)

    def cancel(self, jobs: Sequence[Any]) -> None:
        if self.kind == "slurm":
            cluster.cancel(str(j.job_id) for j in jobs)
        else:
            for job in jobs:
                job.cancel(check=False)

    def run(self) -> dict[str, cluster.JobState]:
        """Until every job has ended; returns each job's last known state."""
        next_poll = time.monotonic()
        interval = 1.0
        next_log = time.monotonic() + self.log_every_s
        shown = ""
        while True:
            for job in self.jobs:
                if not self.finished(job) and self._has_result(job):
                    self.states[str(job.job_id)] = cluster.JobState(str(job.job_id), "COMPLETED")
            now = time.monotonic()
            if now >= next_poll and not all(self.finished(j) for j in self.jobs):
                try:
                    self.poll()
                except cluster.ClusterError as err:
                    log.warning("WARNING %s; still waiting", err)
                self._check_pending()
                next_poll = now + interval
                interval = min(interval * 2, self.poll_s)
            if all(self.finished(j) for j in self.jobs):
                break
            line = self.line()
            if line != shown:
                self.progress.update(line)
                shown = line
            if not self.progress.live and now >= next_log:
                log.info("%s", self.line())
                next_log = now + self.log_every_s
            time.sleep(0.25 if self.kind == "local" else 0.5)
        self.progress.clear()
        log.info("%s", self.line())
        return self.states


def collect(jobs: Sequence[Any], job_overrides: Sequence[Sequence[str]],
            folders: Sequence[Path], states: dict[str, cluster.JobState],
            started: float) -> list[JobReturn]:
    """One completed JobReturn per job; a job that died outside Python is recorded in its folder."""
    returns = []
    for job, overrides, path in zip(jobs, job_overrides, folders, strict=True):
        state = states.get(str(job.job_id), cluster.JobState(str(job.job_id), "UNKNOWN"))
        error: str | None = None
        if job.paths.result_pickle.exists() or state.kind == "done":
            try:
                ret = job.results()[0]
                if ret.status == JobStatus.COMPLETED:
                    returns.append(ret)
                    continue
                error = f"{type(ret._return_value).__name__}: {ret._return_value}"
            except Exception as err:
                error = cluster.first_error_line(str(err))
        outcome = "interrupted" if state.kind == "interrupted" else "failed"
        folder = RunFolder(path)
        last = folder.last_attempt()
        if last is None or last["time"] < started:
            if outcome == "failed" and folder.status != "done":
                folder.mark_failed(RuntimeError(
                    error or f"SLURM job {job.job_id} ended {state.state or 'unknown'}; its log: "
                             f"{job.paths.stderr}"), traceback=False)
            folder.record_attempt(outcome)
        returns.append(JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED,
                                 _return_value={"status": outcome, "dir": str(path),
                                                "slurm_state": state.state}))
    return returns


def run_in_job(plugin: Any, sweep_overrides: list[str], job_dir_key: str, job_num: int,
               singleton_state: dict[type, Singleton]) -> JobReturn:
    """On the node: compose the job's config, apply the resources the preflight chose, run it."""
    import submitit

    Singleton.set_state(singleton_state)
    setup_globals()
    sweep_config = plugin.hydra_context.config_loader.load_sweep_config(plugin.config,
                                                                        sweep_overrides)
    with open_dict(sweep_config.hydra):
        sweep_config.hydra.job.id = submitit.JobEnvironment().job_id
        sweep_config.hydra.job.num = job_num
        for key, value in (plugin.resolved or {}).items():
            sweep_config.hydra.launcher[key] = value
    return run_job(hydra_context=plugin.hydra_context, task_function=plugin.task_function,
                   config=sweep_config, job_dir_key=job_dir_key,
                   job_subdir_key="hydra.sweep.subdir")
