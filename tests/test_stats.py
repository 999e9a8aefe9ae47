"""scripts/stats.py: IQM, probability of improvement and their bootstrap intervals, the permutation
test, Holm and power; scripts/comparison/fits.py: areas and the saturating fit; on tiny tables whose
values are worked out by hand in the comments."""

from __future__ import annotations

import numpy as np
import pytest

from scripts.comparison.fits import fit_arm, normalised_area, saturating_curve
from scripts.stats import (
    detectable_difference,
    holm,
    improvement_interval,
    interval_is_min_max,
    iqm,
    iqm_curve,
    iqm_interval,
    permutation_test,
    pooled_sd,
    probability_of_improvement,
    runs_by_tasks,
    seeds_needed,
)

REPS = 10_000


# --- point estimates -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scores, expected",
    [
        # 8 scores: sorted 1 2 3 4 5 6 7 100, drop 2 at each end -> mean(3, 4, 5, 6) = 4.5 (the mean is 16)
        ([1, 2, 3, 4, 100, 7, 5, 6], 4.5),
        # 5 scores: sorted 0 1 2 3 10, drop floor(5/4) = 1 at each end -> mean(1, 2, 3) = 2
        ([10, 0, 3, 1, 2], 2.0),
        # 3 scores: floor(3/4) = 0, nothing dropped -> the mean, 3
        ([1, 2, 6], 3.0),
        # 2 runs x 2 tasks pooled: sorted 1 3 5 9, drop 1 at each end -> mean(3, 5) = 4
        ([[1, 9], [3, 5]], 4.0),
    ],
)
def test_iqm_hand_values(scores, expected):
    assert iqm(runs_by_tasks(scores)) == pytest.approx(expected)


def test_iqm_is_batched_over_leading_axes():
    # two resamples of 4 runs: sorted (0 1 2 9) -> 1.5 and (4 4 5 6) -> 4.5
    batch = np.array([[0, 9, 1, 2], [6, 4, 5, 4]], dtype=float)[..., None]  # (2, 4 runs, 1 task)
    np.testing.assert_allclose(iqm(batch), [1.5, 4.5])


@pytest.mark.parametrize(
    "x, y, expected",
    [
        # pairs: 3>1 1, 3=3 1/2, 3<4 0, 5>1 1, 5>3 1, 5>4 1 -> 4.5 / 6
        ([3, 5], [1, 3, 4], 0.75),
        # the other way round: 1.5 / 6
        ([1, 3, 4], [3, 5], 0.25),
        # 1 vs 2: 0, 0; 2 vs 2: 1/2, 1/2; 3 vs 2: 1, 1 -> 3 / 6
        ([1, 2, 3], [2, 2], 0.5),
        # identical runs: every comparison is a tie or cancels out
        ([0.2, 0.7, 0.4], [0.2, 0.7, 0.4], 0.5),
        # two tasks, averaged: task 0 (1, 2) vs (0, 0) -> 1; task 1 (1, 0) vs (1, 1) -> (1/2 + 1/2) / 4 = 0.25
        ([[1, 1], [2, 0]], [[0, 1], [0, 1]], 0.625),
    ],
)
def test_probability_of_improvement_hand_values(x, y, expected):
    assert probability_of_improvement(runs_by_tasks(x), runs_by_tasks(y)) == pytest.approx(expected)


def test_probability_of_improvement_is_batched():
    x = np.array([[3, 5], [1, 1]], dtype=float)[..., None]  # (2 resamples, 2 runs, 1 task)
    y = np.array([[1, 3, 4], [1, 3, 4]], dtype=float)[..., None]  # (2, 3, 1)
    # second entry: 1 vs (1, 3, 4) twice -> (1/2 + 0 + 0) * 2 / 6
    np.testing.assert_allclose(probability_of_improvement(x, y), [0.75, 1 / 6])


@pytest.mark.parametrize("scores", [[], [0.1, np.nan], [[[0.1]]]])
def test_runs_by_tasks_rejects_empty_missing_or_3d(scores):
    with pytest.raises(ValueError, match="scores must be"):
        runs_by_tasks(scores)


# --- bootstrap intervals ---------------------------------------------------------------------------


def test_iqm_interval_contains_the_estimate_and_is_deterministic():
    scores = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]  # symmetric around 0.5
    estimate, low, high = iqm_interval(scores, reps=REPS, seed=3)
    assert estimate == pytest.approx(0.5)  # drop 2 at each end: mean(0.3 .. 0.7)
    assert 0.1 <= low < estimate < high <= 0.9
    assert iqm_interval(scores, reps=REPS, seed=3) == (estimate, low, high)


def test_identical_runs_give_a_degenerate_interval():
    estimate, low, high = iqm_interval([0.3] * 5, reps=REPS, seed=0)
    assert low == estimate == high == pytest.approx(0.3)
    assert improvement_interval([0.4, 0.4], [0.4, 0.4, 0.4], reps=REPS, seed=0) == (0.5, 0.5, 0.5)


