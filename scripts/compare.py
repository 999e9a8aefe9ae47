"""Compare runs of PPO, GRPO, DAPO or any arms: one figure and one Markdown table from their run
folders, from the results archive, or from a W&B group.

    python -m scripts.compare outputs/compare/sweep                 # every run found under the folder
    python -m scripts.compare docs/results/compare                  # the published runs (the archive)
    python -m scripts.compare outputs/a outputs/b --out reports --threshold 0.5
    python -m scripts.compare --wandb-group compare --wandb-entity me --out reports

A run is any folder holding `metrics.jsonl` next to `.hydra/config.yaml` (what `python -m
scripts.train` writes) or next to `config.yaml` (an archived run, scripts/archive.py), found
recursively under each PATH. Runs are grouped by their arm (config key `arm`: the algorithm, or a
named variant such as drgrpo or a rung of the DAPO ablation); when runs of one arm differ in
`rollout.group_size`, each group size gets its own label (`grpo-G4`, `grpo-G16`). Writes into --out
(default: the first PATH):

    comparison.png   2x3 grid: rows held-out accuracy (eval/accuracy) and the training task reward of
                     everything sampled (reward/correct, before any dynamic-sampling filter); columns
                     step, generated tokens (sampling/tokens_total) and wall time (perf/wall_s,
                     minutes); accuracy as the IQM over seeds with a 95% bootstrap band, reward as the
                     mean over seeds with a +/- std band
    comparison.md    one row per arm: finished runs, final / best / start held-out accuracy, steps and
                     tokens to reach --threshold, policy optimizer steps, seconds per step, final KL,
                     generated tokens; then "Interquartile mean" (IQM and 95% CI of final and best
                     accuracy) and "Probability of improvement" (P(X > Y) of final accuracy for every
                     pair, 95% CI: a list for up to 3 arms, a matrix beyond); then one line per run
                     that has no final checkpoint (crashed or still running)

The parts live in scripts/comparison/: runs.py (loading, arms, order), curves.py (series and
aggregates over seeds), tables.py (the Markdown), figure.py, wandb_runs.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from scripts.comparison.figure import plot
from scripts.comparison.numerics import mixed_warning
from scripts.comparison.runs import assign_labels, config_get, find_runs
from scripts.comparison.tables import BOOTSTRAP_REPS, summary_table
from scripts.comparison.wandb_runs import load_wandb_group


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.compare",
        description="Compare runs (grouped by arm): comparison.png and comparison.md.",
    )
    parser.add_argument(
        "paths", nargs="*", help="run folders or archived runs, or folders searched for them recursively"
    )
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
    if mixed := mixed_warning(runs):
        print(f"warning: {mixed}", file=sys.stderr)
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
