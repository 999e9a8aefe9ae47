"""Sentences generated from the archive, so that no number a document quotes from runs is typed by
hand. A document holds a block

    <!-- prose: docs/results/compare --threshold 0.5 : pairs -->
    (generated text)
    <!-- /prose -->

whose marker holds `scripts.compare`'s arguments (one or more archive folders and options), a colon,
and the kind of text (PROSE); scripts/refresh_results.py rewrites the body, and its --check fails when
the body differs from what the archive gives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from scripts.comparison import numerics, significance
from scripts.comparison.curves import final_and_best, finite, last_value
from scripts.comparison.runs import ACCURACY, STEP, TOKENS, UPDATES, WALL, Run, group_runs

# the metrics as one sentence names them
SHORT_NAMES = {"final": "final held-out accuracy", "area": "area under the curve"}
# the pair sentences listed by name (the others are counted)
MAX_PAIR_SENTENCES = 6


def span(values: Sequence[float], digits: int) -> str:
    """ "0.21" for one value (or equal values), "0.17-0.71" for a range."""
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return low if low == high else f"{low} to {high}" if min(values) < 0 else f"{low}-{high}"


def pair_sentence(test: significance.PairTest) -> str:
    """ "`x` ends above `y` by 0.116, not separated (Holm p = 0.43; detectable: 0.17)"."""
    side = "above" if test.difference > 0 else "below" if test.difference < 0 else "level with"
    verb = "ends" if test.metric == "final" else "has an area"
    detectable = "n/a" if math.isnan(test.detectable) else f"{test.detectable:.2f}"
    return (
        f"`{test.x}` {verb} {side} `{test.y}` by {abs(test.difference):.3f}, "
        f"{'separated' if test.separated else 'not separated'} "
        f"(Holm p = {significance.format_p(test.holm_p)}; detectable: {detectable})"
    )


def pairs_text(runs: Sequence[Run], reps: int, seed: int) -> str:
    """Per metric: how many pairs are separated, the pairs by corrected p (the first few named), the
    range of detectable differences and of seeds per arm for 0.10."""
    groups = group_runs(runs)
    budget, _ = significance.token_budget(runs)
    tests = significance.pair_tests(significance.run_scores(groups, budget), reps=reps, seed=seed)
    out = []
    for metric, name in significance.METRICS.items():
        chosen = sorted((t for t in tests if t.metric == metric), key=lambda t: (t.holm_p, t.p))
        if not chosen:
            continue
        separated = sum(t.separated for t in chosen)
        named = "; ".join(pair_sentence(t) for t in chosen[:MAX_PAIR_SENTENCES])
        rest = len(chosen) - MAX_PAIR_SENTENCES
        more = f"; the other {rest} pairs have larger corrected p" if rest > 0 else ""
        detectable = [t.detectable for t in chosen if not math.isnan(t.detectable)]
        seeds = [n for t in chosen if (n := t.seeds[1]) is not None]
        power = f" Detectable at 80% power: {span(detectable, 2)}" if detectable else ""
        power += f"; seeds per arm to detect 0.10: {span(seeds, 0)}." if seeds else "." if power else ""
        out.append(
            f"On the {name}, {separated} of {len(chosen)} pairs {'is' if separated == 1 else 'are'} "
            f"separated: {named}{more}.{power}"
        )
    return "\n".join(out)


def verdict_text(runs: Sequence[Run], reps: int, seed: int) -> str:
    """One sentence: per metric how many pairs are separated, the smallest corrected p and its pair,
    and the range of detectable differences."""
    groups = group_runs(runs)
    budget, _ = significance.token_budget(runs)
    tests = significance.pair_tests(significance.run_scores(groups, budget), reps=reps, seed=seed)
    parts = []
    for metric in significance.METRICS:
        chosen = [t for t in tests if t.metric == metric]
        if not chosen:
            continue
        best = min(chosen, key=lambda t: (t.holm_p, t.p))
        detectable = [t.detectable for t in chosen if not math.isnan(t.detectable)]
        parts.append(
            f"{sum(t.separated for t in chosen)} of {len(chosen)} pairs separated on {SHORT_NAMES[metric]} "
            f"(smallest Holm p {significance.format_p(best.holm_p)}, `{best.x}` against `{best.y}`"
            + (f"; detectable differences {span(detectable, 2)})" if detectable else ")")
        )
    return "; ".join(parts) + "." if parts else "No pair of arms to test."


def machines_text(runs: Sequence[Run], reps: int, seed: int) -> str:
    """Where the runs ran: each numerics environment with its runs, and whether they mix."""
    found = numerics.environments(runs)
    if not found:
        return "No run records its machine."
    listed = "; ".join(f"{env}: {', '.join(f'`{name}`' for name in names)}" for env, names in found.items())
    verdict = (
        "one numerics environment"
        if len(found) == 1
        else f"{len(found)} numerics environments mixed (a seed is not the same run in each)"
    )
    return f"{verdict.capitalize()}: {listed}."


def run_text(runs: Sequence[Run], reps: int, seed: int) -> str:
    """One run's held-out accuracy at each evaluation and its wall time (the first run)."""
    run = runs[0]
    points = [(int(row[STEP]), float(row[ACCURACY])) for row in run.rows if finite(row.get(ACCURACY))]
    listed = ", ".join(f"{accuracy:.2f} at step {step}" for step, accuracy in points)
    wall = last_value(run, WALL)
    minutes = f", in {wall / 60:.0f} minutes" if wall is not None else ""
    return f"held-out greedy accuracy {listed}{minutes}."


