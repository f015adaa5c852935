"""The verdicts table: one row per (section, claim, metric), the tests Holm-adjusted together.

The rules (docs/report.md says them in full):

- **accuracy**: non-inferiority of the candidate's test accuracy, in points, at ``margin_pts``
  (:func:`ncsweep.report.stats.noninferiority`, paired t on shared seeds, else Welch). A side
  with one run is inconclusive; its ``seeds_needed`` is planned with :data:`ASSUMED_SD_PTS`
  where no side has a spread of its own.
- **collapse**: each judged NC metric as the ratio candidate / baseline of geometric means
  (:func:`ncsweep.report.stats.ratio_test`): passes when the ratio's upper bound is at most
  :data:`RATIO_LIMIT` or every candidate run is below :data:`FLOOR`.
- **multiple comparisons**: every accuracy and collapse test of the report is adjusted together
  (Holm); a ``yes`` needs both its interval and its adjusted p-value below alpha, so a test
  whose interval clears the bound but whose adjusted p does not is ``inconclusive``.
- **stability**: ``no`` with any failed or diverged candidate run; ``yes`` when none failed and
  the exact 95% upper bound on its failure rate is below :data:`STABLE_BOUND`; else inconclusive.
- **parameters** and **memory** are counts, not samples: their verdict is the share saved.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ncsweep.report.claims import (
    BASELINE,
    CANDIDATE,
    COLLAPSE_METRICS,
    COLLAPSE_ROWSPACE,
    DEFAULT_GROUP_BY,
    row_keys,
    setting_name,
)
from ncsweep.report.conditions import NONE
from ncsweep.report.stats import (
    INCONCLUSIVE,
    NO,
    SEEDS_CAP,
    YES,
    Comparison,
    event_rate_bound,
    holm,
    noninferiority,
    ratio_test,
)

MARGIN_PTS = 0.5
ALPHA = 0.05
ASSUMED_SD_PTS = 0.3
RATIO_LIMIT = 1.10
FLOOR = 1e-3
STABLE_BOUND = 0.5
STABLE_CONFIDENCE = 0.95
MEMORY_CLAIM_PCT = 20.0
NA = "n/a"
AT_LEAST_2 = ">=2"
CLAIMS = ("accuracy", "parameters", "memory", "collapse", "stability")
VERDICT_COLUMNS = ("section", "claim", "metric", "baseline", "candidate", "estimate", "ci_low",
                   "ci_high", "p_value", "p_adjusted", "verdict", "n_baseline", "n_candidate",
                   "seeds_needed", "method", "reason")
TESTED = ("accuracy", "collapse")


def section_label(group: dict) -> str:
    """``digits / mlp / ce`` with ``: <condition>`` unless the condition is "none"."""
    label = " / ".join(str(v) for k, v in group.items() if k != "condition")
    condition = group.get("condition", NONE)
    return label if condition == NONE else f"{label}: {condition}"


def verdict_table(table: pd.DataFrame, group_by: Sequence[str] = DEFAULT_GROUP_BY,
                  margin_pts: float = MARGIN_PTS, alpha: float = ALPHA) -> pd.DataFrame:
    """verdicts.csv: every claim of every condition, the tests Holm-adjusted together.

    ``attrs`` holds ``tests`` (how many tests were adjusted together), ``margin`` and ``alpha``.
    """
    keys = row_keys(table, group_by)
    rows: list[dict] = []
    for group, cells in table.groupby(keys, sort=False):
        values = dict(zip(keys, group if isinstance(group, tuple) else (group,), strict=True))
        by_setting = cells.set_index("setting")
        base = by_setting.loc[setting_name(*BASELINE)]
        cand = by_setting.loc[setting_name(*CANDIDATE)]
        head = {**values, "section": section_label(values)}
        rows += [{**row, **head} for row in _group_rows(base, cand, margin_pts, alpha)]
    frame = adjust(pd.DataFrame(rows, columns=[*keys, *VERDICT_COLUMNS]), alpha)
    frame.attrs.update(margin=margin_pts, alpha=alpha)
    return frame


def adjust(frame: pd.DataFrame, alpha: float = ALPHA) -> pd.DataFrame:
    """Holm over the tested claims' p-values; a ``yes`` whose adjusted p is not below alpha
    becomes ``inconclusive``."""
    tested = frame["claim"].isin(TESTED).to_numpy()
    p = pd.to_numeric(frame["p_value"], errors="coerce").to_numpy(float)
    adjusted = np.full(len(frame), np.nan)
    if tested.any():
        adjusted[tested] = holm(p[tested])
    frame["p_adjusted"] = adjusted
    count = int((tested & ~np.isnan(p)).sum())
    weak = tested & (frame["verdict"] == YES).to_numpy() & ~(adjusted < alpha)
    frame.loc[weak, "verdict"] = INCONCLUSIVE
    frame.loc[weak, "reason"] = [
        f"{r}, but its Holm-adjusted p {a:.3g} (over {count} tests) is not below {alpha:g}"
        for r, a in zip(frame.loc[weak, "reason"], adjusted[weak], strict=True)]
    frame.attrs["tests"] = count
    return frame


def _group_rows(base: pd.Series, cand: pd.Series, margin: float, alpha: float) -> list[dict]:
    missing = [setting_name(*s) for s, cell in ((BASELINE, base), (CANDIDATE, cand))
               if cell["n_done"] == 0]
    if missing:
        reason = f"cannot judge: no finished runs for {' and '.join(missing)}"
        return [_row(claim, "", NA, reason) for claim in CLAIMS]
    return [_accuracy(base, cand, margin, alpha), _parameters(base, cand), _memory(base, cand),
            *_collapse(base, cand, alpha), _stability(base, cand)]


def _row(claim: str, metric: str, verdict: str, reason: str, **values: object) -> dict:
    row = dict.fromkeys(VERDICT_COLUMNS, math.nan)
    row.update({"claim": claim, "metric": metric, "verdict": verdict, "reason": reason,
                "method": "", "seeds_needed": "", **values})
    return row


def _tested(claim: str, metric: str, result: Comparison, base: float, cand: float) -> dict:
    return _row(claim, metric, result.verdict, result.reason, baseline=base, candidate=cand,
                estimate=result.estimate, ci_low=result.ci_low, ci_high=result.ci_high,
                p_value=result.p_value, n_baseline=result.n_baseline,
                n_candidate=result.n_candidate, method=result.method,
                seeds_needed=_seeds_needed(result))


def _seeds_needed(result: Comparison) -> str:
    """"" once settled, else a number, ``>100``, ``>=2`` (one seed and nothing to plan with) or
    ``n/a`` (no number of seeds settles it)."""
    if result.verdict != INCONCLUSIVE:
        return ""
    if result.seeds_over_cap:
        return f">{SEEDS_CAP}"
    if result.seeds_needed is None and min(result.n_baseline, result.n_candidate) < 2:
        return AT_LEAST_2
    return NA if result.seeds_needed is None else str(result.seeds_needed)


def _values(cell: pd.Series, metric: str, scale: float = 1.0) -> list[float]:
    return [scale * v for v in cell.get(f"{metric}_values", ())]


def _accuracy(base: pd.Series, cand: pd.Series, margin: float, alpha: float) -> dict:
    b, c = _values(base, "test_acc", 100.0), _values(cand, "test_acc", 100.0)
    if not any(map(np.isfinite, b)) or not any(map(np.isfinite, c)):
        return _row("accuracy", "test_acc", NA, "test accuracy not recorded for these runs")
    result = noninferiority(b, c, margin, alpha, base["seed_list"], cand["seed_list"],
                            assumed_sd=ASSUMED_SD_PTS)
    return _tested("accuracy", "test_acc", result, float(np.nanmean(b)), float(np.nanmean(c)))


def collapse_metrics(base: pd.Series, cand: pd.Series) -> tuple[list[str], list[str]]:
    """The judged NC metrics (nc1, nc2_m, nc3 and, for an ETF candidate, the row-space keys both
    sides recorded), and the row-space keys only the candidate recorded (named, not judged)."""
    judged, unjudged = list(COLLAPSE_METRICS), []
    if cand["head"] == "etf":
        for metric in COLLAPSE_ROWSPACE:
            if not math.isnan(cand[f"{metric}_mean"]):
                (judged if not math.isnan(base[f"{metric}_mean"]) else unjudged).append(metric)
    return judged, unjudged


def _collapse(base: pd.Series, cand: pd.Series, alpha: float) -> list[dict]:
    rows = []
    for metric in collapse_metrics(base, cand)[0]:
        b, c = _values(base, metric), _values(cand, metric)
        if not any(map(np.isfinite, b)) or not any(map(np.isfinite, c)):
            rows.append(_row("collapse", metric, NA, f"{metric} not recorded for these runs"))
            continue
        result = ratio_test(b, c, RATIO_LIMIT, FLOOR, alpha, base["seed_list"],
                            cand["seed_list"])
        rows.append(_tested("collapse", metric, result, result.geomean_baseline,
                            result.geomean_candidate))
    return rows


def _parameters(base: pd.Series, cand: pd.Series) -> dict:
    saved = cand["params_trainable_saved_pct"]
    if math.isnan(saved):
        varies = any(pd.notna(c["params_trainable_min"])
                     and c["params_trainable_min"] != c["params_trainable_max"]
                     for c in (base, cand))
        return _row("parameters", "params_trainable", NA,
                    "the trainable parameters vary within a cell" if varies else "not recorded")
    return _row("parameters", "params_trainable", f"{saved:.1f}%", "a count: share saved",
                baseline=base["params_trainable_max"], candidate=cand["params_trainable_max"],
                estimate=saved, n_baseline=base["n_done"], n_candidate=cand["n_done"],
                method="count")


def memory_measure(base: pd.Series, cand: pd.Series) -> str | None:
    """The memory the verdict uses: the CUDA peak where both sides have one, else
    train_memory_bytes, else a peak of one comparable kind on both sides; None if none."""
    cuda = cand["peak_memory_kind"] == base["peak_memory_kind"] == "cuda_max_allocated"
    peak, train = cand["peak_memory_bytes_saved_pct"], cand["train_memory_bytes_saved_pct"]
    if (cuda and not math.isnan(peak)) or (math.isnan(train) and cand["memory_comparable"]
                                           and not math.isnan(peak)):
        return "peak_memory_bytes"
    return None if math.isnan(train) else "train_memory_bytes"


def _memory(base: pd.Series, cand: pd.Series) -> dict:
    metric = memory_measure(base, cand)
    if metric is None:
        return _row("memory", "", NA, "not comparable (no train_memory_bytes, and the peak "
                                      "memory kinds differ or are missing)")
    saved = cand[f"{metric}_saved_pct"]
    method = cand["peak_memory_kind"] if metric == "peak_memory_bytes" else "train_memory_bytes"
    over = YES if saved > MEMORY_CLAIM_PCT else NO
    return _row("memory", metric, f"{saved:.1f}%", f"over {MEMORY_CLAIM_PCT:g}%: {over}",
                baseline=base[f"{metric}_mean"], candidate=cand[f"{metric}_mean"],
                estimate=saved, n_baseline=base["n_done"], n_candidate=cand["n_done"],
                method=method)


def _stability(base: pd.Series, cand: pd.Series) -> dict:
    """Failed or diverged runs among the runs that ended; the exact bound on the rate."""
    k, n = int(cand["n_unstable"]), int(cand["n_done"] + cand["n_failed"])
    kb, nb = int(base["n_unstable"]), int(base["n_done"] + base["n_failed"])
    n = max(n, k)
    bound = event_rate_bound(k, n, STABLE_CONFIDENCE) if n else math.nan
    if k:
        verdict, reason = NO, f"{k} of {n} candidate runs failed or diverged"
    elif bound < STABLE_BOUND:
        verdict, reason = YES, (f"0 of {n} failed or diverged: the failure rate is below "
                                f"{bound:.0%} at {STABLE_CONFIDENCE:.0%}")
    else:
        verdict, reason = INCONCLUSIVE, (f"0 of {n} failed or diverged, but that only bounds the "
                                         f"failure rate below {bound:.0%} at "
                                         f"{STABLE_CONFIDENCE:.0%}")
    return _row("stability", "failed_or_diverged", verdict, reason,
                baseline=kb / nb if nb else math.nan, candidate=k / n if n else math.nan,
                estimate=k / n if n else math.nan, ci_low=0.0, ci_high=bound, n_baseline=nb,
                n_candidate=n, method="exact binomial (Clopper-Pearson)",
                seeds_needed=_stable_seeds() if verdict == INCONCLUSIVE else "")


def _stable_seeds() -> str:
    """Runs without a failure that would bring the bound below STABLE_BOUND."""
    need = math.ceil(math.log(1 - STABLE_CONFIDENCE) / math.log(1 - STABLE_BOUND))
    return str(need)


def claim_verdict(rows: pd.DataFrame) -> str:
    """One claim's verdict from its metric rows: n/a if any is, no if any is, yes if all are."""
    verdicts = set(rows["verdict"])
    if len(rows) == 1:
        return str(rows["verdict"].iloc[0])
    for word in (NA, NO, INCONCLUSIVE):
        if word in verdicts:
            return word
    return YES


NUMERIC = ("baseline", "candidate", "estimate", "ci_low", "ci_high", "p_value", "p_adjusted",
           "n_baseline", "n_candidate")


def read_verdicts(path: str | os.PathLike) -> pd.DataFrame:
    """verdicts.csv as written: text kept as text ("n/a" too), the numeric columns as floats."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in NUMERIC:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame
