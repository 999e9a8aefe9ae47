"""Runs of a comparison: loading them from run folders, the results archive or W&B rows, their arm
labels and the order they are shown in.

A run folder is what `python -m scripts.train` writes (`metrics.jsonl` beside `.hydra/config.yaml`, a
final checkpoint once finished); an archived run (docs/results/<experiment>/<arm>-s<seed>/, written by
scripts/archive.py) holds `metrics.jsonl` beside `config.yaml` and `archive.json`, which says whether
it finished. Runs are grouped by their arm (config key `arm`; runs from before that key existed:
their algorithm).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

ACCURACY = "eval/accuracy"
# the task's own reward over everything sampled (before any dynamic-sampling filter): comparable
# across arms (reward/total adds DAPO's overlong penalty and the format term; reward/kept_correct is
# the filtered batch's, higher by construction under DAPO)
REWARD = "reward/correct"
STEP = "step"
TOKENS = "sampling/tokens_total"
WALL = "perf/wall_s"
STEP_S = "perf/step_s"
KL = "kl/value"
UPDATES = "policy/optimizer_steps_total"

# What defines a run besides its arm and group size: runs of one arm must agree on these to be pooled
# as seeds of one thing (runs of another experiment, model, task, learning rate or budget are not)
DEFINING_KEYS = (
    "experiment_name",
    "task.name",
    "model.name",
    "model.name_or_path",
    "optim.lr",
    "trainer.batch_size",
    "trainer.max_steps",
    "trainer.max_generated_tokens",
    "rollout.max_new_tokens",
)

# Arms in this order first (the algorithms, then Dr. GRPO), then the others in natural order
# (dapo0_naive_grpo, dapo1_..., so the DAPO ladder reads rung by rung)
ARM_ORDER = ["ppo", "grpo", "drgrpo", "dapo"]


@dataclass
class Run:
    """One training run: its config and its metric rows, one dict per step sorted by step."""

    path: str
    algorithm: str
    arm: str
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


def run_arm(config: dict[str, Any]) -> tuple[str, str]:
    """(algorithm, arm) of a run's config; the arm is the algorithm for runs without an `arm` key."""
    algorithm = str(config_get(config, "algorithm.name", "unknown"))
    return algorithm, str(config_get(config, "arm", algorithm))


def run_files(run_dir: Path) -> tuple[Path, Path] | None:
    """(config, metrics) of a run folder (.hydra/config.yaml) or an archived run (config.yaml), else None."""
    metrics = run_dir / "metrics.jsonl"
    for config in (run_dir / ".hydra" / "config.yaml", run_dir / "config.yaml"):
        if metrics.is_file() and config.is_file():
            return config, metrics
    return None


def is_finished(run_dir: Path) -> bool:
    """A run folder with its final checkpoint, or an archived run whose archive.json says finished."""
    if (run_dir / "checkpoints" / "final").is_dir():
        return True
    try:
        return bool(json.loads((run_dir / "archive.json").read_text(encoding="utf-8"))["finished"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def load_run(path: str | Path) -> Run:
    """Read one run folder (metrics.jsonl, .hydra/config.yaml, checkpoints/final) or archived run
    (metrics.jsonl, config.yaml, archive.json).

    The label is the arm; find_runs adds "-G<g>" where group sizes differ within an arm.
    """
    run_dir = Path(path)
    files = run_files(run_dir)
    if files is None:
        raise SystemExit(
            f"compare: {run_dir} is not a run directory (needs metrics.jsonl and .hydra/config.yaml, "
            "or config.yaml in an archived run)"
        )
    config = load_config(files[0])
    rows, warnings = read_metrics(files[1])
    algorithm, arm = run_arm(config)
    return Run(
        path=str(run_dir),
        algorithm=algorithm,
        arm=arm,
        label=arm,
        seed=config_get(config, "seed"),
        config=config,
        rows=rows,
        finished=is_finished(run_dir),
        warnings=warnings,
    )


def assign_labels(runs: list[Run]) -> list[Run]:
    """label = arm, plus "-G<g>" for every run of an arm whose runs differ in group size; then
    `check_same_settings`."""
    sizes: dict[str, set[str]] = {}
    for run in runs:
        sizes.setdefault(run.arm, set()).add(str(run.group_size))
    for run in runs:
        split = len(sizes[run.arm]) > 1
        run.label = f"{run.arm}-G{run.group_size}" if split else run.arm
    check_same_settings(runs)
    return runs


def check_same_settings(runs: list[Run]) -> None:
    """SystemExit in one line when two runs of one label differ in a DEFINING_KEYS setting: they are
    not seeds of one arm, and their mean would describe neither."""
    first: dict[tuple[str, str], Run] = {}
    for run in runs:
        for key in DEFINING_KEYS:
            seen = first.setdefault((run.label, key), run)
            old, new = config_get(seen.config, key), config_get(run.config, key)
            if old != new:
                raise SystemExit(
                    f"compare: arm {run.label} mixes runs of different settings: {key} is {old} in "
                    f"{seen.path} and {new} in {run.path}; compare them separately"
                )


def find_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Every run folder or archived run under each path (recursively; a path may itself be one).

    Raises SystemExit with a one-line message when a path does not exist or holds no runs.
    """
    run_dirs: dict[Path, Path] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise SystemExit(f"compare: {path} does not exist")
        found = sorted(m.parent for m in path.rglob("metrics.jsonl") if run_files(m.parent) is not None)
        if not found:
            raise SystemExit(
                f"compare: no runs under {path} (no metrics.jsonl next to .hydra/config.yaml or config.yaml)"
            )
        for run_dir in found:
            run_dirs.setdefault(run_dir.resolve(), run_dir)
    return assign_labels([load_run(run_dir) for run_dir in run_dirs.values()])


def natural_key(text: str) -> list[Any]:
    """Sort key that orders numbers inside names by value: "dapo2" < "dapo10", "G4" < "G16"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def label_order(label: str) -> tuple[int, list[Any]]:
    """Where a label is shown: ARM_ORDER's arms first, then the others in natural order; a label's
    "-G<g>" variants stay together in group-size order."""
    arm = label.partition("-G")[0]
    rank = ARM_ORDER.index(arm) if arm in ARM_ORDER else len(ARM_ORDER)
    return rank, natural_key(label)


def group_runs(runs: Iterable[Run]) -> dict[str, list[Run]]:
    """Runs by label, in label_order; within a label by seed."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    return {
        label: sorted(groups[label], key=lambda r: (str(r.seed), r.path))
        for label in sorted(groups, key=label_order)
    }
