"""The comparison's Markdown: one summary row per arm, then the interquartile mean of the final and
best held-out accuracy with 95% CIs, and the probability of improvement of every pair of arms (a
list for up to three arms, a matrix for more). IQM, stratified bootstrap intervals and P(X > Y)
follow Agarwal et al. 2021 (scripts/stats.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.ticker import EngFormatter

from scripts import stats
from scripts.comparison import significance
from scripts.comparison.curves import (
    final_and_best,
    finite,
    first_reach,
    last_value,
    mean_std,
    present,
    series,
    x_value,
)
from scripts.comparison.runs import ACCURACY, KL, STEP, STEP_S, TOKENS, UPDATES, Run, config_get, group_runs

# Bootstrap resamples for every confidence interval (rliable's examples use 2,000 to 50,000)
BOOTSTRAP_REPS = 10_000


def format_number(value: float, digits: int) -> str:
    """digits decimals; token counts (digits < 0) in engineering units (12.3k, 4.56M)."""
    if digits >= 0:
        return f"{value:.{digits}f}"
    return EngFormatter(places=1, sep="")(value) if abs(value) >= 1000 else f"{value:.0f}"


def format_mean_std(values: Sequence[float], digits: int = 3) -> str:
    """ "0.600 ± 0.141" (sample std over seeds), the value alone for one run, "n/a" for none."""
    if not values:
        return "n/a"
    mean, std = mean_std(values)
    if len(values) == 1:
        return format_number(mean, digits)
    return f"{format_number(mean, digits)} ± {format_number(std, digits)}"


def best_steps(runs: Sequence[Run]) -> list[int] | None:
    """The evaluation steps over which "best" held-out accuracy is taken, the same for every arm: the
    steps at which every finished run evaluated (a crashed run counts up to where it stopped). None
    under a token budget (trainer.max_generated_tokens): there arms reach the budget in different
    numbers of steps and were evaluated a different number of times, and a maximum over more noisy
    evaluations is higher by itself, so "best" is not shown."""
    if any(config_get(run.config, "trainer.max_generated_tokens") is not None for run in runs):
        return None
    evaluated = [
        {int(row[STEP]) for row in run.rows if finite(row.get(ACCURACY))} for run in runs if run.finished
    ]
    return sorted(set.intersection(*evaluated)) if evaluated else None


def final_and_shared_best(run: Run, steps: list[int] | None) -> tuple[float, float | None] | None:
    """The run's final held-out accuracy and its highest at `steps` (best_steps; None: no best)."""
    scores = final_and_best(run)
    if scores is None:
        return None
    if steps is None:
        return scores[0], None
    at = [float(row[ACCURACY]) for row in run.rows if row[STEP] in steps and finite(row.get(ACCURACY))]
    return scores[0], max(at) if at else None


def summary_row(label: str, runs: Sequence[Run], threshold: float, steps: list[int] | None) -> list[str]:
    """One table row: the aggregates over the runs (seeds) of one label; best at `steps` (best_steps)."""
    accuracy = present(final_and_shared_best(run, steps) for run in runs)
    reached = present(first_reach(run, threshold) for run in runs)
    step_s = [float(np.mean(ys)) for _, ys in (series(run, STEP_S, STEP) for run in runs) if len(ys)]
    kl = present(last_value(run, KL) for run in runs)
    start = present(
        float(row[ACCURACY])
        for run in runs
        for row in run.rows[:1]
        if row[STEP] == 0 and finite(row.get(ACCURACY))
    )
    counts = f" ({len(reached)}/{len(runs)})"
    return [
        label,
        f"{sum(run.finished for run in runs)}/{len(runs)}",
        format_mean_std([final for final, _ in accuracy]),
        format_mean_std(present(best for _, best in accuracy)) if steps is not None else "—",
        format_mean_std(start),
        format_mean_std([float(row[STEP]) for row in reached], digits=1) + counts,
        format_mean_std([x_value(row, TOKENS) or 0.0 for row in reached], digits=-1) + counts,
        format_mean_std(step_s, digits=1),
        format_mean_std(kl, digits=4) if kl else "—",
        format_mean_std(present(last_value(run, TOKENS) for run in runs), digits=-1),
        format_mean_std(updates, digits=0)
        if (updates := present(last_value(run, UPDATES) for run in runs))
        else "—",
    ]


