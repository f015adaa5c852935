"""Read ncsweep runs back and judge the Neural Collapse claims: tables, verdicts, figures.

``python -m ncsweep.report RUNS... [--out DIR] [--group-by KEYS]`` writes runs.csv, report.md,
report.html and PNG figures into DIR (default ``./report``). RUNS are run folders, sweep folders
(searched recursively), W&B ``offline-run-*`` folders or ``wandb://entity/project[?group=NAME]``.
The same steps are public functions for notebooks: :func:`load_runs`, :func:`load_history`,
:func:`claims_table`, :func:`claim_verdicts`, :func:`ufm_table`, the ``*_figure`` functions and
:func:`write_report`. Run folders are read only through :mod:`ncsweep.tracking`, so the report and
the writer agree on every file's layout; only finished runs are ever averaged.
"""

from __future__ import annotations

import argparse
import html
import io
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ncsweep.tracking import CONFIG_FILE, FAILED, SUMMARY_FILE, RunFolder, read_wandb_offline

__all__ = [
    "DEFAULT_GROUP_BY", "ReportError", "claim_verdicts", "claims_table", "curves_figure",
    "format_claims", "groups_of", "load", "load_history", "load_runs", "main", "make_figures",
    "mixed_cells", "not_averaged", "png_bytes", "resources_figure", "ufm_figure", "ufm_suspects",
    "ufm_table", "write_report",
]


# ---- Reading runs: run folders, offline W&B runs and W&B projects, one row per run --------------

ID_COLUMNS = ("dataset", "arch", "loss", "head", "feature_dim", "num_classes", "seed",
              "optimizer", "dim", "name", "run_key", "path", "status")
EXTRA_COLUMNS = ("reason", "source", "variant", "diverged", "last_epoch",
                 "epochs_to_full_train_acc")
HISTORY_ID = ("name", "run_key", "path", "status", "dataset", "arch", "loss", "head",
              "feature_dim", "num_classes", "dim", "seed", "optimizer")
RUN_MARKERS = (CONFIG_FILE, SUMMARY_FILE, FAILED, RunFolder.ATTEMPT_FILE)
CHOICE_GROUPS = {"arch": "arch", "head": "head", "loss": "loss", "optimizer": "optim",
                 "schedule": "schedule"}
SETTING_KEYS = ("seed", "head", "dim", "name", "logger", "launcher", "trainer.resume",
                "trainer.progress", "trainer.device")
INT_COLUMNS = ("feature_dim", "num_classes", "seed", "epoch", "step", "last_epoch",
               "epochs_to_full_train_acc", "params_total", "params_trainable", "epochs",
               "peak_memory_bytes", "resumed_from_epoch", "n_per_class")
FULL_ACC = 1.0 - 1e-9
_TARGET = re.compile(r"^_target_:\s*(\S+)\s*$", re.MULTILINE)
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
    """One run folder: summary (or config while unfinished), markers and metrics.jsonl."""
    folder = RunFolder(path)
    marker = folder.status
    summary, problem = _read_json(folder.read_summary, folder.file(SUMMARY_FILE))
    config: dict = {}
    if not summary:
        config, _ = _read_json(folder.read_config, folder.file(CONFIG_FILE))
    history = folder.read_metrics()
    status, reason = _folder_status(folder, marker, summary, problem, history)
    row = _identity(config, summary, key=path.name, name=path.parent.name)
    row.update(path=str(path.resolve()), status=status, reason=reason, source="run_folder")
    return _finish(row, summary, history)


def read_offline_run(path: Path) -> Loaded:
    """One W&B offline run mapped onto the run-folder columns (its summary mirrors summary.json)."""
    try:
        record = read_wandb_offline(path)
    except Exception as err:  # a corrupt record log is listed as a failed run, not a crash
        row = _identity({}, {}, key=None, name=None)
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
    row = _identity(config, summary, key=summary.get("run_key"), name=config.get("name"))
    row.update(path=path, status=status, reason=reason, source=source)
    return _finish(row, summary, history)


def _wandb_status(state: str | None, unfinished: str) -> tuple[str, str]:
    if state in ("failed", "crashed", "killed"):
        return "failed", f"W&B run state: {state}"
    if state == "finished":
        return "failed", "W&B run finished without an ncsweep summary"
    return "running", unfinished


def _finish(row: dict, summary: Mapping, history: list[dict]) -> Loaded:
    """Add final metrics (only for runs that finished) and stability figures from the history."""
    if row["status"] in ("done", "dry_run"):
        for key, value in summary.items():
            if key not in row and _scalar(value):
                row[key] = value
    row["variant"] = _variant(summary.get("overrides"), row.get("run_key"))
    row["last_epoch"] = history[-1].get("epoch") if history else None
    row["epochs_to_full_train_acc"] = _epochs_to_full(history)
    row["diverged"] = _diverged(row, history)
    ident = {k: row.get(k) for k in HISTORY_ID}
    points = [{**ident, **{k: v for k, v in h.items() if _scalar(v)}} for h in history]
    return Loaded([row], points)


def _folder_status(folder: RunFolder, marker: str, summary: Mapping, problem: str | None,
                   history: list[dict]) -> tuple[str, str | None]:
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


def _identity(config: Mapping, summary: Mapping, key: str | None, name: str | None) -> dict:
    """Identity columns: the summary first, then the run key's overrides, then the config."""
    row: dict[str, Any] = dict.fromkeys(ID_COLUMNS)
    row.update({k: v for k, v in _from_config(config).items() if v is not None})
    row.update(_from_run_key(key))
    row["run_key"], row["name"] = key, config.get("name", name)
    row.update({k: summary[k] for k in ID_COLUMNS if summary.get(k) is not None})
    return row


def _from_config(config: Mapping) -> dict:
    if not config:
        return {}
    dataset = config.get("dataset") or {}
    row = {"dataset": dataset.get("name"), "num_classes": dataset.get("num_classes"),
           "feature_dim": config.get("feature_dim"), "seed": config.get("seed"),
           "dim": None if config.get("dim") is None else str(config.get("dim"))}
    for column, group in CHOICE_GROUPS.items():
        target = (config.get(group) or {}).get("_target_")
        row[column] = _choice_of(group, target)
    return row


def _from_run_key(key: str | None) -> dict:
    """Group choices, dim and seed named in a run key such as ``dim=K-2,head=etf,seed=1``."""
    pairs = dict(part.split("=", 1) for part in (key or "").split(",") if "=" in part)
    row: dict[str, Any] = {column: pairs[group] for column, group in CHOICE_GROUPS.items()
                           if group in pairs}
    for column in ("dataset", "dim"):
        if column in pairs:
            row[column] = pairs[column]
    if pairs.get("seed", "").isdigit():
        row["seed"] = int(pairs["seed"])
    return row


