"""Hydra's submitit launchers with a requeued job that resumes (configs/hydra/launcher/slurm.yaml).
Hydra instantiates launchers from the hydra_plugins namespace package only, hence this folder.

Before SLURM stops a job at its time limit, or preempts it, submitit has it send the warning signal
USR2 (`signal_delay_s` before the limit). The trainer catches it (trainer.checkpoint_signals),
finishes the step, checkpoints, then hands the signal on to submitit's own handler
(scripts.train.hand_on_signal), which requeues the job through the launcher's `checkpoint`: the
same job, in the same sweep folder, here with `resume=auto` added, so the requeued job continues
from that checkpoint instead of starting over at step 0 (a fresh start into the folder would be
refused: common.run_folder).
"""

from __future__ import annotations

from typing import Any

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
except ImportError:  # not installed: nothing to extend (Hydra imports every plugin at each start)
    LocalLauncher = SlurmLauncher = object


def resumed_overrides(overrides: list[str]) -> list[str]:
    """A job's overrides with resume=auto in place of any resume= of its own.

    Example: ["seed=1", "resume=null"] -> ["seed=1", "resume=auto"]
    """
    return [o for o in overrides if not o.lstrip("+~").startswith("resume=")] + ["resume=auto"]


class ResumingSlurmLauncher(SlurmLauncher):
    """submitit's SLURM launcher whose requeued jobs resume (`resume=auto`)."""

    def checkpoint(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> Any:
        return super().checkpoint(resumed_overrides(sweep_overrides), *args, **kwargs)


class ResumingLocalLauncher(LocalLauncher):
    """The same on submitit's local executor (hydra/launcher=submitit_local), which sends USR2 and
    requeues as SLURM does: what tests/test_signals.py runs."""

    def checkpoint(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> Any:
        return super().checkpoint(resumed_overrides(sweep_overrides), *args, **kwargs)