def seeds_text(runs: Sequence[Run], reps: int, seed: int) -> str:
    """Final held-out accuracy of every run, by arm and seed."""
    parts = []
    for label, group in group_runs(runs).items():
        scored = [(run, pair) for run in group if (pair := final_and_best(run)) is not None]
        finals = [f"{pair[0]:.2f} (s{run.seed})" for run, pair in scored]
        parts.append(f"`{label}` {', '.join(finals)}")
    return "Final held-out accuracy by seed: " + "; ".join(parts) + "."


def per_arm(runs: Sequence[Run], describe: Callable[[list[Run]], str | None]) -> str:
    """ "`arm` <describe(runs)>; ..." over the arms whose description is not None."""
    parts = [f"`{label}` {text}" for label, group in group_runs(runs).items() if (text := describe(group))]
    return "; ".join(parts)


def budget_text(runs: Sequence[Run], reps: int, seed: int) -> str:
    """Per arm: steps, policy optimizer steps and generated tokens over its runs (ranges)."""

    def describe(group: list[Run]) -> str:
        steps = [run.last_step for run in group]
        updates = [u for run in group if (u := last_value(run, UPDATES)) is not None]
        tokens = [t for run in group if (t := last_value(run, TOKENS)) is not None]
        return (
            f"{span(steps, 0)} steps, {span(updates, 0)} policy updates, "
            f"{span([t / 1000 for t in tokens], 1)}k generated tokens"
        )

    return "Per run: " + per_arm(runs, describe) + "."


def first_step_value(run: Run, key: str) -> float | None:
    row = next((row for row in run.rows if row[STEP] == 1), {})
    return float(row[key]) if finite(row.get(key)) else None


def truncation_text(runs: Sequence[Run], reps: int, seed: int) -> str:
    """Per arm: the share of step 1's responses cut at rollout.max_new_tokens (rollout/truncated_frac)."""

    def describe(group: list[Run]) -> str | None:
        shares = [first_step_value(run, "rollout/truncated_frac") for run in group]
        shares = [100 * v for v in shares if v is not None]
        return f"{span(shares, 1)}%" if shares else None

    return "Responses cut at the token limit at step 1, per run: " + per_arm(runs, describe) + "."


def critic_text(runs: Sequence[Run], reps: int, seed: int) -> str:
    """The range of the critic's mean value at step 1 (critic/values_mean) against the returns'."""
    values = [v for run in runs if (v := first_step_value(run, "critic/values_mean")) is not None]
    returns = [v for run in runs if (v := first_step_value(run, "critic/returns_mean")) is not None]
    if not values:
        return "No run has a critic."
    return (
        f"at step 1 its mean value over the batch is {span(values, 2)} across these {len(values)} runs, "
        f"against mean returns of {span(returns, 2)}"
    )


def skipped_text(runs: Sequence[Run], reps: int, seed: int) -> str:
    """Per arm: steps whose update was skipped (dynamic sampling kept no group: no optimizer step) and
    steps that trained on fewer groups than the batch (sampling/groups_kept), which still take every
    mini-batch's optimizer step (the mini-batch count comes from trainer.batch_size)."""

    def describe(group: list[Run]) -> str | None:
        skipped = [
            f"s{run.seed} step {row[STEP]}" for run in group for row in run.rows
            if row[STEP] > 0 and "sampling/samples" in row and "policy/optimizer_steps" not in row
        ]  # fmt: skip
        short = sum(
            1 for run in group for row in run.rows
            if finite(row.get("sampling/groups_kept")) and 0 < row["sampling/groups_kept"]
            < run.config.get("trainer", {}).get("batch_size", 0)
        )  # fmt: skip
        if not skipped and not short:
            return None
        no_update = ", ".join(skipped) if skipped else "none"
        return f"steps without an update: {no_update}; steps on fewer groups than the batch: {short}"

    return (per_arm(runs, describe) or "Every step of every run updated the policy on a full batch") + "."


PROSE: dict[str, Callable[[Sequence[Run], int, int], str]] = {
    "pairs": pairs_text,
    "verdict": verdict_text,
    "machines": machines_text,
    "run": run_text,
    "seeds": seeds_text,
    "budget": budget_text,
    "truncation": truncation_text,
    "critic": critic_text,
    "skipped": skipped_text,
}


def prose(kind: str, runs: Sequence[Run], *, reps: int, seed: int) -> str:
    """The generated text of one kind (PROSE) for `runs`, wrapped at 100 characters, with a newline."""
    if kind not in PROSE:
        raise SystemExit(f"refresh_results: unknown prose {kind!r}; options: {', '.join(PROSE)}")
    text = PROSE[kind](runs, reps, seed)
    return "\n".join(wrap(paragraph) for paragraph in text.split("\n")) + "\n"


def wrap(paragraph: str, width: int = 100) -> str:
    """Greedy word wrap (textwrap would split inside `code spans`' hyphens)."""
    lines, line = [], ""
    for word in paragraph.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join([*lines, line])
