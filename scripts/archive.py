"""Put finished runs into the results archive: what re-plotting a published comparison needs, and
nothing heavy.

    python -m scripts.archive outputs/compare/sweep --to docs/results/compare
    python -m scripts.archive outputs/compare/sweep --to docs/results/compare --include-unfinished

Each run folder found under the PATHs (metrics.jsonl beside .hydra/config.yaml) becomes
`<to>/<arm>-s<seed>/` holding

    config.yaml      the run's config, resolved (Hydra's own ${hydra:...} keys left as they were)
    overrides.yaml   the command-line overrides of the run (Hydra's .hydra/overrides.yaml)
    metrics.jsonl    one JSON object per step, as the run wrote it
    provenance.json  the commit and the machine of each start of the run (common/provenance.py)
    archive.json     whether it finished (had its final checkpoint) and where it was archived from

and no checkpoints, samples or W&B files. `<to>/compare.json` records the options of the
experiment's published tables (--threshold, and the bootstrap's reps and seed), which
`python -m scripts.compare <to>` takes as its defaults, so that it reproduces the published files;
it reads the archive like run folders. A run already in the archive is left alone (--replace
overwrites it), so later runs add seeds to an archive instead of starting it over; two runs of one
arm and seed in one call are refused (one would silently replace the other); unfinished runs are
skipped unless --include-unfinished (compare.py then lists them as unfinished).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from scripts.compare import ARCHIVE_SETTINGS, DEFAULTS, archive_settings
from scripts.comparison.runs import Run, find_runs


def archive_name(run: Run) -> str:
    """The run's folder in the archive: <arm>-s<seed>."""
    return f"{run.arm}-s{run.seed}"


def archive_run(run: Run, to: Path, *, replace: bool = False) -> Path | None:
    """Copy what re-plotting needs of one run folder into `to`/<arm>-s<seed>/; returns that folder,
    or None when it exists already and `replace` is off."""
    source = Path(run.path)
    dest = to / archive_name(run)
    if dest.exists() and not replace:
        return None
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    (dest / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(run.config)), encoding="utf-8")
    for name, target in ((".hydra/overrides.yaml", "overrides.yaml"), ("metrics.jsonl", "metrics.jsonl")):
        shutil.copyfile(source / name, dest / target)
    if (source / "provenance.json").is_file():
        shutil.copyfile(source / "provenance.json", dest / "provenance.json")
    record = {"finished": run.finished, "archived_from": str(source)}
    (dest / "archive.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return dest


def record_settings(to: Path, threshold: float | None) -> dict[str, Any]:
    """Write `to`/compare.json: the archive's recorded compare options with `threshold` set (None:
    keep the recorded one), the others as recorded, else scripts.compare's defaults; returns them."""
    settings = {**DEFAULTS, **archive_settings(to)}
    if threshold is not None:
        settings["threshold"] = threshold
    to.mkdir(parents=True, exist_ok=True)
    (to / ARCHIVE_SETTINGS).write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
    return settings


def refuse_duplicates(runs: Sequence[Run]) -> None:
    """SystemExit in one line when two of `runs` share an archive folder (<arm>-s<seed>)."""
    seen: dict[str, str] = {}
    for run in runs:
        other = seen.setdefault(archive_name(run), run.path)
        if other != run.path:
            raise SystemExit(
                f"archive: {other} and {run.path} are both {archive_name(run)} (arm {run.arm}, seed "
                f"{run.seed}); archive one of them"
            )


def archive(
    paths: Sequence[str | Path],
    to: Path,
    *,
    replace: bool = False,
    include_unfinished: bool = False,
    threshold: float | None = None,
) -> dict[str, list[str]]:
    """Archive every run folder under `paths` into `to` and record the comparison's options
    (`record_settings`); returns the runs by outcome: "archived", "kept" (already there),
    "unfinished" (skipped)."""
    outcome: dict[str, list[str]] = {"archived": [], "kept": [], "unfinished": []}
    runs = find_runs(paths)
    for run in runs:
        if not (Path(run.path) / ".hydra" / "overrides.yaml").is_file():
            raise SystemExit(
                f"archive: {run.path} is not a run folder of scripts.train (no .hydra/overrides.yaml)"
            )
    chosen = [run for run in runs if run.finished or include_unfinished]
    refuse_duplicates(chosen)
    outcome["unfinished"] = [run.path for run in runs if not (run.finished or include_unfinished)]
    for run in chosen:
        done = archive_run(run, to, replace=replace)
        outcome["archived" if done else "kept"].append(archive_name(run))
    record_settings(to, threshold)
    return outcome


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.archive", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run folders, or folders searched for them recursively")
    parser.add_argument("--to", required=True, type=Path, help="the experiment's archive folder")
    parser.add_argument("--replace", action="store_true", help="overwrite runs already in the archive")
    parser.add_argument(
        "--threshold",
        type=float,
        help="the held-out accuracy the experiment's tables count steps to (recorded in compare.json; "
        "default: the recorded one, else scripts.compare's)",
    )
    parser.add_argument(
        "--include-unfinished", action="store_true", help="archive runs without a final checkpoint too"
    )
    args = parser.parse_args(argv)
    outcome = archive(
        args.paths,
        args.to,
        replace=args.replace,
        include_unfinished=args.include_unfinished,
        threshold=args.threshold,
    )
    print(f"archived into {args.to}: {', '.join(outcome['archived']) or 'nothing new'}")
    if outcome["kept"]:
        print(f"already archived (kept; --replace overwrites): {', '.join(outcome['kept'])}")
    for path in outcome["unfinished"]:
        print(f"skipped (no final checkpoint; --include-unfinished archives it): {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
