"""Judging the claims: head x d settings per condition, the claims table, verdicts.

The candidate is a fixed simplex-ETF head at d = K, the baseline a learned head at the largest d
of its condition (``report.conditions``); every verdict is computed from the same table cells
the report prints.
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
CELL_METRICS = ("test_acc", "train_acc", "nc1", "nc2_m", "nc2_of", "nc3", "nc4", "nc4_test",
                *ROWSPACE_METRICS, "params_trainable", "params_total", "peak_memory_bytes",
                "train_memory_bytes", "epochs_to_full_train_acc", "wall_time_s")
PARAM_METRICS = ("params_trainable", "params_total")
COLLAPSE_METRICS = ("nc1", "nc2_m", "nc3")
COLLAPSE_ROWSPACE = ("nc1_rowspace", "nc2_m_rowspace", "nc3_duality_rowspace")
COLLAPSE_REL_TOL = 0.10
COLLAPSE_FLOOR = 1e-3
TOLERANCE_PTS = 0.5
MEMORY_CLAIM_PCT = 20.0
MEMORY_KINDS = {
    "cpu_peak_rss": "the process's peak RSS, which includes the Python and torch baseline",
    "cpu_peak_rss_lifetime": "the process's lifetime peak RSS (no per-phase reset on this OS)",
    "cuda_max_allocated": "the CUDA allocator's peak of allocated tensor memory",
}
TRAIN_MEMORY = ("train_memory_bytes: parameters, gradients, optimizer state and saved "
                "activations of one training step, the same on every device")
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
            "peak_memory_kind", "embedding", *stats, *ranges]


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
           "embedding": _joined(done, "embedding")}
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


def claim_verdicts(table: pd.DataFrame, group_by: Sequence[str] = DEFAULT_GROUP_BY,
                   tolerance_pts: float = TOLERANCE_PTS) -> pd.DataFrame:
    """Plain verdicts per group and condition: accuracy, parameters, memory, collapse, stability."""
    keys = row_keys(table, group_by)
    rows = []
    for group, cells in table.groupby(keys, sort=False):
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
    label = candidate_label(cand)
    return [_accuracy_verdict(base, cand, tol, label), _params_verdict(base, cand, label),
            _memory_verdict(base, cand, label), _collapse_verdict(base, cand, label),
            _stability_verdict(base, cand, label)]


def candidate_label(cand: pd.Series) -> str:
    """``ETF (coordinate) + d=K``: the candidate named with its head's embedding where known."""
    embedding = cand.get("embedding") or ""
    return f"ETF ({embedding.replace(',', ', ')}) + d=K" if embedding else "ETF + d=K"


def _seeds(base: pd.Series, cand: pd.Series) -> str:
    if base["n_done"] == cand["n_done"]:
        return f"{int(cand['n_done'])} seed{'s' if cand['n_done'] != 1 else ''} each"
    return f"{int(cand['n_done'])} vs {int(base['n_done'])} seeds"


def _accuracy_verdict(base: pd.Series, cand: pd.Series, tol: float,
                      label: str) -> tuple[str, str, str]:
    delta = cand["test_acc_delta_pts"]
    if math.isnan(delta):
        return "accuracy", "n/a", "test accuracy: not recorded for these runs"
    verdict = "yes" if delta >= -tol else "no"
    text = (f"{label} within {tol:g} points of baseline test accuracy (or above it): "
            f"{verdict} ({100 * cand['test_acc_mean']:.2f}% vs {100 * base['test_acc_mean']:.2f}%,"
            f" {delta:+.2f} pts; {_seeds(base, cand)})")
    return "accuracy", verdict, text


def _params_verdict(base: pd.Series, cand: pd.Series, label: str) -> tuple[str, str, str]:
    saved, total = cand["params_trainable_saved_pct"], cand["params_total_saved_pct"]
    left, reference = params_text(cand, "params_trainable"), params_text(base, "params_trainable")
    if math.isnan(saved):
        if any(pd.notna(c["params_trainable_min"])
               and c["params_trainable_min"] != c["params_trainable_max"] for c in (base, cand)):
            return "parameters", "n/a", (f"parameters saved: not judged, the trainable "
                                         f"parameters vary within a cell ({left} vs {reference})")
        return "parameters", "n/a", "parameters saved: not recorded"
    text = (f"parameters saved by {label}: {saved:.1f}% of trainable parameters "
            f"({left} left); {total:.1f}% of all parameters")
    return "parameters", f"{saved:.1f}%", text


