"""The comparison's claims and what the seeds can carry: run-level scores (the final held-out accuracy
and the area under the accuracy-tokens curve), every pair of arms tested on each (exact permutation
test, Holm's correction across the pairs, the difference detectable at 80% power and the seeds it
takes; scripts/stats.py), and each arm's saturating fit (scripts/comparison/fits.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from scripts import stats
from scripts.comparison.curves import final_and_best, finite, last_value, mean_std, series
from scripts.comparison.fits import ArmFit, fit_arm, normalised_area
from scripts.comparison.runs import ACCURACY, STEP, TOKENS, Run, config_get

# Run-level metrics tested between arms: name -> what it is
METRICS = {
    "final": "final held-out accuracy",
    "area": "area under held-out accuracy against generated tokens, over the budget",
}
# A pair is separated when its Holm-corrected p is below this
ALPHA = 0.05
# Differences whose seeds-per-arm are reported
DIFFERENCES = (0.05, 0.10)
# Bootstrap resamples of the runs for the fit's intervals (each a full refit)
FIT_REPS = 400


def token_budget(runs: Sequence[Run]) -> tuple[float, str]:
    """The token range every arm is compared over, and where it comes from: the runs' common
    trainer.max_generated_tokens, else the fewest tokens any run generated (the range all runs cover)."""
    caps = {config_get(run.config, "trainer.max_generated_tokens") for run in runs}
    if len(caps) == 1 and finite(cap := caps.pop()):
        return float(cap), "trainer.max_generated_tokens"
    totals = [total for run in runs if (total := last_value(run, TOKENS)) is not None]
    return (min(totals), "the fewest tokens of any run") if totals else (math.nan, "no tokens logged")


def start_accuracy(runs: Sequence[Run]) -> float:
    """R0: the mean step-0 held-out accuracy over runs (the same starting policy: one value)."""
    starts = [float(run.rows[0][ACCURACY]) for run in runs if run.rows and run.rows[0][STEP] == 0
              and finite(run.rows[0].get(ACCURACY))]  # fmt: skip
    return float(np.mean(starts)) if starts else math.nan


def run_scores(groups: dict[str, list[Run]], budget: float) -> dict[str, dict[str, list[float]]]:
    """label -> metric (METRICS) -> one score per run that evaluated (a crashed run as far as it went)."""
    scores: dict[str, dict[str, list[float]]] = {}
    for label, runs in groups.items():
        finals = [pair[0] for run in runs if (pair := final_and_best(run)) is not None]
        curves = [series(run, ACCURACY, TOKENS) for run in runs]
        areas = [normalised_area(x, y, budget) for x, y in curves if len(x) and math.isfinite(budget)]
        scores[label] = {"final": finals, "area": areas}
    return scores


@dataclass(frozen=True)
class PairTest:
    """One pair of arms on one metric: X - Y in means, its p-values and the power it had."""

    metric: str
    x: str
    y: str
    n_x: int
    n_y: int
    difference: float
    p: float
    splits: int
    exact: bool
    holm_p: float
    detectable: float
    seeds: tuple[int | None, ...]

    @property
    def separated(self) -> bool:
        return self.holm_p < ALPHA


def pair_tests(scores: dict[str, dict[str, list[float]]], *, reps: int, seed: int) -> list[PairTest]:
    """Every pair of labels (in order) on every metric, Holm-corrected within each metric."""
    tests = []
    for metric in METRICS:
        labels = [label for label, by_metric in scores.items() if by_metric[metric]]
        raw = []
        for i, x in enumerate(labels):
            for y in labels[i + 1 :]:
                a, b = scores[x][metric], scores[y][metric]
                p, splits, exact = stats.permutation_test(a, b, reps=reps, seed=seed)
                raw.append((x, y, a, b, p, splits, exact))
        adjusted = stats.holm([entry[4] for entry in raw]) if raw else []
        for (x, y, a, b, p, splits, exact), holm_p in zip(raw, adjusted, strict=True):
            sd = stats.pooled_sd(a, b)
            tests.append(PairTest(
                metric, x, y, len(a), len(b), float(np.mean(a) - np.mean(b)), p, splits, exact,
                float(holm_p), stats.detectable_difference(sd, len(a), len(b)),
                tuple(stats.seeds_needed(sd, d) for d in DIFFERENCES),
            ))  # fmt: skip
    return tests


def format_p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else "< 0.001"


def format_seeds(n: int | None) -> str:
    return "n/a" if n is None else str(n)


def significance_section(tests: list[PairTest], *, reps: int, seed: int) -> list[str]:
    """Markdown lines: one row per pair and metric, then how the p-values were computed."""
    lines = [
        "## Significance and power",
        "",
        "Each pair of arms on each run-level metric (final: the last held-out accuracy; area: see Curves):",
        "X − Y in means, the two-sided permutation p of that difference, Holm's correction across the",
        f"pairs of the metric, *separated* when the corrected p < {ALPHA:g}; detectable: the difference a",
        "two-sample t-test would find with 80% power at the pooled spread of the pair; seeds: runs per",
        "arm that would detect 0.05 and 0.10 at that spread.",
        "",
        "| metric | X | Y | runs (X, Y) | X − Y | p | Holm p | separated | detectable (80%) "
        "| seeds for 0.05 | seeds for 0.10 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in tests:
        detectable = "n/a" if math.isnan(t.detectable) else f"{t.detectable:.2f}"
        lines.append(
            f"| {t.metric} | {t.x} | {t.y} | {t.n_x}, {t.n_y} | {t.difference:+.3f} | {format_p(t.p)} | "
            f"{format_p(t.holm_p)} | {'yes' if t.separated else 'no'} | {detectable} | "
            f"{format_seeds(t.seeds[0])} | {format_seeds(t.seeds[1])} |"
        )
    if not tests:
        lines.append("| — | — | — | — | — | — | — | — | — | — | — |")
        return lines
    exact = all(t.exact for t in tests)
    how = "all splits of the pooled runs" if exact else (
        f"all splits up to {stats.MAX_EXACT_SPLITS:,}, else {reps:,} random splits (seed {seed})"
    )  # fmt: skip
    smallest = min(2 / math.comb(t.n_x + t.n_y, t.n_x) if t.n_x + t.n_y > 2 else 1.0 for t in tests)
    return lines + ["", f"Note: p from {how}; the smallest p these run counts allow is {format_p(smallest)}."]


def arm_fits(
    groups: dict[str, list[Run]], r0: float, budget: float, *, reps: int, seed: int
) -> dict[str, ArmFit]:
    """label -> its saturating fit on its runs' accuracy-tokens curves."""
    return {
        label: fit_arm([series(run, ACCURACY, TOKENS) for run in runs], r0, budget, reps=reps, seed=seed)
        for label, runs in groups.items()
    }


