"""The verdict lines of the report, written from the verdicts table so the two cannot disagree.

:func:`claim_verdicts` gives one line per (condition, claim) for report.md; :func:`short_lines`
one short line per claim for the end of a sweep.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from ncsweep.report.claims import (
    BASELINE,
    CANDIDATE,
    DEFAULT_GROUP_BY,
    candidate_label,
    epochs_text,
    params_text,
    row_keys,
    setting_name,
)
from ncsweep.report.stats import INCONCLUSIVE
from ncsweep.report.verdicts import (
    ALPHA,
    ASSUMED_SD_PTS,
    AT_LEAST_2,
    FLOOR,
    MARGIN_PTS,
    MEMORY_CLAIM_PCT,
    NA,
    RATIO_LIMIT,
    claim_verdict,
    collapse_metrics,
    verdict_table,
)

MEMORY_KINDS = {
    "cpu_peak_rss": "the process's peak RSS, which includes the Python and torch baseline",
    "cpu_peak_rss_lifetime": "the process's lifetime peak RSS (no per-phase reset on this OS)",
    "cuda_max_allocated": "the CUDA allocator's peak of allocated tensor memory",
}
STABLE_UNIT = "candidate runs, none failing,"
TRAIN_MEMORY = ("train_memory_bytes: parameters, gradients, optimizer state and saved "
                "activations of one training step, the same on every device")


def claim_verdicts(table: pd.DataFrame, group_by: Sequence[str] = DEFAULT_GROUP_BY,
                   margin_pts: float = MARGIN_PTS, alpha: float = ALPHA,
                   verdicts: pd.DataFrame | None = None) -> pd.DataFrame:
    """One verdict line per group, condition and claim, from ``verdicts`` (built if not given)."""
    if verdicts is None:
        verdicts = verdict_table(table, group_by, margin_pts, alpha)
    keys = row_keys(table, group_by)
    margin = verdicts.attrs.get("margin", margin_pts)
    rows = []
    for group, cells in table.groupby(keys, sort=False):
        values = dict(zip(keys, group if isinstance(group, tuple) else (group,), strict=True))
        by_setting = cells.set_index("setting")
        base = by_setting.loc[setting_name(*BASELINE)]
        cand = by_setting.loc[setting_name(*CANDIDATE)]
        mine = verdicts[(verdicts[keys] == pd.Series(values)).all(axis=1)]
        for claim, claim_rows in mine.groupby("claim", sort=False):
            verdict = claim_verdict(claim_rows)
            text = _text(claim, verdict, claim_rows, base, cand, alpha, margin)
            rows.append({**values, "claim": claim, "verdict": verdict, "text": text})
    return pd.DataFrame(rows, columns=[*keys, "claim", "verdict", "text"])


def _text(claim: str, verdict: str, rows: pd.DataFrame, base: pd.Series, cand: pd.Series,
          alpha: float, margin: float) -> str:
    first = rows.iloc[0]
    if verdict == NA and str(first["reason"]).startswith("cannot judge"):
        return f"{claim}: {first['reason']}"
    label = candidate_label(cand)
    write = {"accuracy": _accuracy, "parameters": _parameters, "memory": _memory,
             "collapse": _collapse, "stability": _stability}[claim]
    return write(verdict, rows, base, cand, label, alpha, margin)


def _conf(alpha: float) -> str:
    return f"{1 - 2 * alpha:.0%} CI"


def _p(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2g}"


def settle_text(row: pd.Series, unit: str = "seeds a side") -> str:
    """What would settle an inconclusive comparison: the seeds a side, or why nothing can."""
    needed = str(row["seeds_needed"])
    if row["verdict"] != INCONCLUSIVE or not needed:
        return ""
    if needed == NA:
        return "; no number of seeds settles it at this difference"
    if needed == AT_LEAST_2:
        return f"; at least 2 {unit} are needed (one seed has no spread)"
    if needed.startswith(">"):
        return f"; more than {needed[1:]} {unit} would be needed"
    return f"; about {needed} {unit} would settle it"


def _accuracy(verdict: str, rows: pd.DataFrame, base: pd.Series, cand: pd.Series, label: str,
              alpha: float, margin: float) -> str:
    row = rows.iloc[0]
    if verdict == NA:
        return f"test accuracy: {row['reason']}"
    nb, nc = int(row["n_baseline"]), int(row["n_candidate"])
    seeds = f"{nc} seed{'s' if nc != 1 else ''} each" if nb == nc else f"{nc} vs {nb} seeds"
    if math.isnan(row["ci_low"]):
        stats = f"{seeds}: {row['reason']}"
        if min(nb, nc) < 2 and nb + nc > 2:
            stats += "; planned with the sd of the side that has one"
        elif min(nb, nc) < 2:
            stats += f"; planned at an assumed sd of {ASSUMED_SD_PTS:g} pts a run"
    else:
        stats = (f"{_conf(alpha)} {row['ci_low']:+.2f} to {row['ci_high']:+.2f}, Holm-adjusted "
                 f"p {_p(row['p_adjusted'])}; {seeds}, {row['method']}; {row['reason']}")
    return (f"{label} within {margin:g} points of baseline test accuracy (or above it): "
            f"{verdict} ({row['candidate']:.2f}% vs {row['baseline']:.2f}%, "
            f"{row['estimate']:+.2f} pts; {stats}){settle_text(row)}")


def _parameters(verdict: str, rows: pd.DataFrame, base: pd.Series, cand: pd.Series, label: str,
                alpha: float, margin: float) -> str:
    left, reference = params_text(cand, "params_trainable"), params_text(base, "params_trainable")
    if verdict == NA:
        if "vary" in rows.iloc[0]["reason"]:
            return (f"parameters saved: not judged, the trainable parameters vary within a cell "
                    f"({left} vs {reference})")
        return "parameters saved: not recorded"
    return (f"parameters saved by {label}: {verdict} of trainable parameters ({left} left); "
            f"{cand['params_total_saved_pct']:.1f}% of all parameters")


def _memory(verdict: str, rows: pd.DataFrame, base: pd.Series, cand: pd.Series, label: str,
            alpha: float, margin: float) -> str:
    row = rows.iloc[0]
    if verdict == NA:
        return f"memory saved: {row['reason']}"
    if row["metric"] == "peak_memory_bytes":
        kind = cand["peak_memory_kind"]
        what = (f"peak memory saved by {label}: {verdict} ({kind}: "
                f"{MEMORY_KINDS.get(kind, 'as recorded by the runs')})")
    else:
        what = (f"training-step memory saved by {label}: {verdict} ({TRAIN_MEMORY}; no CUDA "
                "peak on both sides)")
    over = row["reason"].split(": ")[-1]
    return f"{what}; over {MEMORY_CLAIM_PCT:g}% as claimed for ResNet18: {over}"


def _collapse(verdict: str, rows: pd.DataFrame, base: pd.Series, cand: pd.Series, label: str,
              alpha: float, margin: float) -> str:
    missing = list(rows.loc[rows["verdict"] == NA, "metric"])
    if missing:
        return f"NC metrics at the end: {', '.join(missing)} not recorded for these runs"
    metrics = list(rows["metric"])
    shown = {m: f"{m} {cand[f'{m}_mean']:.3g} vs {base[f'{m}_mean']:.3g}" for m in metrics}
    named = [shown[m] for m, v in zip(metrics, rows["verdict"], strict=True) if v == verdict]
    head = f"{verdict}: {', '.join(named)}" if verdict != "yes" else verdict
    rule = (f"each of {', '.join(metrics)} with the upper bound of candidate / baseline "
            f"(geometric means, {_conf(alpha)}) at most {RATIO_LIMIT:g}, or every candidate run "
            f"below {FLOOR:g}")
    nc4 = f"; nc4 {cand['nc4_mean']:.3g} vs {base['nc4_mean']:.3g}, not judged"
    unjudged = collapse_metrics(base, cand)[1]
    skipped = (f"; {', '.join(unjudged)} not recorded for the baseline, not judged"
               if unjudged else "")
    ratios = "; ".join(_ratio(row) for _, row in rows.iterrows())
    settle = max((settle_text(row) for _, row in rows.iterrows()), key=len, default="")
    return (f"{label} collapses at least as far as the baseline ({rule}): {head} "
            f"({'; '.join(shown.values())}{nc4}{skipped}; {label} vs baseline at the end; "
            f"ratios, {_conf(alpha)}: {ratios}){settle}")


def _ratio(row: pd.Series) -> str:
    if math.isnan(row["ci_low"]):
        return f"{row['metric']} {row['estimate']:.3g} ({row['reason']})"
    return (f"{row['metric']} {row['estimate']:.3g} [{row['ci_low']:.3g}, {row['ci_high']:.3g}] "
            f"{row['verdict']}, Holm p {_p(row['p_adjusted'])}")


def _stability(verdict: str, rows: pd.DataFrame, base: pd.Series, cand: pd.Series, label: str,
               alpha: float, margin: float) -> str:
    row = rows.iloc[0]
    spread = f"{sd_text(cand, alpha)} vs {sd_text(base, alpha)}"
    return (f"{label} trains stably: {verdict} ({row['reason']}; failed or diverged runs "
            f"{int(cand['n_unstable'])} vs {int(base['n_unstable'])}; test-acc sd over seeds "
            f"{spread}; epochs to 100% train accuracy {epochs_text(cand)} vs "
            f"{epochs_text(base)}){settle_text(row, STABLE_UNIT)}")


def sd_text(cell: pd.Series, alpha: float = ALPHA) -> str:
    """A cell's test-accuracy sd in points with its chi-square interval, or why there is none."""
    from scipy import stats

    values = [v for v in cell.get("test_acc_values", ()) if not math.isnan(v)]
    n = len(values)
    if n < 2:
        return f"none ({n} seed{'s' if n != 1 else ''}: no spread)"
    sd = 100 * float(pd.Series(values).std())
    low = sd * math.sqrt((n - 1) / stats.chi2.ppf(1 - alpha, n - 1))
    high = sd * math.sqrt((n - 1) / stats.chi2.ppf(alpha, n - 1))
    return f"{sd:.2f} pts ({_conf(alpha)} {low:.2f}-{high:.2f})"


