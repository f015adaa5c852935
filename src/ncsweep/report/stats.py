"""Verdicts with their uncertainty: non-inferiority of a difference, a ratio on the log scale.

Every comparison is a t test on scipy.stats. Seeds pair the two sides (paired t) when both hold
exactly the same seeds, each at most once, after missing values are dropped; otherwise Welch's
t. The interval is two-sided at 1 - 2 alpha, so its lower bound is the one-sided alpha test.

Edge cases, by rule rather than by crash:

- A side with fewer than 2 runs is always "inconclusive" ("1 seed: no spread"): interval and
  p-value are NaN; the estimate is still given where both sides have a run. The ratio test's
  floor rule alone may still say "yes", and only on at least 2 candidate runs.
- Missing values (None, NaN, inf) are dropped, with their seeds, before anything else.
- No spread (the standard error of the difference is 0, e.g. every run gave the same value):
  the difference is known exactly, so the interval is the point itself, the p-value is 0 when
  the point clears the bound and 1 when not, and ``seeds_needed`` is 2 (None at the bound).
- ``seeds_needed`` is None with ``seeds_over_cap`` False where no number of seeds can settle
  the comparison (the difference sits exactly on the bound, or there is no spread to plan with),
  and None with ``seeds_over_cap`` True where it takes more than :data:`SEEDS_CAP` seeds a side.
- The ratio test reads values below the floor (zero and rounding negatives included) as the
  floor: differences beneath it are not judged and every log stays finite.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

SEEDS_CAP = 100
POWER = 0.8
PAIRED, WELCH = "paired t", "Welch t"
YES, NO, INCONCLUSIVE = "yes", "no", "inconclusive"
_ZERO_SE = 1e-12


@dataclass(frozen=True)
class Comparison:
    """One judged claim: estimate, interval, one-sided p-value, verdict and seeds to settle it."""

    estimate: float
    ci_low: float
    ci_high: float
    p_value: float
    verdict: str
    seeds_needed: int | None
    seeds_over_cap: bool
    n_baseline: int
    n_candidate: int
    method: str
    reason: str

    @property
    def seeds_needed_text(self) -> str:
        """``seeds_needed`` for a reader: a number, "more than 100" or "n/a"."""
        if self.seeds_over_cap:
            return f"more than {SEEDS_CAP}"
        return "n/a" if self.seeds_needed is None else str(self.seeds_needed)


@dataclass(frozen=True)
class RatioComparison(Comparison):
    """A ratio claim: ``estimate``, ``ci_low`` and ``ci_high`` are ratios candidate / baseline."""

    geomean_baseline: float
    geomean_candidate: float


@dataclass(frozen=True)
class Batch:
    """Many comparisons at once (one per row), for simulations and large reports."""

    estimate: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    p_value: np.ndarray
    verdict: np.ndarray


@dataclass(frozen=True)
class _Sides:
    """Two sides after missing values are dropped, aligned by seed when paired."""

    baseline: np.ndarray
    candidate: np.ndarray
    paired: bool

    @property
    def method(self) -> str:
        return PAIRED if self.paired else WELCH

    @property
    def enough(self) -> bool:
        return min(self.baseline.size, self.candidate.size) >= 2

    def spread(self) -> tuple[float, ...]:
        """The spread to plan with: the sd of the differences (paired) or of each side."""
        if self.paired:
            return (float(np.std(self.candidate - self.baseline, ddof=1)),)
        return (float(np.std(self.baseline, ddof=1)), float(np.std(self.candidate, ddof=1)))


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha={alpha!r} is not allowed: a number in (0, 0.5)")


def _valid(values: Sequence[float | None], seeds: Sequence | None,
           name: str) -> tuple[np.ndarray, list | None]:
    """Finite values and their seeds; missing values (None, NaN, inf) dropped with their seed."""
    array = np.array([np.nan if v is None else v for v in values], dtype=float)
    if seeds is not None and len(seeds) != array.size:
        raise ValueError(f"{name}_seeds has {len(seeds)} seeds for {array.size} values: "
                         "one seed per value is allowed")
    keep = np.isfinite(array)
    kept_seeds = None if seeds is None else [s for s, k in zip(seeds, keep, strict=True) if k]
    return array[keep], kept_seeds


def _sides(baseline, candidate, baseline_seeds, candidate_seeds) -> _Sides:
    """Both sides cleaned; paired, in seed order, when they hold exactly the same seeds."""
    base, b_seeds = _valid(baseline, baseline_seeds, "baseline")
    cand, c_seeds = _valid(candidate, candidate_seeds, "candidate")
    if (b_seeds is None or c_seeds is None or len(set(b_seeds)) != len(b_seeds)
            or len(set(c_seeds)) != len(c_seeds) or set(b_seeds) != set(c_seeds)):
        return _Sides(base, cand, paired=False)
    position = {seed: i for i, seed in enumerate(c_seeds)}
    order = [position[seed] for seed in b_seeds]
    return _Sides(base, cand[order], paired=True)


def _difference(baseline: np.ndarray, candidate: np.ndarray, paired: bool):
    """Row-wise mean difference (candidate - baseline), its standard error and t's df."""
    with np.errstate(invalid="ignore", divide="ignore"):
        if paired:
            diff = candidate - baseline
            n = diff.shape[-1]
            estimate = diff.mean(axis=-1)
            se = diff.std(axis=-1, ddof=1) / math.sqrt(n)
            df = np.full_like(estimate, n - 1.0)
        else:
            nb, nc = baseline.shape[-1], candidate.shape[-1]
            vb = baseline.var(axis=-1, ddof=1) / nb
            vc = candidate.var(axis=-1, ddof=1) / nc
            estimate = candidate.mean(axis=-1) - baseline.mean(axis=-1)
            se = np.sqrt(vb + vc)
            df = (vb + vc) ** 2 / (vb**2 / (nb - 1) + vc**2 / (nc - 1))
    scale = np.maximum(1.0, np.maximum(np.abs(baseline).max(axis=-1),
                                       np.abs(candidate).max(axis=-1)))
    exact = se <= _ZERO_SE * scale
    return estimate, np.where(exact, 0.0, se), np.where(exact, 1.0, df), exact


