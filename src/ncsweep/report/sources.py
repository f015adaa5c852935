"""Finding and reading runs: run folders, offline W&B runs and W&B projects, one row per run.

A run folder's identity (dataset, arch, head, loss, optim, dim, seed, embedding, ...) comes from
its ``run.json`` only and its results from ``summary.json`` and ``metrics.jsonl``, all read
through :class:`ncsweep.tracking.RunFolder`; a folder without ``run.json`` is listed as
unreadable. W&B runs are mapped onto the same columns from their summary, which mirrors
summary.json.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ncsweep.report.wandb_log import read_wandb_offline
from ncsweep.tracking import (
    CONFIG_FILE,
    FAILED,
    RUN_FILE,
    RUN_FORMAT,
    SUMMARY_FILE,
    RunFolder,
)

logger = logging.getLogger(__name__)

ID_COLUMNS = ("dataset", "arch", "loss", "head", "embedding", "feature_dim", "num_classes",
              "seed", "optim", "schedule", "dim", "name", "run_key", "path", "status")
EXTRA_COLUMNS = ("reason", "source", "variant", "diverged", "last_epoch",
                 "epochs_to_full_train_acc")
HISTORY_ID = ("name", "run_key", "path", "status", "dataset", "arch", "loss", "head",
              "embedding", "feature_dim", "num_classes", "dim", "seed", "optim")
RUN_MARKERS = (RUN_FILE, CONFIG_FILE, SUMMARY_FILE, FAILED, RunFolder.ATTEMPT_FILE)
NOT_VARIANT = ("seed", "head", "dim", "name", "logger", "launcher", "trainer.ensemble",
               "trainer.resume",
               "trainer.progress", "trainer.device", "dataset", "arch", "loss", "optim",
               "schedule", "experiment")
NOT_VARIANT_PREFIXES = ("hydra.", "logger.", "launcher.")
INT_COLUMNS = ("feature_dim", "num_classes", "seed", "epoch", "step", "last_epoch",
               "epochs_to_full_train_acc", "params_total", "params_trainable", "epochs",
               "peak_memory_bytes", "train_memory_bytes", "resumed_from_epoch", "n_per_class")
FULL_ACC = 1.0 - 1e-9
_WANDB_PRIVATE = re.compile(r"^_")


class ReportError(ValueError):
    """Input the report cannot use; the message is one line that names the input."""


@dataclass
class Loaded:
    """What the sources held: one dict per run and one per eval point."""

    runs: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)

    def extend(self, other: Loaded) -> None:
        self.runs.extend(other.runs)
        self.history.extend(other.history)


def load(sources: str | os.PathLike | Iterable[str | os.PathLike]
         ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Runs and history of every source, read once; raises ReportError on unusable input."""
    loaded = Loaded()
    seen: set[str] = set()
    for source in _as_list(sources):
        part = _load_source(str(source))
        part.runs = [r for r in part.runs if r["path"] not in seen]
        fresh = {r["path"] for r in part.runs}
        part.history = [h for h in part.history if h["path"] in fresh]
        seen.update(fresh)
        loaded.extend(part)
    return runs_frame(loaded.runs), history_frame(loaded.history)


def load_runs(sources: str | os.PathLike | Iterable[str | os.PathLike]) -> pd.DataFrame:
    """One row per run: identity columns, status and reason, final metrics, derived stability."""
    return load(sources)[0]


def load_history(sources: str | os.PathLike | Iterable[str | os.PathLike]) -> pd.DataFrame:
    """One row per eval point (epoch, step, metrics) with the run's identifying columns."""
    return load(sources)[1]


def runs_frame(rows: list[dict]) -> pd.DataFrame:
    """Runs as a DataFrame with the identity columns first, in a fixed order."""
    frame = pd.DataFrame(rows)
    lead = [*ID_COLUMNS, *EXTRA_COLUMNS]
    for column in lead:
        if column not in frame:
            frame[column] = None
    rest = [c for c in frame.columns if c not in lead]
    return _integers(frame[lead + rest].reset_index(drop=True))


def history_frame(rows: list[dict]) -> pd.DataFrame:
    """Eval points as a DataFrame, identity columns first, sorted by run and epoch."""
    frame = pd.DataFrame(rows)
    for column in (*HISTORY_ID, "epoch", "step"):
        if column not in frame:
            frame[column] = None
    rest = [c for c in frame.columns if c not in (*HISTORY_ID, "epoch", "step")]
    frame = _integers(frame[[*HISTORY_ID, "epoch", "step", *rest]])
    return frame.sort_values(["path", "epoch"], kind="stable").reset_index(drop=True)


def _integers(frame: pd.DataFrame) -> pd.DataFrame:
    """Whole-number columns as nullable integers, so a missing seed does not turn 0 into 0.0."""
    for column in INT_COLUMNS:
        if column in frame:
            values = pd.to_numeric(frame[column], errors="coerce")
            whole = values.dropna()
            if (whole == whole.round()).all():
                frame[column] = values.astype("Int64")
    return frame


def _as_list(sources: Any) -> list:
    if isinstance(sources, (str, os.PathLike)):
        return [sources]
    return list(sources)


def _load_source(source: str) -> Loaded:
    if source.startswith("wandb://"):
        from ncsweep.report.wandb_project import load_wandb_project

        return load_wandb_project(source)
    path = Path(source)
    if not path.exists():
        raise ReportError(f"no such file or folder: {source}")
    folders, offline = discover(path)
    if not folders and not offline:
        raise ReportError(f"no runs under {source} (looked for run folders with "
                          f"{', '.join(RUN_MARKERS)} and W&B offline-run-*/run-*.wandb)")
    loaded = Loaded()
    for folder in folders:
        loaded.extend(read_run_folder(folder))
    for run_dir in offline:
        loaded.extend(read_offline_run(run_dir))
    return loaded


def discover(path: Path) -> tuple[list[Path], list[Path]]:
    """Run folders and W&B offline-run folders at or below ``path`` (not inside run folders)."""
    if path.is_file():
        path = path.parent
    if is_run_folder(path):
        return [path], []
    if is_offline_wandb(path):
        return [], [path]
    folders: list[Path] = []
    offline: list[Path] = []
    stack = [path]
    while stack:
        with os.scandir(stack.pop()) as entries:
            subdirs = sorted(e.path for e in entries
                             if e.is_dir(follow_symlinks=False) and not e.name.startswith("."))
        for sub in map(Path, subdirs):
            if is_run_folder(sub):
                folders.append(sub)
            elif is_offline_wandb(sub):
                offline.append(sub)
            else:
                stack.append(sub)
    return sorted(folders), sorted(offline)


def is_run_folder(path: Path) -> bool:
    """A folder that tracking wrote a run into: a config, summary, FAILED marker or attempt."""
    return any((path / name).exists() for name in RUN_MARKERS)


def is_offline_wandb(path: Path) -> bool:
    """A W&B ``offline-run-*`` folder holding its ``run-*.wandb`` record log."""
    return path.name.startswith("offline-run-") and any(path.glob("run-*.wandb"))


def read_run_folder(path: Path) -> Loaded:
    """One run folder: identity from run.json, results from summary.json and metrics.jsonl."""
    folder = RunFolder(path)
    identity, problem = _read_identity(folder)
    row: dict[str, Any] = dict.fromkeys(ID_COLUMNS)
    row.update(path=str(path.resolve()), source="run_folder")
    if problem:
        logger.warning("%s: %s", path, problem)
        row.update(status="unreadable", reason=problem)
        return _finish(row, {}, [])
    row.update({k: v for k, v in identity.items() if k != "format" and _scalar(v)})
    summary, broken = _read_json(folder.read_summary, folder.file(SUMMARY_FILE))
    history = folder.read_metrics()
    row["status"], row["reason"] = _folder_status(folder, summary, broken, history)
    return _finish(row, summary, history, identity.get("overrides"))


def _read_identity(folder: RunFolder) -> tuple[dict, str | None]:
    """run.json, or why it cannot be used (absent in runs written before it existed)."""
    if not folder.file(RUN_FILE).exists():
        return {}, (f"no {RUN_FILE}: identity unknown (a run written before {RUN_FILE} "
                    "existed, or not an ncsweep run folder)")
    try:
        identity = folder.read_run()
    except (OSError, ValueError) as err:
        return {}, f"{RUN_FILE} unreadable: {type(err).__name__}: {err}"
    if not isinstance(identity, dict) or identity.get("format") != RUN_FORMAT:
        found = identity.get("format") if isinstance(identity, dict) else type(identity).__name__
        return {}, f"{RUN_FILE} is not in format {RUN_FORMAT} (found {found!r})"
    return identity, None


def read_offline_run(path: Path) -> Loaded:
    """One W&B offline run mapped onto the run-folder columns (its summary mirrors summary.json)."""
    try:
        record = read_wandb_offline(path)
    except Exception as err:  # a corrupt record log is listed as a failed run, not a crash
        row = dict.fromkeys(ID_COLUMNS)
        row.update(path=str(path.resolve()), status="failed", source="wandb_offline",
                   reason=f"cannot read the offline W&B run: {type(err).__name__}: {err}")
        return _finish(row, {}, [])
    return from_wandb_record(record, str(path.resolve()), "wandb_offline",
                             unfinished="no summary in the W&B log: unfinished, or ended "
                                        "without one (failed)")


def from_wandb_record(record: Mapping, path: str, source: str, unfinished: str,
                      state: str | None = None) -> Loaded:
    """Map a W&B run's config, history and summary onto the run-folder columns."""
    summary = {k: v for k, v in record["summary"].items() if not _WANDB_PRIVATE.match(k)}
    config = {k: v for k, v in record["config"].items() if not _WANDB_PRIVATE.match(k)}
    history = [{k: v for k, v in row.items() if not _WANDB_PRIVATE.match(k)}
               for row in record["history"]]
    status = summary.get("status")
    reason = None
    if status not in ("done", "dry_run"):
        status, reason = _wandb_status(state, unfinished)
    row = _wandb_identity(config, summary)
    row.update(path=path, status=status, reason=reason, source=source)
    return _finish(row, summary, history, summary.get("overrides"))


