"""Everything a run writes: its folder (config, metrics, summary, markers, checkpoint), W&B mirror.

The run folder is the source of truth; W&B mirrors it. The report reads runs back only
through :class:`RunFolder`, so the two can never disagree on a file's layout.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from traceback import format_exception
from typing import Any

from ncsweep.diskspace import append_text, atomic_torch_save, atomic_write_text

RUN_FILE = "run.json"
RUN_FORMAT = "ncsweep-run-1"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "checkpoint.pt"
DONE, FAILED = "DONE", "FAILED"
CHECKPOINT_FORMAT = "ncsweep-checkpoint-1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: corrupt, foreign, or missing when required."""


def jsonable(value: Any) -> Any:
    """Plain JSON values; non-finite floats become None so every file stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return jsonable(value.item())
    return value


def write_atomic(path: Path, text: str, what: str | None = None) -> None:
    """Write a file so that readers see the old content or the new, never half of it; a full
    disk raises DiskFull naming ``what`` (the file's name by default) and leaves no temporary."""
    atomic_write_text(path, text, what or path.name)


def _writes(method: Callable) -> Callable:
    """A folder write that a reading-only folder (a rank other than 0) skips."""
    @functools.wraps(method)
    def guarded(self: RunFolder, *args: Any, **kwargs: Any) -> None:
        if self.writer:
            method(self, *args, **kwargs)

    return guarded


class RunFolder:
    """One run's folder and the files in it.

    ``writer=False`` (every rank but 0 of a distributed run) reads the folder and skips
    every write, so one process writes each file.
    """

    ATTEMPT_FILE = "attempt.json"

    def __init__(self, path: str | os.PathLike, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def status(self) -> str:
        """``done``, ``failed``, ``started`` (files but no marker) or ``new``."""
        if self.file(DONE).exists():
            return "done"
        if self.file(FAILED).exists():
            return "failed"
        if self.file(METRICS_FILE).exists() or self.file(CHECKPOINT_FILE).exists():
            return "started"
        return "new"

    @_writes
    def prepare(self) -> None:
        """Create the folder and drop markers left by an earlier attempt."""
        self.path.mkdir(parents=True, exist_ok=True)
        for marker in (DONE, FAILED):
            self.file(marker).unlink(missing_ok=True)

    @_writes
    def reset(self) -> None:
        """Forget an earlier attempt's results (metrics, summary, checkpoint, markers)."""
        self.prepare()
        for name in (METRICS_FILE, SUMMARY_FILE, CHECKPOINT_FILE):
            self.file(name).unlink(missing_ok=True)

    @_writes
    def write_run(self, identity: Mapping) -> None:
        """The run's identity (``run.json``), written at job start so even a failed run has one."""
        self.path.mkdir(parents=True, exist_ok=True)
        record = {"format": RUN_FORMAT, **identity}
        write_atomic(self.file(RUN_FILE), json.dumps(jsonable(record), indent=2),
                     "the run's identity")

    def read_run(self) -> dict:
        return json.loads(self.file(RUN_FILE).read_text())

    @_writes
    def write_config(self, config: Mapping) -> None:
        write_atomic(self.file(CONFIG_FILE), json.dumps(jsonable(config), indent=2),
                     "the resolved config")

    def read_config(self) -> dict:
        return json.loads(self.file(CONFIG_FILE).read_text())

    @_writes
    def append_metrics(self, row: Mapping) -> None:
        """Append one eval row and fsync it, so a killed run keeps every row it logged; a row
        that does not fit on the disk is cut back whole (DiskFull)."""
        append_text(self.file(METRICS_FILE), json.dumps(jsonable(row)) + "\n",
                    "an eval row")

    def read_metrics(self) -> list[dict]:
        """Every complete row; a torn last line (a kill mid-write) is ignored."""
        path = self.file(METRICS_FILE)
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return rows

    @_writes
    def keep_metrics(self, rows: Iterable[Mapping]) -> None:
        """Replace the metrics file by ``rows`` (used on resume, so no row is written twice)."""
        write_atomic(self.file(METRICS_FILE),
                     "".join(json.dumps(jsonable(r)) + "\n" for r in rows),
                     "the metrics kept for resuming")

    @_writes
    def write_summary(self, summary: Mapping) -> None:
        write_atomic(self.file(SUMMARY_FILE), json.dumps(jsonable(summary), indent=2),
                     "the summary")

    def read_summary(self) -> dict:
        return json.loads(self.file(SUMMARY_FILE).read_text())

    @_writes
    def mark_done(self) -> None:
        """Written last: a folder with DONE holds a complete, finished run."""
        self.file(FAILED).unlink(missing_ok=True)
        write_atomic(self.file(DONE), "", "the DONE marker")

    @_writes
    def mark_failed(self, error: BaseException, traceback: bool = True) -> None:
        """FAILED holds the one-line reason, then the traceback unless it was the user's input."""
        self.file(DONE).unlink(missing_ok=True)
        reason = f"{type(error).__name__}: {error}\n"
        if traceback:
            reason += "\n" + "".join(format_exception(type(error), error, error.__traceback__))
        write_atomic(self.file(FAILED), reason, "the FAILED marker")

    @_writes
    def record_attempt(self, outcome: str) -> None:
        """What the latest launch of this job did (done, skipped, failed, interrupted, disk
        full) and when."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.file(self.ATTEMPT_FILE),
                     json.dumps({"outcome": outcome, "time": time.time()}), "the attempt record")

    def last_attempt(self) -> dict | None:
        path = self.file(self.ATTEMPT_FILE)
        return json.loads(path.read_text()) if path.exists() else None

    def failure(self) -> str | None:
        """The first line of the FAILED marker, if any."""
        path = self.file(FAILED)
        lines = path.read_text().splitlines() if path.exists() else []
        return lines[0] if lines else None

    @_writes
    def save_checkpoint(self, state: Mapping, run_key: str) -> None:
        """Save training state atomically (temp file, fsync, rename); only the last one is
        kept, and a save that fails (a full disk: DiskFull) leaves the previous one whole."""
        atomic_torch_save({"format": CHECKPOINT_FORMAT, "run_key": run_key, **state},
                          self.file(CHECKPOINT_FILE), "the checkpoint")

    def load_checkpoint(self, run_key: str) -> dict | None:
        """The saved state, or None when there is none; never a half-loaded or foreign one."""
        import torch

        path = self.file(CHECKPOINT_FILE)
        if not path.exists():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(
                f"checkpoint {path} cannot be read ({type(err).__name__}: corrupt, truncated or "
                "not a safe checkpoint); delete it or run with trainer.resume=never") from None
        if not isinstance(state, dict) or "format" not in state:
            raise CheckpointError(f"checkpoint {path} is not an ncsweep checkpoint; delete it or "
                                  "run with trainer.resume=never")
        if state["format"] != CHECKPOINT_FORMAT:
            raise CheckpointError(f"checkpoint {path} has format {state['format']!r}; this "
                                  f"version resumes {CHECKPOINT_FORMAT!r} only: delete it or run "
                                  "with trainer.resume=never")
        if state.get("run_key") != run_key:
            raise CheckpointError(f"checkpoint {path} belongs to run {state.get('run_key')!r}, "
                                  f"not {run_key!r}; delete it or run with trainer.resume=never")
        return state


class WandbMirror:
    """Mirrors a run to Weights & Biases: offline unless the environment says otherwise."""

    def __init__(self, project: str = "ncsweep", entity: str | None = None,
                 mode: str = "offline", tags: Iterable[str] = ()) -> None:
        self.project, self.entity, self.mode, self.tags = project, entity, mode, list(tags)
        self.run = None

    PROBE_TIMEOUT_S = 4.0
    INIT_TIMEOUT_S = 6.0

    def start(self, run_dir: Path, run_id: str, name: str, group: str, config: Mapping,
              quiet: bool = False) -> None:
        """Start (or resume) the run; an unreachable server means offline, never a hang."""
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        import wandb

        mode = self.mode
        settings = {"quiet": True, "silent": quiet}
        if mode == "online":
            base_url = os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url
            problem = self.unreachable(base_url, self.PROBE_TIMEOUT_S)
            if problem is None:
                settings["init_timeout"] = self.INIT_TIMEOUT_S
                try:
                    self.run = self._init(wandb, mode, run_dir, run_id, name, group, config,
                                          settings)
                    return
                except Exception as err:
                    problem = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
            logging.getLogger(__name__).warning(
                "WARNING W&B server %s unreachable (%s): logging offline to %s/wandb; "
                "`python -m ncsweep.sync <sweep folder>` uploads it later",
                base_url, problem, run_dir)
            mode = "offline"
            settings.pop("init_timeout", None)
        self.run = self._init(wandb, mode, run_dir, run_id, name, group, config, settings)

    def _init(self, wandb: Any, mode: str, run_dir: Path, run_id: str, name: str, group: str,
              config: Mapping, settings: dict) -> Any:
        return wandb.init(
            project=self.project, entity=self.entity, mode=mode, tags=self.tags,
            dir=str(run_dir), id=run_id, name=name, group=group, resume="allow",
            config=jsonable(config), reinit="finish_previous",
            settings=wandb.Settings(**settings),
        )

    @staticmethod
    def unreachable(base_url: str, timeout: float) -> str | None:
        """Why the W&B server at ``base_url`` cannot be reached within ``timeout``, or None."""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(base_url, timeout=timeout):
                return None
        except urllib.error.HTTPError:
            return None
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__

    def log(self, row: Mapping, step: int) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in jsonable(row).items() if v is not None}, step=step)

    def finish(self, summary: Mapping | None = None, exit_code: int = 0) -> None:
        if self.run is None:
            return
        if summary:
            self.run.summary.update({k: v for k, v in jsonable(summary).items()
                                     if isinstance(v, (int, float, str, bool))})
        self.run.finish(exit_code=exit_code)
        self.run = None


class NoMirror(WandbMirror):
    """``logger=none``: the run folder only."""

    def __init__(self) -> None:
        super().__init__()

    def start(self, *args: Any, **kwargs: Any) -> None:
        self.run = None
