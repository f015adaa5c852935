"""The claims table: head x d settings per condition, one row per (group, setting).

The candidate is a fixed simplex-ETF head at d = K, the baseline a learned head at the largest d
of its condition (``report.conditions``). Each cell keeps, beside its means, the per-run values
of the judged metrics and their seeds, so the verdicts (``report.verdicts``) are computed from
the same cells the report prints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ncsweep.report.conditions import NONE, flag, numeric, with_conditions

DEFAULT_GROUP_BY = ("dataset", "arch", "loss")
SETTINGS = (("learned", "large"), ("learned", "K"), ("etf", "large"), ("etf", "K"))
BASELINE, CANDIDATE = ("learned", "large"), ("etf", "K")
ROWSPACE_METRICS = ("nc1_rowspace", "nc2_m_rowspace", "nc3_duality_rowspace", "nc4_rowspace")
MEMORY_PARTS = ("memory_params_bytes", "memory_grads_bytes", "memory_optimizer_bytes",
                "memory_activations_bytes")
CELL_METRICS = ("test_acc", "train_acc", "nc1", "nc2_m", "nc2_of", "nc3", "nc4", "nc4_test",
                *ROWSPACE_METRICS, "params_trainable", "params_total", "peak_memory_bytes",
                "train_memory_bytes", *MEMORY_PARTS, "epochs_to_full_train_acc", "wall_time_s")
PARAM_METRICS = ("params_trainable", "params_total")
COLLAPSE_METRICS = ("nc1", "nc2_m", "nc3")
COLLAPSE_ROWSPACE = ("nc1_rowspace", "nc2_m_rowspace", "nc3_duality_rowspace")
JUDGED_METRICS = ("test_acc", *COLLAPSE_METRICS, *COLLAPSE_ROWSPACE)


def row_keys(table: pd.DataFrame, group_by: Sequence[str]) -> list[str]:
    """The keys of one claims-table section: the group and, where present, the condition."""
    keys = _keys(group_by)
    return [*keys, "condition"] if "condition" in table and "condition" not in keys else keys


def setting_name(head: str, d_kind: str) -> str:
    """Canonical setting key, e.g. ``etf, d=K`` or ``learned, d=large``."""
    return f"{head}, d={d_kind}"


def with_settings(runs: pd.DataFrame, group_by: Sequence[str] = DEFAULT_GROUP_BY) -> pd.DataFrame:
    """Non-UFM runs with ``condition``, ``d_kind`` (K, large or None) and ``setting``.

    Null group values become "none"; d=large is the largest d of the run's condition.
    """
    frame = runs[runs["arch"].astype(object) != "ufm"].copy()
    keys = list(group_by)
    for key in keys:
        frame[key] = frame[key].astype(object).where(frame[key].notna(), NONE)
    frame = with_conditions(frame, keys)
    dims, classes = numeric(frame, "feature_dim"), numeric(frame, "num_classes")
    frame["_d"] = dims
    largest = (frame.groupby([*keys, "condition"], dropna=False)["_d"].transform("max")
               if len(frame) else dims)
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
    frame = frame[frame["setting"].notna()]
    sections = [*keys, "condition"]
    groups = frame[sections].drop_duplicates().sort_values(sections, key=_sort_key)
    rows = [_cell(frame, dict(zip(sections, group, strict=True)), head, kind)
            for group in groups.itertuples(index=False, name=None) for head, kind in SETTINGS]
    table = pd.DataFrame(rows, columns=_table_columns(sections))
    return _add_deltas(table, sections)


def _sort_key(column: pd.Series) -> pd.Series:
    """Numbers before text, "none" first among text, so mixed-type group values sort."""
    return column.map(lambda v: (isinstance(v, str), v != NONE, v if not isinstance(v, str)
                                 else 0, str(v)))


def _keys(group_by: Sequence[str]) -> list[str]:
    keys = [k for k in group_by if k != "condition"]
    if not keys:
        raise ValueError("group_by needs at least one column (e.g. dataset, arch, loss)")
    return keys


def _table_columns(keys: list[str]) -> list[str]:
    stats = [f"{m}_{s}" for m in CELL_METRICS for s in ("mean", "std")]
    ranges = [f"{m}_{s}" for m in PARAM_METRICS for s in ("min", "max")]
    return [*keys, "setting", "head", "d_kind", "feature_dim", "n_done", "n_failed",
            "n_running", "n_diverged", "n_unstable", "seeds", "n_full_train_acc",
            "peak_memory_kind", "embedding", "seed_list", *stats, *ranges,
            *(f"{m}_values" for m in JUDGED_METRICS)]


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
           "peak_memory_kind": _joined(done, "peak_memory_kind"),
           "embedding": _joined(done, "embedding"),
           "seed_list": tuple(None if pd.isna(s) else int(s) for s in done["seed"])}
    for metric in JUDGED_METRICS:
        row[f"{metric}_values"] = tuple(numeric(done, metric).tolist())
    for metric in CELL_METRICS:
        values = numeric(done, metric)
        row[f"{metric}_mean"] = values.mean() if values.notna().any() else math.nan
        row[f"{metric}_std"] = values.std() if values.notna().sum() > 1 else math.nan
    for metric in PARAM_METRICS:
        values = numeric(done, metric)
        row[f"{metric}_min"], row[f"{metric}_max"] = values.min(), values.max()
    return row


def _joined(done: pd.DataFrame, column: str) -> str:
    """The distinct values of a text column over a cell's finished runs, comma-separated."""
    if column not in done:
        return ""
    return ",".join(sorted(str(v) for v in done[column].dropna().unique()))


