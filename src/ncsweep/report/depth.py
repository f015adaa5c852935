"""Collapse through depth in the report: NC1 per block at the end of training, one line per
head x d setting, and the law of data separation's decay ratio and R^2 with intervals over seeds.

Reads the ``layers/<block>/nc1``, ``layers_decay_ratio`` and ``layers_r2`` columns of runs.csv
(``ncsweep.nc.layers``); a section whose runs logged none of them gets no depth part.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ncsweep.report.claims import BASELINE, CANDIDATE, setting_name, with_settings
from ncsweep.report.conditions import numeric
from ncsweep.report.document import Document
from ncsweep.report.figures import STYLE, group_label, new_figure, setting_label
from ncsweep.report.stats import mean_interval
from ncsweep.report.verdicts import ALPHA

PREFIX = "layers"
FIT_KEYS = ("layers_decay_ratio", "layers_r2")
"""``ncsweep.nc.layers``' key prefix and fit keys (repeated here: the report imports no torch)."""
NC1 = re.compile(rf"^{PREFIX}/(?P<block>[^/]+)/nc1$")
LEVEL = f"{1 - 2 * ALPHA:.0%}"
"""The intervals' level: two-sided 1 - 2 alpha at the verdicts' alpha, as their intervals."""
FIT_NAMES = {"layers_decay_ratio": "decay ratio", "layers_r2": "R²"}
_ORDER = re.compile(r"^(?P<kind>stem|stage|block|hidden|fc|features)(?P<index>\d*)$")
_KIND_RANK = {"stem": 0, "stage": 1, "block": 1, "hidden": 1, "fc": 2, "features": 3}


def block_order(name: str) -> tuple[int, int, str]:
    """Forward order of ncsweep.nc.blocks' names: stem, stages / VGG blocks / hidden layers,
    VGG's FC layers, the feature layer; any other name last, by name."""
    match = _ORDER.match(name)
    if match is None:
        return (4, 0, name)
    return (_KIND_RANK[match["kind"]], int(match["index"] or 0), name)


