"""One row per run: the identity columns, final metrics, the variant and stability figures.

Every source (run folders, offline W&B runs, W&B projects) fills its identity columns, status
and reason, then :func:`finish_row` adds the rest the same way; W&B records are mapped onto the
run-folder columns here, since their summary mirrors summary.json.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from ncsweep.keys import COMPARED, IDENTITY_GROUPS, changes_experiment, override_key, parse_or_none

ID_COLUMNS = ("dataset", "arch", "loss", "head", "embedding", "feature_dim", "num_classes",
              "seed", "optim", "schedule", "dim", "name", "run_key", "path", "status")
EXTRA_COLUMNS = ("reason", "source", "variant", "diverged", "last_epoch",
                 "epochs_to_full_train_acc")
HISTORY_ID = ("name", "run_key", "path", "status", "dataset", "arch", "loss", "head",
              "embedding", "feature_dim", "num_classes", "dim", "seed", "optim")
SHOWN_APART = frozenset((*COMPARED, *IDENTITY_GROUPS))
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


def finish_row(row: dict, summary: Mapping, history: list[dict],
               overrides: Any = None) -> Loaded:
    """Add final metrics (only for runs that finished) and stability figures from the history."""
    if row["status"] in ("done", "dry_run"):
        for key, value in summary.items():
            if key not in row and is_scalar(value):
                row[key] = value
    row["variant"] = variant(overrides, row.get("run_key"))
    row["last_epoch"] = history[-1].get("epoch") if history else None
    row["epochs_to_full_train_acc"] = _epochs_to_full(history)
    row["diverged"] = _diverged(row, history)
    ident = {k: row.get(k) for k in HISTORY_ID}
    points = [{**ident, **{k: v for k, v in h.items() if is_scalar(v)}} for h in history]
    return Loaded([row], points)


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
    return finish_row(row, summary, history, summary.get("overrides"))


def _wandb_status(state: str | None, unfinished: str) -> tuple[str, str]:
    if state in ("failed", "crashed", "killed"):
        return "failed", f"W&B run state: {state}"
    if state == "finished":
        return "failed", "W&B run finished without an ncsweep summary"
    return "running", unfinished


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


def variant(overrides: Any, key: str | None) -> str:
    """The overrides that change the experiment, space-separated, the compared keys left out
    (:data:`ncsweep.keys.COMPARED`: seed, head and dim).

    Dropped too: the choices run.json records as columns (:data:`ncsweep.keys.IDENTITY_GROUPS`)
    and the keys that do not change what is trained (:data:`ncsweep.keys.NOT_EXPERIMENT`). A
    leading ``+`` is dropped, so ``+dataset.imbalance=exp`` and ``dataset.imbalance=exp`` are one
    variant.
    """
    items = list(overrides) if isinstance(overrides, list) else (key or "").split(",")
    kept = sorted({str(o).lstrip("+") for o in items if _in_variant(str(o))})
    return " ".join(kept)


@lru_cache(maxsize=65536)
def _in_variant(text: str) -> bool:
    """Whether an override belongs in the variant (one Hydra cannot read is kept, unjudged).

    Cached: a sweep repeats the same few overrides over thousands of runs, and Hydra's parser
    costs about a millisecond an override.
    """
    override = parse_or_none(text)
    if override is None:
        return bool(text.strip())
    key = override_key(override)
    return key not in SHOWN_APART and changes_experiment(key)


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


def is_scalar(value: Any) -> bool:
    """A value a table cell can hold as it is: None, a bool, a number or a text."""
    return value is None or isinstance(value, (bool, int, float, str))
