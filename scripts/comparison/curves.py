"""Per-run series and their aggregates over seeds: the numbers behind the comparison's tables and
figure (scripts/comparison/tables.py, figure.py). Non-finite values ("nan", "inf") count as missing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import numpy as np

from scripts import stats
from scripts.comparison.runs import ACCURACY, STEP, Run

T = TypeVar("T")


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def x_value(row: dict[str, Any], x_key: str) -> float | None:
    """The row's x; the step-0 evaluation has no tokens or wall time yet, so those count as 0 there."""
    value = row.get(x_key)
    if finite(value):
        return float(value)
    return 0.0 if row[STEP] == 0 else None


def series(run: Run, key: str, x_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of one run where both are finite, sorted by x."""
    pairs = [
        (x, float(row[key]))
        for row in run.rows
        if finite(row.get(key)) and (x := x_value(row, x_key)) is not None
    ]
    pairs.sort(key=lambda pair: pair[0])
    xs, ys = zip(*pairs, strict=True) if pairs else ((), ())
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1) over seeds; std is 0 for a single value and nan for none."""
    if not values:
        return math.nan, math.nan
    array = np.asarray(values, dtype=float)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return float(array.mean()), std


def curve_values(runs: Sequence[Run], key: str, x_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Every run's `key` on one shared x grid, for runs of unequal length.

    x_key == "step": the grid is the union of the runs' steps where `key` is finite; a run has a
    value only at its own steps. Other x keys (tokens, wall time) differ per seed, so each run is
    linearly interpolated onto the union of all runs' x values, within its own [x_min, x_max] only:
    no extrapolation, so a short (crashed) run stops counting where it stopped.

        seed 0 at tokens (0, 100, 200): 0.1, 0.3, 0.5;  seed 1 at tokens (0, 200): 0.1, 0.7
        -> grid (0, 100, 200), values [[0.1, 0.3, 0.5], [0.1, 0.4, 0.7]]

    Returns:
        grid: (n_x,); values: (n_runs_with_key, n_x), nan where a run has no value.
    """
    curves = [series(run, key, x_key) for run in runs]
    curves = [(xs, ys) for xs, ys in curves if len(xs)]
    if not curves:
        return np.zeros(0), np.zeros((0, 0))
    grid = np.unique(np.concatenate([xs for xs, _ in curves]))
    values = np.full((len(curves), len(grid)), np.nan)  # (n_runs, n_x)
    for i, (xs, ys) in enumerate(curves):
        if x_key == STEP:
            values[i, np.searchsorted(grid, xs)] = ys
        else:
            inside = (grid >= xs[0]) & (grid <= xs[-1])
            values[i, inside] = np.interp(grid[inside], xs, ys)
    return grid, values


def aggregate(
    runs: Sequence[Run], key: str, x_key: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean and sample std (ddof=1) of `key` over runs, against `x_key` (grid: see curve_values).

        seed 0 at tokens (0, 100, 200): 0.1, 0.3, 0.5;  seed 1 at tokens (0, 200): 0.1, 0.7
        -> x (0, 100, 200), seed 1 at 100 = 0.4, mean (0.1, 0.35, 0.6), n (2, 2, 2)

    Returns:
        x, mean, std, n: arrays of equal length; n = how many runs had a value at x (std 0 where n == 1).
    """
    grid, values = curve_values(runs, key, x_key)
    if not len(grid):
        empty = np.zeros(0)
        return empty, empty, empty, np.zeros(0, dtype=int)
    n = np.sum(~np.isnan(values), axis=0)
    mean = np.nanmean(values, axis=0)
    deviations = np.where(np.isnan(values), 0.0, values - mean) ** 2
    std = np.sqrt(deviations.sum(axis=0) / np.maximum(n - 1, 1))
    return grid, mean, std, n


def aggregate_iqm(
    runs: Sequence[Run], key: str, x_key: str, *, reps: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """IQM of `key` over runs against `x_key` (grid: see curve_values), with the 95% bootstrap band of
    stats.iqm_curve: at each x the runs that have a value there are resampled.

    Returns:
        x, iqm, low, high, n: arrays of equal length; n = how many runs had a value at x.
    """
    grid, values = curve_values(runs, key, x_key)
    iqm, low, high = stats.iqm_curve(values, reps=reps, seed=seed)
    return grid, iqm, low, high, np.sum(~np.isnan(values), axis=0)


def last_value(run: Run, key: str) -> float | None:
    values = [float(row[key]) for row in run.rows if finite(row.get(key))]
    return values[-1] if values else None


def first_reach(run: Run, threshold: float) -> dict[str, Any] | None:
    """The first row whose held-out accuracy is >= threshold, or None."""
    for row in run.rows:
        if finite(row.get(ACCURACY)) and row[ACCURACY] >= threshold:
            return row
    return None


def present(values: Iterable[T | None]) -> list[T]:
    return [value for value in values if value is not None]


def final_and_best(run: Run) -> tuple[float, float] | None:
    """The run's last and highest finite held-out accuracy, or None if it never evaluated.

    A run that crashed counts as far as it went: its last evaluation is its final accuracy.
    """
    _, accuracy = series(run, ACCURACY, STEP)
    return (float(accuracy[-1]), float(accuracy.max())) if len(accuracy) else None


def curve_band(
    runs: Sequence[Run], key: str, x_key: str, *, reps: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x, centre, low, high, n of one label's curve: held-out accuracy as IQM with its 95% bootstrap
    band (aggregate_iqm), anything else as mean ± sample std (aggregate)."""
    if key == ACCURACY:
        return aggregate_iqm(runs, key, x_key, reps=reps, seed=seed)
    x, mean, std, n = aggregate(runs, key, x_key)
    return x, mean, mean - std, mean + std, n
