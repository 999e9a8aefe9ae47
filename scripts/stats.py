"""Aggregate statistics for few runs per algorithm, after Agarwal et al. 2021, "Deep Reinforcement
Learning at the Edge of the Statistical Precipice" (NeurIPS; arXiv:2108.13264), the estimators of its
`rliable` library written in numpy: interquartile mean (IQM), stratified bootstrap confidence intervals
and the probability of improvement P(X > Y).

Scores are (n_runs,) arrays for one task or (n_runs, n_tasks) arrays; the tasks are the bootstrap's
strata (rliable's `StratifiedBootstrap`: runs are resampled with replacement within each task, so every
resample keeps every task). Confidence intervals are percentile intervals (rliable's default method)
over `reps` resamples drawn from `np.random.default_rng(seed)`: the same inputs and seed give the same
interval on every machine.

Significance and power of a difference between two arms, on run-level scores: a two-sided exact
permutation test (Monte Carlo past MAX_EXACT_SPLITS splits), Holm's correction across the pairs of an
experiment, and the smallest difference detectable at 80% power with the observed spread (t quantiles
from scipy.stats).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import scipy.stats
from numpy.typing import ArrayLike


def runs_by_tasks(scores: ArrayLike) -> np.ndarray:
    """scores as a float (n_runs, n_tasks) array; (n_runs,) is one task. ValueError when empty or
    not finite (callers drop missing runs first)."""
    array = np.asarray(scores, dtype=float)
    if array.ndim == 1:
        array = array[:, None]  # (n_runs,) -> (n_runs, 1)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"scores must be (n_runs,) or (n_runs, n_tasks) and non-empty, got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("scores must be finite (drop missing runs first)")
    return array


def iqm(scores: ArrayLike) -> np.ndarray:
    """Interquartile mean over all runs and tasks (Agarwal et al. 2021, Sec. 4.3).

        sort the n = n_runs * n_tasks scores, drop k = floor(n / 4) from each end, mean of the rest

    floor(n / 4) is scipy.stats.trim_mean(scores, 0.25, axis=None), what rliable's aggregate_iqm
    calls: with fewer than 4 scores nothing is dropped (the IQM is the mean); 5 scores drop 1 at
    each end; 8 drop 2.

    Args:
        scores: (..., n_runs, n_tasks); leading axes are a batch (bootstrap resamples).

    Returns:
        (...) the IQM of each batch entry: a 0-d array for one (n_runs, n_tasks) table.
    """
    array = np.asarray(scores, dtype=float)
    flat = np.sort(array.reshape(*array.shape[:-2], -1), axis=-1)  # (..., n_runs * n_tasks)
    n = flat.shape[-1]
    cut = n // 4
    return flat[..., cut : n - cut].mean(axis=-1)


def probability_of_improvement(scores_x: ArrayLike, scores_y: ArrayLike) -> np.ndarray:
    """P(X > Y): the chance that a random run of X scores above a random run of Y, averaged over
    tasks (Agarwal et al. 2021, Sec. 4.3; rliable's probability_of_improvement).

        P(X > Y) = mean_m  1 / (N_x N_y)  sum_i sum_j  S(x_im, y_jm),   S = 1 if x > y, 1/2 if x = y, else 0

    the Mann-Whitney U statistic of X over Y divided by N_x N_y; ties count 1/2, so
    P(X > Y) + P(Y > X) = 1 and identical score sets give 0.5.

        x = (3, 5), y = (1, 3, 4): pairs won 1 + 1/2 + 0 + 1 + 1 + 1 = 4.5 of 6 -> 0.75

    Args:
        scores_x: (..., n_runs_x, n_tasks); leading axes are a batch (bootstrap resamples).
        scores_y: (..., n_runs_y, n_tasks), the same tasks.

    Returns:
        (...) P(X > Y) per batch entry.
    """
    x = np.asarray(scores_x, dtype=float)[..., :, None, :]  # (..., n_x, 1, n_tasks)
    y = np.asarray(scores_y, dtype=float)[..., None, :, :]  # (..., 1, n_y, n_tasks)
    wins = (x > y) + 0.5 * (x == y)  # (..., n_x, n_y, n_tasks)
    return wins.mean(axis=(-3, -2, -1))


def stratified_resample(scores: np.ndarray, reps: int, rng: np.random.Generator) -> np.ndarray:
    """reps resamples of an (n_runs, n_tasks) table: in each task, n_runs runs drawn with replacement
    from that task's runs (rliable's StratifiedBootstrap without task_bootstrap).

    Returns:
        (reps, n_runs, n_tasks)
    """
    n_runs, n_tasks = scores.shape
    rows = rng.integers(0, n_runs, size=(reps, n_runs, n_tasks))  # (reps, n_runs, n_tasks)
    return scores[rows, np.arange(n_tasks)]  # task column broadcasts over (reps, n_runs)


def percentile_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central `confidence` interval of bootstrap samples: their (1 - c)/2 and (1 + c)/2 quantiles."""
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)