def format_interval(low: float, high: float, digits: int) -> str:
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def runs_cell(scored: int, unfinished: int) -> str:
    """How many runs a cell rests on, and how many of them have no final checkpoint."""
    return f"{scored} ({unfinished} unfinished)" if unfinished else str(scored)


def min_max_note(counts: Sequence[int]) -> list[str]:
    """A note under a table of bootstrap intervals when some arm has too few runs for one to mean more
    than [min, max] (stats.interval_is_min_max)."""
    few = sorted({n for n in counts if stats.interval_is_min_max(n)})
    if not few:
        return []
    runs = " or ".join(str(n) for n in few)
    return [
        f"Note: with {runs} runs a 95% percentile-bootstrap interval is no more than the [min, max] of what"
        " those runs give: it says where the runs lie, not where the arm's mean is; 1.00 [1.00, 1.00]"
        " means every run of X ended above every run of Y, not that X is surely better (see Significance"
        " and power)."
    ]


def iqm_section(groups: dict[str, list[Run]], *, reps: int, seed: int) -> list[str]:
    """Markdown lines: final and best held-out accuracy per label as IQM with its 95% CI (stats);
    best at the evaluation steps every run shares (best_steps), or not at all under a token budget."""
    steps = best_steps([run for group in groups.values() for run in group])
    lines = [
        "## Interquartile mean",
        "",
        "IQM over runs (the mean of the middle 50%; with fewer than 4 runs the plain mean) with a 95%",
        f"stratified-bootstrap percentile CI ({reps:,} resamples of the runs, seed {seed}), after Agarwal",
        "et al. 2021; `runs` = runs with a held-out evaluation (a crashed run counts with its last one).",
        "",
        "| arm | held-out acc | runs | IQM | 95% CI | mean ± std |",
        "|---|---|---|---|---|---|",
    ]
    counts = []
    for label, group in groups.items():
        scored = [(run, scores) for run in group if (scores := final_and_shared_best(run, steps)) is not None]
        runs = runs_cell(len(scored), sum(not run.finished for run, _ in scored))
        counts.append(len(scored))
        for index, metric in enumerate(("final", "best") if steps is not None else ("final",)):
            values = present(scores[index] for _, scores in scored)
            if not values:
                lines.append(f"| {label} | {metric} | 0 | n/a | n/a | n/a |")
                continue
            iqm, low, high = stats.iqm_interval(values, reps=reps, seed=seed)
            interval = format_interval(low, high, 3)
            lines.append(
                f"| {label} | {metric} | {runs} | {iqm:.3f} | {interval} | {format_mean_std(values)} |"
            )
    lines.append("")
    if steps is None:
        lines.append(
            "Note: best held-out accuracy is not shown: under a token budget the arms were evaluated a"
            " different number of times, and the highest of more noisy evaluations is higher by itself."
        )
    else:
        shared = ", ".join(map(str, steps))
        lines.append(f"Note: best is the highest held-out accuracy at the steps every run shares ({shared}).")
    return lines + min_max_note(counts)


# Up to this many labels the probability of improvement is a list of pairs; beyond, a matrix
MAX_PAIR_LIST = 3


def improvement_section(groups: dict[str, list[Run]], *, reps: int, seed: int) -> list[str]:
    """Markdown lines: P(X > Y) on final held-out accuracy for every pair of labels, with its 95% CI:
    one line per pair for up to MAX_PAIR_LIST labels, else a matrix (row X, column Y)."""
    finals = {
        label: [scores[0] for scores in present(final_and_best(run) for run in group)]
        for label, group in groups.items()
    }
    labels = [label for label, values in finals.items() if values]
    lines = [
        "## Probability of improvement",
        "",
        "P(X > Y): the chance that a run of X ends with a higher final held-out accuracy than a run of Y",
        "(ties count 1/2, so P(Y > X) = 1 - P(X > Y)); 95% percentile CI from resampling the runs of X",
        "and of Y independently, after Agarwal et al. 2021.",
        "",
    ]
    note = min_max_note([len(finals[label]) for label in labels])
    note = ["", *note] if note else []
    if len(labels) > MAX_PAIR_LIST:
        return lines + improvement_matrix(finals, labels, reps=reps, seed=seed) + note
    lines += ["| X | Y | runs (X, Y) | P(X > Y) | 95% CI |", "|---|---|---|---|---|"]
    for i, x in enumerate(labels):
        for y in labels[i + 1 :]:
            p, low, high = stats.improvement_interval(finals[x], finals[y], reps=reps, seed=seed)
            runs = f"{len(finals[x])}, {len(finals[y])}"
            lines.append(f"| {x} | {y} | {runs} | {p:.3f} | {format_interval(low, high, 3)} |")
    if len(labels) < 2:
        lines.append("| — | — | — | — | — |")
    return lines + note


