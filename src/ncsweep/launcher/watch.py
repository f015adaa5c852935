"""Watching a sweep until it ends: a live line, pending reasons that never clear, results."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn, JobStatus

from ncsweep import cluster
from ncsweep.console import Progress
from ncsweep.launcher.hydra_compat import job_return, raw_return
from ncsweep.launcher.plan import REASONS, Job, Unit
from ncsweep.tracking import RunFolder

log = logging.getLogger(__name__)


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
        return job.task(0).paths.result_pickle.exists()

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
        rank0 = job.task(0)  # on several ranks, rank 0 speaks for the task
        if rank0.paths.result_pickle.exists() or state.kind == "done":
            try:
                results = {run.num: ret for run, ret in zip(runs, rank0.results()[0],
                                                            strict=True)}
            except Exception as err:
                error = cluster.first_error_line(str(err))
        for run in runs:
            ret = results.get(run.num)
            if ret is not None and ret.status == JobStatus.COMPLETED:
                returns[run.num] = ret
                continue
            if ret is not None:
                value = raw_return(ret)
                error = f"{type(value).__name__}: {value}"
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
    return job_return(run.overrides, {"status": outcome, "dir": run.folder,
                                      "slurm_state": state.state})


