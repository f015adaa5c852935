"""One job from config to a finished run folder: admit, build, train or dry-run, record.

A solo run is a group of one: the attempt (ncsweep.lifecycle) is the ensemble members' too.
This module adds what only a solo run has: the dry run, several ranks, the signal hand-over.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ncsweep import distributed
from ncsweep.console import setup_logging
from ncsweep.diskspace import DiskFull, atomic_write_text, full_errno
from ncsweep.lifecycle import (
    Attempt,
    JobContext,
    admit,
    error_line,
    fail,
    memory_fields,
    root_cause,
    stopped_by_full_disk,
)
from ncsweep.runguard import DISK_FULL, NOT_STARTED, RERUN_HINT, RUNNING_ELSEWHERE, noted
from ncsweep.stopping import StopFlag
from ncsweep.tracking import CheckpointError, NoMirror, RunFolder

log = logging.getLogger(__name__)
_BACKEND_PREFIX = re.compile(r"^\[[^\]]*\]\s*")  # gloo's "[.../pair.cc:545] "


def run_job(cfg: DictConfig) -> dict:
    """The Hydra task: returns a small status dict; failures leave a FAILED marker."""
    admitted = admit(cfg)
    return admitted if isinstance(admitted, dict) else run_admitted(admitted)


def run_admitted(attempt: Attempt) -> dict:
    """Train an admitted run alone; its status dict. The run's lease is let go at the end."""
    try:
        return _run_held(attempt)
    except DiskFull as err:
        return stopped_by_full_disk(attempt.context, err)
    finally:
        attempt.release()


def _run_held(attempt: Attempt) -> dict:
    """run_admitted's steps, under the lease."""
    context, folder = attempt.context, attempt.folder
    folder.write_run(attempt.identity)
    stop = StopFlag()
    stop.install()
    try:
        summary = execute(attempt, stop)
    except StopRequestedExit:
        folder.record_attempt("interrupted")
        attempt.release()
        stop.hand_over()
    except Exception as err:
        err = root_cause(err)
        if distributed.is_distributed():
            _fail_ranks(context, err)
        return fail(context, err, error_line(context.key, err, folder.file("FAILED")))
    finally:
        stop.restore()
    folder.record_attempt(summary["status"])
    log.info("%s: %s; results in %s", context.key, summary["status"], folder.path)
    return {"status": summary["status"], "dir": str(folder.path)}


class StopRequestedExit(Exception):
    """Raised after a preemption checkpoint so run_job hands the signal on."""


class RankLost(RuntimeError):
    """A distributed run lost a rank: it died, or hung past the collective timeout."""


def _fail_ranks(context: JobContext, err: BaseException) -> None:
    """A failure on one of several ranks ends the whole task: the group may be broken.

    A lost peer is named by a roll call; the lowest surviving rank writes FAILED when rank 0
    is the one lost. Raises SystemExit, so no rank goes on to the next run of its task.
    """
    if distributed.is_comm_failure(err):
        absent = distributed.absent_ranks()
        me, world = distributed.rank(), distributed.world_size()
        survivors = [r for r in range(world) if r not in absent] or [me]
        context.folder.writer = me == min(survivors)
        lost = ", ".join(map(str, absent)) if absent else "unknown"
        first = _BACKEND_PREFIX.sub("", str(err).strip().splitlines()[0] if str(err).strip()
                                    else type(err).__name__).split(". ")[0]
        err = RankLost(f"rank {lost} of {world} died or stopped answering (collective timeout "
                       f"{distributed.timeout_s():.0f} s); rank {me} saw: {first}")
    fail(context, err, error_line(context.key, err), traceback=not isinstance(err, RankLost))
    raise SystemExit(1)


def execute(attempt: Attempt, stop: StopFlag) -> dict:
    """Build from the resolved config, train (or dry-run), and write the run folder's files."""
    from ncsweep.build import build_run
    from ncsweep.training import StopRequested

    plain, folder, context = attempt.plain, attempt.folder, attempt.context
    dry_run = plain["trainer"]["dry_run"]
    attempt.set_up()
    run = build_run(plain, read_data=not dry_run)
    attempt.begin(run)
    if dry_run:
        peak, account = run.trainer.dry_run_step(run.model, run.loss, run.optimizer,
                                                 plain["dataset"]["num_classes"],
                                                 plain["dataset"]["input_shape"])
        attempt.summary.update(status="dry_run", wall_time_s=time.perf_counter()
                               - attempt.started, **memory_fields(peak, account))
        folder.write_summary(attempt.summary)
        return attempt.summary
    resume = plain["trainer"]["resume"]
    state = distributed.broadcast_object(
        folder.load_checkpoint(context.key) if resume != "never" and folder.writer else None)
    if resume == "must" and state is None:
        raise CheckpointError(f"trainer.resume=must but {folder.file('checkpoint.pt')} does "
                              "not exist")
    attempt.resume_from(state)
    attempt.start_mirror(run.logger if folder.writer else NoMirror())
    try:
        result = run.trainer.fit(run.model, run.loss, run.optimizer, run.scheduler, run.data,
                                 plain["seed"], on_eval=attempt.log_row,
                                 on_checkpoint=attempt.save, stop_requested=stop,
                                 resume_state=state)
    except StopRequested as err:
        attempt.mirror.finish(exit_code=1)
        raise StopRequestedExit(str(err)) from err
    except BaseException:
        attempt.mirror.finish(exit_code=1)
        raise
    return attempt.finish(result)


