"""Evaluation on held-out prompts, split over data-parallel ranks: greedy pass@1 (`evaluate`) and,
beside it, the sampled mean@k (`mean_at_k`)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from common.config import RunSettings, TrainerConfig
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


@contextlib.contextmanager
def sampling_temperature(engine: RolloutEngine, temperature: float) -> Iterator[None]:
    """The engine samples at `temperature` inside the block (every engine reads engine.temperature
    when it samples), and at its own again after it."""
    own = engine.temperature
    engine.temperature = temperature
    try:
        yield
    finally:
        engine.temperature = own


def mean_at_k(
    engine: RolloutEngine,
    task: Task,
    examples: list[Example],
    k: int,
    temperature: float,
    seed: int,
    chunk: int = 32,
    dist: DistContext = SINGLE,
) -> float:
    """mean@k: the mean correctness of k responses sampled per held-out prompt (verl's validation
    metric mean@k, with rollout.val_kwargs.n = k and do_sample), over len(examples) * k responses.

    Its binomial standard error is about sqrt(p (1 - p) / (n k)) where greedy pass@1's is
    sqrt(p (1 - p) / n) (n prompts; less in practice, as a prompt's k responses are correlated).
    Sampling draws from a generator seeded with `seed`, forked from the training RNG, which is left
    as it was: the evaluation neither shifts the training run nor depends on where in it it stands,
    so two policies evaluated with the same seed see the same random numbers.

    Data parallel: as `evaluate`, each rank samples every W-th example (a collective).
    """
    mine = examples[dist.rank :: dist.world_size]
    prompts_per_call = max(1, chunk // k)  # about `chunk` rows per batched decode
    correct = 0.0
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), sampling_temperature(engine, temperature):
        torch.manual_seed(seed)
        for start in range(0, len(mine), prompts_per_call):
            part = mine[start : start + prompts_per_call]
            rollout = engine.sample([e.prompt for e in part], group_size=k)  # rows [q1]*k + [q2]*k + ...
            expanded = [e for e in part for _ in range(k)]
            result = score_responses(task, rollout.responses, expanded, format_weight=0.0)
            correct += result.correct.sum().item()
    return sum(dist.gather_objects(correct)) / (len(examples) * k)


def evaluation_due(trainer: TrainerConfig, step: int, tokens_before: int, tokens: int, last: bool) -> bool:
    """Whether the held-out evaluation runs after `step`, which took the run's generated tokens
    (sampling/tokens_total) from `tokens_before` to `tokens`: at step 0 and at the `last` step (the
    step or token budget reached), every trainer.eval_every steps, and at the first step whose
    tokens cross each multiple of trainer.eval_every_tokens (one evaluation if a step crosses two).
    The token points are the same for every run, whatever it generates per step, so curves of
    arms that sample differently align on the token axis (each point late by less than one step).

    Example (eval_every_tokens=1000): steps that end at 640, 1310, 1950 and 2020 tokens evaluate
    after 1310 (1310 // 1000 = 1 > 640 // 1000 = 0) and 2020 (2 > 1), not after 640 or 1950.
    """
    if not trainer.evaluates:
        return False
    every, every_tokens = trainer.eval_every, trainer.eval_every_tokens
    by_steps = every > 0 and step % every == 0
    by_tokens = every_tokens is not None and tokens // every_tokens > tokens_before // every_tokens
    return step == 0 or last or by_steps or by_tokens


def held_out_metrics(
    engine: RolloutEngine,
    task: Task,
    examples: list[Example],
    settings: RunSettings,
    dist: DistContext = SINGLE,
) -> dict[str, float]:
    """One held-out evaluation: greedy pass@1 (`evaluate`: eval/accuracy, ...) and, with
    trainer.eval_num_samples = k > 0, eval/mean_at_k (`mean_at_k` at trainer.eval_temperature, seeded
    with the run's seed). Data parallel: a collective."""
    trainer = settings.trainer
    metrics = evaluate(engine, task, examples, settings.reward.format_weight, dist=dist)
    if trainer.eval_num_samples > 0:
        metrics["eval/mean_at_k"] = mean_at_k(
            engine,
            task,
            examples,
            trainer.eval_num_samples,
            trainer.eval_temperature,
            settings.seed,
            dist=dist,
        )
    return metrics