def depth_runs(runs: pd.DataFrame, group: Mapping[str, object],
               group_by: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """The group's finished runs of a head x d setting that logged block NC1, and the blocks
    (forward order) that any of them logged."""
    frame = with_settings(runs, list(group_by))
    for key, value in group.items():
        frame = frame[frame[key] == value]
    frame = frame[frame["setting"].notna() & (frame["status"] == "done")]
    blocks = sorted({m["block"] for c in frame.columns if (m := NC1.match(str(c)))},
                    key=block_order)
    if not blocks:
        return frame.iloc[0:0], []
    logged = pd.concat([numeric(frame, f"{PREFIX}/{b}/nc1") for b in blocks], axis=1)
    return frame[logged.notna().any(axis=1)], blocks


def depth_table(frame: pd.DataFrame, blocks: Sequence[str]) -> pd.DataFrame:
    """One row per setting: runs, the decay ratio and R² (mean [t interval] over seeds)
    and each block's NC1 (geometric mean [interval on log10])."""
    rows = []
    for setting in _settings(frame):
        runs = frame[frame["setting"] == setting]
        row: dict[str, object] = {"setting": setting_label(setting, runs["d_large"].iloc[0]),
                                  "runs": len(runs)}
        for key, name in FIT_NAMES.items():
            row[name] = _shown(mean_interval(numeric(runs, key).tolist()))
        for block in blocks:
            logs = np.log10(numeric(runs, f"{PREFIX}/{block}/nc1").where(lambda v: v > 0))
            row[f"NC1 {block}"] = _shown(mean_interval(logs.tolist()), power=True)
        rows.append(row)
    return pd.DataFrame(rows)


def differences(frame: pd.DataFrame, blocks: Sequence[str]) -> str:
    """Where the candidate (ETF, d = K) and the baseline (learned, largest d) differ by more than
    their intervals: the fit's keys and each block's log10 NC1, intervals that do not overlap."""
    names = {setting_name(*BASELINE), setting_name(*CANDIDATE)}
    present = set(frame["setting"])
    if not names <= present:
        return ("No comparison: the candidate (etf, d=K) and the baseline (learned, largest d) "
                "do not both have runs with per-block metrics here.")
    sides = {s: frame[frame["setting"] == s] for s in names}
    columns = {FIT_NAMES[k]: (k, False) for k in FIT_KEYS}
    columns |= {f"NC1 at {b}": (f"{PREFIX}/{b}/nc1", True) for b in blocks}
    apart, unknown = [], []
    for label, (key, log) in columns.items():
        low_high = {}
        for setting, runs in sides.items():
            values = numeric(runs, key)
            values = np.log10(values.where(values > 0)) if log else values
            mean, low, high, _ = mean_interval(values.tolist())
            low_high[setting] = (low, high, mean)
        base, cand = low_high[setting_name(*BASELINE)], low_high[setting_name(*CANDIDATE)]
        if any(math.isnan(v) for v in (*base[:2], *cand[:2])):
            unknown.append(label)
        elif cand[0] > base[1] or cand[1] < base[0]:
            word = "higher" if cand[2] > base[2] else "lower"
            apart.append(f"{label} ({word} for the candidate)")
    if apart:
        text = ("The candidate (etf, d=K) and the baseline (learned, largest d) differ by more "
                f"than their {LEVEL} intervals in: {', '.join(apart)}.")
    else:
        text = ("The candidate (etf, d=K) and the baseline (learned, largest d) differ by more "
                f"than their {LEVEL} intervals nowhere: every interval overlaps.")
    if unknown:
        text += f" Not judged (fewer than 2 seeds a side): {', '.join(unknown)}."
    return text


def depth_figure(frame: pd.DataFrame, blocks: Sequence[str],
                 group: Mapping[str, object]) -> Figure:
    """NC1 per block on a log axis: mean line per setting over its seeds, min-max band."""
    figure = new_figure(8, 4.5)
    ax = figure.subplots()
    x = np.arange(len(blocks))
    for setting in _settings(frame):
        runs = frame[frame["setting"] == setting]
        values = pd.concat([numeric(runs, f"{PREFIX}/{b}/nc1") for b in blocks], axis=1)
        values = values.where(values > 0)
        color, style = STYLE[setting]
        geo = np.power(10.0, np.log10(values).mean(axis=0).to_numpy())
        ax.plot(x, geo, color=color, linestyle=style, marker="o",
                label=setting_label(setting, runs["d_large"].iloc[0]))
        ax.fill_between(x, values.min(axis=0).to_numpy(), values.max(axis=0).to_numpy(),
                        color=color, alpha=0.2)
    ax.set_yscale("log", nonpositive="mask")
    ax.set_xticks(x, list(blocks))
    ax.set_xlabel("block (forward order)")
    ax.set_ylabel("NC1  tr(Σ_W Σ_B⁺)/K")
    ax.legend()
    ax.set_title(f"{group_label(group)}: NC1 per block at the end of training\n(line: geometric "
                 "mean over seeds, band: min-max)", fontsize=10)
    return figure


def depth_section(doc: Document, frame: pd.DataFrame, blocks: Sequence[str],
                  figure: str | None, title: str) -> None:
    """The "collapse through depth" part of one claims section."""
    if frame.empty:
        return
    doc.heading(4, f"Collapse through depth: {title}")
    doc.paragraph("Per-block NC1 at the end of training (`layers/<block>/nc1`, "
                  "docs/metrics.md). The law of data separation: the least-squares line of "
                  "log10 NC1 on the block's depth; the decay ratio is 10^slope, the factor by "
                  "which NC1 shrinks per block, and R² says how straight the line is. Cells: "
                  f"mean over seeds [{LEVEL} t interval] (NC1: geometric mean, interval on "
                  "log10).")
    if figure is not None:
        doc.image(figure, f"{title}: NC1 per block")
    doc.table(depth_table(frame, blocks), index=False)
    doc.paragraph(differences(frame, blocks))


def _settings(frame: pd.DataFrame) -> list[str]:
    return [name for name in STYLE if name in set(frame["setting"])]


def _shown(interval: tuple[float, float, float, int], power: bool = False) -> str:
    """``mean [low, high]`` in 3 significant digits; 10^x of each where ``power``."""
    mean, low, high, n = interval
    if n == 0:
        return ""
    if power:
        mean, low, high = (10.0**v for v in (mean, low, high))
    if math.isnan(low):
        return f"{mean:.3g}"
    return f"{mean:.3g} [{low:.3g}, {high:.3g}]"
