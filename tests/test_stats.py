"""pkt.stats: intervals for one model's score and the paired test between two models."""
import math

import numpy as np
import pytest

from pkt.stats import bootstrap_ci, paired_difference, weighted_mean, wilson_interval


def test_wilson_interval_is_the_closed_form():
    k, n, z = 13, 40, 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert wilson_interval(k, n) == pytest.approx((centre - half, centre + half), abs=1e-9)


def test_wilson_interval_is_not_degenerate_at_zero_or_all():
    lo, hi = wilson_interval(0, 40)
    assert lo == 0.0 and 0.05 < hi < 0.15
    lo, hi = wilson_interval(5, 5)
    assert hi == pytest.approx(1.0) and lo < 0.6


def test_wilson_interval_refuses_impossible_counts():
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_weighted_mean_is_the_pooled_per_token_mean():
    sums, tokens = [10.0, 2.0], [5, 1]          # per-token 2.0 and 2.0 -> 2.0; the mean of means would be too
    assert weighted_mean(sums, tokens) == 2.0
    assert weighted_mean([1.0, 3.0]) == 2.0


def test_bootstrap_ci_holds_the_mean_narrows_with_more_examples_and_is_seeded():
    rng = np.random.default_rng(0)
    tokens = rng.integers(50, 200, 400)
    sums = rng.normal(2.0, 0.5, 400) * tokens
    small = bootstrap_ci(sums[:25], tokens[:25])
    large = bootstrap_ci(sums, tokens)
    assert small[0] < weighted_mean(sums[:25], tokens[:25]) < small[1]
    assert large[1] - large[0] < small[1] - small[0]
    assert bootstrap_ci(sums, tokens) == large


def test_paired_difference_sees_a_small_consistent_shift_that_unpaired_resampling_cannot():
    rng = np.random.default_rng(1)
    difficulty = rng.normal(5.0, 1.0, 32)                 # examples differ far more than the two models do
    a, b = difficulty - 0.05 + rng.normal(0, 0.01, 32), difficulty
    paired = paired_difference(a, b)
    unpaired = paired_difference(a, b, unpaired=True)
    assert paired.diff == pytest.approx(unpaired.diff) and paired.paired and not unpaired.paired
    assert paired.high < 0 and not paired.inside_noise
    assert unpaired.inside_noise


def test_identical_models_are_inside_the_noise():
    d = paired_difference([1, 0, 1, 1], [1, 0, 1, 1])
    assert (d.diff, d.low, d.high) == (0.0, 0.0, 0.0) and d.inside_noise


def test_paired_difference_needs_the_same_examples():
    with pytest.raises(ValueError, match="4 and 3"):
        paired_difference([1, 0, 1, 1], [1, 0, 1])
    assert paired_difference([1, 0, 1, 1], [1, 0, 1], unpaired=True).diff == pytest.approx(0.75 - 2 / 3)


def test_one_example_has_a_point_interval():
    assert bootstrap_ci([3.0], [2.0]) == (1.5, 1.5)
