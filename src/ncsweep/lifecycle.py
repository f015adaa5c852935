"""One attempt at a run, the same for a solo run and an ensemble member (a solo run is a
group of one): admission (the run folder's lease taken), the folder set up or resumed, the
attempts and wall time carried over from the checkpoint, the W&B mirror, the one error line
(a full disk's too), and the finish."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ncsweep import distributed
from ncsweep.capabilities import capability
from ncsweep.config import ConfigError, run_key, validate
from ncsweep.console import setup_logging
from ncsweep.diskspace import DiskFull
from ncsweep.keys import IDENTITY_GROUPS
from ncsweep.lease import Lease, RunHeld
from ncsweep.runguard import (
    DISK_FULL,
    NOT_STARTED,
    RERUN_HINT,
    RUNNING_ELSEWHERE,
    LeaseLost,
    as_disk_full,
    full_disk_at,
    hold,
    note,
    stop_on,
    write_hydra_files,
)
from ncsweep.tracking import CheckpointError, NoMirror, RunFolder, WandbMirror, write_atomic

USER_ERRORS = (ConfigError, CheckpointError)
log = logging.getLogger(__name__)
_WANDB_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class JobContext:
    """Where a job stands: its folder, key, sweep name, group choices and launch mode."""

    def __init__(self, cfg: DictConfig) -> None:
        hydra = HydraConfig.get()
        self.folder = RunFolder(hydra.runtime.output_dir, writer=distributed.is_writer())
        self.key = run_key(hydra.job.override_dirname)
        self.name = str(cfg.get("name", "default"))
        self.choices = {k: v for k, v in hydra.runtime.choices.items()
                        if not k.startswith("hydra")}
        self.overrides = list(hydra.overrides.task)
        self.multirun = hydra.mode == RunMode.MULTIRUN

    @property
    def wandb_id(self) -> str:
        """Deterministic, W&B-safe and unique per (sweep, job): a requeued job continues its run."""
        digest = hashlib.sha1(f"{self.name}/{self.key}".encode()).hexdigest()[:10]
        slug = _WANDB_UNSAFE.sub("-", f"{self.name}-{self.key}").strip("-")[:50]
        return f"{slug}-{digest}"


def root_cause(err: BaseException) -> BaseException:
    """The builder's own error, not Hydra's InstantiationException wrapped around it."""
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err


def error_line(key: str, err: BaseException, traceback_file: Path | None = None) -> str:
    """The one line a failed run logs: ``error: ...`` for bad input, else ``KEY FAILED: ...``."""
    if isinstance(err, USER_ERRORS):
        return f"error: {err}"
    where = f" (traceback in {traceback_file})" if traceback_file is not None else ""
    return f"{key} FAILED: {type(err).__name__}: {err}{where}"


def fail(context: JobContext, err: BaseException, line: str, before_work: bool = False,
         traceback: bool | None = None) -> dict:
    """Mark the job failed; an error found before any work leaves a finished run's DONE alone.

    A full disk is not the run's failure: it is stopped by the disk (stopped_by_full_disk).
    """
    if isinstance(err, LeaseLost):
        return running_elsewhere(context, err)
    full = as_disk_full(err, context.folder.path)
    if full is not None:
        return stopped_by_full_disk(context, full)
    if not (before_work and context.folder.status == "done"):
        context.folder.prepare()
        context.folder.mark_failed(err, traceback=not isinstance(err, USER_ERRORS)
                                   if traceback is None else traceback)
    context.folder.record_attempt("failed")
    log.error("%s", line)
    if not context.multirun:
        raise SystemExit(1)
    return {"status": "failed", "dir": str(context.folder.path), "error": str(err)}


def stopped_by_full_disk(context: JobContext, err: DiskFull) -> dict:
    """A full disk: one line, no FAILED marker (the run is whole up to its last checkpoint and
    resumes when re-run), the outcome recorded where it still fits, no later run started on
    that disk by this process."""
    stop_on(err)
    note(context.folder.path, DISK_FULL, str(err))
    with contextlib.suppress(DiskFull):
        context.folder.record_attempt(DISK_FULL)
    log.error("%s stopped: %s: %s", context.key, err, RERUN_HINT)
    if not context.multirun:
        raise SystemExit(1)
    return {"status": DISK_FULL, "dir": str(context.folder.path), "error": str(err)}


def running_elsewhere(context: JobContext, err: RunHeld | LeaseLost) -> dict:
    """Another live process holds the run: one line, nothing written, never a failure."""
    note(context.folder.path, RUNNING_ELSEWHERE, str(err))
    line = f"{context.key} not started: {err}"
    if not context.multirun:
        log.error("%s", line)
        raise SystemExit(1)
    log.warning("%s", line)
    return {"status": RUNNING_ELSEWHERE, "dir": str(context.folder.path), "error": str(err)}


def code_version() -> dict:
    """The git commit of the code that ran, and whether the tree had uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], text=True,
                                capture_output=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "."],
                               text=True, capture_output=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {"code_commit": None, "code_dirty": None}
    return {"code_commit": commit, "code_dirty": bool(dirty.strip())}


