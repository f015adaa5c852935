"""The report's figures on the Agg canvas, built without pyplot so no global figure state leaks."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from ncsweep.report.claims import (
    MEMORY_PARTS,
    SETTINGS,
    setting_name,
    with_settings,
)
from ncsweep.report.conditions import NONE
from ncsweep.report.ufm import ufm_table

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
    """Parameters and the training step's memory per head x d setting of one group.

    Memory is the measure the verdict uses: train_memory_bytes stacked by its parts (parameters,
    gradients, optimizer state, activations; one bar where the parts were not recorded), with
    the CUDA peak as a marker where the runs had one. The process's RSS is left to runs.csv.
    """
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
    params.bar(x, cells["params_total_max"].fillna(0), color="none", edgecolor="grey",
               label="total")
    trainable = cells["params_trainable_max"].fillna(0)
    params.bar(x, trainable, color=colors, label="trainable",
               yerr=[(trainable - cells["params_trainable_min"].fillna(0)).clip(lower=0),
                     0 * trainable], capsize=4)
    params.set_title("parameters (a range: bar at the largest, whisker to the smallest)",
                     fontsize="medium")
    params.legend()
    _memory_panel(memory, cells, x)
    for ax in (params, memory):
        ax.set_xticks(x, labels, rotation=15)
        for i, n in enumerate(cells["n_done"]):
            if n == 0:
                ax.text(i, 0, "missing", ha="center", va="bottom", color="red")
    figure.suptitle(group_label(group) + ": model size and training-step memory")
    return figure


def _memory_panel(ax: object, cells: pd.DataFrame, x: np.ndarray) -> None:
    """train_memory_bytes stacked by part (MiB), the CUDA peak as a marker where recorded."""
    bottom = np.zeros(len(cells))
    parts = [(p, f"{p}_mean") for p in MEMORY_PARTS if cells[f"{p}_mean"].notna().any()]
    for i, (part, column) in enumerate(parts):
        height = cells[column].fillna(0).to_numpy(float) / 2**20
        ax.bar(x, height, bottom=bottom, color=f"C{i + 4}",
               label=part.removeprefix("memory_").removesuffix("_bytes"))
        bottom += height
    total = cells["train_memory_bytes_mean"].to_numpy(float) / 2**20
    rest = np.where(np.isfinite(total), np.maximum(total - bottom, 0), 0)
    if not parts or (rest > 1e-9 * np.maximum(total, 1)).any():
        ax.bar(x, rest, bottom=bottom, color="lightgrey",
               label="train_memory_bytes" if not parts else "not in the parts")
    cuda = (cells["peak_memory_kind"] == "cuda_max_allocated").to_numpy()
    if cuda.any():
        peak = cells["peak_memory_bytes_mean"].to_numpy(float) / 2**20
        ax.plot(x[cuda], peak[cuda], "k_", markersize=30, markeredgewidth=2,
                label="CUDA peak (cuda_max_allocated)")
    if not np.isfinite(total).any() and not cuda.any():
        ax.text(0.5, 0.5, "train_memory_bytes not recorded", ha="center",
                transform=ax.transAxes)
    ax.set_title("training-step memory, MiB (what the memory verdict uses)", fontsize="medium")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def ufm_figure(runs: pd.DataFrame) -> Figure | None:
    """Per (K, d, loss) against d/K: share of starts at the optimum, distinct values, worst gap.

    One line per (K, loss). A filled marker is the share at the closed-form f* (d >= K-1), a
    hollow one the share at the best value found (no closed form, below K-1); a red x marks
    a cell with a spurious-minimum suspect. The dotted line is d = K, the theorem's claim.
    """
    table = ufm_table(runs)
    if table.empty:
        return None
    figure = new_figure(15, 4.8)
    share_ax, distinct_ax, gap_ax = figure.subplots(1, 3, sharex=True)
    for i, ((k, loss), cells) in enumerate(table.groupby(["num_classes", "loss"], sort=True)):
        cells = cells.sort_values("d_over_k")
        color, style = f"C{i % 10}", "-" if loss == "ce" else "--"
        closed = cells["optimum_share"].notna().to_numpy()
        share = cells["optimum_share"].where(closed, cells["best_share"])
        x = cells["d_over_k"].to_numpy(float)
        share_ax.plot(x, share, color=color, linestyle=style, label=f"K={k} {loss}")
        share_ax.scatter(x[closed], share[closed], color=color, s=30)
        share_ax.scatter(x[~closed], share[~closed], facecolors="none", edgecolors=color, s=30)
        flagged = (cells["n_spurious_suspect"] > 0).to_numpy()
        share_ax.scatter(x[flagged], share[flagged], color="red", marker="x", s=60)
        distinct_ax.plot(x, cells["distinct_values_max"], color=color, linestyle=style,
                         marker="o")
        gap = cells["gap_max"].abs().clip(lower=GAP_FLOOR)
        if closed.any():
            gap_ax.plot(x[closed], gap[closed], color=color, linestyle=style, marker="o")
    if not gap_ax.lines:
        gap_ax.text(0.5, 0.5, "no cell with a closed form", ha="center",
                    transform=gap_ax.transAxes)
    share_ax.set_ylim(-0.03, 1.05)
    share_ax.set_title("share of starts at the global optimum\n(hollow: at the best value "
                       "found, no closed form)", fontsize="medium")
    distinct_ax.set_yscale("log", nonpositive="mask")
    distinct_ax.set_title("distinct final objective values (beyond the stopping rule's "
                          "tolerance), most of a run", fontsize="medium")
    gap_ax.set_yscale("log", nonpositive="mask")
    gap_ax.set_title(f"largest gap f - f* (closed form; below {GAP_FLOOR:g} drawn at it)",
                     fontsize="medium")
    for ax in (share_ax, distinct_ax, gap_ax):
        ax.set_xscale("log", nonpositive="mask")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("d / K")
        ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    share_ax.legend(fontsize="small")
    figure.suptitle("UFM landscape per (K, d, loss): random starts against the closed-form "
                    "optimum (dotted: d = K; red x: spurious-minimum suspect)")
    return figure
