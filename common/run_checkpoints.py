"""The training loop's checkpoint writes and the stops that save one: `Checkpointer` (a collective
write of the run's state, which a failure turns into one line), the non-finite-steps and held-out
reward-error stops, and what follows the final checkpoint (`save_final`).

Split from common/trainer.py, which calls these; the checkpoint files themselves (atomic writes,
pruning, finding the newest) are common/checkpoint.py's, what a checkpoint carries common/state.py's.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.checkpoint import (
    MODEL_ONLY,
    disk_bytes,
    find_latest,
    prune_checkpoints,
    remove_step_checkpoints,
    save_checkpoint,
)
from common.distributed import model_state_dict, unwrap
from common.state import CheckpointWriteError, LoopState, Resumable, RunAbortedError, StopRequest

if TYPE_CHECKING:
    from common.trainer import RunContext

log = logging.getLogger("rl_lab")


@dataclass
class Checkpointer:
    """Writes the run's checkpoints: the state is gathered from every rank, rank 0 writes it
    (common.checkpoint.save_checkpoint: atomic, finite only) and prunes the older step checkpoints.

    A write that fails, whatever raised (a full disk; a folder gone read-only, where the tokenizer's
    save raises a bare Exception; a NaN in the state), stops the run with a CheckpointWriteError
    naming the folder and the last checkpoint, which the failed write left intact: a run that can no
    longer save would otherwise train on with nothing to resume from.
    """

    ctx: RunContext
    resumable: Resumable
    loop: LoopState
    t_start: float
    stop: StopRequest | None = None  # a signal during a write lets it finish

    def save(self, name: str, model_only: bool = False, snapshot: dict[str, Any] | None = None) -> Path:
        """Checkpoint `name` of the state after loop.step (model_only: the policy alone, what
        scripts/eval.py reads; a resume from it stops); `snapshot`: Resumable.snapshot's RNG, data
        and algorithm state instead of the current ones. Data parallel: a collective."""
        ctx, loop = self.ctx, self.loop
        loop.wall_s = time.perf_counter() - self.t_start
        state = (
            {"step": loop.step, MODEL_ONLY: True}
            if model_only
            else self.resumable.state_dict(loop, ctx.logger.wandb_run_id if ctx.logger else None, snapshot)
        )
        weights = model_state_dict(ctx.model, ctx.dist) if ctx.dist.shards_params else None  # all ranks
        path, error = ctx.run_dir / "checkpoints" / name, None
        if ctx.dist.is_main:
            try:
                writing = self.stop.writing() if self.stop is not None else contextlib.nullcontext()
                with writing:
                    save_checkpoint(
                        path, model=unwrap(ctx.model), tokenizer=ctx.tokenizer, state=state, weights=weights
                    )
                    prune_checkpoints(ctx.run_dir, path, ctx.settings.trainer.keep_last_checkpoints)
            except Exception as err:  # whatever the failure, the previous checkpoint is intact
                error = err
        if ctx.dist.any(error is not None):
            raise CheckpointWriteError(path, error, find_latest(ctx.run_dir)) from error
        return path


def check_bad_steps(saver: Checkpointer, step: int) -> None:
    """Raise RunAbortedError once trainer.max_bad_steps steps in a row had no finite update. Their
    updates were skipped or undone, so the state is the last good one: it is saved, or, should it
    hold a non-finite value after all, the last checkpoint written is named instead."""
    loop = saver.loop
    if loop.bad_steps < saver.ctx.settings.trainer.max_bad_steps:
        return
    why = f"non-finite loss, gradient or update in {loop.bad_steps} steps in a row (trainer.max_bad_steps)"
    try:
        path = saver.save(f"step_{step}")
    except CheckpointWriteError as err:
        raise RunAbortedError(f"{why}; {err}", err.path) from err
    raise RunAbortedError(f"{why}; the last good state is saved in {path}", path)


def check_eval_reward_errors(saver: Checkpointer, step: int, metrics: dict[str, float]) -> None:
    """trainer.fail_on_reward_error in held-out evaluation as in training: a reward error there
    (eval/reward_errors > 0) saves the state after `step` and raises RunAbortedError."""
    errors = metrics.get("eval/reward_errors", 0)
    if not (errors and saver.ctx.settings.trainer.fail_on_reward_error):
        return
    path = saver.save(f"step_{step}")
    raise RunAbortedError(
        f"step {step}: held-out evaluation: the reward function failed on {errors} prompt(s) (the first in "
        f"the warning above; trainer.fail_on_reward_error); the state after step {step} is saved in {path}",
        path,
    )


def save_final(ctx: RunContext, path: Path, step: int) -> None:
    """After the final checkpoint (at `path`) is written: delete the step checkpoints it supersedes,
    which exist to resume a run that did not finish (unless trainer.keep_step_checkpoints), and log
    where the policy is and what the run folder takes on disk."""
    if not ctx.dist.is_main:
        return
    settings, run_dir = ctx.settings, ctx.run_dir
    if not settings.trainer.keep_step_checkpoints:
        remove_step_checkpoints(run_dir, up_to=step)
    log.info(
        "final policy saved to %s%s", path, " (weights only)" if settings.trainer.save_only_model else ""
    )
    log.info("the run folder %s takes %.1f MB on disk", run_dir, disk_bytes(run_dir) / 1e6)