def _choice_of(group: str, target: str | None) -> str | None:
    """The conf/ choice whose ``_target_`` is ``target`` (e.g. ncsweep.heads.ETFHead -> etf)."""
    if target is None:
        return None
    return _choices().get((group, target), target.rsplit(".", 1)[-1].lower())


@lru_cache(maxsize=1)
def _choices() -> dict[tuple[str, str], str]:
    try:
        from ncsweep.app import conf_dir

        conf = conf_dir()
    except (ImportError, SystemExit):
        return {}
    found = {}
    for group in CHOICE_GROUPS.values():
        for file in sorted((conf / group).glob("*.yaml")):
            match = _TARGET.search(file.read_text())
            if match:
                found[(group, match.group(1))] = file.stem
    return found


def _variant(overrides: Any, key: str | None) -> str:
    """The overrides other than the table's own settings: runs in one cell should share them."""
    items = list(overrides) if isinstance(overrides, list) else (key or "").split(",")
    kept = sorted(o for o in items if "=" in o and o.split("=", 1)[0].lstrip("+~")
                  not in SETTING_KEYS)
    return ",".join(kept)


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


# ---- wandb://entity/project: wandb.Api(), failing fast when no server answers -------------------

CONNECT_TIMEOUT_S = 3.0
API_TIMEOUT_S = 15


def parse_wandb_url(url: str) -> tuple[str, str, str | None]:
    """(entity, project, group) of ``wandb://entity/project?group=NAME``."""
    parts = urlsplit(url)
    project = parts.path.strip("/")
    if not parts.netloc or not project or "/" in project:
        raise ReportError(f"bad W&B source {url!r}: expected wandb://entity/project[?group=NAME]")
    group = parse_qs(parts.query).get("group", [None])[0]
    return parts.netloc, project, group


def base_url() -> str:
    """The server ``wandb.Api()`` would use: WANDB_BASE_URL, else wandb's configured default."""
    from wandb import env
    from wandb.sdk import wandb_setup

    return str(env.get_base_url(wandb_setup.singleton().settings.base_url)).rstrip("/")


def check_reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ReportError unless a TCP connection to ``url``'s host opens within ``timeout``.

    ``wandb.Api()`` retries an unreachable server for minutes; this probe fails in seconds (the
    thread also bounds a slow DNS lookup, which the socket timeout does not cover).
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(err)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    error = outcome[0] if outcome else TimeoutError(f"no answer in {timeout:.0f} s")
    if error is not None:
        raise ReportError(f"W&B server {url} is not reachable ({type(error).__name__}: "
                          f"{error}); read the run folders or the offline runs instead")


def load_wandb_project(url: str) -> Loaded:
    """Every run of a W&B project (optionally one group), mapped onto the run-folder columns."""
    entity, project, group = parse_wandb_url(url)
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    server = base_url()
    check_reachable(server)
    try:
        return _query_wandb(entity, project, group)
    except ReportError:
        raise
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise ReportError(f"W&B query {url} on {server} failed: {type(err).__name__}: "
                          f"{first}") from None


def _query_wandb(entity: str, project: str, group: str | None) -> Loaded:
    import wandb

    api = wandb.Api(timeout=API_TIMEOUT_S)
    runs = list(api.runs(f"{entity}/{project}", filters={"group": group} if group else None))
    if not runs:
        raise ReportError(f"no runs in wandb://{entity}/{project}"
                          + (f"?group={group}" if group else ""))
    loaded = Loaded()
    for run in runs:
        record = {"config": dict(run.config), "summary": dict(run.summary.items()),
                  "history": list(run.scan_history())}
        loaded.extend(from_wandb_record(record, run.url, "wandb_api",
                                        unfinished=f"W&B run state: {run.state}",
                                        state=run.state))
    return loaded


# ---- The claims table, its verdicts, the UFM landscape table ------------------------------------

DEFAULT_GROUP_BY = ("dataset", "arch", "loss")
SETTINGS = (("learned", "large"), ("learned", "K"), ("etf", "large"), ("etf", "K"))
BASELINE, CANDIDATE = ("learned", "large"), ("etf", "K")
CELL_METRICS = ("test_acc", "train_acc", "nc1", "nc2_m", "nc3", "nc4", "params_trainable",
                "params_total", "peak_memory_bytes", "epochs_to_full_train_acc", "wall_time_s")
NC_METRICS = ("nc1", "nc2_m", "nc3", "nc4")
UFM_KEYS = ("num_classes", "feature_dim", "loss")
TOLERANCE_PTS = 0.5
MEMORY_CLAIM_PCT = 20.0
MEMORY_KINDS = {
    "cpu_peak_rss": "the process's peak RSS, which includes the Python and torch baseline",
    "cpu_peak_rss_lifetime": "the process's lifetime peak RSS (no per-phase reset on this OS)",
    "cuda_max_allocated": "the CUDA allocator's peak of allocated tensor memory",
}


def setting_name(head: str, d_kind: str) -> str:
    """Canonical setting key, e.g. ``etf, d=K`` or ``learned, d=large``."""
    return f"{head}, d={d_kind}"


def with_settings(runs: pd.DataFrame, group_by: Sequence[str] = DEFAULT_GROUP_BY) -> pd.DataFrame:
    """Non-UFM runs with ``d_kind`` (K, large or None) and ``setting``; d=large is the group max."""
    frame = runs[runs["arch"].astype(object) != "ufm"].copy()
    keys = list(group_by)
    dims, classes = numeric(frame, "feature_dim"), numeric(frame, "num_classes")
    frame["_d"] = dims
    largest = frame.groupby(keys, dropna=False)["_d"].transform("max") if len(frame) else dims
    kind = np.where(dims == classes, "K", np.where((dims == largest) & (dims > classes),
                                                    "large", None))
    frame["d_kind"] = pd.Series(kind, index=frame.index, dtype=object)
    frame["d_large"] = largest
    frame["setting"] = [setting_name(h, k) if k is not None and h in ("etf", "learned") else None
                        for h, k in zip(frame["head"], frame["d_kind"], strict=True)]
    return frame.drop(columns="_d")


