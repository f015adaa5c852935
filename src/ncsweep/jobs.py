"""One job from config to a finished run folder: validate, skip or resume, build, train, record.

This is the only module that knows about Hydra's runtime, launchers, signals and markers.
"""

from __future__ import annotations

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
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ncsweep import distributed
from ncsweep.config import ConfigError, run_key, validate
from ncsweep.console import setup_logging
from ncsweep.stopping import StopFlag
from ncsweep.tracking import CheckpointError, NoMirror, RunFolder, write_atomic

IDENTITY_GROUPS = ("dataset", "arch", "head", "loss", "optim", "schedule", "launcher",
                   "experiment")
USER_ERRORS = (ConfigError, CheckpointError)
log = logging.getLogger(__name__)
_WANDB_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_BACKEND_PREFIX = re.compile(r"^\[[^\]]*\]\s*")  # gloo's "[.../pair.cc:545] "


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


def admit(cfg: DictConfig) -> tuple[JobContext, dict, dict] | dict:
    """Validate a job and skip a finished one: (context, identity, plain config) or its status."""
    setup_logging()
    context = JobContext(cfg)
    folder = context.folder
    identity = run_identity(cfg, context)
    try:
        plain = validate(cfg)
        if plain["trainer"].get("ensemble"):
            from ncsweep.ensemble import check_supported

            check_supported(plain)
        _check_ranks(plain)
    except ConfigError as err:
        if folder.status != "done":
            folder.write_run(identity)
        return _fail(context, err, f"error: {err}", before_work=True)
    trainer_cfg = plain["trainer"]
    if (distributed.broadcast_object(folder.status) == "done"
            and trainer_cfg["resume"] != "never" and not trainer_cfg["dry_run"]):
        folder.record_attempt("skipped")
        log.info("%s: already done, skipped (%s)", context.key, folder.path)
        return {"status": "skipped", "dir": str(folder.path)}
    return context, identity, plain


def run_job(cfg: DictConfig) -> dict:
    """The Hydra task: returns a small status dict; failures leave a FAILED marker."""
    admitted = admit(cfg)
    if isinstance(admitted, dict):
        return admitted
    context, identity, plain = admitted
    folder = context.folder
    folder.write_run(identity)
    stop = StopFlag()
    stop.install()
    try:
        summary = execute(cfg, plain, identity, context, stop)
    except StopRequestedExit:
        folder.record_attempt("interrupted")
        stop.hand_over()
    except Exception as err:
        err = _root_cause(err)
        if distributed.is_distributed():
            _fail_ranks(context, err)
        if isinstance(err, USER_ERRORS):
            return _fail(context, err, f"error: {err}")
        return _fail(context, err, f"{context.key} FAILED: {type(err).__name__}: "
                                   f"{err} (traceback in {folder.file('FAILED')})")
    finally:
        stop.restore()
    folder.record_attempt(summary["status"])
    log.info("%s: %s; results in %s", context.key, summary["status"], folder.path)
    return {"status": summary["status"], "dir": str(folder.path)}


class StopRequestedExit(Exception):
    """Raised after a preemption checkpoint so run_job hands the signal on."""


class RankLost(RuntimeError):
    """A distributed run lost a rank: it died, or hung past the collective timeout."""


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
    line = (f"error: {err}" if isinstance(err, USER_ERRORS)
            else f"{context.key} FAILED: {type(err).__name__}: {err}")
    _fail(context, err, line, traceback=not isinstance(err, RankLost))
    raise SystemExit(1)


def _root_cause(err: BaseException) -> BaseException:
    """The builder's own error, not Hydra's InstantiationException wrapped around it."""
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err




def _fail(context: JobContext, err: BaseException, line: str, before_work: bool = False,
          traceback: bool | None = None) -> dict:
    """Mark the job failed; an error found before any work leaves a finished run's DONE alone."""
    if not (before_work and context.folder.status == "done"):
        context.folder.prepare()
        context.folder.mark_failed(err, traceback=not isinstance(err, USER_ERRORS)
                                   if traceback is None else traceback)
    context.folder.record_attempt("failed")
    log.error("%s", line)
    if not context.multirun:
        raise SystemExit(1)
    return {"status": "failed", "dir": str(context.folder.path), "error": str(err)}


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
    head = cfg.get("head") or {}
    return {
        "name": context.name, "run_key": context.key,
        **{group: choice.get(group) for group in IDENTITY_GROUPS},
        "overrides": context.overrides, "dim": str(cfg.get("dim")),
        "feature_dim": _resolved(cfg, "feature_dim"),
        "num_classes": _resolved(cfg, "dataset.num_classes"), "seed": _resolved(cfg, "seed"),
        "embedding": (_resolved(cfg, "head.embedding")
                      if str(head.get("_target_", "")).endswith("ETFHead") else None),
        **code_version(), "created": time.time(),
    }