class SweepReport(Callback):
    """At the end of a sweep: how many jobs finished, were skipped, failed, were interrupted,
    ran elsewhere or were stopped by a full disk."""

    ORDER = ("done", "skipped", "failed", "interrupted", RUNNING_ELSEWHERE, DISK_FULL,
             NOT_STARTED)
    UNFINISHED = ("failed", "interrupted", RUNNING_ELSEWHERE, DISK_FULL, NOT_STARTED)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """The sweep's start; a disk too full for the sweep's first file is one line, now."""
        self.started = time.time()
        sweep_dir = Path(config.hydra.sweep.dir).absolute()
        try:
            sweep_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(sweep_dir / "multirun.yaml", OmegaConf.to_yaml(config),
                              "the sweep's multirun.yaml")
        except DiskFull as err:
            setup_logging()
            log.error("sweep %s not started: %s: %s", sweep_dir, err, RERUN_HINT)
            raise SystemExit(1) from None
        except OSError:
            return  # an unwritable sweep folder is reported where it is first written

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        if OmegaConf.select(config, "hydra.launcher.detach", default=False):
            log.info("sweep %s: submitted, detached; `python -m ncsweep.status %s` shows it",
                     sweep_dir, sweep_dir)
            return
        outcomes = self.outcomes(sweep_dir)
        names = [k for k in self.ORDER if k in outcomes] + sorted(set(outcomes) - set(self.ORDER))
        counts = ", ".join(f"{len(outcomes[k])} {k}" for k in names) or "no jobs"
        full = DISK_FULL in outcomes or NOT_STARTED in outcomes
        log.info("sweep %s: %s%s", sweep_dir, counts, f": {RERUN_HINT}" if full else "")
        self.details(outcomes)
        if OmegaConf.select(config, "report.at_end", default=True) and not full:
            self.answer(sweep_dir)
        if any(outcomes.get(k) for k in self.UNFINISHED):
            raise SystemExit(1)

    def outcomes(self, sweep_dir: Path) -> dict[str, dict[str, str]]:
        """Each outcome's run folders (with a detail line) since the sweep started: the attempt
        records, then what this process noted where no file could hold it."""
        since = getattr(self, "started", 0.0)
        last: dict[str, tuple[str, str]] = {}
        for attempt in sorted(sweep_dir.glob(f"*/{RunFolder.ATTEMPT_FILE}")):
            record = RunFolder(attempt.parent).last_attempt()
            if record and record["time"] >= since:
                last[str(attempt.parent.resolve())] = (record["outcome"], "")
        for entry in noted(since):
            if Path(entry.folder).parent == sweep_dir:
                last[entry.folder] = (entry.outcome, entry.detail)
        outcomes: dict[str, dict[str, str]] = {}
        for folder, (outcome, detail) in sorted(last.items()):
            outcomes.setdefault(outcome, {})[folder] = detail
        return outcomes

    @staticmethod
    def details(outcomes: dict[str, dict[str, str]]) -> None:
        """One line per run that did not finish, saying why and what to do."""
        for path in outcomes.get("failed", {}):
            log.info("  failed: %s: %s", path, RunFolder(path).failure())
        for path in outcomes.get("interrupted", {}):
            hint = ("checkpoint saved: re-run the same command to resume"
                    if RunFolder(path).file("checkpoint.pt").exists()
                    else "no checkpoint: re-run the same command to start it again")
            log.info("  interrupted: %s: %s", path, hint)
        for path, detail in outcomes.get(RUNNING_ELSEWHERE, {}).items():
            log.info("  running elsewhere: %s", detail or path)
        for path, detail in outcomes.get(DISK_FULL, {}).items():
            log.info("  stopped: %s", detail or f"{path}: disk full")

    @staticmethod
    def answer(sweep_dir: Path) -> None:
        """The report's verdict lines; a full disk while writing the report is one line."""
        from ncsweep.report import sweep_answer

        try:
            lines = sweep_answer(sweep_dir)
        except OSError as err:
            if full_errno(err) is None:
                raise
            log.error("the sweep's report was not written: %s", err)
            return
        for line in lines:
            log.info("%s", line)