def improvement_matrix(
    finals: dict[str, list[float]], labels: list[str], *, reps: int, seed: int
) -> list[str]:
    """Markdown lines: the matrix of P(row > column) with 95% CIs, rows and columns in label order
    (runs per label in the row names); the diagonal is "—". Below the diagonal each cell is
    1 - its mirror, with the interval mirrored too (P(Y > X) = 1 - P(X > Y))."""
    cells: dict[tuple[str, str], str] = {}
    for i, x in enumerate(labels):
        for y in labels[i + 1 :]:
            p, low, high = stats.improvement_interval(finals[x], finals[y], reps=reps, seed=seed)
            cells[x, y] = f"{p:.2f} {format_interval(low, high, 2)}"
            cells[y, x] = f"{1 - p:.2f} {format_interval(1 - high, 1 - low, 2)}"
    lines = [
        "| P(row > column) | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for x in labels:
        row = [cells.get((x, y), "—") for y in labels]
        runs = f"{len(finals[x])} run{'s' if len(finals[x]) != 1 else ''}"
        lines.append(f"| {x} ({runs}) | " + " | ".join(row) + " |")
    return lines


def summary_table(runs: Sequence[Run], threshold: float, *, reps: int = BOOTSTRAP_REPS, seed: int = 0) -> str:
    """The Markdown comparison: one row per label, then one line per run without a final checkpoint.

    Columns hold mean ± sample std (ddof=1) over seeds. Final accuracy is each run's last finite
    eval/accuracy; steps / tokens to threshold average over the runs that reached it, and "(k/n)" says
    how many did; seconds per step is each run's mean perf/step_s; final KL is the last kl/value;
    generated tokens and policy updates (optimizer steps) are each run's totals.
    Then the sections "Interquartile mean" (final and best accuracy: IQM, 95% CI) and "Probability of
    improvement" (P(X > Y) of final accuracy for every pair of labels), both bootstrapped with
    `reps` resamples from `seed`.
    """
    header = [
        "arm",
        "runs (finished/total)",
        "final held-out acc",
        "best held-out acc",
        "start acc (step 0)",
        f"steps to acc ≥ {threshold:g}",
        f"tokens to acc ≥ {threshold:g}",
        "s/step",
        "final KL",
        "generated tokens",
        "policy updates",
    ]
    lines = [
        f"Mean ± sample std (ddof=1) over seeds; held-out accuracy threshold {threshold:g}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    groups = group_runs(runs)
    steps = best_steps(runs)
    for label, group in groups.items():
        lines.append("| " + " | ".join(summary_row(label, group, threshold, steps)) + " |")
    lines += ["", *iqm_section(groups, reps=reps, seed=seed)]
    lines += ["", *improvement_section(groups, reps=reps, seed=seed)]
    budget, _ = significance.token_budget(runs)
    scores = significance.run_scores(groups, budget)
    tests = significance.pair_tests(scores, reps=reps, seed=seed)
    lines += ["", *significance.significance_section(tests, reps=reps, seed=seed)]
    lines += ["", *significance.curves_section(groups, scores, reps=reps, seed=seed)]
    unfinished = [run for run in runs if not run.finished]
    if unfinished:
        lines.append("")
    for run in unfinished:
        last = max((int(row[STEP]) for row in run.rows if row[STEP] > 0), default=0)
        used = f"used steps 1..{last}" if last else "no training steps"
        lines.append(f"- {run.path}: no final checkpoint; {used}")
    warnings = [warning for run in runs for warning in run.warnings]
    if warnings:
        lines.append("")
    lines.extend(f"- warning: {warning}" for warning in warnings)
    return "\n".join(lines) + "\n"