def run_identity(cfg: DictConfig, context: JobContext) -> dict:
    """What ``run.json`` records: known before validation, so a run failing it still has one."""
    choice = context.choices
    frozen = capability(cfg.get("head") or {}, "frozen", False)
    return {
        "name": context.name, "run_key": context.key,
        **{group: choice.get(group) for group in IDENTITY_GROUPS},
        "overrides": context.overrides, "dim": str(cfg.get("dim")),
        "feature_dim": _resolved(cfg, "feature_dim"),
        "num_classes": _resolved(cfg, "dataset.num_classes"), "seed": _resolved(cfg, "seed"),
        "embedding": _resolved(cfg, "head.embedding") if frozen else None,
        **code_version(), "created": time.time(),
    }


def _resolved(cfg: DictConfig, key: str) -> Any:
    """The value at ``key``, or None where it does not resolve (the error comes from validate)."""
    try:
        return OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
    except Exception:
        return None


def _check_ranks(plain: dict) -> None:
    """What cannot run on several ranks is refused in one line before any work."""
    world = distributed.world_size()
    if world == 1:
        return
    if plain["arch"].get("starts") is not None:
        raise ConfigError("arch.starts", plain["arch"]["starts"],
                          f"null on {world} ranks (batched random starts run on one device)")
    if plain["trainer"]["dry_run"]:
        raise ConfigError("trainer.dry_run", True, f"false on {world} ranks (a dry run is one "
                          "step on one device; run it with hydra.launcher.tasks_per_node=1)")


def admit(cfg: DictConfig) -> Attempt | dict:
    """Validate a job, skip a finished one, take its lease: its attempt, or its status dict."""
    setup_logging()
    context = JobContext(cfg)
    try:
        return _admit(context, cfg)
    except DiskFull as err:
        return stopped_by_full_disk(context, err)


def _admit(context: JobContext, cfg: DictConfig) -> Attempt | dict:
    """admit's steps; a full disk on the way is admit's to report."""
    folder = context.folder
    full = full_disk_at(folder.path)
    if full is not None:
        note(folder.path, NOT_STARTED, f"not started: {full}")
        return {"status": NOT_STARTED, "dir": str(folder.path), "error": str(full)}
    identity = run_identity(cfg, context)
    try:
        plain = validate(cfg)
        if plain["trainer"].get("ensemble"):
            from ncsweep.ensemble.support import check_supported

            check_supported(plain)
        _check_ranks(plain)
    except ConfigError as err:
        if folder.status != "done":
            folder.write_run(identity)
        return fail(context, err, error_line(context.key, err), before_work=True)
    if _finished(folder, plain):
        return _skip(context)
    lease = hold(folder, cfg)
    if isinstance(lease, RunHeld):
        return running_elsewhere(context, lease)
    attempt = Attempt(context, identity, plain, lease)
    try:
        if _finished(folder, plain):
            skipped = _skip(context)
            attempt.release()
            return skipped
        write_hydra_files(folder, cfg, HydraConfig.instance().cfg)
    except BaseException:
        attempt.release()
        raise
    return attempt


def _finished(folder: RunFolder, plain: dict) -> bool:
    """Whether the folder holds a finished run that this job leaves as it is."""
    trainer_cfg = plain["trainer"]
    return (distributed.broadcast_object(folder.status) == "done"
            and trainer_cfg["resume"] != "never" and not trainer_cfg["dry_run"])


def _skip(context: JobContext) -> dict:
    """A finished run: recorded as skipped."""
    context.folder.record_attempt("skipped")
    log.info("%s: already done, skipped (%s)", context.key, context.folder.path)
    return {"status": "skipped", "dir": str(context.folder.path)}


