"""Conditions: the runs of a group that differ in nothing but ``seed``, named by what differs.

A cell averages only runs that differ in nothing but ``seed``. Within each ``group_by`` group
the runs are split into conditions by everything else they record (:func:`with_conditions`):

- the experiment-changing overrides (the ``variant`` column: the job's Hydra overrides without
  the compared keys, the choices run.json records as columns and the keys that do not change
  the experiment, all named in :mod:`ncsweep.keys`);
- ``num_classes`` and every column whose recorded values are all text or yes/no (dataset,
  optim, schedule, experiment, embedding, and summary options such as imbalance, label_noise,
  weights, weights_sha256, freeze), except bookkeeping (name, run_key, path, status, reason,
  source, device, peak_memory_kind, code_*, launcher) and per-run outcomes (diverged, the UFM
  flags). Numbers in the summary are results, so a numeric option counts through its override.

Missing values match anything where a value cannot apply: a head option (``embedding``, a
``head.*`` override) on a head without it, so one learned-head baseline serves every ETF
condition it fits; and any value a run that did not finish never recorded. A null value is a
value of its own ("none"), never a reason to drop a run. A condition is named by the values
that tell it apart from the other conditions of its group (e.g. ``dataset.imbalance=exp``);
one with none of them set is "none".
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import pandas as pd

from ncsweep.keys import COMPARED, NOT_EXPERIMENT_COLUMNS, override_key, parse_or_none

NONE = "none"
NOT_SETTINGS = frozenset({
    *COMPARED, *NOT_EXPERIMENT_COLUMNS, "feature_dim", "run_key", "path", "status", "reason",
    "source", "created", "code_commit", "code_dirty", "peak_memory_kind", "variant",
    "overrides", "format", "diverged", "reached_global_optimum", "spurious_minimum_suspect",
    "setting", "d_kind", "d_large", "condition"})
NUMERIC_SETTINGS = ("num_classes",)
HEAD_OPTIONS = ("embedding",)
HEAD_OVERRIDE_PREFIX = "head."
_WILD = object()


def variant_options(variant: object) -> dict[str, str]:
    """A ``variant`` text as override key -> value, as Hydra reads them (``~key`` deletions keep
    an empty value)."""
    if not isinstance(variant, str) or not variant.strip():
        return {}
    try:
        tokens = shlex.split(variant, posix=False)
    except ValueError:
        tokens = variant.split()
    return dict(_option(token) for token in tokens)


@lru_cache(maxsize=65536)
def _option(token: str) -> tuple[str, str]:
    """One override's key and value as Hydra writes them (text it cannot read: a bare key)."""
    override = parse_or_none(token)
    if override is None or override.is_sweep_override():
        return token, ""
    if override.is_delete() and override.value() is None:
        return override_key(override), ""
    return override_key(override), override.get_value_element_as_str()


def setting_columns(frame: pd.DataFrame) -> list[str]:
    """The columns that name a run's condition: num_classes and the text or yes/no columns."""
    columns = []
    for column in frame.columns:
        if column in NOT_SETTINGS or str(column).startswith("_"):
            continue
        if column in NUMERIC_SETTINGS:
            columns.append(column)
            continue
        series = frame[column]
        if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
            continue
        values = series.dropna()
        if len(values) and all(isinstance(v, (str, bool, np.bool_)) for v in values):
            columns.append(column)
    return columns


def with_conditions(frame: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """``frame`` with a ``condition`` per run, a run repeated once per condition it fits."""
    if frame.empty:
        return frame.assign(condition=pd.Series(dtype=object))
    options = [variant_options(v) for v in (frame["variant"] if "variant" in frame
                                            else [None] * len(frame))]
    entries = [("override", k) for k in sorted({k for o in options for k in o})]
    entries += [("column", c) for c in setting_columns(frame) if c not in keys]
    head_option = [(kind == "column" and name in HEAD_OPTIONS)
                   or (kind == "override" and name.startswith(HEAD_OVERRIDE_PREFIX))
                   for kind, name in entries]
    columns = {name: frame[name].tolist() for kind, name in entries if kind == "column"}
    done = (frame["status"] == "done").tolist()
    signatures = []
    for i, opts in enumerate(options):
        values = []
        for (kind, name), of_head in zip(entries, head_option, strict=True):
            value = opts.get(name) if kind == "override" else _plain(columns[name][i])
            unknown = value is None and (of_head or (kind == "column" and not done[i]))
            values.append(_WILD if unknown else value)
        signatures.append(tuple(values))
    positions, labels = [], []
    group_rows = frame.groupby(list(keys), dropna=False, sort=False).indices if keys else {
        (): np.arange(len(frame))}
    for members in group_rows.values():
        rows, fits = _rows_of(members, signatures, done)
        names = _row_names(rows, entries)
        for i, fit in zip(members, fits, strict=True):
            positions += [i] * len(fit)
            labels += [names[r] for r in fit]
    out = frame.iloc[positions].reset_index(drop=True)
    out["condition"] = pd.Series(labels, dtype=object)
    return out


def _plain(value: object) -> object:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def _fits(signature: tuple, row: tuple) -> bool:
    return all(v is _WILD or v == r for v, r in zip(signature, row, strict=True))


def _rows_of(members: np.ndarray, signatures: list[tuple],
             done: list[bool]) -> tuple[list[tuple], list[list[int]]]:
    """The conditions of one group (finished runs first, fewest unknowns first) and their runs."""
    rows: list[tuple] = []
    order = sorted(members, key=lambda i: (not done[i], sum(v is _WILD for v in signatures[i]),
                                           str(signatures[i])))
    for i in order:
        if not any(_fits(signatures[i], row) for row in rows):
            rows.append(tuple(None if v is _WILD else v for v in signatures[i]))
    fits = [[r for r, row in enumerate(rows) if _fits(signatures[i], row)] for i in members]
    return rows, fits


def _row_names(rows: list[tuple], entries: list[tuple[str, str]]) -> list[str]:
    """Each condition named by the values that split the group's conditions apart."""
    blocks = [list(range(len(rows)))]
    named = []
    for j in range(len(entries)):
        split = [b for b in blocks if len({rows[r][j] for r in b}) > 1]
        if not split:
            continue
        named.append(j)
        blocks = [part for b in blocks for part in _partition(b, rows, j)]
    names = []
    for row in rows:
        parts = []
        for j in named:
            kind, name = entries[j]
            if row[j] is None and kind == "override":
                continue
            parts.append(name if kind == "override" and row[j] == "" else
                         f"{name}={_shown(row[j])}")
        names.append(", ".join(parts) or NONE)
    return names


def _partition(block: list[int], rows: list[tuple], j: int) -> list[list[int]]:
    parts: dict[object, list[int]] = {}
    for r in block:
        parts.setdefault(rows[r][j], []).append(r)
    return list(parts.values())


def _shown(value: object) -> str:
    if value is None:
        return NONE
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


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

