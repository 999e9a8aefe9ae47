"""Curves, not end points: the area under a run's held-out accuracy against generated tokens, and
each arm's saturating compute curve after ScaleRL (Khatri et al. 2025, "The Art of Scaling
Reinforcement Learning Compute for LLMs", arXiv:2510.13786, Eq. 1), fitted with numpy alone:

    R(C) = R0 + (A - R0) / (1 + (C_mid / C)^B)

C = generated tokens (sampling/tokens_total), R0 = the shared step-0 accuracy (fixed, not fitted),
A = the asymptote, B = the efficiency (steepness), C_mid = the tokens at which half the gain A - R0
is reached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

# The fit's search box: A in [0, 1] (an accuracy), B and C_mid on log grids; C_mid from a tenth of the
# smallest to ten times the largest token count of the data
A_BOUNDS = (0.0, 1.0)
B_GRID = np.geomspace(0.2, 10.0, 40)
C_MID_SPAN = 10.0
C_MID_POINTS = 50
# Zooms of the grid around the best point (each a 5x narrower box of the same size)
REFINEMENTS = 3


def normalised_area(tokens: ArrayLike, accuracy: ArrayLike, budget: float) -> float:
    """Area under held-out accuracy against generated tokens over [0, budget], divided by the budget:
    the mean accuracy over the budget (trapezoid rule).

        area = (1 / budget) * integral_0^budget acc(C) dC,  acc linear between evaluations

    The step-0 evaluation is the point C = 0. The curve is cut at C = budget by linear interpolation
    between the evaluations on either side (evaluations past the budget only enter through that
    point); a run whose last evaluation comes before the budget (a crash, or a shorter budget) holds
    that last accuracy to the end, which says so no better than its last evaluation.

        tokens (0, 100, 300), acc (0.2, 0.4, 0.8), budget 200: acc(200) = 0.6;
        trapezoids 100 * (0.2 + 0.4) / 2 + 100 * (0.4 + 0.6) / 2 = 30 + 50 = 80 -> 80 / 200 = 0.4

    Args:
        tokens: (n_eval,) increasing, the first 0; accuracy: (n_eval,); budget > 0.
    """
    x, y = np.asarray(tokens, dtype=float), np.asarray(accuracy, dtype=float)
    inside = x < budget
    x_cut = np.append(x[inside], budget)  # (k + 1,)
    y_cut = np.append(y[inside], np.interp(budget, x, y))  # np.interp holds the last value past the end
    return float(np.sum(np.diff(x_cut) * (y_cut[1:] + y_cut[:-1]) / 2) / budget)


def saturating_curve(tokens: ArrayLike, r0: float, a: float, b: float, c_mid: float) -> np.ndarray:
    """R(C) = R0 + (A - R0) / (1 + (C_mid / C)^B) (ScaleRL Eq. 1); R(0) = R0, R(C_mid) = (R0 + A) / 2."""
    c = np.asarray(tokens, dtype=float)
    with np.errstate(divide="ignore"):
        gain = 1.0 / (1.0 + (c_mid / c) ** b)  # C = 0 -> (c_mid / 0)^b = inf -> 0
    return r0 + (a - r0) * gain


@dataclass(frozen=True)
class Fit:
    """A fitted curve: the asymptote A, efficiency B, midpoint C_mid (tokens) and the RMS error."""

    a: float
    b: float
    c_mid: float
    rmse: float


def best_on_grid(c: np.ndarray, r: np.ndarray, r0: float, b: np.ndarray, c_mid: np.ndarray) -> Fit:
    """The least-squares fit over a grid of (B, C_mid), A solved in closed form at each grid point:
    with g = 1 / (1 + (C_mid / C)^B), R - R0 = (A - R0) g is linear in A - R0, so
    A - R0 = sum g (R - R0) / sum g^2, then clipped to A_BOUNDS (the clip is the constrained optimum,
    the loss being a parabola in A)."""
    gain = 1.0 / (1.0 + (c_mid[None, :, None] / c[None, None, :]) ** b[:, None, None])  # (nB, nC, n)
    target = r - r0  # (n,)
    scale = np.sum(gain * target, axis=-1) / np.maximum(np.sum(gain**2, axis=-1), 1e-12)  # (nB, nC)
    a = np.clip(r0 + scale, *A_BOUNDS)
    residual = r0 + (a - r0)[..., None] * gain - r  # (nB, nC, n)
    loss = np.mean(residual**2, axis=-1)
    i, j = np.unravel_index(np.argmin(loss), loss.shape)
    return Fit(float(a[i, j]), float(b[i]), float(c_mid[j]), float(np.sqrt(loss[i, j])))


def c_mid_bounds(tokens: np.ndarray) -> tuple[float, float]:
    """The box of C_mid: a tenth of the smallest to ten times the largest positive token count."""
    return float(tokens.min()) / C_MID_SPAN, float(tokens.max()) * C_MID_SPAN


def fit_saturating(tokens: ArrayLike, accuracy: ArrayLike, r0: float) -> Fit | None:
    """Fit A, B, C_mid of saturating_curve to evaluation points (C > 0) with R0 fixed: a grid over B
    (B_GRID) and C_mid (log grid within c_mid_bounds), A in closed form (best_on_grid), then
    REFINEMENTS zooms of the grid around the best point (each 5x narrower, kept inside the box).

    Args:
        tokens: (n,) generated tokens at each evaluation (points at C = 0 are dropped: R0 is fixed);
        accuracy: (n,); r0: the step-0 accuracy.

    Returns:
        the Fit, or None with fewer than 3 points at C > 0 (three parameters).
    """
    c, r = np.asarray(tokens, dtype=float), np.asarray(accuracy, dtype=float)
    keep = c > 0
    c, r = c[keep], r[keep]
    if len(c) < 3:
        return None
    low, high = c_mid_bounds(c)
    b_grid, c_grid = B_GRID, np.geomspace(low, high, C_MID_POINTS)
    fit = best_on_grid(c, r, r0, b_grid, c_grid)
    b_span, c_span = math.log(B_GRID[-1] / B_GRID[0]), math.log(high / low)
    for _ in range(REFINEMENTS):
        b_span, c_span = b_span / 5, c_span / 5
        b_grid = np.clip(fit.b * np.exp(np.linspace(-b_span, b_span, 15)), B_GRID[0], B_GRID[-1])
        c_grid = np.clip(fit.c_mid * np.exp(np.linspace(-c_span, c_span, 15)), low, high)
        fit = best_on_grid(c, r, r0, b_grid, c_grid)
    return fit


def pooled_points(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Every run's (tokens, accuracy) evaluation points in one pair of arrays."""
    if not curves:
        return np.zeros(0), np.zeros(0)
    return np.concatenate([x for x, _ in curves]), np.concatenate([y for _, y in curves])