class Attempt:
    """One attempt at an admitted run: from its folder's setup to DONE or FAILED."""

    def __init__(self, context: JobContext, identity: dict, plain: dict,
                 lease: Lease | None = None) -> None:
        self.context, self.identity, self.plain = context, identity, plain
        self.lease = lease
        self.folder = context.folder
        self.trainer = plain["trainer"]
        self.started = time.perf_counter()
        self.state: dict | None = None
        self.attempts, self.earlier_wall = 1, 0.0
        self.mirror: WandbMirror = NoMirror()
        self.run: Any = None
        self.summary: dict = {}
        self.status: dict | None = None

    def release(self) -> None:
        """Let go of the run folder's lease (done, failed or interrupted); idempotent."""
        lease, self.lease = self.lease, None
        if lease is not None:
            lease.release()

    @property
    def resumes(self) -> bool:
        """Whether this attempt may continue from a checkpoint (``trainer.resume`` not never)."""
        return self.trainer["resume"] != "never" and not self.trainer["dry_run"]

    def set_up(self) -> None:
        """A fresh folder (resume=never, a dry run) or the earlier attempt's, kept to resume."""
        self.started = time.perf_counter()
        if self.resumes:
            self.folder.prepare()
        else:
            self.folder.reset()

    def begin(self, run: Any, group: int = 1) -> None:
        """The built run's summary head and the resolved config written to the folder."""
        self.run = run
        self.summary = summary_head(self.identity, self.trainer, group)
        self.summary.update(run.describe())
        self.folder.write_config(self.plain)

    def resume_from(self, state: dict | None) -> None:
        """Metrics trimmed to the checkpoint; the attempts and wall time it carries."""
        self.state = state
        self.folder.keep_metrics([r for r in self.folder.read_metrics()
                                  if state is not None and r["epoch"] <= state["epoch"]])
        if state is not None:
            self.earlier_wall = float(state.get("wall_time_s", 0.0))
            self.attempts = int(state.get("attempts", 1)) + 1

    def start_mirror(self, mirror: WandbMirror) -> None:
        self.mirror = mirror
        mirror.start(self.folder.path, self.context.wandb_id, self.context.key,
                     self.context.name, self.plain, quiet=not self.trainer["progress"])

    def check_lease(self) -> None:
        """LeaseLost when another process has taken the folder's lease over meanwhile."""
        if self.lease is not None and self.lease.lost:
            raise LeaseLost(f"run folder {self.folder.path} was taken over by another launch "
                            "while this one trained (its heartbeat stalled)")

    def save(self, checkpoint: dict) -> None:
        """A checkpoint with this attempt's count and the wall time over every attempt."""
        self.check_lease()
        self.folder.save_checkpoint({**checkpoint, "attempts": self.attempts,
                                     "wall_time_s": self.earlier_wall + time.perf_counter()
                                     - self.started}, self.context.key)

    def log_row(self, row: dict) -> None:
        """An eval row into metrics.jsonl and the mirror."""
        self.check_lease()
        self.folder.append_metrics(row)
        self.mirror.log(row, step=int(row["epoch"]))

    def finish(self, result: Any) -> dict:
        """The summary, the run's own files and DONE; the finished summary."""
        self.check_lease()
        finish_run(self.folder, self.run, self.summary, result, self.state, self.started,
                   self.earlier_wall, self.attempts)
        summary = self.summary
        if summary.get("spurious_minimum_suspect"):
            log.warning("WARNING spurious_minimum_suspect: gradient norm %.2e, objective gap "
                        "%.2e, smallest Hessian eigenvalue %.2e (no negative curvature)",
                        summary["grad_norm"], summary["objective_gap"],
                        summary["hessian_min_eig"])
        self.folder.write_summary(summary)
        self.mirror.finish(summary)
        self.folder.mark_done()
        return summary

    def fail(self, err: BaseException, traceback_named: bool = True) -> dict:
        """The mirror closed, FAILED written and the one error line logged."""
        self.mirror.finish(exit_code=1)
        where = self.folder.file("FAILED") if traceback_named else None
        self.status = fail(self.context, err, error_line(self.context.key, err, where))
        return self.status


def summary_head(identity: Mapping, trainer_cfg: Mapping, ensemble: int = 1) -> dict:
    """What every summary starts with: identity, the training shape, ensemble and ranks."""
    head = {**identity, "epochs": trainer_cfg["epochs"], "batch_size": trainer_cfg["batch_size"],
            "ensemble": ensemble, "world_size": distributed.world_size(),
            "sync_batchnorm": bool(trainer_cfg.get("sync_batchnorm"))}
    head.pop("created", None)
    return head


def finish_run(folder: RunFolder, run: Any, summary: dict, result: Any, state: dict | None,
               started: float, earlier_wall: float, attempts: int) -> None:
    """A finished fit into the summary (results, memory, final checks, then the times, which
    count the checks: a Hessian certificate can cost more than the fit), run files written."""
    checks_started = time.perf_counter()
    checks = run.final_checks(result.final)
    now = time.perf_counter()
    wall = now - started
    summary.update(status="done", resumed_from_epoch=state["epoch"] if state else None,
                   **result.final, **memory_fields(result.peak_memory, result.train_memory),
                   **_times(wall, earlier_wall, result, attempts),
                   final_checks_time_s=now - checks_started,
                   time_per_epoch_s=result.train_time_s / max(result.epochs_run, 1),
                   samples_per_s=result.samples_seen / max(result.train_time_s, 1e-9))
    summary.update(checks)
    for name, text in run.model.backbone.run_files().items():
        if folder.writer:
            write_atomic(folder.file(name), text, f"the run file {name}")


def _times(wall: float, earlier_wall: float, result: Any, attempts: int) -> dict:
    """Time summed over every attempt of a resumed run, and the last attempt's apart."""
    return {"wall_time_s": earlier_wall + wall,
            "train_time_s": result.earlier_train_time_s + result.train_time_s,
            "last_attempt_wall_time_s": wall, "last_attempt_train_time_s": result.train_time_s,
            "attempts": attempts}


def memory_fields(peak: Any, account: Any) -> dict:
    """The device's peak beside the step's account (docs/metrics.md, training memory)."""
    fields = {"peak_memory_bytes": peak.bytes, "peak_memory_kind": peak.kind,
              "peak_memory_reserved_bytes": peak.reserved_bytes}
    return {**fields, **(account.as_dict() if account is not None else {})}
