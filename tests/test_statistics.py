"""uumamba.evaluation.statistics: bootstrap intervals and the Wilcoxon wrapper on samples whose
answers can be worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import wilcoxon

from uumamba.evaluation.statistics import (
    bootstrap_mean,
    bootstrap_median,
    paired_bootstrap_difference,
    wilcoxon_signed_rank,
)


def test_constant_sample_has_a_point_interval():
    ci = bootstrap_mean([0.8] * 7)
    assert (ci.estimate, ci.low, ci.high, ci.n) == (pytest.approx(0.8), ci.estimate, ci.estimate, 7)
    one = bootstrap_mean([0.3])
    assert one.low == one.estimate == one.high == pytest.approx(0.3) and one.n == 1


def test_interval_contains_the_mean_and_stays_within_the_data():
    values = [0.1, 0.5, 0.9, 0.3, 0.7]
    ci = bootstrap_mean(values, seed=3)
    assert ci.estimate == pytest.approx(0.5)
    assert 0.1 <= ci.low < 0.5 < ci.high <= 0.9
    # the same values and seed give the same interval; another seed nearly the same one
    spread = np.random.default_rng(0).uniform(0.5, 1.0, size=40)
    first = bootstrap_mean(spread, seed=3)
    assert bootstrap_mean(spread, seed=3) == first
    other = bootstrap_mean(spread, seed=4)
    assert other != first
    assert abs(other.low - first.low) < 0.01 and abs(other.high - first.high) < 0.01


def test_two_point_sample_quantiles_by_hand():
    # resampling [0, 1] twice gives mean 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 2.5 %
    # and 97.5 % points are 0 and 1, the 30 % and 70 % points (confidence 0.4) both 0.5
    wide = bootstrap_mean([0.0, 1.0])
    assert (wide.low, wide.estimate, wide.high) == (0.0, 0.5, 1.0)
    narrow = bootstrap_mean([0.0, 1.0], confidence=0.4)
    assert (narrow.low, narrow.high) == (0.5, 0.5)


def test_nan_values_are_dropped_and_no_values_give_nan():
    ci = bootstrap_mean([1.0, math.nan, 0.0, math.nan])
    assert ci.n == 2 and ci.estimate == 0.5
    empty = bootstrap_mean([math.nan, math.nan])
    assert empty.n == 0 and math.isnan(empty.estimate) and math.isnan(empty.low)
    assert empty.to_json() == {"estimate": None, "low": None, "high": None, "n": 0,
                               "confidence": 0.95}


def test_paired_difference_sign_and_constant_shift():
    base = np.array([0.6, 0.7, 0.9, 0.8])
    better = paired_bootstrap_difference(base + 0.05, base)
    assert better.estimate == pytest.approx(0.05)
    assert better.low == pytest.approx(0.05) and better.high == pytest.approx(0.05)
    worse = paired_bootstrap_difference(base - np.array([0.1, 0.2, 0.0, 0.3]), base, seed=1)
    assert worse.estimate == pytest.approx(-0.15)
    assert -0.3 <= worse.low < -0.15 < worse.high <= 0.0


def test_paired_difference_drops_nan_pairs_and_checks_lengths():
    d = paired_bootstrap_difference([1.0, math.nan, 0.5], [0.5, 0.2, math.nan])
    assert d.n == 1 and d.estimate == 0.5
    with pytest.raises(ValueError, match="one value per case"):
        paired_bootstrap_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_mean([1.0], confidence=1.0)


def test_wilcoxon_matches_scipy_on_small_examples():
    # five positive differences: the exact two-sided p is 2 / 2**5
    r = wilcoxon_signed_rank([1, 2, 3, 4, 5], [0, 0, 0, 0, 0])
    assert r.p_value == pytest.approx(2 / 32) and r.statistic == 0.0
    assert r.n == 5 and r.n_nonzero == 5 and "p < 0.05 needs 6" in r.note
    a = [0.91, 0.85, 0.78, 0.88, 0.93, 0.80, 0.86, 0.90]
    b = [0.89, 0.86, 0.70, 0.84, 0.90, 0.81, 0.80, 0.85]
    ours = wilcoxon_signed_rank(a, b)
    theirs = wilcoxon(np.subtract(a, b))
    assert ours.p_value == pytest.approx(float(theirs.pvalue))
    assert ours.statistic == pytest.approx(float(theirs.statistic)) and ours.note is None


def test_wilcoxon_all_zero_none_and_nan():
    zero = wilcoxon_signed_rank([0.5, 0.7, 0.9], [0.5, 0.7, 0.9])
    assert (zero.p_value, zero.n, zero.n_nonzero, zero.note) == (1.0, 3, 0,
                                                                 "all differences are zero")
    none = wilcoxon_signed_rank([math.nan], [0.3])
    assert none.p_value is None and none.n == 0 and none.note == "no paired cases"
    # a NaN pair is dropped, the rest goes to scipy: [1, 2] -> exact p 0.5
    assert wilcoxon_signed_rank([1.0, 2.0, math.nan], [0.0, 0.0, 1.0]).p_value == pytest.approx(0.5)


def test_median_bootstrap_resists_one_outlier_and_matches_resampling_by_hand():
    values = [1.0, 1.1, 0.9, 1.05, 0.95, 10.0]  # one disturbed round
    got = bootstrap_median(values, n_resamples=2000, seed=3)
    assert got.estimate == pytest.approx(1.025)
    assert got.n == 6 and got.low <= 1.025 <= got.high and got.high < 10.0
    rng = np.random.default_rng(3)
    medians = np.median(np.asarray(values)[rng.integers(0, 6, size=(2000, 6))], axis=1)
    assert (got.low, got.high) == pytest.approx(tuple(np.quantile(medians, [0.025, 0.975])))
    assert math.isnan(bootstrap_median([math.nan]).estimate)


def test_paired_ratio_is_the_geometric_mean_of_per_case_ratios():
    from uumamba.evaluation.statistics import paired_bootstrap_ratio

    a, b = [1.0, 4.0, 2.0, float("nan")], [2.0, 2.0, 2.0, 1.0]
    r = paired_bootstrap_ratio(a, b)
    assert r.n == 3 and r.estimate == pytest.approx((0.5 * 2.0 * 1.0) ** (1 / 3))
    assert r.low < r.estimate < r.high
    same = paired_bootstrap_ratio([3.0, 6.0], [1.5, 3.0])  # every volume twice as slow
    assert (same.low, same.estimate, same.high) == pytest.approx((2.0, 2.0, 2.0))
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="finite values > 0"):
            paired_bootstrap_ratio([1.0, bad], [1.0, 1.0])