def claims_table(runs: pd.DataFrame, group_by: Sequence[str] = DEFAULT_GROUP_BY) -> pd.DataFrame:
    """One row per (group, setting): mean/std/n of the final metrics, counts, deltas vs baseline.

    Every group gets all four settings; a setting without finished runs has ``n_done == 0``.
    """
    keys = _keys(group_by)
    frame = with_settings(runs, keys)
    frame = frame[frame["setting"].notna() & frame[keys].notna().all(axis=1)]
    groups = frame[keys].drop_duplicates().sort_values(keys).itertuples(index=False, name=None)
    rows = [_cell(frame, dict(zip(keys, group, strict=True)), head, kind)
            for group in groups for head, kind in SETTINGS]
    table = pd.DataFrame(rows, columns=_table_columns(keys))
    return _add_deltas(table, keys)


def _keys(group_by: Sequence[str]) -> list[str]:
    keys = list(group_by)
    if not keys:
        raise ValueError("group_by needs at least one column (e.g. dataset, arch, loss)")
    return keys


def _table_columns(keys: list[str]) -> list[str]:
    stats = [f"{m}_{s}" for m in CELL_METRICS for s in ("mean", "std")]
    return [*keys, "setting", "head", "d_kind", "feature_dim", "n_done", "n_failed",
            "n_running", "n_diverged", "n_unstable", "seeds", "n_full_train_acc",
            "peak_memory_kind", *stats]


def _cell(frame: pd.DataFrame, group: dict, head: str, kind: str) -> dict:
    mask = (frame["head"] == head) & (frame["d_kind"] == kind)
    for key, value in group.items():
        mask &= frame[key] == value
    cell = frame[mask]
    done = cell[cell["status"] == "done"]
    diverged = flag(cell, "diverged")
    dims = sorted({int(d) for d in cell["feature_dim"].dropna()})
    row = {**group, "setting": setting_name(head, kind), "head": head, "d_kind": kind,
           "feature_dim": dims[0] if len(dims) == 1 else (None if not dims else str(dims)),
           "n_done": len(done), "n_failed": int((cell["status"] == "failed").sum()),
           "n_running": int((cell["status"] == "running").sum()),
           "n_diverged": int(diverged.sum()),
           "n_unstable": int(((cell["status"] == "failed") | diverged).sum()),
           "seeds": ",".join(str(int(s)) for s in sorted(done["seed"].dropna())),
           "n_full_train_acc": int(done["epochs_to_full_train_acc"].notna().sum()),
           "peak_memory_kind": ",".join(sorted(done["peak_memory_kind"].dropna().unique()))
           if "peak_memory_kind" in done else ""}
    for metric in CELL_METRICS:
        values = numeric(done, metric)
        row[f"{metric}_mean"] = values.mean() if values.notna().any() else math.nan
        row[f"{metric}_std"] = values.std() if values.notna().sum() > 1 else math.nan
    return row