def _resolved(cfg: DictConfig, key: str) -> Any:
    """The value at ``key``, or None where it does not resolve (the error comes from validate)."""
    try:
        return OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
    except Exception:
        return None


def execute(cfg: DictConfig, plain: dict, identity: Mapping, context: JobContext,
            stop: StopFlag) -> dict:
    """Build from config, train (or dry-run), and write the run folder's files."""
    from ncsweep.build import build_run
    from ncsweep.training import StopRequested

    folder = context.folder
    trainer_cfg = plain["trainer"]
    resume = trainer_cfg["resume"]
    if resume == "never" or trainer_cfg["dry_run"]:
        folder.reset()
    else:
        folder.prepare()
    started = time.perf_counter()
    run = build_run(cfg, plain, read_data=not trainer_cfg["dry_run"])
    summary = summary_head(identity, trainer_cfg)
    summary.update(run.describe())
    folder.write_config(plain)
    if trainer_cfg["dry_run"]:
        peak, account = run.trainer.dry_run_step(run.model, run.loss, run.optimizer,
                                                 plain["dataset"]["num_classes"],
                                                 plain["dataset"]["input_shape"])
        summary.update(status="dry_run", wall_time_s=time.perf_counter() - started,
                       **_memory_fields(peak, account))
        folder.write_summary(summary)
        return summary
    state = distributed.broadcast_object(
        folder.load_checkpoint(context.key) if resume != "never" and folder.writer else None)
    if resume == "must" and state is None:
        raise CheckpointError(f"trainer.resume=must but {folder.file('checkpoint.pt')} does "
                              "not exist")
    rows = [r for r in folder.read_metrics() if state is not None and r["epoch"] <= state["epoch"]]
    folder.keep_metrics(rows)
    mirror = run.logger if folder.writer else NoMirror()
    mirror.start(folder.path, context.wandb_id, context.key, context.name, plain,
                 quiet=not trainer_cfg["progress"])

    earlier_wall = float(state.get("wall_time_s", 0.0)) if state else 0.0
    attempts = int(state.get("attempts", 1)) + 1 if state else 1

    def save(checkpoint: dict) -> None:
        folder.save_checkpoint({**checkpoint, "attempts": attempts,
                                "wall_time_s": earlier_wall + time.perf_counter() - started},
                               context.key)

    def on_eval(row: dict) -> None:
        folder.append_metrics(row)
        mirror.log(row, step=int(row["epoch"]))

    try:
        result = run.trainer.fit(
            run.model, run.loss, run.optimizer, run.scheduler, run.data, plain["seed"],
            on_eval=on_eval, on_checkpoint=save,
            stop_requested=stop, resume_state=state)
    except StopRequested as err:
        mirror.finish(exit_code=1)
        raise StopRequestedExit(str(err)) from err
    except BaseException:
        mirror.finish(exit_code=1)
        raise
    finish_run(folder, run, summary, result, state, started, earlier_wall, attempts)
    if summary.get("spurious_minimum_suspect"):
        log.warning("WARNING spurious_minimum_suspect: gradient norm %.2e, objective gap %.2e, "
                    "smallest Hessian eigenvalue %.2e (no negative curvature)",
                    summary["grad_norm"], summary["objective_gap"], summary["hessian_min_eig"])
    folder.write_summary(summary)
    mirror.finish(summary)
    folder.mark_done()
    return summary


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
                   **result.final, **_memory_fields(result.peak_memory, result.train_memory),
                   **_times(wall, earlier_wall, result, attempts),
                   final_checks_time_s=now - checks_started,
                   time_per_epoch_s=result.train_time_s / max(result.epochs_run, 1),
                   samples_per_s=result.samples_seen / max(result.train_time_s, 1e-9))
    summary.update(checks)
    for name, text in run.model.backbone.run_files().items():
        if folder.writer:
            write_atomic(folder.file(name), text)


def _times(wall: float, earlier_wall: float, result: Any, attempts: int) -> dict:
    """Time summed over every attempt of a resumed run, and the last attempt's apart."""
    return {"wall_time_s": earlier_wall + wall,
            "train_time_s": result.earlier_train_time_s + result.train_time_s,
            "last_attempt_wall_time_s": wall, "last_attempt_train_time_s": result.train_time_s,
            "attempts": attempts}


def _memory_fields(peak: Any, account: Any) -> dict:
    """The device's peak beside the step's account (docs/metrics.md, training memory)."""
    fields = {"peak_memory_bytes": peak.bytes, "peak_memory_kind": peak.kind,
              "peak_memory_reserved_bytes": peak.reserved_bytes}
    return {**fields, **(account.as_dict() if account is not None else {})}


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
        if outcomes.get("failed") or outcomes.get("interrupted"):
            raise SystemExit(1)