def _one(sides: _Sides) -> tuple[float, float, float, bool]:
    """One comparison's difference, standard error, df and whether it is exact (no spread)."""
    estimate, se, df, exact = _difference(sides.baseline[None], sides.candidate[None],
                                          sides.paired)
    return float(estimate[0]), float(se[0]), float(df[0]), bool(exact[0])


def _interval(estimate, se, df, alpha):
    """The two-sided 1 - 2 alpha t interval (the point itself where se is 0)."""
    half = stats.t.ppf(1 - alpha, df) * se
    return estimate - half, estimate + half


def noninferiority_batch(baseline: np.ndarray, candidate: np.ndarray, margin: float,
                         alpha: float = 0.05, paired: bool = False) -> Batch:
    """Non-inferiority of each row's candidate to its baseline; rows are comparisons.

    ``baseline`` and ``candidate`` are 2-D (comparisons x runs), complete, at least 2 runs a
    side (equal shapes, columns matched by seed, when ``paired``). Same rules as
    :func:`noninferiority`.
    """
    _check_alpha(alpha)
    base, cand = np.atleast_2d(np.asarray(baseline, float)), np.atleast_2d(
        np.asarray(candidate, float))
    if min(base.shape[-1], cand.shape[-1]) < 2 or (paired and base.shape != cand.shape):
        raise ValueError(f"shapes {base.shape} and {cand.shape} are not allowed: "
                         "at least 2 runs a side, equal shapes when paired")
    estimate, se, df, exact = _difference(base, cand, paired)
    low, high = _interval(estimate, se, df, alpha)
    with np.errstate(invalid="ignore", divide="ignore"):
        p_test = stats.t.sf((estimate + margin) / se, df)
    p_value = np.where(exact, np.where(estimate > -margin, 0.0, 1.0), p_test)
    verdict = np.where(low > -margin, YES, np.where(high < -margin, NO, INCONCLUSIVE))
    return Batch(estimate, low, high, p_value, verdict)


