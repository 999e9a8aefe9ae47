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
`rollout.group_size`, each group size gets its own label (`grpo-G4`, `grpo-G16`); runs of one arm that
differ in a setting that defines the run (experiment, model, task, learning rate, budget:
scripts/comparison/runs.py DEFINING_KEYS) are refused, not pooled as seeds.

An archive folder (docs/results/<experiment>/) records the options its published tables were made
with in compare.json (scripts/archive.py --threshold): they are the defaults when it is the first
PATH, so `python -m scripts.compare docs/results/<experiment>` reproduces the published files. Writes
into --out; by default the first PATH, except an archive's (tracked, published) folder, whose
comparison is written to outputs/compare/<experiment>/ instead:

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
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scripts.comparison.figure import plot
from scripts.comparison.numerics import mixed_warning
from scripts.comparison.runs import assign_labels, config_get, find_runs
from scripts.comparison.tables import BOOTSTRAP_REPS, summary_table
from scripts.comparison.wandb_runs import load_wandb_group

# the file in an archive folder that records the options of its published tables (scripts/archive.py)
ARCHIVE_SETTINGS = "compare.json"
# those options when neither a flag nor the archive sets them
DEFAULTS: dict[str, Any] = {"threshold": 0.6, "bootstrap_reps": BOOTSTRAP_REPS, "seed": 0}


def archive_settings(folder: Path) -> dict[str, Any]:
    """The compare options an archive folder recorded (its ARCHIVE_SETTINGS file), {} if none."""
    path = folder / ARCHIVE_SETTINGS
    if not path.is_file():
        return {}
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise SystemExit(f"compare: {path} is not valid JSON ({err})") from err
    unknown = sorted(set(recorded) - set(DEFAULTS))
    if unknown:
        raise SystemExit(
            f"compare: {path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}"
        )
    return recorded


def default_out(paths: Sequence[str], wandb_group: str | None) -> Path:
    """Where the comparison goes without --out: the first PATH, unless it is an archive (it records
    its settings): the published files are rewritten only on request, so outputs/compare/<name>."""
    if not paths:
        return Path("outputs") / "compare" / str(wandb_group)
    first = Path(paths[0])
    if (first / ARCHIVE_SETTINGS).is_file():
        return Path("outputs") / "compare" / first.resolve().name
    return first


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.compare",
        description="Compare runs (grouped by arm): comparison.png and comparison.md.",
    )
    parser.add_argument(
        "paths", nargs="*", help="run folders or archived runs, or folders searched for them recursively"
    )
    parser.add_argument(
        "--out", help="output folder (default: the first PATH; outputs/compare/<name> for an archive)"
    )
    parser.add_argument(
        "--threshold",
        type=float,
        help=f"held-out accuracy to reach (default: the archive's, else {DEFAULTS['threshold']})",
    )
    parser.add_argument(
        "--bootstrap-reps",
        type=int,
        help=f"bootstrap resamples per confidence interval (default: the archive's, else {BOOTSTRAP_REPS})",
    )
    parser.add_argument("--seed", type=int, help="bootstrap seed (default: the archive's, else 0)")
    parser.add_argument("--wandb-group", help="read the runs of this W&B group instead of (or besides) PATHs")
    parser.add_argument("--wandb-project", default="rl-lab")
    parser.add_argument("--wandb-entity", default=None)
    args = parser.parse_args(argv)
    if not args.paths and not args.wandb_group:
        parser.error("give at least one PATH or --wandb-group")
    recorded = archive_settings(Path(args.paths[0])) if args.paths else {}
    for key, default in DEFAULTS.items():  # a flag, else the archive's record, else the default
        if getattr(args, key) is None:
            setattr(args, key, recorded.get(key, default))
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
    out = Path(args.out) if args.out else default_out(args.paths, args.wandb_group)
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