def test_interval_shrinks_with_more_runs():
    # the same spread (half 0, half 1), 4 runs vs 64: with 4, a resample of only zeros has chance
    # 1/16 > 2.5%, so the interval spans [0, 1]; with 64 the IQM's resamples stay near 0.5
    _, low_few, high_few = iqm_interval([0, 0, 1, 1], reps=REPS, seed=0)
    _, low_many, high_many = iqm_interval([0, 0, 1, 1] * 16, reps=REPS, seed=0)
    assert (low_few, high_few) == (0.0, 1.0)
    assert high_many - low_many < 0.6 * (high_few - low_few)
    assert low_many <= 0.5 <= high_many


def test_bootstrap_resamples_runs_within_each_task():
    # task 0 is always 0, task 1 always 1: every stratified resample holds three 0s and three 1s,
    # so its IQM is 0.5 and the interval is a point. Pooled into one task the same six values vary.
    stratified = iqm_interval([[0, 1], [0, 1], [0, 1]], reps=REPS, seed=0)
    assert stratified == (0.5, 0.5, 0.5)
    _, low, high = iqm_interval([0, 1, 0, 1, 0, 1], reps=REPS, seed=0)
    assert low < 0.5 < high


def test_improvement_interval_hand_cases():
    # every run of X beats every run of Y: P = 1 in every resample
    assert improvement_interval([0.8, 0.9], [0.1, 0.2, 0.3], reps=REPS, seed=0) == (1.0, 1.0, 1.0)
    # x (0.5, 0.7), y (0.8, 0.5): P = (0 + 1/2 + 0 + 1) / 4; a resample of x = (0.5, 0.5) with
    # y = (0.8, 0.8) gives 0, x = (0.7, 0.7) with y = (0.5, 0.5) gives 1, each with chance 1/16 > 2.5%
    assert improvement_interval([0.5, 0.7], [0.8, 0.5], reps=REPS, seed=0) == (0.375, 0.0, 1.0)
    with pytest.raises(ValueError, match="same tasks"):
        improvement_interval([[0.1, 0.2]], [0.3], reps=10, seed=0)


# --- learning curves -------------------------------------------------------------------------------


def test_iqm_curve_uses_the_runs_present_at_each_x():
    values = [[0.1, 0.3, np.nan], [0.3, np.nan, np.nan], [0.2, 0.5, np.nan]]  # (3 runs, 3 x)
    centre, low, high = iqm_curve(values, reps=REPS, seed=0)
    # x 0: mean(0.1, 0.3, 0.2) = 0.2 (3 runs: nothing trimmed); x 1: runs 0 and 2 -> 0.4; x 2: none
    np.testing.assert_allclose(centre[:2], [0.2, 0.4])
    assert np.isnan(centre[2]) and np.isnan(low[2]) and np.isnan(high[2])
    # a resample of x 1 holds (0.3, 0.3), (0.3, 0.5) or (0.5, 0.5): 0.3 and 0.5 each have chance 1/4
    np.testing.assert_allclose([low[1], high[1]], [0.3, 0.5])
    assert np.all(low[:2] <= centre[:2]) and np.all(centre[:2] <= high[:2])


# --- significance and power ------------------------------------------------------------------------


def test_exact_permutation_p_of_fully_separated_three_against_three():
    # C(6, 3) = 20 splits; only the observed split (d = -3) and its mirror (d = +3) reach |d| = 3 -> 2 / 20
    assert permutation_test([1, 2, 3], [4, 5, 6]) == (pytest.approx(0.1), 20, True)


def test_exact_permutation_p_counts_ties_of_the_statistic():
    # x = (0, 1), y = (1, 2): d = -1; the C(4, 2) = 6 splits of {0, 1, 1, 2} give d = -1 ({0,1} twice),
    # 0 ({0,2}, {1,1}), +1 ({1,2} twice) -> 4 of 6 reach |d| = 1 -> p = 2/3
    p, splits, exact = permutation_test([0, 1], [1, 2])
    assert (p, splits, exact) == (pytest.approx(2 / 3), 6, True)


def test_permutation_p_of_equal_arms_is_one_and_of_single_runs_is_one():
    assert permutation_test([0.5, 0.5], [0.5, 0.5])[0] == 1.0
    # 1 against 1: C(2, 1) = 2 splits, both reach |d| -> 1.0 (one run per arm can never separate)
    assert permutation_test([0.2], [0.9])[0] == 1.0


