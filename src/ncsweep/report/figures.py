"""The report's figures on the Agg canvas, built without pyplot so no global figure state leaks."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ncsweep.report.claims import (
    NONE,
    SETTINGS,
    UFM_KEYS,
    flag,
    numeric,
    setting_name,
    with_settings,
)

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
    figure.suptitle(group_label(group) + ": NC metrics and accuracy per epoch (line: mean "
                    "over the seeds of one setting, band: min-max)")
    return figure


def _group_settings(runs: pd.DataFrame, group: Mapping[str, object],
                    group_by: Sequence[str]) -> pd.DataFrame:
    frame = with_settings(runs, list(group_by))
    for key, value in group.items():
        frame = frame[frame[key] == value]
    return frame[frame["setting"].notna() & (frame["status"] == "done")]


def group_label(group: Mapping[str, object]) -> str:
    """``digits / mlp / ce``, with ``: <condition>`` unless the condition is "none"."""
    label = " / ".join(str(v) for k, v in group.items() if k != "condition")
    condition = group.get("condition", NONE)
    return label if condition == NONE else f"{label}: {condition}"


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
    params.bar(x, cells["params_total_max"], color="none", edgecolor="grey", label="total")
    params.bar(x, cells["params_trainable_max"], color=colors, label="trainable",
               yerr=[cells["params_trainable_max"] - cells["params_trainable_min"],
                     0 * cells["params_trainable_max"]], capsize=4)
    params.set_title("parameters (a range: bar at the largest, whisker to the smallest)")
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
    figure.suptitle(group_label(group) + ": model size and peak memory")
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