def _add_deltas(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Differences of every setting against the (learned, large d) baseline of its group."""
    columns = ["test_acc_mean", "train_acc_mean", "params_trainable_mean", "params_total_mean",
               "peak_memory_bytes_mean", "train_memory_bytes_mean", "peak_memory_kind",
               *(f"{m}_{s}" for m in PARAM_METRICS for s in ("min", "max"))]
    base = table.loc[table["setting"] == setting_name(*BASELINE), [*keys, *columns]]
    lookup = table[keys].merge(base, on=keys, how="left")
    lookup.index = table.index
    for metric in ("test_acc", "train_acc"):
        table[f"{metric}_delta_pts"] = 100 * (table[f"{metric}_mean"] - lookup[f"{metric}_mean"])
    for metric in ("params_trainable", "params_total", "peak_memory_bytes", "train_memory_bytes"):
        reference = lookup[f"{metric}_mean"]
        table[f"{metric}_saved_pct"] = 100 * (reference - table[f"{metric}_mean"]) / reference
    for metric in PARAM_METRICS:
        single = (table[f"{metric}_min"] == table[f"{metric}_max"]) & (
            lookup[f"{metric}_min"] == lookup[f"{metric}_max"])
        table.loc[~single, f"{metric}_saved_pct"] = math.nan
    same_kind = (table["peak_memory_kind"] == lookup["peak_memory_kind"]) & ~table[
        "peak_memory_kind"].str.contains(",", regex=False)
    table.loc[~same_kind, "peak_memory_bytes_saved_pct"] = math.nan
    table["memory_comparable"] = same_kind
    return table


def candidate_label(cand: pd.Series) -> str:
    """``ETF (coordinate) + d=K``: the candidate named with its head's embedding where known."""
    embedding = cand.get("embedding") or ""
    return f"ETF ({embedding.replace(',', ', ')}) + d=K" if embedding else "ETF + d=K"


def params_text(cell: pd.Series, metric: str) -> str:
    """A cell's parameter count: one value, or the range ``min-max`` its runs span; never a mean."""
    low, high = cell[f"{metric}_min"], cell[f"{metric}_max"]
    if pd.isna(low):
        return "-"
    return f"{low:,.0f}" if low == high else f"{low:,.0f}-{high:,.0f}"


def epochs_text(cell: pd.Series) -> str:
    """Epochs to 100% train accuracy of a cell: the mean over runs that got there, and how many."""
    reached, n = int(cell["n_full_train_acc"]), int(cell["n_done"])
    if reached == 0:
        return f"never (0/{n})"
    return f"{cell['epochs_to_full_train_acc_mean']:.3g} ({reached}/{n} runs)"


def repeated_seeds(runs: pd.DataFrame, group_by: Sequence[str] = DEFAULT_GROUP_BY) -> list[str]:
    """Cells where one seed appears more than once: one setting run again (several sweeps?)."""
    frame = with_settings(runs, list(group_by))
    frame = frame[frame["setting"].notna() & (frame["status"] == "done")]
    notes = []
    sections = [*_keys(group_by), "condition"]
    for group, runs_in in frame.groupby(sections, sort=True):
        repeated = sorted(s for s, seeds in runs_in.groupby("setting")["seed"]
                          if seeds.dropna().duplicated().any())
        if repeated:
            label = " / ".join(str(v) for v in group)
            notes.append(f"{label}: a seed appears more than once in {'; '.join(repeated)} "
                         "(the same setting run by several sweeps; all its runs are averaged)")
    return notes


def other_settings(runs: pd.DataFrame, group_by: Sequence[str] = DEFAULT_GROUP_BY) -> list[str]:
    """Finished non-UFM runs that fit none of the four settings (e.g. d=K-1), named by d."""
    frame = with_settings(runs, list(group_by))
    rest = frame[frame["setting"].isna() & (frame["status"] == "done")]
    named = sorted({(str(h), str(d), "" if c == NONE else f" ({c})") for h, d, c in
                    zip(rest["head"], rest["feature_dim"], rest["condition"], strict=True)})
    return [f"{h}, d={d}{c}" for h, d, c in named]


def shown_counts(runs: pd.DataFrame, group_by: Sequence[str] = DEFAULT_GROUP_BY) -> dict[str, int]:
    """Finished runs by where the report shows them; table + other + ufm is every finished run.

    ``repeated`` counts the runs shown in more than one condition (a shared baseline).
    """
    frame = with_settings(runs, list(group_by))
    done = frame[frame["status"] == "done"]
    in_table = done[done["setting"].notna()]
    per_run = in_table.groupby("path")["condition"].nunique()
    return {"done": int((runs["status"] == "done").sum()),
            "table": int(in_table["path"].nunique()),
            "other": int(done.loc[done["setting"].isna(), "path"].nunique()),
            "ufm": int(((runs["arch"] == "ufm") & (runs["status"] == "done")).sum()),
            "repeated": int((per_run > 1).sum())}


def not_averaged(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs that did not finish (failed, running, dry run): path and reason, never averaged."""
    columns = ["status", "path", "reason", "dataset", "arch", "loss", "head", "dim", "seed"]
    return runs.loc[runs["status"] != "done", columns].reset_index(drop=True)