def iqm_interval(
    scores: ArrayLike, *, reps: int, seed: int, confidence: float = 0.95
) -> tuple[float, float, float]:
    """IQM of scores with its stratified bootstrap percentile interval: (iqm, low, high).

    Identical runs give low == high; more runs (of the same spread) give a narrower interval.
    """
    table = runs_by_tasks(scores)  # (n_runs, n_tasks)
    resamples = stratified_resample(table, reps, np.random.default_rng(seed))
    return (float(iqm(table)), *percentile_interval(iqm(resamples), confidence))


def improvement_interval(
    scores_x: ArrayLike, scores_y: ArrayLike, *, reps: int, seed: int, confidence: float = 0.95
) -> tuple[float, float, float]:
    """P(X > Y) with its percentile interval: (p, low, high). The runs of X and of Y are resampled
    independently, each stratified by task (rliable's StratifiedIndependentBootstrap)."""
    x, y = runs_by_tasks(scores_x), runs_by_tasks(scores_y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"X and Y must have the same tasks, got {x.shape[1]} and {y.shape[1]}")
    rng = np.random.default_rng(seed)
    x_resamples, y_resamples = stratified_resample(x, reps, rng), stratified_resample(y, reps, rng)
    samples = probability_of_improvement(x_resamples, y_resamples)  # (reps,)
    return (float(probability_of_improvement(x, y)), *percentile_interval(samples, confidence))