def _add_deltas(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Differences of every setting against the (learned, large d) baseline of its group."""
    columns = ["test_acc_mean", "train_acc_mean", "params_trainable_mean", "params_total_mean",
               "peak_memory_bytes_mean", "peak_memory_kind"]
    base = table.loc[table["setting"] == setting_name(*BASELINE), [*keys, *columns]]
    lookup = table[keys].merge(base, on=keys, how="left")
    lookup.index = table.index
    for metric in ("test_acc", "train_acc"):
        table[f"{metric}_delta_pts"] = 100 * (table[f"{metric}_mean"] - lookup[f"{metric}_mean"])
    for metric in ("params_trainable", "params_total", "peak_memory_bytes"):
        reference = lookup[f"{metric}_mean"]
        table[f"{metric}_saved_pct"] = 100 * (reference - table[f"{metric}_mean"]) / reference
    same_kind = (table["peak_memory_kind"] == lookup["peak_memory_kind"]) & ~table[
        "peak_memory_kind"].str.contains(",", regex=False)
    table.loc[~same_kind, "peak_memory_bytes_saved_pct"] = math.nan
    table["memory_comparable"] = same_kind
    return table


def claim_verdicts(table: pd.DataFrame, group_by: Sequence[str] = DEFAULT_GROUP_BY,
                   tolerance_pts: float = TOLERANCE_PTS) -> pd.DataFrame:
    """Plain verdicts per group: accuracy, parameters, memory, collapse, stability."""
    keys = _keys(group_by)
    rows = []
    for group, cells in table.groupby(keys, sort=True):
        values = dict(zip(keys, group if isinstance(group, tuple) else (group,), strict=True))
        by_setting = cells.set_index("setting")
        base = by_setting.loc[setting_name(*BASELINE)]
        cand = by_setting.loc[setting_name(*CANDIDATE)]
        for claim, verdict, text in _group_verdicts(base, cand, tolerance_pts):
            rows.append({**values, "claim": claim, "verdict": verdict, "text": text})
    return pd.DataFrame(rows, columns=[*keys, "claim", "verdict", "text"])


def _group_verdicts(base: pd.Series, cand: pd.Series, tol: float) -> list[tuple[str, str, str]]:
    missing = [setting_name(*s) for s, cell in ((BASELINE, base), (CANDIDATE, cand))
               if cell["n_done"] == 0]
    if missing:
        text = f"cannot judge: no finished runs for {' and '.join(missing)}"
        return [(claim, "n/a", f"{claim}: {text}")
                for claim in ("accuracy", "parameters", "memory", "collapse", "stability")]
    return [_accuracy_verdict(base, cand, tol), _params_verdict(cand), _memory_verdict(cand),
            _collapse_verdict(base, cand), _stability_verdict(base, cand)]


def _seeds(base: pd.Series, cand: pd.Series) -> str:
    if base["n_done"] == cand["n_done"]:
        return f"{int(cand['n_done'])} seed{'s' if cand['n_done'] != 1 else ''} each"
    return f"{int(cand['n_done'])} vs {int(base['n_done'])} seeds"


def _accuracy_verdict(base: pd.Series, cand: pd.Series, tol: float) -> tuple[str, str, str]:
    delta = cand["test_acc_delta_pts"]
    if math.isnan(delta):
        return "accuracy", "n/a", "test accuracy: not recorded for these runs"
    verdict = "yes" if delta >= -tol else "no"
    text = (f"ETF + d=K within {tol:g} points of baseline test accuracy (or above it): "
            f"{verdict} ({100 * cand['test_acc_mean']:.2f}% vs {100 * base['test_acc_mean']:.2f}%,"
            f" {delta:+.2f} pts; {_seeds(base, cand)})")
    return "accuracy", verdict, text


def _params_verdict(cand: pd.Series) -> tuple[str, str, str]:
    saved, total = cand["params_trainable_saved_pct"], cand["params_total_saved_pct"]
    if math.isnan(saved):
        return "parameters", "n/a", "parameters saved: not recorded"
    text = (f"parameters saved by ETF + d=K: {saved:.1f}% of trainable parameters "
            f"({cand['params_trainable_mean']:,.0f} left); {total:.1f}% of all parameters")
    return "parameters", f"{saved:.1f}%", text


def _memory_verdict(cand: pd.Series) -> tuple[str, str, str]:
    saved, kind = cand["peak_memory_bytes_saved_pct"], cand["peak_memory_kind"]
    if not cand["memory_comparable"] or math.isnan(saved):
        return "memory", "n/a", ("peak memory saved: not comparable (memory kinds differ or "
                                 "missing: the runs must measure the same kind)")
    meaning = MEMORY_KINDS.get(kind, "as recorded by the runs")
    claim = "yes" if saved > MEMORY_CLAIM_PCT else "no"
    text = (f"peak memory saved by ETF + d=K: {saved:.1f}% ({kind}: {meaning}); "
            f"over {MEMORY_CLAIM_PCT:g}% as claimed for ResNet18: {claim}")
    return "memory", f"{saved:.1f}%", text


def _collapse_verdict(base: pd.Series, cand: pd.Series) -> tuple[str, str, str]:
    parts = [f"{label} {cand[f'{m}_mean']:.3g} vs {base[f'{m}_mean']:.3g}"
             for m, label in zip(NC_METRICS, ("NC1", "NC2", "NC3", "NC4"), strict=True)]
    if math.isnan(cand["nc1_mean"]) or math.isnan(base["nc1_mean"]):
        return "collapse", "n/a", "NC metrics at the end: not recorded for these runs"
    verdict = "yes" if cand["nc1_mean"] <= base["nc1_mean"] else "no"
    text = (f"ETF + d=K collapses at least as far as the baseline (NC1): {verdict} "
            f"({'; '.join(parts)}, ETF + d=K vs baseline, at the end; NC2 is nc2_m)")
    return "collapse", verdict, text


def _stability_verdict(base: pd.Series, cand: pd.Series) -> tuple[str, str, str]:
    bad_cand, bad_base = int(cand["n_unstable"]), int(base["n_unstable"])
    verdict = "yes" if bad_cand == 0 else "no"
    text = (f"ETF + d=K trains stably: {verdict} (test-acc std over seeds "
            f"{_pts(cand['test_acc_std'])} vs {_pts(base['test_acc_std'])}; failed or diverged "
            f"runs {bad_cand} vs {bad_base}; epochs to 100% train accuracy "
            f"{epochs_text(cand)} vs {epochs_text(base)})")
    return "stability", verdict, text


def _pts(std: float) -> str:
    return "n/a (1 seed)" if math.isnan(std) else f"{100 * std:.2f} pts"


def epochs_text(cell: pd.Series) -> str:
    """Epochs to 100% train accuracy of a cell: the mean over runs that got there, and how many."""
    reached, n = int(cell["n_full_train_acc"]), int(cell["n_done"])
    if reached == 0:
        return f"never (0/{n})"
    return f"{cell['epochs_to_full_train_acc_mean']:.3g} ({reached}/{n} runs)"


def mixed_cells(runs: pd.DataFrame, group_by: Sequence[str] = DEFAULT_GROUP_BY) -> list[str]:
    """Groups whose cells mix runs that differ in more than the seed: their means would mislead."""
    keys = list(group_by)
    frame = with_settings(runs[runs["status"] == "done"], keys)
    frame = frame[frame["setting"].notna()]
    notes = []
    for group, runs_in in frame.groupby(keys, dropna=False, sort=True):
        label = " / ".join(str(v) for v in (group if isinstance(group, tuple) else (group,)))
        cells = runs_in.groupby("setting")
        for column in ("name", "variant", "optimizer"):
            if column in runs_in and (cells[column].nunique() > 1).any():
                values = sorted(str(v) for v in runs_in[column].dropna().unique())
                notes.append(f"{label}: runs of one setting differ in {column} ({values}); "
                             "add it to --group-by or report the sweeps one by one")
        repeated = sorted(s for s, c in runs_in.groupby("setting")["seed"]
                          if c.dropna().duplicated().any())
        if repeated:
            notes.append(f"{label}: a seed appears more than once in {'; '.join(repeated)} "
                         "(several sweeps?)")
    return notes


def other_settings(runs: pd.DataFrame, group_by: Sequence[str] = DEFAULT_GROUP_BY) -> list[str]:
    """Finished non-UFM runs that fit none of the four settings (e.g. d=K-1), named by d."""
    frame = with_settings(runs[runs["status"] == "done"], list(group_by))
    rest = frame[frame["setting"].isna()]
    pairs = sorted({(str(h), str(d)) for h, d in zip(rest["head"], rest["feature_dim"],
                                                       strict=True)})
    return [f"{h}, d={d}" for h, d in pairs]


def not_averaged(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs that did not finish (failed, running, dry run): path and reason, never averaged."""
    columns = ["status", "path", "reason", "dataset", "arch", "loss", "head", "dim", "seed"]
    return runs.loc[runs["status"] != "done", columns].reset_index(drop=True)


def ufm_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (K, d, loss) of finished UFM runs: share at the global optimum, gap, curvature."""
    ufm = runs[(runs["arch"] == "ufm") & (runs["status"] == "done")]
    columns = [*UFM_KEYS, "n", "n_optimum", "optimum_share", "gap_median", "gap_max",
               "hessian_min_eig_min", "grad_norm_max", "n_spurious_suspect"]
    if ufm.empty:
        return pd.DataFrame(columns=columns)
    ufm = ufm.assign(**{c: numeric(ufm, c) for c in ("objective_gap", "hessian_min_eig",
                                                      "grad_norm")},
                     _opt=flag(ufm, "reached_global_optimum"),
                     _sus=flag(ufm, "spurious_minimum_suspect"))
    grouped = ufm.groupby(list(UFM_KEYS), sort=True)
    table = pd.DataFrame({
        "n": grouped.size(), "n_optimum": grouped["_opt"].sum(),
        "optimum_share": grouped["_opt"].mean(),
        "gap_median": grouped["objective_gap"].median(), "gap_max": grouped["objective_gap"].max(),
        "hessian_min_eig_min": grouped["hessian_min_eig"].min(),
        "grad_norm_max": grouped["grad_norm"].max(), "n_spurious_suspect": grouped["_sus"].sum(),
    }).reset_index()
    return table[columns]


def ufm_suspects(runs: pd.DataFrame) -> pd.DataFrame:
    """Finished runs flagged spurious_minimum_suspect: possible counterexamples to the theorem."""
    flagged = flag(runs, "spurious_minimum_suspect")
    return runs[flagged & (runs["status"] == "done")].reset_index(drop=True)


def numeric(frame: pd.DataFrame, column: str) -> pd.Series:
    """A column as floats (NaN where absent or not a number)."""
    if column not in frame:
        return pd.Series(math.nan, index=frame.index, dtype=float)
    return pd.to_numeric(frame[column], errors="coerce").astype(float)


def flag(frame: pd.DataFrame, column: str) -> pd.Series:
    """A yes/no column as bools (False where absent or missing)."""
    if column not in frame:
        return pd.Series(False, index=frame.index, dtype=bool)
    return frame[column].astype(object).fillna(False).astype(bool)


# ---- Figures on the Agg canvas, built without pyplot so no global figure state leaks ------------

CURVE_PANELS = (("nc1", "NC1  tr(Σ_W Σ_B⁺)/K"), ("nc2_m", "NC2  (nc2_m)"), ("nc3", "NC3"),
                ("nc4", "NC4  (NCC mismatch)"), ("train_acc", "train accuracy"),
                ("test_acc", "test accuracy"))
LOG_METRICS = ("nc1", "nc2_m", "nc3")  # nc4 is a fraction that reaches exactly 0: linear
STYLE = {setting_name(*s): (f"C{i}", "--" if s[1] == "large" else "-")
         for i, s in enumerate(SETTINGS)}
GAP_FLOOR = 1e-20


def new_figure(width: float, height: float) -> Figure:
    """A figure bound to the Agg canvas (PNG output, no display needed)."""
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Figure, path: Path) -> Path:
    """Write ``figure`` as a PNG."""
    figure.savefig(path, format="png")
    return path


def png_bytes(figure: Figure) -> bytes:
    """The figure as PNG bytes (for notebooks: IPython.display.Image(data=...))."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def setting_label(setting: str, d_large: float | None) -> str:
    """``etf, d=K`` stays; ``learned, d=large`` becomes ``learned, d=512``."""
    if setting.endswith("d=large") and d_large is not None and not pd.isna(d_large):
        return setting.replace("d=large", f"d={int(d_large)}")
    return setting


def curves_figure(runs: pd.DataFrame, history: pd.DataFrame, group: Mapping[str, object],
                  group_by: Sequence[str]) -> Figure:
    """NC1-NC4 and accuracy against epoch for one group: mean line, min-max band over seeds."""
    settings = _group_settings(runs, group, group_by)
    points = history.merge(settings[["path", "setting", "d_large"]], on="path")
    figure = new_figure(13, 7)
    axes = figure.subplots(2, 3).ravel()
    for ax, (metric, title) in zip(axes, CURVE_PANELS, strict=True):
        _curve_panel(ax, points, metric, title)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncols=len(labels))
    figure.suptitle(" / ".join(str(v) for v in group.values()) + ": NC metrics and accuracy "
                    "per epoch (line: mean over seeds, band: min-max)")
    return figure


