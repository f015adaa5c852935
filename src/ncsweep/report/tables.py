"""Claims tables as text: one column per head x d setting, one row per quantity of a cell."""

from __future__ import annotations

import math

import pandas as pd

from ncsweep.report.claims import (
    BASELINE,
    ROWSPACE_METRICS,
    epochs_text,
    params_text,
    setting_name,
)
from ncsweep.report.figures import setting_label


def format_claims(table: pd.DataFrame, group: dict, rows: dict | None = None) -> pd.DataFrame:
    """One group's cells as text: rows are quantities, columns the four head x d settings."""
    rows = _ROWS if rows is None else rows
    cells = table
    for key, value in group.items():
        cells = cells[cells[key] == value]
    large = cells.loc[cells["d_kind"] == "large", "feature_dim"].dropna()
    columns = {}
    for _, cell in cells.iterrows():
        label = setting_label(cell["setting"], large.iloc[0] if len(large) else None)
        columns[label] = _cell_text(cell, rows)
    return pd.DataFrame(columns, index=list(rows))


def format_rowspace(table: pd.DataFrame, group: dict) -> pd.DataFrame | None:
    """The row-space metrics of one group (what a frozen head's loss sees), None if not logged."""
    cells = table
    for key, value in group.items():
        cells = cells[cells[key] == value]
    logged = [m for m in ROWSPACE_METRICS if cells[f"{m}_mean"].notna().any()]
    if not logged:
        return None
    return format_claims(table, group, {
        "finished runs (seeds)": _ROWS["finished runs (seeds)"],
        **{f"{m} (end)": (lambda c, m=m: _sci(c, m)) for m in logged}})


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
    "NC2 orthogonal frame (nc2_of, end)": lambda c: _sci(c, "nc2_of"),
    "NC3 (end)": lambda c: _sci(c, "nc3"),
    "NC4 (end)": lambda c: _sci(c, "nc4"),
    "NC4 on the test set (nc4_test, end)": lambda c: _sci(c, "nc4_test"),
    "trainable params": lambda c: params_text(c, "params_trainable"),
    "total params": lambda c: params_text(c, "params_total"),
    "trainable params saved": lambda c: _signed(c["params_trainable_saved_pct"], ".1f", "%"),
    "peak memory, MiB": lambda c: _memory(c),
    "peak memory saved": lambda c: _signed(c["peak_memory_bytes_saved_pct"], ".1f", "%")
    if c["peak_memory_kind"] == "cuda_max_allocated" else "-",
    "train-step memory, MiB": lambda c: _mib(c, "train_memory_bytes"),
    "train-step memory saved": lambda c: _signed(c["train_memory_bytes_saved_pct"], ".1f", "%"),
    "epochs to 100% train acc": lambda c: epochs_text(c) if c["n_done"] else "-",
}


def _cell_text(cell: pd.Series, rows: dict) -> list[str]:
    if cell["n_done"] == 0:
        texts = ["-"] * len(rows)
        texts[0] = "missing (no finished runs)"
        if "failed / running / diverged" in rows:
            texts[1] = _ROWS["failed / running / diverged"](cell)
        return texts
    texts = [fmt(cell) for fmt in rows.values()]
    if cell["setting"] == setting_name(*BASELINE):
        texts = ["baseline" if "vs baseline" in row or "saved" in row else text
                 for row, text in zip(rows, texts, strict=True)]
    return texts


def missing(value: object) -> bool:
    """No value: None or NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _pct(cell: pd.Series, metric: str) -> str:
    mean, std = cell[f"{metric}_mean"], cell[f"{metric}_std"]
    if missing(mean):
        return "-"
    spread = "" if missing(std) else f" ± {100 * std:.2f}"
    return f"{100 * mean:.2f}{spread} (n={cell['n_done']})"


def _sci(cell: pd.Series, metric: str) -> str:
    mean, std = cell[f"{metric}_mean"], cell[f"{metric}_std"]
    if missing(mean):
        return "-"
    return f"{mean:.3g}" + ("" if missing(std) else f" ± {std:.2g}")


def _signed(value: float, spec: str, unit: str = "") -> str:
    return "-" if missing(value) else f"{value:+{spec}}{unit}"


def _mib(cell: pd.Series, metric: str) -> str:
    mean, std = cell[f"{metric}_mean"], cell[f"{metric}_std"]
    if missing(mean):
        return "-"
    return f"{mean / 2**20:.1f}" + ("" if missing(std) else f" ± {std / 2**20:.1f}")


def _memory(cell: pd.Series) -> str:
    """The CUDA peak; a process RSS is only named (its bytes stay in runs.csv: not the step's)."""
    mean, std = cell["peak_memory_bytes_mean"], cell["peak_memory_bytes_std"]
    if missing(mean):
        return "-"
    if cell["peak_memory_kind"] != "cuda_max_allocated":
        return f"in runs.csv ({cell['peak_memory_kind']})"
    spread = "" if missing(std) else f" ± {std / 2**20:.1f}"
    return f"{mean / 2**20:.1f}{spread} ({cell['peak_memory_kind']})"