@dataclass(frozen=True)
class ArmFit:
    """An arm's fit on all its runs, its bootstrap intervals over runs, and the half-budget check."""

    fit: Fit | None
    a: tuple[float, float]
    b: tuple[float, float]
    c_mid: tuple[float, float]
    a_identified: bool
    half_error: float | None


def fit_arm(
    curves: list[tuple[np.ndarray, np.ndarray]], r0: float, budget: float, *, reps: int, seed: int
) -> ArmFit:
    """The saturating fit of one arm from its runs' (tokens, accuracy) curves, with:

    - 95% percentile intervals of A, B and C_mid from refitting `reps` resamples of the runs (with
      replacement, np.random.default_rng(seed)); with one run the intervals are the point;
    - A identified unless its interval comes within 0.01 of A's upper bound 1 (prints as 1.00) or
      C_mid's reaches the top of its box (the curve has not bent within ten times the data: A is an
      extrapolation);
    - the half-budget validation: fit on the points with C <= budget / 2, report the RMS error of that
      curve on the points with C > budget / 2 (every run's own evaluations, so seed noise included);
      None when the first half has fewer than 3 points or the second half none.
    """
    tokens, accuracy = pooled_points(curves)
    fit = fit_saturating(tokens, accuracy, r0)
    nan = (math.nan, math.nan)
    if fit is None:
        return ArmFit(None, nan, nan, nan, False, None)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(reps if len(curves) > 1 else 0):
        picked = [curves[i] for i in rng.integers(0, len(curves), len(curves))]
        if (refit := fit_saturating(*pooled_points(picked), r0)) is not None:
            samples.append((refit.a, refit.b, refit.c_mid))
    table = np.asarray(samples if samples else [(fit.a, fit.b, fit.c_mid)])  # (reps, 3)
    low, high = np.percentile(table, [2.5, 97.5], axis=0)
    c_top = c_mid_bounds(tokens[tokens > 0])[1]
    identified = high[0] < A_BOUNDS[1] - 0.01 and high[2] < c_top * (1 - 1e-6)
    first = tokens <= budget / 2
    early = fit_saturating(tokens[first], accuracy[first], r0)
    late = tokens > budget / 2
    half_error = None
    if early is not None and late.any():
        predicted = saturating_curve(tokens[late], r0, early.a, early.b, early.c_mid)
        half_error = float(np.sqrt(np.mean((predicted - accuracy[late]) ** 2)))
    bounds = [(float(low[k]), float(high[k])) for k in range(3)]
    return ArmFit(fit, bounds[0], bounds[1], bounds[2], identified, half_error)
