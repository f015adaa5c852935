"""The forest plot: every condition's accuracy difference and NC ratios with their intervals."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ncsweep.report.figures import new_figure
from ncsweep.report.verdicts import RATIO_LIMIT

COLORS = {"yes": "C2", "no": "C3", "inconclusive": "C1"}
ROW_INCHES = 0.28
MAX_ROWS = 120


def forest_figure(verdicts: pd.DataFrame) -> Figure | None:
    """Accuracy difference (points) per condition with the margin shaded, and the NC ratios on a
    log axis with the limit line; None where the report holds no such comparison."""
    accuracy = _estimated(verdicts[verdicts["claim"] == "accuracy"])
    ratios = _estimated(verdicts[verdicts["claim"] == "collapse"])
    if accuracy.empty and ratios.empty:
        return None
    accuracy, ratios = accuracy.head(MAX_ROWS), ratios.head(MAX_ROWS)
    rows = max(len(accuracy), len(ratios), 1)
    figure = new_figure(13, 1.6 + ROW_INCHES * rows)
    left, right = figure.subplots(1, 2)
    margin = float(verdicts.attrs.get("margin", 0.5))
    _panel(left, accuracy, [str(s) for s in accuracy["section"]], log=False)
    left.axvspan(-margin, 0, color="grey", alpha=0.15, label=f"margin -{margin:g} pts")
    left.axvline(0, color="grey", linewidth=1)
    left.set_title("test accuracy, candidate - baseline (pts)", fontsize="medium")
    left.legend(loc="lower right", fontsize="small")
    _panel(right, ratios, [f"{s}: {m}" for s, m in zip(ratios["section"], ratios["metric"],
                                                        strict=True)], log=True)
    right.axvline(RATIO_LIMIT, color="C3", linestyle="--", linewidth=1,
                  label=f"limit {RATIO_LIMIT:g}")
    right.axvline(1.0, color="grey", linewidth=1)
    right.set_title("NC metric ratio candidate / baseline (geometric means)",
                    fontsize="medium")
    right.legend(loc="lower right", fontsize="small")
    conf = 1 - 2 * float(verdicts.attrs.get("alpha", 0.05))
    figure.suptitle(f"Verdicts: estimates with {conf:.0%} intervals (green yes, red no, orange "
                    "inconclusive; a point alone: no interval, e.g. one seed)")
    return figure


def _estimated(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows with a finite estimate (ratios also positive): the ones a plot can place."""
    estimate = pd.to_numeric(rows["estimate"], errors="coerce")
    keep = np.isfinite(estimate)
    if (rows["claim"] == "collapse").any():
        keep &= estimate > 0
    return rows[keep]


def _panel(ax: Axes, rows: pd.DataFrame, labels: list[str], log: bool) -> None:
    if log:
        ax.set_xscale("log")
    if rows.empty:
        ax.text(0.5, 0.5, "no comparison with an estimate", ha="center",
                transform=ax.transAxes)
        ax.set_yticks([])
        return
    y = np.arange(len(rows))[::-1]
    for position, (_, row) in zip(y, rows.iterrows(), strict=True):
        color = COLORS.get(str(row["verdict"]), "grey")
        low, high = row["ci_low"], row["ci_high"]
        if _finite(low, high, log):
            ax.plot([low, high], [position, position], color=color, linewidth=2)
        ax.plot([row["estimate"]], [position], "o", color=color)
    ax.set_yticks(y, labels, fontsize="small")


def _finite(low: float, high: float, log: bool) -> bool:
    if not (math.isfinite(low) and math.isfinite(high)):
        return False
    return not log or (low > 0 and high > 0)
