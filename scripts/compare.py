"""Compare runs of PPO, GRPO and DAPO: one figure and one Markdown table from their run directories.

    python -m scripts.compare outputs/sweep                       # every run found under outputs/sweep
    python -m scripts.compare outputs/a outputs/b --out reports --threshold 0.5
    python -m scripts.compare --wandb-group sweep --wandb-entity me --out reports

A run directory is any folder holding `metrics.jsonl` next to `.hydra/config.yaml` (what
`python -m scripts.train` writes), found recursively under each PATH. Runs are grouped by
`algorithm.name`; when runs of one algorithm differ in `rollout.group_size`, each group size gets its
own label (`grpo-G4`, `grpo-G16`). Writes into --out (default: the first PATH):

    comparison.png   2x3 grid: rows held-out accuracy (eval/accuracy) and training task reward
                     (reward/correct); columns step, generated tokens (sampling/tokens_total) and wall
                     time (perf/wall_s, minutes); accuracy as the IQM over seeds with a 95% bootstrap
                     band, reward as the mean over seeds with a +/- std band
    comparison.md    one row per label: finished runs, final / best / start held-out accuracy, steps and
                     tokens to reach --threshold, seconds per step, final KL, generated tokens; then the
                     sections "Interquartile mean" (IQM and 95% CI of final and best accuracy) and
                     "Probability of improvement" (P(X > Y) of final accuracy for every pair, 95% CI);
                     then one line per run that has no final checkpoint (crashed or still running)

Every "mean ± std" is over seeds (one value per run) with the sample std (ddof=1); a single run shows
its value alone. IQM, stratified bootstrap intervals and P(X > Y) follow Agarwal et al. 2021 (see
scripts/stats.py); --bootstrap-reps and --seed fix the resampling. Non-finite values ("nan", "inf")
count as missing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from scripts import stats  # noqa: E402

ACCURACY = "eval/accuracy"
# the task's own reward: comparable across algorithms (reward/total adds DAPO's overlong penalty and
# the format term, which differ by algorithm and task)
REWARD = "reward/correct"
STEP = "step"
TOKENS = "sampling/tokens_total"
WALL = "perf/wall_s"
STEP_S = "perf/step_s"
KL = "kl/value"

# Fixed colours so an algorithm looks the same in every figure; other labels take the rest in order
ALGORITHM_COLOURS = {"ppo": "tab:blue", "grpo": "tab:orange", "dapo": "tab:green"}
SPARE_COLOURS = ["tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan"]
ALGORITHM_ORDER = ["ppo", "grpo", "dapo"]

# Bootstrap resamples for every confidence interval (rliable's examples use 2,000 to 50,000)
BOOTSTRAP_REPS = 10_000

ROWS = [(ACCURACY, "held-out accuracy (IQM, 95% CI)"), (REWARD, "training task reward (mean ± std)")]
COLUMNS = [(STEP, "step"), (TOKENS, "generated tokens"), (WALL, "wall time (min)")]


T = TypeVar("T")


@dataclass
class Run:
    """One training run: its config and its metric rows, one dict per step sorted by step."""

    path: str
    algorithm: str
    label: str
    seed: int | None
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    finished: bool
    warnings: list[str] = field(default_factory=list)

    @property
    def group_size(self) -> Any:
        return config_get(self.config, "rollout.group_size")

    @property
    def last_step(self) -> int:
        return max((int(row[STEP]) for row in self.rows), default=0)


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def config_get(config: dict[str, Any], dotted: str, default: Any = None) -> Any:
    """config["a"]["b"] for "a.b", or a flat config["a.b"] (as W&B may store it); default if absent."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return config.get(dotted, default)
        node = node[part]
    return node


def parse_value(value: Any) -> Any:
    """The strings "nan", "inf" and "-inf" (how metrics.jsonl stores non-finite floats) become floats."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def merge_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows sorted by step; rows that share a step are merged (a later value wins)."""
    by_step: dict[int, dict[str, Any]] = {}
    for row in rows:
        by_step.setdefault(int(row[STEP]), {}).update(row)
    return [by_step[step] for step in sorted(by_step)]


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of a metrics.jsonl and the warnings for lines that are not a JSON object with a step.

    A crashed run can leave its last line half-written; such lines are skipped, never fatal.
    """
    rows, warnings = [], []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            where = "last line" if number == len(lines) else f"line {number}"
            warnings.append(f"{path}: skipped {where} (not valid JSON, probably truncated)")
            continue
        if not isinstance(row, dict) or not isinstance(row.get(STEP), int):
            warnings.append(f"{path}: skipped line {number} (no integer 'step')")
            continue
        rows.append({key: parse_value(value) for key, value in row.items()})
    return merge_rows(rows), warnings


def load_config(path: Path) -> dict[str, Any]:
    """The saved Hydra config as a plain dict, resolved where possible (${hydra:...} cannot be offline)."""
    cfg = OmegaConf.load(path)
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:
        return OmegaConf.to_container(cfg, resolve=False)


def load_run(path: str | Path) -> Run:
    """Read one run directory (metrics.jsonl, .hydra/config.yaml, checkpoints/final).

    The label is the algorithm; find_runs adds "-G<g>" where group sizes differ within an algorithm.
    """
    run_dir = Path(path)
    if not (run_dir / "metrics.jsonl").is_file() or not (run_dir / ".hydra" / "config.yaml").is_file():
        raise SystemExit(
            f"compare: {run_dir} is not a run directory (needs metrics.jsonl and .hydra/config.yaml)"
        )
    config = load_config(run_dir / ".hydra" / "config.yaml")
    rows, warnings = read_metrics(run_dir / "metrics.jsonl")
    algorithm = str(config_get(config, "algorithm.name", "unknown"))
    return Run(
        path=str(run_dir),
        algorithm=algorithm,
        label=algorithm,
        seed=config_get(config, "seed"),
        config=config,
        rows=rows,
        finished=(run_dir / "checkpoints" / "final").is_dir(),
        warnings=warnings,
    )


def assign_labels(runs: list[Run]) -> list[Run]:
    """label = algorithm, plus "-G<g>" for every run of an algorithm whose runs differ in group size."""
    sizes: dict[str, set[str]] = {}
    for run in runs:
        sizes.setdefault(run.algorithm, set()).add(str(run.group_size))
    for run in runs:
        split = len(sizes[run.algorithm]) > 1
        run.label = f"{run.algorithm}-G{run.group_size}" if split else run.algorithm
    return runs


def find_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Every run directory under each path (recursively; a path may itself be a run directory).

    Raises SystemExit with a one-line message when a path does not exist or holds no runs.
    """
    run_dirs: dict[Path, Path] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise SystemExit(f"compare: {path} does not exist")
        found = sorted(
            metrics.parent
            for metrics in path.rglob("metrics.jsonl")
            if (metrics.parent / ".hydra" / "config.yaml").is_file()
        )
        if not found:
            raise SystemExit(f"compare: no runs under {path} (no metrics.jsonl next to .hydra/config.yaml)")
        for run_dir in found:
            run_dirs.setdefault(run_dir.resolve(), run_dir)
    return assign_labels([load_run(run_dir) for run_dir in run_dirs.values()])


# ---------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------


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


def group_runs(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs by label: ppo, grpo, dapo first, then the rest by name (group sizes in numeric order)."""

    def order(label: str) -> tuple[int, str, float]:
        algorithm, _, size = label.partition("-G")
        rank = ALGORITHM_ORDER.index(algorithm) if algorithm in ALGORITHM_ORDER else len(ALGORITHM_ORDER)
        return rank, algorithm, float(size) if size.isdigit() else 0.0

    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    return {
        label: sorted(groups[label], key=lambda r: (str(r.seed), r.path))
        for label in sorted(groups, key=order)
    }


def label_colours(labels: Sequence[str]) -> dict[str, str]:
    """The fixed colour for a plain algorithm label; the spare colours, in order, for the rest."""
    spare = iter(SPARE_COLOURS * (len(labels) // len(SPARE_COLOURS) + 1))
    return {label: ALGORITHM_COLOURS.get(label) or next(spare) for label in labels}


# ---------------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------------


def last_value(run: Run, key: str) -> float | None:
    values = [float(row[key]) for row in run.rows if finite(row.get(key))]
    return values[-1] if values else None


def first_reach(run: Run, threshold: float) -> dict[str, Any] | None:
    """The first row whose held-out accuracy is >= threshold, or None."""
    for row in run.rows:
        if finite(row.get(ACCURACY)) and row[ACCURACY] >= threshold:
            return row
    return None


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


def present(values: Iterable[T | None]) -> list[T]:
    return [value for value in values if value is not None]


def final_and_best(run: Run) -> tuple[float, float] | None:
    """The run's last and highest finite held-out accuracy, or None if it never evaluated.

    A run that crashed counts as far as it went: its last evaluation is its final accuracy.
    """
    _, accuracy = series(run, ACCURACY, STEP)
    return (float(accuracy[-1]), float(accuracy.max())) if len(accuracy) else None


def summary_row(label: str, runs: Sequence[Run], threshold: float) -> list[str]:
    """One table row: the aggregates over the runs (seeds) of one label."""
    accuracy = present(final_and_best(run) for run in runs)
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
        format_mean_std([best for _, best in accuracy]),
        format_mean_std(start),
        format_mean_std([float(row[STEP]) for row in reached], digits=1) + counts,
        format_mean_std([x_value(row, TOKENS) or 0.0 for row in reached], digits=-1) + counts,
        format_mean_std(step_s, digits=1),
        format_mean_std(kl, digits=4) if kl else "—",
        format_mean_std(present(last_value(run, TOKENS) for run in runs), digits=-1),
    ]


def format_interval(low: float, high: float, digits: int) -> str:
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def runs_cell(scored: int, unfinished: int) -> str:
    """How many runs a cell rests on, and how many of them have no final checkpoint."""
    return f"{scored} ({unfinished} unfinished)" if unfinished else str(scored)


def iqm_section(groups: dict[str, list[Run]], *, reps: int, seed: int) -> list[str]:
    """Markdown lines: final and best held-out accuracy per label as IQM with its 95% CI (stats)."""
    lines = [
        "## Interquartile mean",
        "",
        "IQM over runs (the mean of the middle 50%; with fewer than 4 runs the plain mean) with a 95%",
        f"stratified-bootstrap percentile CI ({reps:,} resamples of the runs, seed {seed}), after Agarwal",
        "et al. 2021; `runs` = runs with a held-out evaluation (a crashed run counts with its last one).",
        "",
        "| algorithm | held-out acc | runs | IQM | 95% CI | mean ± std |",
        "|---|---|---|---|---|---|",
    ]
    for label, group in groups.items():
        scored = [(run, scores) for run in group if (scores := final_and_best(run)) is not None]
        runs = runs_cell(len(scored), sum(not run.finished for run, _ in scored))
        for index, metric in enumerate(("final", "best")):
            values = [scores[index] for _, scores in scored]
            if not values:
                lines.append(f"| {label} | {metric} | 0 | n/a | n/a | n/a |")
                continue
            iqm, low, high = stats.iqm_interval(values, reps=reps, seed=seed)
            interval = format_interval(low, high, 3)
            lines.append(
                f"| {label} | {metric} | {runs} | {iqm:.3f} | {interval} | {format_mean_std(values)} |"
            )
    return lines


def improvement_section(groups: dict[str, list[Run]], *, reps: int, seed: int) -> list[str]:
    """Markdown lines: P(X > Y) on final held-out accuracy for every pair of labels, with its 95% CI."""
    finals = {
        label: [scores[0] for scores in present(final_and_best(run) for run in group)]
        for label, group in groups.items()
    }
    lines = [
        "## Probability of improvement",
        "",
        "P(X > Y): the chance that a run of X ends with a higher final held-out accuracy than a run of Y",
        "(ties count 1/2, so P(Y > X) = 1 - P(X > Y)); 95% percentile CI from resampling the runs of X",
        "and of Y independently, after Agarwal et al. 2021.",
        "",
        "| X | Y | runs (X, Y) | P(X > Y) | 95% CI |",
        "|---|---|---|---|---|",
    ]
    labels = [label for label, values in finals.items() if values]
    for i, x in enumerate(labels):
        for y in labels[i + 1 :]:
            p, low, high = stats.improvement_interval(finals[x], finals[y], reps=reps, seed=seed)
            runs = f"{len(finals[x])}, {len(finals[y])}"
            lines.append(f"| {x} | {y} | {runs} | {p:.3f} | {format_interval(low, high, 3)} |")
    if len(labels) < 2:
        lines.append("| — | — | — | — | — |")
    return lines


def summary_table(runs: Sequence[Run], threshold: float, *, reps: int = BOOTSTRAP_REPS, seed: int = 0) -> str:
    """The Markdown comparison: one row per label, then one line per run without a final checkpoint.

    Columns hold mean ± sample std (ddof=1) over seeds. Final accuracy is each run's last finite
    eval/accuracy; steps / tokens to threshold average over the runs that reached it, and "(k/n)" says
    how many did; seconds per step is each run's mean perf/step_s; final KL is the last kl/value.
    Then the sections "Interquartile mean" (final and best accuracy: IQM, 95% CI) and "Probability of
    improvement" (P(X > Y) of final accuracy for every pair of labels), both bootstrapped with
    `reps` resamples from `seed`.
    """
    header = [
        "algorithm",
        "runs (finished/total)",
        "final held-out acc",
        "best held-out acc",
        "start acc (step 0)",
        f"steps to acc ≥ {threshold:g}",
        f"tokens to acc ≥ {threshold:g}",
        "s/step",
        "final KL",
        "generated tokens",
    ]
    lines = [
        f"Mean ± sample std (ddof=1) over seeds; held-out accuracy threshold {threshold:g}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    groups = group_runs(runs)
    for label, group in groups.items():
        lines.append("| " + " | ".join(summary_row(label, group, threshold)) + " |")
    lines += ["", *iqm_section(groups, reps=reps, seed=seed)]
    lines += ["", *improvement_section(groups, reps=reps, seed=seed)]
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


# ---------------------------------------------------------------------------------------------------
# Figure
# ---------------------------------------------------------------------------------------------------


def curve_band(
    runs: Sequence[Run], key: str, x_key: str, *, reps: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x, centre, low, high, n of one label's curve: held-out accuracy as IQM with its 95% bootstrap
    band (aggregate_iqm), anything else as mean ± sample std (aggregate)."""
    if key == ACCURACY:
        return aggregate_iqm(runs, key, x_key, reps=reps, seed=seed)
    x, mean, std, n = aggregate(runs, key, x_key)
    return x, mean, mean - std, mean + std, n


def plot(
    runs: Sequence[Run],
    path: str | Path,
    *,
    threshold: float | None = None,
    reps: int = BOOTSTRAP_REPS,
    seed: int = 0,
) -> Path:
    """Save the 2x3 comparison grid (rows: accuracy, reward; columns: step, tokens, wall time) to path.

    Held-out accuracy is drawn as the IQM over seeds with its 95% stratified-bootstrap band (`reps`
    resamples from `seed`), the training reward as the mean with a ± std band (see curve_band);
    accuracy exists only at evaluation steps, so it is drawn with markers. The line is solid where
    every seed has a value and faint dashed where only some do. A grey dashed line marks the
    threshold if given.
    """
    groups = group_runs(runs)
    colours = label_colours(list(groups))
    fig, axes = plt.subplots(len(ROWS), len(COLUMNS), figsize=(16, 8.5), squeeze=False)
    for (key, y_label), ax_row in zip(ROWS, axes, strict=True):
        for (x_key, x_label), ax in zip(COLUMNS, ax_row, strict=True):
            for label, group in groups.items():
                x, centre, low, high, n = curve_band(group, key, x_key, reps=reps, seed=seed)
                if not len(x):
                    continue
                if x_key == WALL:
                    x = x / 60.0
                style = {
                    "color": colours[label],
                    "marker": "o" if key == ACCURACY else None,
                    "markersize": 3.5,
                }
                # Where some seeds have stopped (crashed, shorter), the curve jumps: draw that part faint
                ax.plot(x, centre, linestyle="--", linewidth=1.2, alpha=0.5, **style)
                ax.plot(x, np.where(n == len(group), centre, np.nan), linewidth=1.6, **style)
                ax.fill_between(x, low, high, color=colours[label], alpha=0.18, linewidth=0)
            if key == ACCURACY and threshold is not None:
                ax.axhline(threshold, color="0.4", linestyle="--", linewidth=0.9)
            if x_key == TOKENS:
                ax.xaxis.set_major_formatter(EngFormatter(sep=""))
            ax.set_xlabel(x_label)
            ax.set_ylabel(y_label)
            ax.grid(alpha=0.3)
    handles = [
        plt.Line2D([], [], color=colours[label], linewidth=2, label=f"{label} (n={len(group)} seeds)")
        for label, group in groups.items()
    ]
    fig.legend(handles=handles, loc="upper center", ncol=max(len(handles), 1), frameon=False)
    fig.suptitle(
        "held-out accuracy: IQM over seeds with a 95% stratified-bootstrap band; training reward: mean"
        " ± std over seeds (faint dashed: not every seed has a value there)",
        y=0.955,
        fontsize=10,
        color="0.35",
    )
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------
# Weights & Biases (optional): the same Run structure from a W&B group
# ---------------------------------------------------------------------------------------------------


def run_from_wandb(wandb_run: Any) -> Run:
    """A Run from a wandb.apis.public.Run: config, full history (_step -> step), finished = state."""
    config = dict(wandb_run.config)
    rows = []
    for record in wandb_run.scan_history():
        if record.get("_step") is None:
            continue
        row = {k: parse_value(v) for k, v in record.items() if not k.startswith("_") and v is not None}
        rows.append({**row, STEP: int(record["_step"])})
    algorithm = str(config_get(config, "algorithm.name", "unknown"))
    return Run(
        path=f"wandb:{'/'.join(wandb_run.path)}",
        algorithm=algorithm,
        label=algorithm,
        seed=config_get(config, "seed"),
        config=config,
        rows=merge_rows(rows),
        finished=wandb_run.state == "finished",
    )


def load_wandb_group(group: str, *, project: str, entity: str | None) -> list[Run]:
    """Every run of a W&B group; SystemExit with one line when W&B is missing, logged out or offline."""
    from common.logging import wandb_logged_in

    try:
        import wandb
    except ImportError:
        raise SystemExit("compare: --wandb-group needs the wandb package (pip install wandb)") from None
    if not wandb_logged_in():
        raise SystemExit("compare: W&B is not logged in (run `wandb login` or set WANDB_API_KEY)")
    try:
        api = wandb.Api()
        where = f"{entity or api.default_entity}/{project}"
        runs = [run_from_wandb(run) for run in api.runs(where, filters={"group": group})]
    except Exception as err:
        raise SystemExit(
            f"compare: could not read W&B group {group!r} (offline? {type(err).__name__}: {err})"
        ) from None
    if not runs:
        raise SystemExit(f"compare: no runs in W&B group {group!r} of {where}")
    return assign_labels(runs)


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.compare",
        description="Compare runs (grouped by algorithm): comparison.png and comparison.md.",
    )
    parser.add_argument("paths", nargs="*", help="run directories, or folders searched for them recursively")
    parser.add_argument("--out", help="output folder (default: the first PATH)")
    parser.add_argument(
        "--threshold", type=float, default=0.6, help="held-out accuracy to reach (default 0.6)"
    )
    parser.add_argument(
        "--bootstrap-reps",
        type=int,
        default=BOOTSTRAP_REPS,
        help=f"bootstrap resamples per confidence interval (default {BOOTSTRAP_REPS})",
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--wandb-group", help="read the runs of this W&B group instead of (or besides) PATHs")
    parser.add_argument("--wandb-project", default="rl-lab")
    parser.add_argument("--wandb-entity", default=None)
    args = parser.parse_args(argv)
    if not args.paths and not args.wandb_group:
        parser.error("give at least one PATH or --wandb-group")
    if args.bootstrap_reps < 1:
        parser.error(f"--bootstrap-reps must be at least 1 (got {args.bootstrap_reps})")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    runs = find_runs(args.paths) if args.paths else []
    if args.wandb_group:
        runs = assign_labels(
            runs + load_wandb_group(args.wandb_group, project=args.wandb_project, entity=args.wandb_entity)
        )
    out = Path(args.out or (args.paths[0] if args.paths else Path("outputs") / "compare" / args.wandb_group))
    for warning in (warning for run in runs for warning in run.warnings):
        print(f"warning: {warning}", file=sys.stderr)
    tasks = sorted({str(config_get(run.config, "task.name")) for run in runs})
    if len(tasks) > 1:
        print(
            f"warning: runs span several tasks ({', '.join(tasks)}); they are grouped together",
            file=sys.stderr,
        )
    table = summary_table(runs, args.threshold, reps=args.bootstrap_reps, seed=args.seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(table, encoding="utf-8")
    figure = plot(
        runs, out / "comparison.png", threshold=args.threshold, reps=args.bootstrap_reps, seed=args.seed
    )
    print(table)
    print(f"wrote {figure}")
    print(f"wrote {out / 'comparison.md'}")


if __name__ == "__main__":
    main()
