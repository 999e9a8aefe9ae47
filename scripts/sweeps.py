"""A sweep's failed jobs, reported at its end: `python -m scripts.train -m ...` runs every job even
when some fail (scripts/train.py `failed` returns the worst objective so that a sweeper such as Optuna
goes on), then prints which jobs failed and exits with status 1 if any did.

Each failed job leaves its one-line error in FAILED_FILE in its own folder (`record_failure`); the
Hydra callback `SweepFailures` (configs/train.yaml, hydra.callbacks) clears that file when a job
starts and reads them all when the sweep ends. A file, not process memory: a launcher may run the
jobs in other processes (hydra/launcher=joblib, slurm).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

# the file a failed job of a sweep writes its error into, in its own output folder
FAILED_FILE = "FAILED"


def record_failure(run_dir: Path, message: str) -> None:
    """Write `message` into run_dir/FAILED_FILE (best effort: an unwritable folder is its own error)."""
    with contextlib.suppress(OSError):
        (run_dir / FAILED_FILE).write_text(message + "\n", encoding="utf-8")


def failed_jobs(sweep_dir: Path) -> list[tuple[Path, str]]:
    """(job folder, its error's first line) of every job under sweep_dir that recorded a failure."""
    return [
        (path.parent, (path.read_text(encoding="utf-8").splitlines() or [""])[0])
        for path in sorted(sweep_dir.rglob(FAILED_FILE))
    ]


class SweepFailures(Callback):
    """Hydra callback: clear a job's FAILED_FILE as it starts; at the end of a sweep, print one line
    per failed job and exit with status 1 if any failed (Hydra would exit 0)."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        (Path(HydraConfig.get().runtime.output_dir) / FAILED_FILE).unlink(missing_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failures = failed_jobs(Path(config.hydra.sweep.dir))
        if not failures:
            return
        for folder, error in failures:
            print(f"failed: {folder}: {error}", file=sys.stderr)
        print(f"error: {len(failures)} job(s) of the sweep failed", file=sys.stderr)
        sys.exit(1)
