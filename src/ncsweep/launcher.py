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
import pickle
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict

from ncsweep import cluster
from ncsweep.config import ConfigError
from ncsweep.console import Progress, setup_logging
from ncsweep.tracking import RunFolder

log = logging.getLogger(__name__)
JOBS_FILE = ".ncsweep-jobs.jsonl"
WATCH_KEYS = ("detach", "leave_running_on_interrupt", "poll_s", "log_every_s")
PACKING_KEYS = ("runs_per_task", "runs_in_parallel")
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
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


@dataclass(frozen=True)
class Job:
    """One run of the sweep: its overrides, Hydra job number and run folder."""

    overrides: tuple[str, ...]
    num: int
    folder: str


Unit = list[Job]  # one run, or the members of an ensemble (jobs differing only in seed)


def _override_key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def ensemble_on(config: DictConfig, overrides: Sequence[str]) -> bool:
    """Whether a job asks ``trainer.ensemble``: its own override, else the sweep's config."""
    for override in overrides:
        if _override_key(override) == "trainer.ensemble":
            return override.partition("=")[2].strip().lower() == "true"
    return bool(OmegaConf.select(config, "trainer.ensemble", default=False))


def plan_units(config: DictConfig, job_overrides: Sequence[Sequence[str]], initial_job_idx: int,
               folders: Sequence[Path]) -> list[Unit]:
    """The sweep's jobs as units: under trainer.ensemble, jobs differing only in seed are one."""
    units: list[Unit] = []
    groups: dict[tuple[str, ...], Unit] = {}
    for idx, (overrides, folder) in enumerate(zip(job_overrides, folders, strict=True)):
        job = Job(tuple(overrides), initial_job_idx + idx, str(folder))
        if not ensemble_on(config, overrides):
            units.append([job])
            continue
        key = tuple(sorted(o for o in overrides if _override_key(o) != "seed"))
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


def _packing(params: dict[str, Any]) -> tuple[int, int]:
    """``runs_per_task`` and ``runs_in_parallel`` from the launcher's parameters, checked."""
    values = []
    for key in PACKING_KEYS:
        value = params.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"hydra.launcher.{key}", value, "an integer >= 1")
        values.append(value)
    return values[0], values[1]


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
    folders = job_folders(config, job_overrides, initial_job_idx)
    try:
        per_task, parallel = _packing({k: params.pop(k, 1) for k in PACKING_KEYS})
        tasks = pack(plan_units(config, job_overrides, initial_job_idx, folders), per_task)
        if kind == "slurm":
            resolved, line = _preflight(params, len(tasks))
            params.update(resolved)
            plugin.resolved = resolved
        else:
            line = (f"local: {len(tasks)} job(s) as subprocesses of this one, each "
                    f"{params.get('cpus_per_task') or 1} CPU(s), {params.get('timeout_min')} min")
        executor = _executor(kind, params)
    except (ConfigError, cluster.ClusterError) as err:
        raise _fail(err) from None
    if len(tasks) < len(job_overrides):
        line += (f"; {len(job_overrides)} runs, up to {per_task} a job"
                 + (f", {parallel} at once" if parallel > 1 else ""))
    log.info("%s", line)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in config.hydra.sweep:
        os.chmod(sweep_dir, mode=int(str(config.hydra.sweep.mode), 8))
    singleton = Singleton.get_state()
    job_params = [(task, "hydra.sweep.dir", singleton, started) for task in tasks]
    jobs = _submit(executor, plugin, job_params)
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
    return collect(jobs, tasks, states, started)


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


def collect(jobs: Sequence[Any], tasks: Sequence[list[Unit]],
            states: dict[str, cluster.JobState], started: float) -> list[JobReturn]:
    """One completed JobReturn per run, in job order; a run whose task died outside Python is
    recorded in its folder."""
    returns: dict[int, JobReturn] = {}
    for job, task in zip(jobs, tasks, strict=True):
        state = states.get(str(job.job_id), cluster.JobState(str(job.job_id), "UNKNOWN"))
        runs = [run for unit in task for run in unit]
        results: dict[int, JobReturn] = {}
        error: str | None = None
        if job.paths.result_pickle.exists() or state.kind == "done":
            try:
                results = {run.num: ret for run, ret in zip(runs, job.results()[0], strict=True)}
            except Exception as err:
                error = cluster.first_error_line(str(err))
        for run in runs:
            ret = results.get(run.num)
            if ret is not None and ret.status == JobStatus.COMPLETED:
                returns[run.num] = ret
                continue
            if ret is not None:
                error = f"{type(ret._return_value).__name__}: {ret._return_value}"
            returns[run.num] = _record_lost(run, job, state, error, started)
    return [returns[num] for num in sorted(returns)]


def _record_lost(run: Job, job: Any, state: cluster.JobState, error: str | None,
                 started: float) -> JobReturn:
    """A run without a result: failed (or interrupted) in its folder unless it said so itself."""
    outcome = "interrupted" if state.kind == "interrupted" else "failed"
    folder = RunFolder(run.folder)
    last = folder.last_attempt()
    if last is None or last["time"] < started:
        if outcome == "failed" and folder.status != "done":
            folder.mark_failed(RuntimeError(
                error or f"SLURM job {job.job_id} ended {state.state or 'unknown'}; its log: "
                         f"{job.paths.stderr}"), traceback=False)
        folder.record_attempt(outcome)
    elif last["outcome"] in ("done", "skipped", "failed", "interrupted"):
        outcome = last["outcome"]
    return JobReturn(overrides=list(run.overrides), status=JobStatus.COMPLETED,
                     _return_value={"status": outcome, "dir": run.folder,
                                    "slurm_state": state.state})


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
    if ensemble:
        from ncsweep.ensemble import prepare

        task_function = prepare
    for run in todo:
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(run.overrides))
        with open_dict(sweep_config.hydra):
            sweep_config.hydra.job.id = run.num if job_id is None else job_id
            sweep_config.hydra.job.num = run.num
            for key, value in (launcher or {}).items():
                sweep_config.hydra.launcher[key] = value
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
        return [ret for unit in units for ret in run_unit(
            plugin.hydra_context, plugin.task_function, plugin.config, unit, job_dir_key,
            launched, job_id, resources)]
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
        handler = previous.get(received[0])
        if callable(handler):
            handler(received[0], None)
        raise SystemExit(128 + received[0])
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