def short_lines(verdicts: pd.DataFrame, alpha: float = ALPHA) -> list[str]:
    """One short line per (section, claim) of the tested and stability claims, for a terminal."""
    lines = []
    for (section, claim), rows in verdicts.groupby(["section", "claim"], sort=False):
        if claim in ("parameters", "memory"):
            continue
        verdict = claim_verdict(rows)
        if verdict == NA:
            lines.append(f"{section}: {claim} n/a ({rows.iloc[0]['reason']})")
            continue
        parts = [_short(row, alpha) for _, row in rows.iterrows()]
        unit = STABLE_UNIT if claim == "stability" else "seeds a side"
        settle = max((settle_text(row, unit) for _, row in rows.iterrows()), key=len,
                     default="")
        if claim == "accuracy" and settle and rows["n_baseline"].max() < 2 and rows[
                "n_candidate"].max() < 2:
            settle += f" (at an assumed sd of {ASSUMED_SD_PTS:g} pts a run)"
        lines.append(f"{section}: {claim} {verdict} ({'; '.join(parts)}){settle}")
    return lines


def _short(row: pd.Series, alpha: float) -> str:
    n = f"n={int(row['n_candidate'])} vs {int(row['n_baseline'])}"
    if row["claim"] == "accuracy":
        interval = ("no interval" if math.isnan(row["ci_low"]) else
                    f"{_conf(alpha)} [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]")
        return f"{row['estimate']:+.2f} pts, {interval}, {n}"
    if row["claim"] == "stability":
        return f"{row['reason']}"
    interval = ("" if math.isnan(row["ci_low"]) else
                f" [{row['ci_low']:.3g}, {row['ci_high']:.3g}]")
    return f"{row['metric']} x{row['estimate']:.3g}{interval}"
