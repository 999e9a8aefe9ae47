"""Aggregate statistics for few runs per algorithm, after Agarwal et al. 2021, "Deep Reinforcement
Learning at the Edge of the Statistical Precipice" (NeurIPS; arXiv:2108.13264), the estimators of its
`rliable` library written in numpy: interquartile mean (IQM), stratified bootstrap confidence intervals
and the probability of improvement P(X > Y).

Scores are (n_runs,) arrays for one task or (n_runs, n_tasks) arrays; the tasks are the bootstrap's
strata (rliable's `StratifiedBootstrap`: runs are resampled with replacement within each task, so every
resample keeps every task). Confidence intervals are percentile intervals (rliable's default method)
over `reps` resamples drawn from `np.random.default_rng(seed)`: the same inputs and seed give the same
interval on every machine.
"""

from __future__ import annotations

import numpy as np
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