def seeds_needed(difference: float, margin: float, sds: Sequence[float], alpha: float = 0.05,
                 power: float = POWER) -> tuple[int | None, bool]:
    """Seeds a side at which this difference and spread settle the claim, and "over the cap".

    ``sds`` is one sd (of the paired differences) or two (baseline, candidate: Welch). The
    claim settles "yes" above -margin and "no" below it; the power of the one-sided test is
    the noncentral t's, searched over 2 to :data:`SEEDS_CAP` seeds. Returns ``(n, False)``,
    ``(None, True)`` beyond the cap, and ``(None, False)`` where it cannot settle (the
    difference exactly at -margin, or no spread known).
    """
    distance = abs(difference + margin)
    sds = [float(s) for s in sds]
    if not sds or not math.isfinite(distance) or not all(math.isfinite(s) for s in sds):
        return None, False
    if distance == 0:
        return None, False
    variance = sum(s * s for s in sds)
    if variance == 0:
        return 2, False
    n = np.arange(2, SEEDS_CAP + 1, dtype=float)
    df = n - 1 if len(sds) == 1 else (n - 1) * variance**2 / sum(s**4 for s in sds)
    ncp = distance / np.sqrt(variance / n)
    reached = stats.nct.sf(stats.t.ppf(1 - alpha, df), df, ncp) >= power
    if not reached.any():
        return None, True
    return int(n[np.argmax(reached)]), False


def _few_runs(sides: _Sides) -> str:
    fewest = min(sides.baseline.size, sides.candidate.size)
    return "1 seed: no spread" if fewest == 1 else "0 seeds: no runs"


def _spread(sides: _Sides, exact: bool) -> tuple[float, ...]:
    """The spread to plan with; none at all where the difference is exact."""
    return (0.0,) if exact else sides.spread()


def _planning_sds(sides: _Sides, assumed_sd: float | None) -> tuple[float, ...]:
    """Welch sds to plan with when a side has under 2 runs: a side's own sd, else the assumed."""
    own = [float(np.std(s, ddof=1)) for s in (sides.baseline, sides.candidate) if s.size >= 2]
    if own:
        return (own[0], own[0])
    return () if assumed_sd is None else (assumed_sd, assumed_sd)


def _reason(verdict: str, bound: str, alpha: float, exact: bool) -> str:
    if exact:
        return f"no spread: the difference is exact; {verdict} against {bound}"
    where = {YES: "clears", NO: "falls short of", INCONCLUSIVE: "straddles"}[verdict]
    return f"the {1 - 2 * alpha:.0%} interval {where} {bound}"


def noninferiority(baseline: Sequence[float | None], candidate: Sequence[float | None],
                   margin: float, alpha: float = 0.05, baseline_seeds: Sequence | None = None,
                   candidate_seeds: Sequence | None = None,
                   assumed_sd: float | None = None) -> Comparison:
    """Is the candidate no worse than the baseline by more than ``margin``?

    ``yes`` when the 1 - 2 alpha interval of candidate - baseline lies above -margin, ``no``
    when it lies below, else ``inconclusive``; ``p_value`` is one-sided, of H0: difference <=
    -margin. ``assumed_sd`` (the run-to-run sd of one side) plans ``seeds_needed`` when no
    side has 2 runs; with one such side, that side's sd stands for both.
    """
    if margin < 0:
        raise ValueError(f"margin={margin!r} is not allowed: a number >= 0")
    _check_alpha(alpha)
    sides = _sides(baseline, candidate, baseline_seeds, candidate_seeds)
    nb, nc = sides.baseline.size, sides.candidate.size
    if not sides.enough:
        estimate = (float(sides.candidate.mean() - sides.baseline.mean()) if min(nb, nc)
                    else math.nan)
        needed = seeds_needed(estimate, margin, _planning_sds(sides, assumed_sd), alpha)
        return Comparison(estimate, math.nan, math.nan, math.nan, INCONCLUSIVE, *needed, nb,
                          nc, sides.method, _few_runs(sides))
    batch = noninferiority_batch(sides.baseline, sides.candidate, margin, alpha, sides.paired)
    estimate, verdict = float(batch.estimate[0]), str(batch.verdict[0])
    exact = bool(batch.ci_low[0] == batch.ci_high[0])
    return Comparison(estimate, float(batch.ci_low[0]), float(batch.ci_high[0]),
                      float(batch.p_value[0]), verdict,
                      *seeds_needed(estimate, margin, _spread(sides, exact), alpha), nb, nc,
                      sides.method, _reason(verdict, f"-{margin:g}", alpha, exact))


