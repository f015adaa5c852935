"""Verdict statistics: calibration by simulation, pairing, Holm, the ratio test's rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from ncsweep.report.stats import (
    PAIRED,
    SEEDS_CAP,
    WELCH,
    holm,
    noninferiority,
    noninferiority_batch,
    ratio_test,
    rule_of_three,
    seeds_needed,
    zero_event_bound,
)

SIMS = 4000
MARGIN = 0.5
ALPHA = 0.05


def _two_se(rate: float, sims: int = SIMS) -> float:
    return 2 * math.sqrt(rate * (1 - rate) / sims)


def _simulate(rng, true_diff, n_b, n_c, sd_b, sd_c, paired=False, shared_sd=1.0):
    """SIMS comparisons; paired runs share a per-seed effect that pairing removes."""
    if paired:
        shared = rng.normal(0, shared_sd, (SIMS, n_b))
        base = 90 + shared + rng.normal(0, sd_b, (SIMS, n_b))
        return base, 90 + true_diff + shared + rng.normal(0, sd_c, (SIMS, n_c))
    return (90 + rng.normal(0, sd_b, (SIMS, n_b)),
            90 + true_diff + rng.normal(0, sd_c, (SIMS, n_c)))


CASES = [  # (n_baseline, n_candidate, sd_baseline, sd_candidate, paired)
    pytest.param(5, 5, 0.2, 0.2, True, id="paired-5"),
    pytest.param(10, 10, 0.3, 0.3, False, id="welch-10"),
    pytest.param(4, 8, 0.2, 0.4, False, id="welch-4-8-unequal"),
    pytest.param(3, 3, 0.3, 0.3, False, id="welch-3"),
]


@pytest.mark.parametrize(("n_b", "n_c", "sd_b", "sd_c", "paired"), CASES)
def test_yes_at_the_margin_is_at_most_alpha(n_b, n_c, sd_b, sd_c, paired):
    base, cand = _simulate(np.random.default_rng(1), -MARGIN, n_b, n_c, sd_b, sd_c, paired)
    verdicts = noninferiority_batch(base, cand, MARGIN, ALPHA, paired).verdict
    rate = float(np.mean(verdicts == "yes"))
    print(f"yes at a true difference of -margin: {rate:.4f}")
    assert rate <= ALPHA + _two_se(ALPHA)


@pytest.mark.parametrize("paired", [True, False], ids=["paired", "welch"])
def test_equal_means_with_small_spread_say_yes(paired):
    base, cand = _simulate(np.random.default_rng(2), 0.0, 10, 10, MARGIN / 5, MARGIN / 5,
                           paired)
    rate = float(np.mean(noninferiority_batch(base, cand, MARGIN, ALPHA, paired).verdict
                         == "yes"))
    print(f"yes at a true difference of 0, sd margin/5, 10 seeds: {rate:.4f}")
    assert rate >= 0.95


def _coverage(n_b, n_c, sd_b, sd_c, paired) -> float:
    true_diff = -0.2
    base, cand = _simulate(np.random.default_rng(3), true_diff, n_b, n_c, sd_b, sd_c, paired)
    batch = noninferiority_batch(base, cand, MARGIN, ALPHA, paired)
    rate = float(np.mean((batch.ci_low <= true_diff) & (true_diff <= batch.ci_high)))
    print(f"coverage of the {1 - 2 * ALPHA:.0%} interval: {rate:.4f}")
    return rate


@pytest.mark.parametrize(("n_b", "n_c", "sd_b", "sd_c", "paired"), CASES[:3])
def test_interval_covers_at_its_nominal_rate(n_b, n_c, sd_b, sd_c, paired):
    nominal = 1 - 2 * ALPHA
    assert abs(_coverage(n_b, n_c, sd_b, sd_c, paired) - nominal) <= _two_se(nominal)


def test_welch_interval_errs_wide_at_three_seeds_a_side():
    # Welch's df is below the pooled 4 at 3 + 3 equal-spread runs: about 92% for a 90% interval.
    nominal = 1 - 2 * ALPHA
    assert nominal - _two_se(nominal) <= _coverage(3, 3, 0.3, 0.3, False) <= 0.95


@pytest.mark.parametrize(("true_diff", "paired", "settles"), [
    (-0.2, False, "yes"), (-0.3, True, "yes"), (0.1, False, "yes"), (-0.85, False, "no")])
def test_reported_seeds_needed_settle_with_the_promised_power(true_diff, paired, settles):
    rng = np.random.default_rng(4)
    sd = 0.3
    pilot_b, pilot_c = _simulate(rng, true_diff, 6, 6, sd, sd, paired)
    seeds = list(range(6))
    pilot = noninferiority(pilot_b[0], pilot_c[0], MARGIN, ALPHA, seeds,
                           seeds if paired else None)
    n = pilot.seeds_needed
    assert pilot.method == (PAIRED if paired else WELCH)
    assert n is not None and 2 <= n <= SEEDS_CAP
    # the world the pilot saw: its estimate and its spread, at n seeds a side
    if paired:
        d_sd = float(np.std(pilot_c[0] - pilot_b[0], ddof=1))
        base = rng.normal(0, 1, (SIMS, n))
        cand = base + pilot.estimate + rng.normal(0, d_sd, (SIMS, n))
    else:
        sd_b, sd_c = np.std(pilot_b[0], ddof=1), np.std(pilot_c[0], ddof=1)
        base = rng.normal(0, sd_b, (SIMS, n))
        cand = pilot.estimate + rng.normal(0, sd_c, (SIMS, n))
    rate = float(np.mean(noninferiority_batch(base, cand, MARGIN, ALPHA, paired).verdict
                         == settles))
    print(f"{settles} at the reported {n} seeds: {rate:.4f}")
    assert rate >= 0.75


def test_seeds_needed_cap_boundary_and_no_spread():
    assert seeds_needed(-0.49, MARGIN, (0.3, 0.3)) == (None, True)
    assert seeds_needed(-MARGIN, MARGIN, (0.3, 0.3)) == (None, False)
    assert seeds_needed(0.0, MARGIN, ()) == (None, False)
    assert seeds_needed(0.0, MARGIN, (0.0, 0.0)) == (2, False)
    small, large = seeds_needed(0.0, MARGIN, (0.3,)), seeds_needed(0.0, MARGIN, (0.6,))
    assert small[0] < large[0]
    over = noninferiority([90.0, 90.3, 89.7], [89.51, 89.81, 89.21], MARGIN)
    assert over.seeds_needed is None and over.seeds_over_cap
    assert over.seeds_needed_text == "more than 100"


def test_single_comparison_matches_scipy_and_the_batch():
    rng = np.random.default_rng(5)
    base, cand = rng.normal(98.3, 0.3, 7), rng.normal(98.1, 0.4, 5)
    result = noninferiority(base, cand, MARGIN)
    welch = sps.ttest_ind(cand, base, equal_var=False)
    low, high = welch.confidence_interval(1 - 2 * ALPHA)
    assert result.method == WELCH and (result.n_baseline, result.n_candidate) == (7, 5)
    assert result.estimate == pytest.approx(cand.mean() - base.mean())
    assert (result.ci_low, result.ci_high) == pytest.approx((low, high))
    p_scipy = sps.ttest_ind(cand + MARGIN, base, equal_var=False, alternative="greater").pvalue
    assert result.p_value == pytest.approx(p_scipy)
    batch = noninferiority_batch(base, cand, MARGIN)
    assert (batch.ci_low[0], batch.verdict[0]) == (pytest.approx(result.ci_low), result.verdict)
    expected = ("yes" if low > -MARGIN else "no" if high < -MARGIN else "inconclusive")
    assert result.verdict == expected


def test_same_seeds_pair_in_seed_order_otherwise_welch():
    base, cand = [98.0, 98.4, 98.2, 97.9], [98.1, 98.3, 98.6, 97.8]
    seeds = [0, 1, 2, 3]
    shuffled = [3, 1, 0, 2]
    cand_shuffled = [cand[s] for s in shuffled]
    paired = noninferiority(base, cand_shuffled, MARGIN, baseline_seeds=seeds,
                            candidate_seeds=shuffled)
    rel = sps.ttest_rel(cand, base)
    assert paired.method == PAIRED
    assert (paired.ci_low, paired.ci_high) == pytest.approx(rel.confidence_interval(0.9))
    assert paired.estimate == pytest.approx(np.mean(np.subtract(cand, base)))
    for b_seeds, c_seeds in [(seeds, [0, 1, 2, 4]), (None, seeds), (seeds, None),
                             ([0, 0, 1, 2], [0, 0, 1, 2])]:
        result = noninferiority(base, cand, MARGIN, baseline_seeds=b_seeds,
                                candidate_seeds=c_seeds)
        assert result.method == WELCH
    missing = noninferiority(base, [98.1, None, 98.6, 97.8], MARGIN, baseline_seeds=seeds,
                             candidate_seeds=seeds)
    assert (missing.method, missing.n_baseline, missing.n_candidate) == (WELCH, 4, 3)
    with pytest.raises(ValueError, match="baseline_seeds"):
        noninferiority(base, cand, MARGIN, baseline_seeds=[0, 1])


def test_one_seed_is_never_yes():
    for base, cand in [([98.3], [99.9]), ([98.3, 98.2, 98.4], [99.9]), ([98.3], [99.9, 99.8]),
                       ([], [99.0, 99.1]), ([98.3, None], [99.9, math.nan])]:
        result = noninferiority(base, cand, MARGIN, assumed_sd=0.3)
        assert result.verdict == "inconclusive"
        assert math.isnan(result.ci_low) and math.isnan(result.p_value)
    one = noninferiority([98.33], [98.61], MARGIN)
    assert one.reason == "1 seed: no spread"
    assert one.estimate == pytest.approx(0.28) and one.seeds_needed is None
    planned = noninferiority([98.33], [98.61], MARGIN, assumed_sd=0.3)
    assert planned.seeds_needed == seeds_needed(0.28, MARGIN, (0.3, 0.3))[0]
    assert ratio_test([0.1], [1e-5]).verdict == "inconclusive"
    with pytest.raises(ValueError, match="at least 2 runs"):
        noninferiority_batch(np.ones((3, 1)), np.ones((3, 4)), MARGIN)


def test_no_spread_is_exact_and_does_not_crash():
    same = noninferiority([98.0, 98.0, 98.0], [98.0, 98.0], MARGIN)
    assert (same.verdict, same.ci_low, same.ci_high, same.p_value) == ("yes", 0.0, 0.0, 0.0)
    assert same.seeds_needed == 2
    worse = noninferiority([98.0, 98.0], [97.0, 97.0], MARGIN)
    assert (worse.verdict, worse.p_value) == ("no", 1.0)
    edge = noninferiority([1.0, 1.0], [0.5, 0.5], MARGIN, baseline_seeds=[0, 1],
                          candidate_seeds=[0, 1])
    assert (edge.verdict, edge.seeds_needed, edge.seeds_over_cap) == ("inconclusive", None,
                                                                      False)
    shifted = noninferiority([1.0, 2.0, 3.0], [1.1, 2.1, 3.1], MARGIN, baseline_seeds=[0, 1, 2],
                             candidate_seeds=[0, 1, 2])
    assert (shifted.method, shifted.verdict, shifted.seeds_needed) == (PAIRED, "yes", 2)


def test_holm_equals_a_hand_computation():
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6, 0.001]) == pytest.approx([1.0, 1.0, 0.003])
    assert holm([0.02, math.nan, 0.01]) == pytest.approx([0.02, math.nan, 0.02], nan_ok=True)
    assert holm([]) == []
    rng = np.random.default_rng(6)
    p = rng.uniform(0, 0.2, 50)
    adjusted = np.array(holm(p))
    order = np.argsort(p)
    assert np.all(np.diff(adjusted[order]) >= 0)
    assert np.all(adjusted >= p) and np.all(adjusted <= 1)


def test_ratio_test_verdicts():
    seeds = [0, 1, 2, 3, 4]
    base = [0.100, 0.110, 0.105, 0.098, 0.102]
    same = ratio_test(base, [0.101, 0.108, 0.104, 0.097, 0.103], baseline_seeds=seeds,
                      candidate_seeds=seeds)
    assert (same.verdict, same.method) == ("yes", PAIRED)
    assert same.ci_high <= 1.10 and same.ci_low <= same.estimate <= same.ci_high
    assert same.p_value < ALPHA
    worse = ratio_test(base, [0.30, 0.33, 0.31, 0.29, 0.32])
    assert (worse.verdict, worse.method) == ("no", WELCH)
    assert worse.ci_low > 1.10 and worse.p_value > 0.5
    assert worse.estimate == pytest.approx(worse.geomean_candidate / worse.geomean_baseline)
    assert worse.geomean_baseline == pytest.approx(sps.gmean(base))
    unsure = ratio_test([0.1, 0.2, 0.05], [0.12, 0.25, 0.04])
    assert unsure.verdict == "inconclusive" and unsure.ci_low < 1.10 < unsure.ci_high
    floor = ratio_test([1e-5, 2e-5, 1.5e-5], [5e-4, 8e-4, 0.0])
    assert floor.verdict == "yes" and "floor" in floor.reason
    assert ratio_test([], [1e-4, 2e-4]).verdict == "yes"
    assert ratio_test([0.1, 0.1], [1e-4]).verdict == "inconclusive"


def test_ratio_test_handles_zeros_and_missing_values():
    zeros = ratio_test([0.0, 0.0, 0.0], [0.0, 0.0])
    assert zeros.verdict == "yes"
    missing = ratio_test([0.1, None, math.nan, 0.12], [0.5, math.inf, 0.55])
    assert (missing.n_baseline, missing.n_candidate, missing.verdict) == (2, 2, "no")
    empty = ratio_test([], [])
    assert empty.verdict == "inconclusive" and math.isnan(empty.estimate)
    half_zero = ratio_test([0.0, 0.0], [0.5, 0.6])
    assert half_zero.verdict == "no" and math.isfinite(half_zero.ci_low)


def test_rule_of_three():
    assert rule_of_three(1000) == pytest.approx(0.003)
    assert zero_event_bound(1000) == pytest.approx(1 - 0.05 ** (1 / 1000))
    assert zero_event_bound(30) < rule_of_three(30)
    with pytest.raises(ValueError, match="n=0"):
        rule_of_three(0)