def test_monte_carlo_permutation_is_seeded_and_close_to_the_exact_p():
    # 12 against 12 (C(24, 12) = 2,704,156 splits) past max_exact: a seeded Monte Carlo
    x, y = np.arange(12.0), np.arange(12.0) + 3
    p, splits, exact = permutation_test(x, y, reps=20_000, seed=1)
    assert (splits, exact) == (20_000, False)
    assert p == permutation_test(x, y, reps=20_000, seed=1)[0]
    # the same pair enumerated exactly (max_exact raised) differs by Monte Carlo noise only
    p_exact, _, _ = permutation_test(x, y, max_exact=3_000_000)
    assert abs(p - p_exact) < 0.01


def test_holm_hand_values():
    # sorted 0.01, 0.03, 0.04 -> 0.03, 0.06, 0.04 -> running max 0.03, 0.06, 0.06 -> input order
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    # capped at 1: 2 * 0.6 = 1.2 -> 1
    np.testing.assert_allclose(holm([0.6, 0.7]), [1.0, 1.0])


def test_pooled_sd_and_detectable_difference_hand_values():
    # x = (0, 2), y = (4, 6): squares 2 + 2 = 4 over df 2 -> sd 1.414
    assert pooled_sd([0, 2], [4, 6]) == pytest.approx(2**0.5)
    assert np.isnan(pooled_sd([1], [2]))
    # sd 0.1, 5 vs 5: df 8, t_0.975 = 2.306 + t_0.8 = 0.889 -> 3.195 * 0.1 * sqrt(0.4) = 0.202
    assert detectable_difference(0.1, 5, 5) == pytest.approx(0.2021, abs=1e-4)
    assert np.isnan(detectable_difference(0.1, 1, 1))


def test_seeds_needed_hand_values():
    # n = 17: (2.037 + 0.853) * 0.1 * sqrt(2/17) = 0.0991 <= 0.1; n = 16: 0.1024 > 0.1 -> 17
    assert seeds_needed(0.1, 0.10) == 17
    # half the difference takes about four times the runs
    assert seeds_needed(0.1, 0.05) == 64
    assert seeds_needed(float("nan"), 0.1) is None
    assert seeds_needed(1.0, 0.01, most=50) is None


def test_interval_of_three_runs_is_their_min_and_max():
    # 3 runs: resampling the lowest three times has probability 1/27 = 3.7% > 2.5% -> the ends are min, max
    assert interval_is_min_max(3) and not interval_is_min_max(4)
    mean, low, high = iqm_interval([0.2, 0.5, 0.9], reps=REPS, seed=0)
    assert (low, high) == (pytest.approx(0.2), pytest.approx(0.9))


# --- curves: area and the saturating fit (scripts/comparison/fits.py) --------------------------------


def test_normalised_area_cuts_at_the_budget_and_holds_the_last_value():
    # acc(200) = 0.6 by interpolation; 100 * (0.2 + 0.4) / 2 + 100 * (0.4 + 0.6) / 2 = 80 -> 80 / 200
    assert normalised_area([0, 100, 300], [0.2, 0.4, 0.8], 200) == pytest.approx(0.4)
    # ends at 100 before a budget of 200: 100 * (0.2 + 0.4) / 2 + 100 * 0.4 = 70 -> 0.35
    assert normalised_area([0, 100], [0.2, 0.4], 200) == pytest.approx(0.35)


def test_saturating_fit_recovers_a_known_curve_and_predicts_its_second_half():
    # R(C) = 0.2 + (0.7 - 0.2) / (1 + (2000 / C)^2): R(2000) = 0.45, halfway from R0 to A
    assert saturating_curve([0, 2000], 0.2, 0.7, 2.0, 2000)[1] == pytest.approx(0.45)
    tokens = np.array([500.0, 1000, 2000, 3000, 4000, 6000, 8000])
    curves = [(tokens, saturating_curve(tokens, 0.2, 0.7, 2.0, 2000) + shift) for shift in (-0.01, 0, 0.01)]
    arm = fit_arm(curves, 0.2, 8000, reps=50, seed=0)
    assert arm.fit.a == pytest.approx(0.7, abs=0.02) and arm.fit.b == pytest.approx(2.0, rel=0.15)
    assert arm.fit.c_mid == pytest.approx(2000, rel=0.1) and arm.a_identified
    assert arm.half_error < 0.05


def test_an_unbent_curve_leaves_a_not_identified_and_too_few_points_no_fit():
    # a straight climb: the asymptote is anywhere above the data, its interval runs to the bound 1
    tokens = np.array([1000.0, 2000, 3000, 4000])
    curves = [(tokens, 0.2 + tokens / 10_000 + shift) for shift in (-0.05, 0.0, 0.05)]
    assert not fit_arm(curves, 0.2, 4000, reps=50, seed=0).a_identified
    # two evaluations past step 0 for three parameters: no fit
    short = [(np.array([0.0, 100, 200]), np.array([0.2, 0.3, 0.4]))]
    assert fit_arm(short, 0.2, 200, reps=10, seed=0).fit is None
