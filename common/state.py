"""What lets a run stop between two steps and resume exactly: the state a checkpoint carries
besides the policy weights (`Resumable`: optimizers, scheduler, RNG streams, data position,
algorithm state; `LoopState`: the loop's counters), and the stop request of Ctrl-C and the
checkpoint signals (trainer.checkpoint_signals).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.algorithm import Algorithm
from common.checkpoint import CheckpointError
from common.distributed import (
    SINGLE,
    DistContext,
    DistributedError,
    load_model_state_dict,
    load_optimizer_state_dict,
    model_state_dict,
    optimizer_state_dict,
)
from common.rollout.prepack import PrepackPolicy
from common.sampling import PromptStream
from common.update import Critic

log = logging.getLogger("rl_lab")


class RunInterruptedError(Exception):
    """Ctrl-C or a checkpoint signal (`StopRequest`): the current step was finished and checkpointed
    at `path`; `signum` is the signal that asked for it."""

    def __init__(self, step: int, path: Path, signum: int | None = None) -> None:
        super().__init__(f"interrupted after step {step}; checkpoint saved to {path}")
        self.step, self.path, self.signum = step, path, signum


class RunAbortedError(RuntimeError):
    """The run cannot go on (e.g. non-finite losses step after step, a checkpoint that cannot be
    written, a reward function that raised under trainer.fail_on_reward_error); `path` is the
    checkpoint it can resume from, if any."""

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


class CheckpointWriteError(RunAbortedError):
    """A checkpoint could not be written (a full disk, a folder gone read-only, a non-finite state):
    the run stops; `path` is the last checkpoint, which the failed write left intact."""

    def __init__(self, target: Path, error: BaseException | None, last: Path | None) -> None:
        if error is None:
            cause = "the write failed on rank 0"
        elif isinstance(error, CheckpointError):
            cause = str(error)
        else:
            lines = str(error).strip().splitlines()
            cause = f"{type(error).__name__}: {lines[0] if lines else ''}"
        super().__init__(
            f"checkpoint {target.name} not written to {target.parent}: {cause}; "
            f"the last checkpoint is {last or 'none'}",
            last,
        )


class StopRequest:
    """First Ctrl-C or checkpoint signal (trainer.checkpoint_signals: SIGTERM, SIGUSR1, ...): finish the
    current step, checkpoint, stop. A second one stops at once, except while a checkpoint is written
    (`writing`): the write finishes first, so a signal never leaves a run without its checkpoint.

    A step is never cut in half, so the checkpoint is exactly the state after a completed step and
    a resumed run continues as if nothing had happened.
    """

    def __init__(self, signals: Sequence[str] = ("SIGTERM",)) -> None:
        self.signals = dict.fromkeys((signal.SIGINT, *(signal.Signals[name] for name in signals)))
        self.requested = False
        self.signum: int | None = None  # the first signal received
        self._writing = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested and self._writing:
            log.warning("%s received: the checkpoint being written is finished first", name)
        elif self.requested:
            raise KeyboardInterrupt
        else:
            self.requested, self.signum = True, signum
            log.warning("%s received: stopping after this step (again to stop now)", name)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """A checkpoint write: no signal cuts it short."""
        self._writing = True
        try:
            yield
        finally:
            self._writing = False

    def __enter__(self) -> StopRequest:
        for sig in self.signals:
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


@dataclass
class LoopState:
    """Counters that a resumed run continues from."""

    step: int = 0
    samples_total: int = 0
    tokens_total: int = 0
    policy_updates_total: int = 0
    wall_s: float = 0.0
    bad_steps: int = 0


@dataclass
class Resumable:
    """The objects whose state a checkpoint carries besides the policy weights."""

    model: torch.nn.Module  # the trained policy (DDP- or FSDP-wrapped under data parallel)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    stream: PromptStream
    algo: Algorithm
    critic: Critic | None
    generator: torch.Generator
    dist: DistContext = SINGLE
    precision: dict[str, Any] | None = None  # trainer.bf16 / rollout.dtype as resolved (common.precision)
    prepack: PrepackPolicy | None = None  # the decode engine's kernel choice, kept for the whole run

    def _rng_state(self) -> dict[str, Any]:
        return {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "update": self.generator.get_state(),
        }

    def _rollout_state(self) -> dict[str, Any]:
        return {
            "rng": self._rng_state(),
            "data": self.stream.state_dict(),
            "algorithm": self.algo.state_dict(),
        }

    def snapshot(self) -> dict[str, Any]:
        """What a rollout changes (the RNG streams, the data position, the algorithm's state), copied:
        a few kB, taken at the start of each step, so a checkpoint written after a failed rollout
        (`state_dict(..., snapshot=...)`) is exactly the state after the previous step."""
        return copy.deepcopy(self._rollout_state())

    def state_dict(
        self, loop: LoopState, run_id: str | None, snapshot: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Everything but the policy weights that an exact resume needs; the RNG streams, data
        position and algorithm state from `snapshot` when given. Data parallel: a collective (every
        rank calls it; sharded optimizer states are gathered to rank 0); "rank_rng" holds each
        rank's sampling RNG streams."""
        now = snapshot or self._rollout_state()
        state = {
            "step": loop.step,
            "loop": vars(loop).copy(),
            "optimizer": optimizer_state_dict(self.model, self.optimizer, self.dist),
            "scheduler": self.scheduler.state_dict(),
            "rng": now["rng"],
            "rank_rng": self.dist.gather_objects(now["rng"]),
            "data": now["data"],
            "algorithm": now["algorithm"],
            "wandb_run_id": run_id,
            "precision": self.precision,
        }
        if self.prepack is not None:
            state["rollout"] = self.prepack.state_dict()
        if self.critic is not None:
            state["critic"] = model_state_dict(self.critic.model, self.dist)
            state["critic_optimizer"] = optimizer_state_dict(
                self.critic.model, self.critic.optimizer, self.dist
            )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> LoopState:
        """The inverse of `state_dict` (the policy weights are loaded by common.checkpoint), except
        the learning rates: the optimizers' groups keep the ones this run was configured with
        (optim.lr, critic.lr; `follow_learning_rates`), a resume's change of them applied."""
        policy_lrs = configured_lrs(self.optimizer)
        critic_lrs = configured_lrs(self.critic.optimizer) if self.critic is not None else []
        try:
            load_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
            if self.critic is not None:
                load_model_state_dict(self.critic.model, state["critic"])
                load_optimizer_state_dict(self.critic.model, self.critic.optimizer, state["critic_optimizer"])
        except DistributedError as err:
            raise CheckpointError(f"resume: {err}") from err
        self.scheduler.load_state_dict(state["scheduler"])
        follow_learning_rates(self.optimizer, policy_lrs, self.scheduler)
        if self.critic is not None:
            follow_learning_rates(self.critic.optimizer, critic_lrs)
        self.stream.load_state_dict(state["data"])
        self.algo.load_state_dict(state["algorithm"])
        if self.prepack is not None:
            self.prepack.load_state_dict(state.get("rollout", {}))
        rng = state["rng"]
        rank_rng = state.get("rank_rng") or [rng]
        if len(rank_rng) == self.dist.world_size:
            rng = rank_rng[self.dist.rank]
        elif self.dist.rank > 0:
            log.warning(
                "checkpoint written by %d processes, resumed on %d: rank %d reseeds its sampling",
                len(rank_rng),
                self.dist.world_size,
                self.dist.rank,
            )
            reseeded = torch.Generator().manual_seed(int(rng["torch"].sum()) + self.dist.rank)
            rng = {**rng, "torch": reseeded.get_state()}
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.generator.set_state(rng["update"])
        return LoopState(**state["loop"])


def configured_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """Each param group's base learning rate as built from the config (a scheduler keeps it in
    "initial_lr" and scales "lr" from it)."""
    return [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]


def follow_learning_rates(
    optimizer: torch.optim.Optimizer, lrs: list[float], scheduler: Any | None = None
) -> None:
    """Give `optimizer`'s groups the base learning rates `lrs` after a checkpoint's optimizer and
    scheduler states replaced them, at the scheduler's current step: lr = base x lambda(step) for a
    LambdaLR (the warm-up from the config), else the base itself.

    Example: base 1e-4, warm-up over 2 steps, scheduler at step 1: lr = 1e-4 x min(1, 2/2) = 1e-4.
    """
    lambdas = getattr(scheduler, "lr_lambdas", None)
    for i, (group, lr) in enumerate(zip(optimizer.param_groups, lrs, strict=True)):
        group["initial_lr"] = lr
        group["lr"] = lr * lambdas[i](scheduler.last_epoch) if lambdas else lr
    if scheduler is not None:
        scheduler.base_lrs = list(lrs)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr reads
