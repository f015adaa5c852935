"""Finding and reading runs: run folders, offline W&B runs and W&B projects, one row per run.

A run folder's identity (dataset, arch, head, loss, optim, dim, seed, embedding, ...) comes from
its ``run.json`` only and its results from ``summary.json`` and ``metrics.jsonl``, all read
through :class:`ncsweep.tracking.RunFolder`; a folder without ``run.json`` is listed as
unreadable. W&B runs are mapped onto the same columns (:mod:`ncsweep.report.rows`) from their
summary, which mirrors summary.json.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ncsweep.report.rows import (
    EXTRA_COLUMNS,
    HISTORY_ID,
    ID_COLUMNS,
    Loaded,
    ReportError,
    finish_row,
    from_wandb_record,
    is_scalar,
)
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

RUN_MARKERS = (RUN_FILE, CONFIG_FILE, SUMMARY_FILE, FAILED, RunFolder.ATTEMPT_FILE)
INT_COLUMNS = ("feature_dim", "num_classes", "seed", "epoch", "step", "last_epoch",
               "epochs_to_full_train_acc", "params_total", "params_trainable", "epochs",
               "peak_memory_bytes", "train_memory_bytes", "resumed_from_epoch", "n_per_class")


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
        return finish_row(row, {}, [])
    row.update({k: v for k, v in identity.items() if k != "format" and is_scalar(v)})
    summary, broken = _read_json(folder.read_summary, folder.file(SUMMARY_FILE))
    history = folder.read_metrics()
    row["status"], row["reason"] = _folder_status(folder, summary, broken, history)
    return finish_row(row, summary, history, identity.get("overrides"))


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
        return finish_row(row, {}, [])
    return from_wandb_record(record, str(path.resolve()), "wandb_offline",
                             unfinished="no summary in the W&B log: unfinished, or ended "
                                        "without one (failed)")


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