def iqm_curve(
    values: ArrayLike, *, reps: int, seed: int, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IQM over runs at each x of a learning curve, with its bootstrap percentile band.

    At each x only the runs with a value there count (nan = none: a crashed run past its end), and
    those are resampled; every x uses the same seed.

        values [[0.1, 0.3], [0.3, nan], [0.2, 0.5]] -> iqm [0.2, 0.4]; at x 1 only runs 0 and 2 count

    Args:
        values: (n_runs, n_x), nan where a run has no value.

    Returns:
        iqm, low, high: (n_x,) each; nan where no run has a value.
    """
    values = np.asarray(values, dtype=float)
    out = np.full((3, values.shape[1]), np.nan)  # rows: iqm, low, high
    for column in range(values.shape[1]):
        present = values[:, column][~np.isnan(values[:, column])]  # (n_present,)
        if len(present):
            out[:, column] = iqm_interval(present, reps=reps, seed=seed, confidence=confidence)
    return out[0], out[1], out[2]


# --- significance and power ------------------------------------------------------------------------

# Up to this many splits the permutation test enumerates them all (10 against 10 runs: 184,756)
MAX_EXACT_SPLITS = 200_000


def permutation_test(
    x: ArrayLike, y: ArrayLike, *, reps: int = 100_000, seed: int = 0, max_exact: int = MAX_EXACT_SPLITS
) -> tuple[float, int, bool]:
    """Two-sided permutation test of equal means on run-level scores (Fisher's randomisation test).

        statistic d = mean(x) - mean(y); pool the n_x + n_y scores and split them into groups of n_x
        and n_y in every possible way; p = (splits with |d_split| >= |d_observed|) / splits

    The observed split is one of the splits, so p >= 1 / C(n_x + n_y, n_x). When C(n_x + n_y, n_x) >
    max_exact, `reps` random splits from np.random.default_rng(seed) replace the enumeration and
    p = (1 + hits) / (1 + reps) (Phipson & Smyth 2010: never 0). A relative tolerance of 1e-9 counts
    splits whose |d| ties the observed one despite rounding.

        x = (1, 2, 3), y = (4, 5, 6): d = -3; of the C(6, 3) = 20 splits only the observed one and its
        mirror ((4, 5, 6) vs (1, 2, 3), d = +3) reach |d| = 3 -> p = 2 / 20 = 0.1

    Args:
        x: (n_x,) scores of arm X, n_x >= 1; y: (n_y,) scores of arm Y, n_y >= 1.

    Returns:
        (p, splits, exact): splits = how many splits were counted (all of them when exact).
    """
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if not len(x) or not len(y):
        raise ValueError("both arms need at least one score")
    pooled = np.concatenate([x, y])  # (n,)
    n, n_x = len(pooled), len(x)
    observed = abs(x.mean() - y.mean())
    total = math.comb(n, n_x)
    if total <= max_exact:
        members = np.zeros((total, n), dtype=bool)  # (splits, n): True = in group X
        for row, chosen in enumerate(itertools.combinations(range(n), n_x)):
            members[row, list(chosen)] = True
        exact = True
    else:
        rng = np.random.default_rng(seed)
        order = np.argsort(rng.random((reps, n)), axis=1)  # (reps, n): a random permutation per row
        members = order < n_x  # positions that land in the first n_x slots form group X
        exact = False
    sum_x = members @ pooled  # (splits,)
    d = sum_x / n_x - (pooled.sum() - sum_x) / (n - n_x)
    hits = int(np.sum(np.abs(d) >= observed * (1 - 1e-9)))
    if exact:
        return hits / total, total, True
    return (1 + hits) / (1 + reps), reps, False


def holm(p_values: ArrayLike) -> np.ndarray:
    """Holm's step-down correction of m p-values (Holm 1979), family-wise error rate alpha.

        sort ascending p_(1) <= ... <= p_(m); adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)),
        then back in the input order; reject H_i when adjusted p_i < alpha

        (0.01, 0.04, 0.03): sorted 0.01, 0.03, 0.04 -> 3 * 0.01 = 0.03, 2 * 0.03 = 0.06, 1 * 0.04 = 0.04
        raised to the running max 0.06 -> in input order (0.03, 0.06, 0.06)

    Args:
        p_values: (m,)

    Returns:
        (m,) adjusted p-values, in the input order.
    """
    p = np.asarray(p_values, dtype=float).ravel()
    order = np.argsort(p, kind="stable")
    m = len(p)
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])  # (m,), sorted order
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def pooled_sd(x: ArrayLike, y: ArrayLike) -> float:
    """Pooled standard deviation of two samples: sqrt(((n_x - 1) s_x^2 + (n_y - 1) s_y^2) / (n_x + n_y - 2)),
    s the sample std (ddof=1); nan when n_x + n_y < 3 (no degree of freedom)."""
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    df = len(x) + len(y) - 2
    if df < 1:
        return math.nan
    squares = np.sum((x - x.mean()) ** 2) + np.sum((y - y.mean()) ** 2)
    return float(np.sqrt(squares / df))


def detectable_difference(sd: float, n_x: int, n_y: int, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest difference of means that a two-sided two-sample t-test at level alpha detects with
    probability `power`, given the per-run spread sd (the textbook normal-theory approximation with t
    quantiles, e.g. Cohen 1988; the power of the permutation test is close to it for these sizes):

        MDD = (t_{1 - alpha/2, df} + t_{power, df}) * sd * sqrt(1/n_x + 1/n_y),   df = n_x + n_y - 2

        sd 0.1, 5 against 5 runs: df 8, t_0.975 = 2.306, t_0.8 = 0.889 -> 3.195 * 0.1 * sqrt(0.4) = 0.202

    nan when df < 1 or sd is nan.
    """
    df = n_x + n_y - 2
    if df < 1 or not math.isfinite(sd):
        return math.nan
    quantiles = scipy.stats.t.ppf(1 - alpha / 2, df) + scipy.stats.t.ppf(power, df)
    return float(quantiles * sd * math.sqrt(1 / n_x + 1 / n_y))


def seeds_needed(
    sd: float, difference: float, *, alpha: float = 0.05, power: float = 0.8, most: int = 1000
) -> int | None:
    """Runs per arm (equal arms) for detectable_difference(sd, n, n) <= difference: the smallest such
    n >= 2, or None when sd is nan or more than `most` would be needed.

        sd 0.1, difference 0.1: n = 17 gives df 32, (2.037 + 0.853) * 0.1 * sqrt(2/17) = 0.0991 <= 0.1
        while n = 16 gives (2.042 + 0.854) * 0.1 * sqrt(2/16) = 0.1024 -> 17
    """
    if not math.isfinite(sd):
        return None
    for n in range(2, most + 1):
        if detectable_difference(sd, n, n, alpha=alpha, power=power) <= difference:
            return n
    return None


def interval_is_min_max(n_runs: int) -> bool:
    """Whether a 95% percentile-bootstrap interval of the mean (or IQM) of n runs is just their
    [min, max]: with n <= 3 a resample of n copies of the smallest run has probability (1/n)^n >= 1/27,
    above the 2.5% tail, so the interval's ends are the extreme runs (n = 4: 1/256, below it)."""
    return n_runs <= 3
