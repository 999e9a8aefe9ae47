"""Evaluation: greedy pass@1 on held-out prompts, split over data-parallel ranks."""

from __future__ import annotations

import logging

from common.distributed import SINGLE, DistContext
from common.rewards import score_responses
from common.rollout.engine import RolloutEngine
from common.tasks import Example, Task

log = logging.getLogger("rl_lab")


def evaluate(
    engine: RolloutEngine,
    task: Task,
    examples: list[Example],
    format_weight: float,
    chunk: int = 32,
    dist: DistContext = SINGLE,
) -> dict[str, float]:
    """Greedy pass@1 on held-out prompts: accuracy (mean correctness), mean reward, format rate, length,
    and eval/reward_errors, the number of prompts whose reward function raised or returned no valid
    score (scored 0, as in training; the first is described in a warning).

    Data parallel: each rank decodes every W-th example (a collective: every rank calls it), and
    the means are over all examples, so the result is the one-process evaluation's in 1/W the time.
    """
    sums = {"eval/accuracy": 0.0, "eval/reward": 0.0, "eval/format": 0.0, "eval/response_length": 0.0}
    errors: list[str] = []
    mine = examples[dist.rank :: dist.world_size]
    for start in range(0, len(mine), chunk):
        part = mine[start : start + chunk]
        rollout = engine.sample([e.prompt for e in part], group_size=1, do_sample=False)
        result = score_responses(task, rollout.responses, part, format_weight=format_weight)
        sums["eval/accuracy"] += result.correct.sum().item()
        sums["eval/reward"] += result.total.sum().item()
        sums["eval/format"] += result.format.sum().item()
        sums["eval/response_length"] += rollout.lengths.float().sum().item()
        errors += result.error_messages
    if errors:
        log.warning("held-out evaluation: %d reward error(s); the first: %s", len(errors), errors[0])
    per_rank = dist.gather_objects({**sums, "eval/reward_errors": len(errors)})
    metrics = {key: sum(s[key] for s in per_rank) / len(examples) for key in sums}
    metrics["eval/reward_errors"] = sum(s["eval/reward_errors"] for s in per_rank)  # a count, not a mean
    return metrics