def _group_settings(runs: pd.DataFrame, group: Mapping[str, object],
                    group_by: Sequence[str]) -> pd.DataFrame:
    frame = with_settings(runs[runs["status"] == "done"], list(group_by))
    for key, value in group.items():
        frame = frame[frame[key] == value]
    return frame[frame["setting"].notna()]


def _curve_panel(ax: object, points: pd.DataFrame, metric: str, title: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if metric in LOG_METRICS:
        ax.set_yscale("log", nonpositive="mask")
    if metric not in points:
        ax.text(0.5, 0.5, f"{metric} not logged", ha="center", transform=ax.transAxes)
        return
    for setting, d_large in _ordered(points):
        rows = points[points["setting"] == setting]
        stats = pd.to_numeric(rows[metric], errors="coerce").groupby(rows["epoch"]).agg(
            ["mean", "min", "max"]).dropna()
        if stats.empty:
            continue
        color, style = STYLE[setting]
        ax.plot(stats.index, stats["mean"], color=color, linestyle=style, marker=".",
                label=setting_label(setting, d_large))
        ax.fill_between(stats.index, stats["min"], stats["max"], color=color, alpha=0.2)


def _ordered(points: pd.DataFrame) -> list[tuple[str, float]]:
    present = points.groupby("setting")["d_large"].first()
    return [(name, present[name]) for name in STYLE if name in present.index]


def resources_figure(table: pd.DataFrame, group: Mapping[str, object]) -> Figure:
    """Trainable (and total) parameters and peak memory per head x d setting of one group."""
    cells = table
    for key, value in group.items():
        cells = cells[cells[key] == value]
    d_large = cells.loc[cells["d_kind"] == "large", "feature_dim"].dropna()
    large = d_large.iloc[0] if len(d_large) else None
    labels = [setting_label(s, large) for s in cells["setting"]]
    colors = [STYLE[s][0] for s in cells["setting"]]
    x = np.arange(len(cells))
    figure = new_figure(11, 4.5)
    params, memory = figure.subplots(1, 2)
    params.bar(x, cells["params_total_mean"], color="none", edgecolor="grey", label="total")
    params.bar(x, cells["params_trainable_mean"], color=colors, label="trainable")
    params.set_title("parameters")
    params.legend()
    kind = ",".join(sorted({k for k in cells["peak_memory_kind"] if k})) or "unknown kind"
    memory.bar(x, cells["peak_memory_bytes_mean"] / 2**20, color=colors,
               yerr=cells["peak_memory_bytes_std"].fillna(0) / 2**20, capsize=4)
    memory.set_title(f"peak memory, MiB ({kind})")
    for ax in (params, memory):
        ax.set_xticks(x, labels, rotation=15)
        for i, n in enumerate(cells["n_done"]):
            if n == 0:
                ax.text(i, 0, "missing", ha="center", va="bottom", color="red")
    figure.suptitle(" / ".join(str(v) for v in group.values()) + ": model size and peak memory")
    return figure


def ufm_figure(runs: pd.DataFrame) -> Figure | None:
    """UFM runs per (K, d, loss): objective gap, smallest Hessian eigenvalue, share at optimum."""
    ufm = runs[(runs["arch"] == "ufm") & (runs["status"] == "done")].copy()
    if ufm.empty:
        return None
    ufm["_label"] = [f"K={k} d={d} {loss}" for k, d, loss in
                     ufm[list(UFM_KEYS)].itertuples(index=False, name=None)]
    labels = sorted(ufm["_label"].unique(), key=lambda s: _sort_key(ufm, s))
    position = {label: i for i, label in enumerate(labels)}
    x = ufm["_label"].map(position).to_numpy(float)
    x += np.random.default_rng(0).uniform(-0.2, 0.2, len(x))
    suspect = flag(ufm, "spurious_minimum_suspect")
    figure = new_figure(max(12, 1.2 * len(labels) + 6), 4.8)
    gap_ax, eig_ax, share_ax = figure.subplots(1, 3)
    gap = numeric(ufm, "objective_gap").abs().clip(lower=GAP_FLOOR)
    _strip(gap_ax, x, gap, suspect, "objective gap |f - f*|, log")
    gap_ax.set_yscale("log")
    gap_ax.set_ylim(GAP_FLOOR / 10, max(_top(gap) * 10, 1e-8))
    eig = numeric(ufm, "hessian_min_eig")
    _strip(eig_ax, x, eig, suspect, "smallest Hessian eigenvalue, symlog")
    reach = max(_top(eig.abs()) * 10, 1e-8)
    eig_ax.set_yscale("symlog", linthresh=1e-12)
    eig_ax.set_ylim(-reach, reach)
    eig_ax.axhline(0, color="grey", linewidth=0.8)
    share = flag(ufm, "reached_global_optimum").groupby(ufm["_label"]).mean()
    share_ax.bar(range(len(labels)), [share.get(label, 0.0) for label in labels], color="C2")
    share_ax.set_ylim(0, 1.05)
    share_ax.set_title("share of starts at the global optimum", fontsize="medium")
    for ax in (gap_ax, eig_ax, share_ax):
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_xlim(-0.5, len(labels) - 0.5)
    figure.suptitle("UFM landscape per (K, d, loss): one dot per random start (red x: "
                    f"spurious-minimum suspect); gaps below {GAP_FLOOR:g} drawn at it")
    return figure


def _sort_key(ufm: pd.DataFrame, label: str) -> tuple:
    row = ufm[ufm["_label"] == label].iloc[0]
    return tuple(str(row[k]).zfill(8) for k in UFM_KEYS)


def _top(values: pd.Series) -> float:
    top = values.max()
    return 0.0 if pd.isna(top) else float(top)


def _strip(ax: object, x: np.ndarray, y: pd.Series, suspect: pd.Series, title: str) -> None:
    ok = ~suspect.to_numpy()
    ax.scatter(x[ok], y.to_numpy()[ok], color="C0", s=18)
    ax.scatter(x[~ok], y.to_numpy()[~ok], color="red", s=40, marker="x")
    ax.set_title(title, fontsize="medium")


# ---- One document model rendered twice, as Markdown and as HTML, so the two never drift ---------

_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]+)`")
_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 1200px; margin: 2em auto; line-height: 1.4; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; }}
img {{ max-width: 100%; }}
.warning {{ background: #fee; border: 2px solid #c00; padding: 0.5em 1em; }}
</style></head><body>
{body}
</body></html>
"""


@dataclass
class Document:
    """Blocks of a report: headings, paragraphs, bullet lists, tables, images."""

    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("heading", (level, text)))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def rule(self) -> None:
        self.blocks.append(("rule", None))

    def warning(self, text: str) -> None:
        self.blocks.append(("warning", text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("bullets", list(items)))

    def table(self, frame: pd.DataFrame, index: bool = True) -> None:
        self.blocks.append(("table", (frame, index)))

    def image(self, path: str, alt: str) -> None:
        self.blocks.append(("image", (path, alt)))

    def to_markdown(self) -> str:
        """GitHub-flavoured Markdown."""
        parts = [f"# {self.title}"]
        for kind, value in self.blocks:
            parts.append(_MARKDOWN[kind](value))
        return "\n\n".join(parts) + "\n"

    def to_html(self) -> str:
        """A standalone HTML page with the same content."""
        parts = [f"<h1>{html.escape(self.title)}</h1>"]
        for kind, value in self.blocks:
            parts.append(_HTML[kind](value))
        return _PAGE.format(title=html.escape(self.title), body="\n".join(parts))


def markdown_table(frame: pd.DataFrame, index: bool = True) -> str:
    """A pipe table without extra dependencies (pandas' to_markdown needs tabulate)."""
    shown = frame.reset_index() if index else frame
    if index and frame.index.name is None:
        shown = shown.rename(columns={"index": ""})
    header = [_md_cell(c) for c in shown.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in shown.itertuples(index=False, name=None):
        lines.append("| " + " | ".join(_md_cell(v) for v in row) + " |")
    return "\n".join(lines)


def _md_cell(value: object) -> str:
    text = "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def inline_html(text: str) -> str:
    """Escape, then turn **bold** and `code` into tags."""
    escaped = html.escape(text)
    return _CODE.sub(r"<code>\1</code>", _BOLD.sub(r"<strong>\1</strong>", escaped))


_MARKDOWN = {
    "heading": lambda v: f"{'#' * v[0]} {v[1]}",
    "paragraph": lambda v: v,
    "rule": lambda v: "---",
    "warning": lambda v: f"> **WARNING:** {v}",
    "bullets": lambda v: "\n".join(f"- {item}" for item in v),
    "table": lambda v: markdown_table(*v),
    "image": lambda v: f"![{v[1]}]({v[0]})",
}
_HTML = {
    "heading": lambda v: f"<h{v[0]}>{inline_html(v[1])}</h{v[0]}>",
    "paragraph": lambda v: f"<p>{inline_html(v)}</p>",
    "rule": lambda v: "<hr>",
    "warning": lambda v: f'<p class="warning"><strong>WARNING:</strong> {inline_html(v)}</p>',
    "bullets": lambda v: "<ul>" + "".join(f"<li>{inline_html(i)}</li>" for i in v) + "</ul>",
    "table": lambda v: v[0].to_html(index=v[1], na_rep="", border=0),
    "image": lambda v: f'<p><img src="{html.escape(v[0])}" alt="{html.escape(v[1])}"></p>',
}


# ---- Assembling the report and writing it all or nothing ----------------------------------------

_SLUG = re.compile(r"[^A-Za-z0-9_.+-]+")
STATUS_ORDER = ("done", "failed", "running", "dry_run")


def groups_of(table: pd.DataFrame, group_by: Sequence[str]) -> list[dict]:
    """The (dataset, arch, loss)-style groups of a claims table, in table order."""
    keys = list(group_by)
    unique = table[keys].drop_duplicates().itertuples(index=False, name=None)
    return [dict(zip(keys, values, strict=True)) for values in unique]


def slug(group: dict) -> str:
    """A file-name-safe name for a group, e.g. ``digits-mlp-ce``."""
    return _SLUG.sub("_", "-".join(str(v) for v in group.values())).strip("_") or "all"


def make_figures(runs: pd.DataFrame, history: pd.DataFrame, table: pd.DataFrame,
                 group_by: Sequence[str]) -> dict[str, Figure]:
    """Every figure of the report by file name: curves and resources per group, the UFM plot."""
    made: dict[str, Figure] = {}
    for group in groups_of(table, group_by):
        name = slug(group)
        if not history.empty:
            made[f"curves-{name}.png"] = curves_figure(runs, history, group, group_by)
        made[f"resources-{name}.png"] = resources_figure(table, group)
    ufm = ufm_figure(runs)
    if ufm is not None:
        made["ufm.png"] = ufm
    return made


def format_claims(table: pd.DataFrame, group: dict) -> pd.DataFrame:
    """One group's cells as text: rows are quantities, columns the four head x d settings."""
    cells = table
    for key, value in group.items():
        cells = cells[cells[key] == value]
    large = cells.loc[cells["d_kind"] == "large", "feature_dim"].dropna()
    columns = {}
    for _, cell in cells.iterrows():
        label = setting_label(cell["setting"], large.iloc[0] if len(large) else None)
        columns[label] = _cell_text(cell)
    return pd.DataFrame(columns, index=list(_ROWS))


_ROWS = {
    "finished runs (seeds)": lambda c: f"{c['n_done']} ({c['seeds'] or '-'})",
    "failed / running / diverged": lambda c: f"{c['n_failed']} / {c['n_running']} / "
                                             f"{c['n_diverged']}",
    "test acc, %": lambda c: _pct(c, "test_acc"),
    "Δ test acc vs baseline, pts": lambda c: _signed(c["test_acc_delta_pts"], ".2f"),
    "train acc, %": lambda c: _pct(c, "train_acc"),
    "Δ train acc vs baseline, pts": lambda c: _signed(c["train_acc_delta_pts"], ".2f"),
    "NC1 (end)": lambda c: _sci(c, "nc1"),
    "NC2 (nc2_m, end)": lambda c: _sci(c, "nc2_m"),
    "NC3 (end)": lambda c: _sci(c, "nc3"),
    "NC4 (end)": lambda c: _sci(c, "nc4"),
    "trainable params": lambda c: _count(c["params_trainable_mean"]),
    "trainable params saved": lambda c: _signed(c["params_trainable_saved_pct"], ".1f", "%"),
    "peak memory, MiB": lambda c: _memory(c),
    "peak memory saved": lambda c: _signed(c["peak_memory_bytes_saved_pct"], ".1f", "%"),
    "epochs to 100% train acc": lambda c: epochs_text(c) if c["n_done"] else "-",
}


def _cell_text(cell: pd.Series) -> list[str]:
    if cell["n_done"] == 0:
        note = "missing (no finished runs)"
        return [note, _ROWS["failed / running / diverged"](cell)] + ["-"] * (len(_ROWS) - 2)
    texts = [fmt(cell) for fmt in _ROWS.values()]
    if cell["setting"] == setting_name(*BASELINE):
        texts = ["baseline" if "vs baseline" in row or "saved" in row else text
                 for row, text in zip(_ROWS, texts, strict=True)]
    return texts


def _nan(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _pct(cell: pd.Series, metric: str) -> str:
    mean, std = cell[f"{metric}_mean"], cell[f"{metric}_std"]
    if _nan(mean):
        return "-"
    spread = "" if _nan(std) else f" ± {100 * std:.2f}"
    return f"{100 * mean:.2f}{spread} (n={cell['n_done']})"


def _sci(cell: pd.Series, metric: str) -> str:
    mean, std = cell[f"{metric}_mean"], cell[f"{metric}_std"]
    if _nan(mean):
        return "-"
    return f"{mean:.3g}" + ("" if _nan(std) else f" ± {std:.2g}")


def _signed(value: float, spec: str, unit: str = "") -> str:
    return "-" if _nan(value) else f"{value:+{spec}}{unit}"


def _count(value: float) -> str:
    return "-" if _nan(value) else f"{value:,.0f}"


def _memory(cell: pd.Series) -> str:
    mean, std = cell["peak_memory_bytes_mean"], cell["peak_memory_bytes_std"]
    if _nan(mean):
        return "-"
    spread = "" if _nan(std) else f" ± {std / 2**20:.1f}"
    return f"{mean / 2**20:.1f}{spread} ({cell['peak_memory_kind']})"


def build_document(runs: pd.DataFrame, table: pd.DataFrame, verdicts: pd.DataFrame,
                   figure_names: Sequence[str], group_by: Sequence[str],
                   sources: Sequence[str]) -> Document:
    """report.md / report.html content: counts, claims per group, UFM landscape, runs apart."""
    doc = Document("Neural Collapse sweep report")
    _overview(doc, runs, sources)
    _suspect_alarm(doc, runs)
    if not table.empty:
        _claims_section(doc, runs, table, verdicts, figure_names, group_by)
    _ufm_section(doc, runs, "ufm.png" in figure_names)
    _apart_section(doc, runs)
    doc.rule()
    doc.paragraph(f"Written by `python -m ncsweep.report` on {time.strftime('%Y-%m-%d %H:%M')}. "
                  "Runs are read from their run folders (summary.json, metrics.jsonl, markers) "
                  "through ncsweep.tracking, or from W&B runs mapped onto the same columns. "
                  "Every run is one row of runs.csv.")
    return doc


def _overview(doc: Document, runs: pd.DataFrame, sources: Sequence[str]) -> None:
    counts = runs["status"].value_counts()
    parts = [f"{counts[s]} {s.replace('_', ' ')}" for s in STATUS_ORDER if s in counts]
    doc.paragraph(f"Sources: {', '.join(f'`{s}`' for s in sources) or '-'}")
    doc.paragraph(f"**{len(runs)} runs**: {', '.join(parts)}. Only finished (done) runs are "
                  "averaged; the others are listed apart at the end.")


def _suspect_alarm(doc: Document, runs: pd.DataFrame) -> None:
    suspects = ufm_suspects(runs)
    if suspects.empty:
        return
    doc.warning(f"**{len(suspects)} UFM run(s) flagged spurious_minimum_suspect**: gradient "
                "near zero, objective above the global optimum and no negative curvature found. "
                "Either a counterexample to the d = K theorem or a numerical problem: "
                "inspect these runs.")
    doc.bullets([f"`{p}` (K={k}, d={d}, {loss}, seed {s}, gap {g:.3g})" for p, k, d, loss, s, g in
                 suspects[["path", "num_classes", "feature_dim", "loss", "seed",
                           "objective_gap"]].itertuples(index=False, name=None)])


def _claims_section(doc: Document, runs: pd.DataFrame, table: pd.DataFrame,
                    verdicts: pd.DataFrame, figure_names: Sequence[str],
                    group_by: Sequence[str]) -> None:
    doc.heading(2, "Claims: a fixed simplex-ETF head at d = K against a learned head at large d")
    doc.paragraph("Baseline: a learned head at the largest d of the group. \"d=K\" means "
                  "feature_dim equals num_classes. Cells are mean ± std over seeds (ddof=1) of "
                  "finished runs at the end of training; NC2 is `nc2_m` (class means against "
                  "the simplex ETF); accuracies are in percent, differences in points.")
    for note in mixed_cells(runs, group_by):
        doc.warning(note)
    others = other_settings(runs, group_by)
    if others:
        doc.paragraph(f"Finished runs in other settings, not in the table: {', '.join(others)}.")
    for group in groups_of(table, group_by):
        title = " / ".join(f"{k}={v}" for k, v in group.items())
        doc.heading(3, title)
        mask = (verdicts[list(group)] == pd.Series(group)).all(axis=1)
        doc.bullets(list(verdicts.loc[mask, "text"]))
        doc.table(format_claims(table, group))
        for prefix, alt in (("curves", "NC metrics and accuracy per epoch"),
                            ("resources", "parameters and peak memory")):
            name = f"{prefix}-{slug(group)}.png"
            if name in figure_names:
                doc.image(name, f"{title}: {alt}")


def _ufm_section(doc: Document, runs: pd.DataFrame, has_figure: bool) -> None:
    table = ufm_table(runs)
    if table.empty:
        return
    doc.heading(2, "UFM landscape: every critical point at d = K is a global minimum or a "
                   "strict saddle")
    n, reached = int(table["n"].sum()), int(table["n_optimum"].sum())
    flagged = int(table["n_spurious_suspect"].sum())
    doc.bullets([f"random starts that reached the global optimum: {reached}/{n} "
                 f"({100 * reached / n:.0f}%)",
                 f"no spurious local minimum found: {'yes' if flagged == 0 else 'NO'} "
                 f"({flagged} suspect{'s' if flagged != 1 else ''})"])
    shown = table.rename(columns={"num_classes": "K", "feature_dim": "d"})
    for column in ("gap_median", "gap_max", "hessian_min_eig_min", "grad_norm_max"):
        shown[column] = shown[column].map(lambda v: "-" if _nan(v) else f"{v:.3g}")
    shown["optimum_share"] = shown["optimum_share"].map(lambda v: f"{100 * v:.0f}%")
    doc.table(shown, index=False)
    if has_figure:
        doc.image("ufm.png", "UFM objective gap, smallest Hessian eigenvalue, share at optimum")


def _apart_section(doc: Document, runs: pd.DataFrame) -> None:
    apart = not_averaged(runs)
    doc.heading(2, "Runs not averaged (failed, still running, dry runs)")
    if apart.empty:
        doc.paragraph("None: every run finished.")
        return
    doc.table(apart[["status", "path", "reason"]], index=False)


def write_report(runs: pd.DataFrame, history: pd.DataFrame, out: str | os.PathLike,
                 group_by: Sequence[str] = DEFAULT_GROUP_BY,
                 sources: Sequence[str] = (),
                 tolerance_pts: float = TOLERANCE_PTS) -> list[Path]:
    """Write runs.csv, report.md, report.html and the figures into ``out``, all or nothing."""
    table = claims_table(runs, group_by)
    verdicts = claim_verdicts(table, group_by, tolerance_pts)
    made = make_figures(runs, history, table, group_by)
    doc = build_document(runs, table, verdicts, list(made), group_by, sources)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)
    try:
        runs.to_csv(staging / "runs.csv", index=False)
        (staging / "report.md").write_text(doc.to_markdown())
        (staging / "report.html").write_text(doc.to_html())
        for name, figure in made.items():
            save_png(figure, staging / name)
        return _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, out: Path) -> list[Path]:
    names = sorted(p.name for p in staging.iterdir())
    if not out.exists():
        os.replace(staging, out)
    else:
        for name in names:
            os.replace(staging / name, out / name)
    return [out / name for name in names]


# ---- The command line ---------------------------------------------------------------------------

PROG = "python -m ncsweep.report"


def parser() -> argparse.ArgumentParser:
    """The command line: sources, output folder, grouping and the accuracy tolerance."""
    cli = argparse.ArgumentParser(
        prog=PROG, description="Tables, verdicts and figures from ncsweep runs.")
    cli.add_argument("runs", nargs="+", metavar="RUNS",
                     help="run folders, sweep folders (searched recursively), W&B offline-run "
                          "folders, or wandb://entity/project[?group=NAME]")
    cli.add_argument("--out", default="report", help="output folder (default: ./report)")
    cli.add_argument("--group-by", default=",".join(DEFAULT_GROUP_BY), metavar="KEYS",
                     help="comma-separated run columns that make a row of the claims table "
                          "(default: %(default)s)")
    cli.add_argument("--tolerance", type=float, default=TOLERANCE_PTS, metavar="PTS",
                     help="test-accuracy points ETF + d=K may lose to the baseline "
                          "(default: %(default)s)")
    return cli


def main(argv: Sequence[str] | None = None) -> int:
    """Load the runs, write the report, print where; bad input is one line on stderr."""
    args = parser().parse_args(argv)
    matplotlib.use("Agg")
    try:
        group_by = _group_by(args.group_by)
        runs, history = load(args.runs)
        unknown = [k for k in group_by if k not in runs.columns]
        if unknown:
            raise ReportError(f"--group-by {','.join(unknown)}: not a run column (try "
                              f"{', '.join(DEFAULT_GROUP_BY)}, optimizer, name, seed)")
        written = write_report(runs, history, args.out, group_by, args.runs, args.tolerance)
    except ReportError as err:
        print(f"ncsweep.report: error: {err}", file=sys.stderr)
        return 1
    counts = runs["status"].value_counts().to_dict()
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    report = next(p for p in written if p.name == "report.md")
    print(f"ncsweep.report: {len(runs)} runs ({summary}); {len(written)} files: {report}")
    return 0


def _group_by(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    if not keys:
        raise ReportError("--group-by needs at least one column, e.g. dataset,arch,loss")
    return keys


if __name__ == "__main__":
    sys.exit(main())