def format_fit_interval(value: float, bounds: tuple[float, float], digits: int) -> str:
    low, high = bounds
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def fit_cells(fit: ArmFit) -> list[str]:
    """A, B, C_mid (k tokens) with 95% CIs, the fit's RMS error and the second-half error."""
    if fit.fit is None:
        return ["n/a (fewer than 3 evaluations)"] + ["n/a"] * 4
    a = format_fit_interval(fit.fit.a, fit.a, 2) + ("" if fit.a_identified else " (A not identified)")
    c_mid = (fit.fit.c_mid / 1000, (fit.c_mid[0] / 1000, fit.c_mid[1] / 1000))
    half = "n/a" if fit.half_error is None else f"{fit.half_error:.3f}"
    return [a, format_fit_interval(fit.fit.b, fit.b, 2), format_fit_interval(*c_mid, 1),
            f"{fit.fit.rmse:.3f}", half]  # fmt: skip


def curves_section(
    groups: dict[str, list[Run]], scores: dict[str, dict[str, list[float]]], *, reps: int, seed: int
) -> list[str]:
    """Markdown lines: per arm the area under its runs' curves and the saturating fit, then the notes."""
    runs = [run for group in groups.values() for run in group]
    budget, source = token_budget(runs)
    r0 = start_accuracy(runs)
    fits = arm_fits(groups, r0, budget, reps=FIT_REPS, seed=seed)
    lines = [
        "## Curves",
        "",
        "Area: each run's held-out accuracy against generated tokens, integrated over the budget and",
        "divided by it (the mean accuracy over the budget; trapezoids from the step-0 evaluation at 0",
        "tokens, cut at the budget by linear interpolation, a run that ends earlier holding its last",
        "evaluation). Fit: R(C) = R0 + (A − R0) / (1 + (C_mid / C)^B) on every evaluation of the arm's",
        "runs (ScaleRL, Khatri et al. 2025), R0 the shared step-0 accuracy; A, B, C_mid (thousand tokens)",
        f"with 95% percentile CIs over {FIT_REPS} resamples of the runs (seed {seed}); A is not identified",
        "when its interval reaches 1.00 or C_mid's reaches ten times the data; half-budget error: the RMS",
        "error on the evaluations past half the budget of a fit to those before it.",
        "",
        "| arm | runs | area (mean ± std) | A [95% CI] | B [95% CI] | C_mid, k tokens [95% CI] "
        "| fit RMSE | half-budget error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label in groups:
        areas = scores[label]["area"]
        mean, std = mean_std(areas)
        area = "n/a" if not areas else f"{mean:.3f} ± {std:.3f}" if len(areas) > 1 else f"{mean:.3f}"
        lines.append(f"| {label} | {len(areas)} | {area} | " + " | ".join(fit_cells(fits[label])) + " |")
    note = (
        f"Note: budget {budget:,.0f} generated tokens ({source}); R0 = {r0:.3f}."
        if math.isfinite(budget) else "Note: no budget (no run logged its generated tokens)."
    )  # fmt: skip
    return lines + ["", note]