def params_text(cell: pd.Series, metric: str) -> str:
    """A cell's parameter count: one value, or the range ``min-max`` its runs span; never a mean."""
    low, high = cell[f"{metric}_min"], cell[f"{metric}_max"]
    if pd.isna(low):
        return "-"
    return f"{low:,.0f}" if low == high else f"{low:,.0f}-{high:,.0f}"


def _memory_verdict(base: pd.Series, cand: pd.Series, label: str) -> tuple[str, str, str]:
    """The CUDA peak where both sides have one, else train_memory_bytes, else a comparable peak."""
    cuda = cand["peak_memory_kind"] == base["peak_memory_kind"] == "cuda_max_allocated"
    peak, train = cand["peak_memory_bytes_saved_pct"], cand["train_memory_bytes_saved_pct"]
    if (cuda and not math.isnan(peak)) or (math.isnan(train) and cand["memory_comparable"]
                                           and not math.isnan(peak)):
        kind = cand["peak_memory_kind"]
        saved, what = peak, f"peak memory saved by {label}: {peak:.1f}% ({kind}: " \
                            f"{MEMORY_KINDS.get(kind, 'as recorded by the runs')})"
    elif not math.isnan(train):
        saved, what = train, (f"training-step memory saved by {label}: {train:.1f}% "
                              f"({TRAIN_MEMORY}; no CUDA peak on both sides)")
    else:
        return "memory", "n/a", ("memory saved: not comparable (no train_memory_bytes, and the "
                                 "peak memory kinds differ or are missing)")
    claim = "yes" if saved > MEMORY_CLAIM_PCT else "no"
    text = f"{what}; over {MEMORY_CLAIM_PCT:g}% as claimed for ResNet18: {claim}"
    return "memory", f"{saved:.1f}%", text


def collapsed_as_far(candidate: float, baseline: float) -> bool:
    """The collapse rule: within COLLAPSE_REL_TOL of the baseline, or below COLLAPSE_FLOOR."""
    return candidate <= baseline * (1 + COLLAPSE_REL_TOL) or candidate <= COLLAPSE_FLOOR


def _collapse_verdict(base: pd.Series, cand: pd.Series, label: str) -> tuple[str, str, str]:
    """NC1, NC2 (nc2_m), NC3 and, for a frozen ETF head, their row-space variants, each judged.

    A metric passes when :func:`collapsed_as_far` holds for the candidate's mean against the
    baseline's; the verdict is yes only when every judged metric passes, and names those that fail.
    """
    metrics = list(COLLAPSE_METRICS)
    if cand["head"] == "etf":
        metrics += [m for m in COLLAPSE_ROWSPACE if not math.isnan(cand[f"{m}_mean"])]
    values = {m: (cand[f"{m}_mean"], base[f"{m}_mean"]) for m in metrics}
    shown = {m: f"{m} {c:.3g} vs {b:.3g}" for m, (c, b) in values.items()
             if not (math.isnan(c) or math.isnan(b))}
    unrecorded = [m for m in metrics if m not in shown]
    core_missing = [m for m in COLLAPSE_METRICS if m in unrecorded]
    if core_missing:
        return "collapse", "n/a", (f"NC metrics at the end: {', '.join(core_missing)} not "
                                   "recorded for these runs")
    failing = [shown[m] for m in shown if not collapsed_as_far(*values[m])]
    verdict = "no" if failing else "yes"
    rule = (f"each of {', '.join(shown)} within {100 * COLLAPSE_REL_TOL:g}% of the baseline "
            f"or below {COLLAPSE_FLOOR:g}")
    nc4 = f"; nc4 {cand['nc4_mean']:.3g} vs {base['nc4_mean']:.3g}, not judged"
    skipped = (f"; {', '.join(unrecorded)} not recorded for the baseline, not judged"
               if unrecorded else "")
    head = f"{verdict}: {', '.join(failing)}" if failing else verdict
    text = (f"{label} collapses at least as far as the baseline ({rule}): {head} "
            f"({'; '.join(shown.values())}{nc4}{skipped}; {label} vs baseline at the end)")
    return "collapse", verdict, text


def _stability_verdict(base: pd.Series, cand: pd.Series, label: str) -> tuple[str, str, str]:
    bad_cand, bad_base = int(cand["n_unstable"]), int(base["n_unstable"])
    verdict = "yes" if bad_cand == 0 else "no"
    text = (f"{label} trains stably: {verdict} (test-acc std over seeds "
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