def _wandb_status(state: str | None, unfinished: str) -> tuple[str, str]:
    if state in ("failed", "crashed", "killed"):
        return "failed", f"W&B run state: {state}"
    if state == "finished":
        return "failed", "W&B run finished without an ncsweep summary"
    return "running", unfinished


def _finish(row: dict, summary: Mapping, history: list[dict], overrides: Any = None) -> Loaded:
    """Add final metrics (only for runs that finished) and stability figures from the history."""
    if row["status"] in ("done", "dry_run"):
        for key, value in summary.items():
            if key not in row and _scalar(value):
                row[key] = value
    row["variant"] = _variant(overrides, row.get("run_key"))
    row["last_epoch"] = history[-1].get("epoch") if history else None
    row["epochs_to_full_train_acc"] = _epochs_to_full(history)
    row["diverged"] = _diverged(row, history)
    ident = {k: row.get(k) for k in HISTORY_ID}
    points = [{**ident, **{k: v for k, v in h.items() if _scalar(v)}} for h in history]
    return Loaded([row], points)


def _folder_status(folder: RunFolder, summary: Mapping, problem: str | None,
                   history: list[dict]) -> tuple[str, str | None]:
    marker = folder.status
    if marker == "done":
        if problem or not summary:
            return "failed", f"DONE marker but summary.json unreadable: {problem or 'missing'}"
        return "done", None
    if marker == "failed":
        return "failed", _safely(folder.failure) or "FAILED marker without a message"
    if summary.get("status") == "dry_run":
        return "dry_run", "dry run: built and one step on a random batch, no training"
    parts = ["no DONE or FAILED marker"]
    attempt = _safely(folder.last_attempt)
    if isinstance(attempt, dict):
        parts.append(f"last attempt: {attempt.get('outcome')}")
    if history:
        parts.append(f"last eval at epoch {history[-1].get('epoch')}")
    return "running", "; ".join(parts)


def _safely(read: Any) -> Any:
    """A marker's content, or None where the file is empty or unreadable."""
    try:
        return read()
    except (OSError, ValueError, IndexError):
        return None


def _read_json(read: Any, path: Path) -> tuple[dict, str | None]:
    if not path.exists():
        return {}, None
    try:
        return read(), None
    except (OSError, ValueError) as err:
        return {}, f"{type(err).__name__}: {err}"


def _wandb_identity(config: Mapping, summary: Mapping) -> dict:
    """A W&B run's identity: the summary (a copy of summary.json), else the plain config values."""
    dataset = config.get("dataset") or {}
    row: dict[str, Any] = dict.fromkeys(ID_COLUMNS)
    row.update(name=config.get("name"), seed=config.get("seed"),
               feature_dim=config.get("feature_dim"),
               dim=None if config.get("dim") is None else str(config.get("dim")),
               dataset=dataset.get("name"), num_classes=dataset.get("num_classes"))
    row.update({k: summary[k] for k in ID_COLUMNS if summary.get(k) is not None})
    return row


def _variant(overrides: Any, key: str | None) -> str:
    """The overrides that change the experiment, space-separated: all but seed, head and dim.

    Dropped too: choices run.json records as columns (dataset, arch, loss, optim, schedule,
    experiment) and keys that do not change what is trained (name, logger, launcher, hydra.*,
    trainer.resume, trainer.progress, trainer.device). A leading ``+`` is dropped, so
    ``+dataset.imbalance=exp`` and ``dataset.imbalance=exp`` are one variant.
    """
    items = list(overrides) if isinstance(overrides, list) else (key or "").split(",")
    kept = sorted({str(o).lstrip("+") for o in items if _changes_experiment(str(o))})
    return " ".join(kept)


def _changes_experiment(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+")
    return bool(key) and key not in NOT_VARIANT and not key.startswith(NOT_VARIANT_PREFIXES)


def _epochs_to_full(history: list[dict]) -> float | None:
    for row in history:
        acc = row.get("train_acc")
        if isinstance(acc, (int, float)) and acc >= FULL_ACC:
            return row.get("epoch")
    return None


def _diverged(row: Mapping, history: list[dict]) -> bool:
    """A non-finite training loss: a NonFiniteLoss failure, or NaN/inf rows that were ignored."""
    if str(row.get("reason") or "").startswith("NonFiniteLoss"):
        return True
    losses = [h.get("train_loss", 0.0) for h in history]
    if row["status"] == "done":
        losses.append(row.get("train_loss", 0.0))
    return any(v is None or (isinstance(v, float) and not math.isfinite(v)) for v in losses)


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))