def ratio_test(baseline: Sequence[float | None], candidate: Sequence[float | None],
               limit: float = 1.10, floor: float = 1e-3, alpha: float = 0.05,
               baseline_seeds: Sequence | None = None,
               candidate_seeds: Sequence | None = None) -> RatioComparison:
    """Is candidate / baseline (geometric means) at most ``limit``? For NC metrics, lower=better.

    ``yes`` when the upper bound of the 1 - 2 alpha ratio interval is <= ``limit``, or when every
    candidate run (at least 2) is below ``floor``; ``no`` when the lower bound is > ``limit``;
    else ``inconclusive``. The t interval is on the logs, values below the floor read as the
    floor; ``p_value`` is one-sided, of H0: ratio >= limit (0 where the floor decides).
    """
    if limit <= 0 or floor <= 0:
        raise ValueError(f"limit={limit!r}, floor={floor!r} are not allowed: positive numbers")
    _check_alpha(alpha)
    sides = _sides(baseline, candidate, baseline_seeds, candidate_seeds)
    raw_candidate = sides.candidate
    logs = _Sides(np.log(np.maximum(sides.baseline, floor)),
                  np.log(np.maximum(sides.candidate, floor)), sides.paired)
    nb, nc = logs.baseline.size, logs.candidate.size
    geo_b = math.exp(logs.baseline.mean()) if nb else math.nan
    geo_c = math.exp(logs.candidate.mean()) if nc else math.nan
    below_floor = nc >= 2 and bool((raw_candidate < floor).all())
    if not logs.enough:
        verdict, reason = (YES, f"every candidate run below the floor {floor:g}") if (
            below_floor) else (INCONCLUSIVE, _few_runs(logs))
        return RatioComparison(geo_c / geo_b, math.nan, math.nan,
                               0.0 if below_floor else math.nan, verdict, None, False, nb, nc,
                               logs.method, reason, geo_b, geo_c)
    estimate, se, df, exact = _one(logs)
    low, high = _interval(estimate, se, df, alpha)
    bound = math.log(limit)
    if exact:
        p_value = 0.0 if estimate <= bound else 1.0
    else:
        p_value = float(stats.t.cdf((estimate - bound) / se, df))
    ratio_low, ratio_high = math.exp(low), math.exp(high)
    verdict = YES if ratio_high <= limit else NO if ratio_low > limit else INCONCLUSIVE
    reason = _reason(verdict, f"ratio {limit:g}", alpha, exact)
    if below_floor:
        verdict, p_value, reason = YES, 0.0, f"every candidate run below the floor {floor:g}"
    needed = seeds_needed(-estimate, bound, _spread(logs, exact), alpha)
    return RatioComparison(math.exp(estimate), ratio_low, ratio_high, p_value, verdict,
                           *needed, nb, nc, logs.method, reason, geo_b, geo_c)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values in input order: step-down, monotone, capped at 1.

    NaN entries (no test made) stay NaN and do not count among the tests adjusted together.
    """
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    m = order.size
    steps = np.maximum.accumulate((m - np.arange(m)) * p[order])
    adjusted[order] = np.minimum(steps, 1.0)
    return adjusted.tolist()


def rule_of_three(n: int) -> float:
    """The 95% upper bound 3/n on the chance of an event seen 0 times in n trials."""
    if n < 1:
        raise ValueError(f"n={n!r} is not allowed: at least 1 trial")
    return 3.0 / n


def zero_event_bound(n: int, confidence: float = 0.95) -> float:
    """The exact (Clopper-Pearson) upper bound, 1 - (1 - confidence)**(1/n), for 0 events in n."""
    if n < 1:
        raise ValueError(f"n={n!r} is not allowed: at least 1 trial")
    return float(stats.beta.ppf(confidence, 1, n))


def event_rate_bound(events: int, n: int, confidence: float = 0.95) -> float:
    """The exact (Clopper-Pearson) one-sided upper bound on a rate seen ``events`` times in n."""
    if n < 1 or not 0 <= events <= n:
        raise ValueError(f"events={events!r}, n={n!r} are not allowed: 0 <= events <= n, n >= 1")
    if events == n:
        return 1.0
    return float(stats.beta.ppf(confidence, events + 1, n - events))


def mean_interval(values: Sequence[float | None],
                  alpha: float = 0.05) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of one side's finite values: the two-sided 1 - 2 alpha t interval
    of their mean (NaN bounds with fewer than 2 values; the point itself without spread)."""
    _check_alpha(alpha)
    array, _ = _valid(values, None, "values")
    n = int(array.size)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(array.mean())
    if n < 2:
        return mean, math.nan, math.nan, n
    se = float(array.std(ddof=1)) / math.sqrt(n)
    if se <= _ZERO_SE * max(1.0, float(np.abs(array).max())):
        return mean, mean, mean, n
    low, high = _interval(mean, se, n - 1.0, alpha)
    return mean, float(low), float(high), n
