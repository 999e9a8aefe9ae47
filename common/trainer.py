"""The one training loop: rollout -> reward -> advantage -> update -> log -> checkpoint.

Every algorithm (grpo/, dapo/, ppo/) runs through `train`. Differences enter only through the
algorithm object (typed by the protocol common.algorithm.Algorithm), PPO's `Critic`, and the optional
dynamic sampling functions (`group_filter`: DAPO Eq. 11; `flat_groups`: the resample mode), so the
rollout and reward code is identical under all three and differences in results are the algorithm's.

This module is the loop itself, to be read top to bottom; each concern it calls lives in a module
named for it: common/sampling.py (prompt stream, scored rollouts, dynamic sampling),
common/update.py (log-prob passes, micro-batches, gradient accumulation, optimizer steps),
common/finite.py (non-finite steps undone), common/evaluation.py (held-out pass@1 and mean@k),
common/state.py (what a checkpoint carries, Ctrl-C), common/checkpoint.py (writing and finding them),
common/run_checkpoints.py (the loop's checkpoint writes and the stops that save one).
What is fixed for a run (models, optimizers, engine, task, settings, ...) travels as one frozen
`RunContext`, built once in scripts/train.py.

Batch vocabulary (N = rows, T = response tokens; rows grouped as [q1]*G + [q2]*G + ...):
    input_ids, attention_mask (N, P+T)   prompt (left-padded) + response (right-padded)
    response_mask (N, T)                 1 on response tokens through EOS
    loss_mask (N, T)                     tokens that enter the loss (DAPO overlong filtering zeroes rows)
    rewards (N,)                         task reward + shaping terms: what the advantages see
    group_index (N,)                     group id per row (ragged groups allowed)
    advantages (N,) or (N, T)
    old_logprob, ref_logprob, values (N, T)   only when needed
    returns, token_rewards (N, T)             PPO
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from common.algorithm import Algorithm
from common.config import RunSettings, TrainerConfig
from common.distributed import (
    SINGLE,
    DistContext,
    gathered,
    reduce_metrics,
    train_state_bytes,
    unwrap,
)
from common.evaluation import evaluation_due, held_out_metrics
from common.logging import RunLogger, peak_rss_mb
from common.rewards import RewardError
from common.rollout.engine import RolloutEngine
from common.rollout.sampler import NonFiniteLogitsError
from common.run_checkpoints import Checkpointer, check_bad_steps, check_eval_reward_errors, save_final
from common.sampling import FlatGroups, GroupFilter, PromptStream, Samples, collect
from common.state import (
    LoopState,
    Resumable,
    RunAbortedError,
    RunInterruptedError,
    StopRequest,
)
from common.tasks import Example, Task
from common.update import Critic, add_logprobs_and_values, update_policy

log = logging.getLogger("rl_lab")


@dataclass(frozen=True)
class RunContext:
    """What one run is made of, fixed from its first step to its last; built once in scripts/train.py.

    Data parallel (`dist`): `model` (and the critic's model) are DDP-wrapped or FSDP-sharded; the
    engine and the reference hold the plain modules (FSDP: the same, sharded, module; the
    reference sharded). Only rank 0 has a `logger` (others None) and writes checkpoints.
    """

    model: torch.nn.Module
    tokenizer: Any
    reference: torch.nn.Module | None
    engine: RolloutEngine
    algo: Algorithm
    task: Task
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    logger: RunLogger | None
    settings: RunSettings
    run_dir: Path
    device: torch.device
    group_filter: GroupFilter | None = None
    flat_groups: FlatGroups | None = None
    critic: Critic | None = None
    dist: DistContext = SINGLE
    precision: dict[str, Any] | None = None  # common.precision's choice, carried in every checkpoint


def rollout_metrics(samples: Samples, group_size_hint: int) -> dict[str, float]:
    """reward/kept_<term> means and response statistics of one step's training batch: what the
    update sees, after any dynamic-sampling filter (the reward of everything sampled is
    reward/<term>, from common.sampling.sampled_reward_metrics)."""
    r = samples.rollout
    metrics = {f"reward/kept_{k}": v.float().mean().item() for k, v in samples.terms.items()}
    metrics["reward/errors"] = samples.errors
    lengths = r.lengths.float()
    metrics.update(
        {
            "rollout/response_length": lengths.mean().item(),
            "rollout/response_length_max": lengths.max().item(),
            "rollout/truncated_frac": r.truncated.float().mean().item(),
            "rollout/num_sequences": float(len(r.responses)),
            "rollout/group_size": float(group_size_hint),
        }
    )
    return metrics


def sample_rows(samples: Samples, n: int) -> list[dict[str, Any]]:
    """The first n completions of the step (whole groups first), for samples.jsonl and the W&B table."""
    rows = []
    for i in range(min(n, len(samples.examples))):
        rows.append(
            {
                "prompt": samples.examples[i].prompt,
                "response": samples.rollout.responses[i],
                "answer": samples.examples[i].answer,
                "extracted": samples.extracted[i],
                "correct": samples.terms["correct"][i].item(),
                "format": samples.terms["format"][i].item(),
                "reward": samples.terms["total"][i].item(),
            }
        )
    return rows


def build_batch(samples: Samples, algo: Algorithm, device: torch.device) -> dict[str, Any]:
    """Tensors of the training batch (see the module docstring), on `device`."""
    r = samples.rollout
    batch = {
        "input_ids": r.input_ids.to(device),
        "attention_mask": r.attention_mask.to(device),
        "response_mask": r.response_mask.to(device),
        "loss_mask": algo.loss_mask(r.response_mask, r.truncated).to(device),
        "rewards": samples.terms["total"].to(device),
        "group_index": r.group_index.to(device),
        "lengths": r.lengths.to(device),
        "prompt_len": r.prompt_len,
    }
    if r.rollout_logprob is not None:  # the engine's own log-probs: rollout correction and mismatch
        batch["rollout_logprob"] = r.rollout_logprob.to(device)
    return batch


def train_step(
    ctx: RunContext,
    step: int,
    stream: PromptStream,
    generator: torch.Generator,
    tokens_left: int | None = None,
) -> tuple[Samples | None, dict[str, float]]:
    """One step: rollout -> reward -> log-probs -> advantages -> update. Returns the step's batch
    (None when dynamic sampling kept nothing and the update was skipped) and this rank's metrics.
    `tokens_left`: what the token budget has left (None: no budget); the rollout stops there
    (common.sampling.sample_within_budget), so the run's last step may hold fewer prompts."""
    algo, dist, model = ctx.algo, ctx.dist, ctx.model
    t0 = time.perf_counter()
    # 1. rollout + reward (+ dynamic sampling): rows grouped [q1]*G + [q2]*G + ...
    with gathered([model], dist):  # ranks decode different numbers of tokens
        samples, metrics = collect(
            ctx.engine,
            ctx.task,
            stream,
            algo,
            ctx.settings,
            ctx.group_filter,
            ctx.flat_groups,
            dist,
            tokens_left,
        )
    t_rollout = time.perf_counter()
    metrics["perf/rollout_s"] = t_rollout - t0
    if dist.any(samples is None):  # every rank skips the update together (DDP)
        if samples is not None:
            log.warning("dynamic sampling kept no group on another rank: update skipped on all ranks")
        return None, metrics
    batch = build_batch(samples, algo, ctx.device)
    # 2. log-probs: behaviour policy (only when the batch is reused or the rollout corrected), reference
    # (only with KL), values; the rollout's mismatch against the behaviour policy
    temperature = ctx.engine.temperature
    metrics.update(
        add_logprobs_and_values(
            batch, model, ctx.reference, ctx.critic, algo, ctx.settings, temperature, ctx.device, dist
        )
    )
    t_logprob = time.perf_counter()
    # 3. advantages (and, for PPO, returns and KL-shaped token rewards)
    metrics.update(algo.compute_advantages(batch, reduce=dist.sum))  # PPO: global whitening, KL
    # 4. policy (and critic) update; during critic warm-up only the critic steps
    update_actor = ctx.critic is None or step > ctx.critic.warmup_steps
    optimizer = ctx.optimizer if update_actor else None
    metrics.update(
        update_policy(
            model,
            optimizer,
            ctx.scheduler,
            algo,
            batch,
            ctx.settings,
            temperature,
            generator,
            ctx.critic,
            dist,
        )
    )
    if ctx.engine.syncs_weights:  # a separate generation engine (vLLM) gets the new weights
        with gathered([model], dist):
            ctx.engine.sync_weights(unwrap(model))
    t_update = time.perf_counter()
    metrics.update(rollout_metrics(samples, algo.group_size))
    metrics.update(perf_metrics(ctx, samples, [t0, t_rollout, t_logprob, t_update]))
    return samples, metrics


def perf_metrics(ctx: RunContext, samples: Samples, times: list[float]) -> dict[str, float]:
    """perf/: memory, the step's phases (times = start, rollout done, log-probs done, update done)
    and the rollout's throughput."""
    t0, t_rollout, t_logprob, t_update = times
    critic = ctx.critic
    state_bytes = train_state_bytes(
        [ctx.model, ctx.reference, critic and critic.model], [ctx.optimizer, critic and critic.optimizer]
    )
    return {
        "perf/train_state_mb": state_bytes / 2**20,
        "perf/peak_rss_mb": peak_rss_mb(),
        "perf/logprob_s": t_logprob - t_rollout,
        "perf/update_s": t_update - t_logprob,
        "perf/step_s": t_update - t0,
        "perf/rollout_tokens_per_s": int(samples.rollout.lengths.sum()) / max(t_rollout - t0, 1e-9),
    }


def step_summary(step: int, max_steps: int, metrics: dict[str, float]) -> str:
    """The one-line console summary of a step."""
    if "rollout/response_length" not in metrics:
        return f"Step {step}/{max_steps} | no group kept by dynamic sampling: update skipped"
    line = (
        f"Step {step}/{max_steps} | reward {metrics['reward/total']:.3f} "
        f"| correct {metrics['reward/correct']:.3f} | len {metrics['rollout/response_length']:.1f} "
        f"| {metrics['perf/step_s']:.1f}s"
    )
    if "eval/accuracy" in metrics:
        line += f" | eval accuracy {metrics['eval/accuracy']:.3f}"
    return line


def evaluate_if_due(
    ctx: RunContext, examples: list[Example], loop: LoopState, tokens_before: int = 0, last: bool = False
) -> dict[str, float]:
    """Held-out evaluation after the step `loop` has just counted, when `evaluation_due`; {} when
    not. Greedy pass@1 (eval/accuracy, ...), the sampled eval/mean_at_k with trainer.eval_num_samples
    > 0, and eval/tokens, the generated tokens at which it ran. Data parallel: a collective, every
    rank decodes its share of the prompts."""
    settings = ctx.settings
    if not (examples and evaluation_due(settings.trainer, loop.step, tokens_before, loop.tokens_total, last)):
        return {}
    t = time.perf_counter()
    with gathered([ctx.model], ctx.dist):  # every rank decodes its share of the held-out prompts
        try:
            metrics = held_out_metrics(ctx.engine, ctx.task, examples, settings, ctx.dist)
        except NonFiniteLogitsError as err:
            raise RunAbortedError(f"step {loop.step}: held-out evaluation: {err}") from err
    metrics["eval/tokens"] = loop.tokens_total
    metrics["perf/eval_s"] = time.perf_counter() - t
    return metrics


def advance(loop: LoopState, step: int, metrics: dict[str, float], t_start: float) -> dict[str, float]:
    """Count the finished step into the loop's counters; the metrics gain the totals and the wall
    clock (the compute axis counts every generated sample and token, kept or dropped; the update
    budget counts the policy's optimizer steps)."""
    loop.step = step
    loop.samples_total += metrics["sampling/samples"]
    loop.tokens_total += metrics["sampling/tokens"]
    loop.policy_updates_total += int(metrics.get("policy/optimizer_steps", 0))  # 0: update skipped
    metrics["sampling/samples_total"] = loop.samples_total
    metrics["sampling/tokens_total"] = loop.tokens_total
    metrics["policy/optimizer_steps_total"] = loop.policy_updates_total
    metrics["perf/wall_s"] = time.perf_counter() - t_start
    return metrics


def log_step(ctx: RunContext, step: int, samples: Samples | None, metrics: dict[str, float]) -> None:
    """metrics.jsonl / W&B (rank 0), the sample table every trainer.log_samples_every steps, the
    console line, and a warning for reward functions that raised."""
    settings, logger = ctx.settings, ctx.logger
    if samples is not None and samples.errors:
        log.warning("step %d: %d reward errors, e.g. %s", step, samples.errors, samples.error_messages[0])
    if logger:
        logger.log(step, metrics)
    if (
        logger
        and samples is not None
        and settings.trainer.log_samples_every > 0
        and step % settings.trainer.log_samples_every == 0
    ):
        logger.log_samples(step, sample_rows(samples, settings.trainer.num_samples_logged))
    if ctx.dist.is_main:
        tqdm.write(step_summary(step, settings.trainer.max_steps, metrics))


def failed_update(samples: Samples | None, metrics: dict[str, float]) -> bool:
    """Every update of the step was skipped or undone as non-finite (a step without samples did not try)."""
    return (
        samples is not None and metrics["policy/skipped_updates"] > 0 and math.isnan(metrics["policy/loss"])
    )


def train(ctx: RunContext, resume_state: dict[str, Any] | None = None) -> dict[str, float]:
    """Run until the budget is spent (see `finished`: trainer.max_steps steps or
    trainer.max_generated_tokens tokens); returns the last step's metrics (with its evaluation).

    `resume_state` is a checkpoint's trainer state (its weights already loaded into `ctx.model`):
    the run continues after the checkpoint's step with the same RNG streams, data order and
    optimizer. Raises RunInterruptedError after Ctrl-C or a signal of trainer.checkpoint_signals (the
    step in flight finishes and is checkpointed; one during a checkpoint write lets it finish);
    RunAbortedError after trainer.max_bad_steps steps in a row without a finite
    update (`check_bad_steps`) or, with trainer.fail_on_reward_error, a reward function that raised
    (the state after the previous step is checkpointed); CheckpointWriteError when a checkpoint
    cannot be written (`Checkpointer`). At the end the final checkpoint is written (the policy
    weights only with trainer.save_only_model) and the step checkpoints it supersedes are deleted
    (unless trainer.keep_step_checkpoints).

    Data parallel (`ctx.dist`): every rank runs this loop with its DDP-wrapped model; metrics are
    reduced over ranks, evaluation is split over them, and only rank 0 (whose logger is the only
    one) logs and writes checkpoints.
    """
    settings, dist, logger = ctx.settings, ctx.dist, ctx.logger
    stream = PromptStream(ctx.task.train, settings.seed)
    eval_examples = ctx.task.test[: settings.trainer.eval_num_prompts]
    generator = torch.Generator().manual_seed(settings.seed)
    prepack = getattr(ctx.engine, "prepack", None)  # the decode engine's kernel choice
    resumable = Resumable(
        ctx.model,
        ctx.optimizer,
        ctx.scheduler,
        stream,
        ctx.algo,
        ctx.critic,
        generator,
        dist,
        precision=ctx.precision,
        prepack=prepack,
    )
    loop = LoopState() if resume_state is None else resumable.load_state_dict(resume_state)
    if resume_state is not None:
        log.info("resumed after step %d", loop.step)
    last_metrics: dict[str, float] = {}
    with StopRequest(settings.trainer.checkpoint_signals) as stop, progress_bar(ctx, loop.step) as progress:
        saver = Checkpointer(ctx, resumable, loop, time.perf_counter() - loop.wall_s, stop)
        # a resumed run logged its step 0 already (a checkpoint at step 0 is a failed first step's)
        initial = evaluate_if_due(ctx, eval_examples, loop) if resume_state is None else {}
        if initial and logger:
            logger.log(0, initial)
            tqdm.write(f"Step 0/{settings.trainer.max_steps} | eval accuracy {initial['eval/accuracy']:.3f}")
        check_eval_reward_errors(saver, 0, initial)
        while not finished(loop, settings.trainer):
            step = loop.step + 1
            before = resumable.snapshot()  # a failing reward checkpoints the state after the last step
            left = tokens_left(loop, settings.trainer)
            try:
                samples, metrics = train_step(ctx, step, stream, generator, left)
            except RewardError as err:
                path = saver.save(f"step_{loop.step}", snapshot=before)
                raise RunAbortedError(
                    f"step {step}: {err}; the state after step {loop.step} is saved in {path}", path
                ) from err
            except NonFiniteLogitsError as err:  # nothing to sample from: no checkpoint of such a policy
                raise RunAbortedError(f"step {step}: {err}") from err
            tokens_before = loop.tokens_total
            metrics = advance(loop, step, reduce_metrics(metrics, dist), saver.t_start)
            last = finished(loop, settings.trainer)
            metrics.update(evaluate_if_due(ctx, eval_examples, loop, tokens_before, last))
            progress.update(1)
            log_step(ctx, step, samples, metrics)
            check_eval_reward_errors(saver, step, metrics)
            last_metrics = metrics
            # 5. faults: a step whose every update was non-finite changed nothing; K in a row end the run
            loop.bad_steps = loop.bad_steps + 1 if failed_update(samples, metrics) else 0
            check_bad_steps(saver, step)
            if dist.any(stop.requested) and not last:
                raise RunInterruptedError(step, saver.save(f"step_{step}"), stop.signum)
            if settings.trainer.save_every > 0 and step % settings.trainer.save_every == 0 and not last:
                saver.save(f"step_{step}")
        if loop.step < settings.trainer.max_steps:
            log.info(
                "token budget reached: %d generated tokens after step %d (trainer.max_generated_tokens=%d)",
                loop.tokens_total,
                loop.step,
                settings.trainer.max_generated_tokens,
            )
        # inside the signal handlers: a signal now lets the final checkpoint finish
        save_final(ctx, saver.save("final", model_only=settings.trainer.save_only_model), loop.step)
    return last_metrics


def tokens_left(loop: LoopState, trainer: TrainerConfig) -> int | None:
    """What trainer.max_generated_tokens leaves after the steps done (None: no token budget)."""
    budget = trainer.max_generated_tokens
    return None if budget is None else budget - loop.tokens_total


def finished(loop: LoopState, trainer: TrainerConfig) -> bool:
    """The run's budget is spent: trainer.max_steps steps, or trainer.max_generated_tokens tokens
    generated (every sampled token, kept or dropped: sampling/tokens_total), whichever comes first.
    The step that reaches the token budget is its last: it samples only what the budget has left
    (common.sampling.sample_within_budget), so the run ends past the budget by less than one
    group's rollout.max_new_tokens x G tokens."""
    left = tokens_left(loop, trainer)
    return loop.step >= trainer.max_steps or (left is not None and left <= 0)


def progress_bar(ctx: RunContext, initial: int) -> tqdm:
    """The run's step bar (rank 0 only), starting at `initial` steps done."""
    return tqdm(
        total=ctx.settings.trainer.max_steps,
        initial=initial,
        desc=ctx.algo.name,
        unit="step",
        dynamic_ncols=True,
        disable=not ctx.dist.is_main,
    )
