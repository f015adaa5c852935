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
from ncsweep.lifecycle import (
    Attempt,
    JobContext,
    admit,
    error_line,
    fail,
    memory_fields,
    root_cause,
)
from ncsweep.stopping import StopFlag
from ncsweep.tracking import CheckpointError, NoMirror, RunFolder

log = logging.getLogger(__name__)
_BACKEND_PREFIX = re.compile(r"^\[[^\]]*\]\s*")  # gloo's "[.../pair.cc:545] "


def run_job(cfg: DictConfig) -> dict:
    """The Hydra task: returns a small status dict; failures leave a FAILED marker."""
    admitted = admit(cfg)
    return admitted if isinstance(admitted, dict) else run_admitted(admitted)


def run_admitted(attempt: Attempt) -> dict:
    """Train an admitted run alone; its status dict."""
    context, folder = attempt.context, attempt.folder
    folder.write_run(attempt.identity)
    stop = StopFlag()
    stop.install()
    try:
        summary = execute(attempt, stop)
    except StopRequestedExit:
        folder.record_attempt("interrupted")
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
    """At the end of a sweep: how many jobs finished, were skipped, failed or were interrupted."""

    ORDER = ("done", "skipped", "failed", "interrupted")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        if OmegaConf.select(config, "hydra.launcher.detach", default=False):
            log.info("sweep %s: submitted, detached; `python -m ncsweep.status %s` shows it",
                     sweep_dir, sweep_dir)
            return
        outcomes: dict[str, list[str]] = {}
        for attempt in sorted(sweep_dir.glob(f"*/{RunFolder.ATTEMPT_FILE}")):
            folder = RunFolder(attempt.parent)
            last = folder.last_attempt()
            if last and last["time"] >= getattr(self, "started", 0.0):
                outcomes.setdefault(last["outcome"], []).append(str(folder.path))
        names = [k for k in self.ORDER if k in outcomes] + sorted(set(outcomes) - set(self.ORDER))
        counts = ", ".join(f"{len(outcomes[k])} {k}" for k in names) or "no jobs"
        log.info("sweep %s: %s", sweep_dir, counts)
        for path in outcomes.get("failed", []):
            log.info("  failed: %s: %s", path, RunFolder(path).failure())
        for path in outcomes.get("interrupted", []):
            hint = ("checkpoint saved: re-run the same command to resume"
                    if RunFolder(path).file("checkpoint.pt").exists()
                    else "no checkpoint: re-run the same command to start it again")
            log.info("  interrupted: %s: %s", path, hint)
        if OmegaConf.select(config, "report.at_end", default=True):
            from ncsweep.report import sweep_answer

            for line in sweep_answer(sweep_dir):
                log.info("%s", line)
        if outcomes.get("failed") or outcomes.get("interrupted"):
            raise SystemExit(1)
