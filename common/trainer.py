"""The one training loop: rollout -> reward -> advantage -> update -> log -> checkpoint.

Every algorithm (grpo/, dapo/, ppo/) runs through `train`. Differences enter only through the
algorithm object (typed by the protocol common.algorithm.Algorithm), PPO's `Critic`, and the optional
dynamic sampling functions (`group_filter`: DAPO Eq. 11; `flat_groups`: the resample mode), so the
rollout and reward code is identical under all three and differences in results are the algorithm's.

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

import contextlib
import logging
import math
import random
import signal
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from common.algorithm import Algorithm
from common.checkpoint import CheckpointError, prune_checkpoints, save_checkpoint
from common.distributed import (
    SINGLE,
    DistContext,
    DistributedError,
    gathered,
    load_model_state_dict,
    load_optimizer_state_dict,
    model_state_dict,
    no_sync,
    optimizer_state_dict,
    reduce_metrics,
    scalar,
    train_state_bytes,
    unwrap,
)
from common.logging import RunLogger, peak_rss_mb
from common.losses import aggregation_denominator
from common.reward_fn import score_responses
from common.rollout import HFRollout, RolloutBatch, sequence_logprobs
from common.tasks import Example, Task

log = logging.getLogger("rl_lab")

# (rewards (N,), G) -> keep (n_groups,) bool: DAPO's filter_groups
GroupFilter = Callable[[torch.Tensor, int], torch.Tensor]
# (rewards (N,), group_index (N,)) -> ids of groups whose rewards are all equal: dapo.groups_to_resample
FlatGroups = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrainSettings:
    """Loop settings, built from cfg.trainer / cfg.optim / cfg.reward / cfg.dynamic_sampling in scripts/."""

    max_steps: int
    batch_size: int
    mini_batch_size: int
    micro_batch_size: int
    max_grad_norm: float
    format_weight: float
    eval_every: int
    eval_num_prompts: int
    log_samples_every: int
    num_samples_logged: int
    save_every: int
    fail_on_reward_error: bool
    max_num_gen_batches: int = 1
    max_samples: int = 0
    keep_last_checkpoints: int = 2
    max_bad_steps: int = 3
    bf16: bool = False
    seed: int = 0


@dataclass
class Critic:
    """PPO's value model with its own optimizer. For the first `warmup_steps` steps only the critic
    learns (the policy's optimizer does not step), so advantages start from sensible values."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    max_grad_norm: float
    warmup_steps: int = 0


class PromptStream:
    """Endless pass over the training examples, reshuffled each epoch with a seeded generator."""

    def __init__(self, examples: list[Example], seed: int) -> None:
        self.examples = examples
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[Example]:
        out = []
        while len(out) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.examples[self._order[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffle()


@dataclass
class Samples:
    """A scored rollout: the token batch, each row's example, and each reward term (N,)."""

    rollout: RolloutBatch
    examples: list[Example]
    terms: dict[str, torch.Tensor]
    extracted: list[str | None]
    errors: int = 0
    error_messages: list[str] = field(default_factory=list)

    def select(self, index: torch.Tensor) -> Samples:
        rows = index.nonzero().flatten() if index.dtype == torch.bool else index
        return Samples(
            rollout=self.rollout.select(rows),
            examples=[self.examples[i] for i in rows.tolist()],
            terms={k: v[rows] for k, v in self.terms.items()},
            extracted=[self.extracted[i] for i in rows.tolist()],
            errors=self.errors,
            error_messages=self.error_messages,
        )

    @staticmethod
    def concat(parts: list[Samples], offset_groups: bool = True) -> Samples:
        return Samples(
            rollout=RolloutBatch.concat([p.rollout for p in parts], offset_groups=offset_groups),
            examples=[e for p in parts for e in p.examples],
            terms={k: torch.cat([p.terms[k] for p in parts]) for k in parts[0].terms},
            extracted=[x for p in parts for x in p.extracted],
            errors=sum(p.errors for p in parts),
            error_messages=[m for p in parts for m in p.error_messages],
        )


def score_samples(
    task: Task, rollout: RolloutBatch, examples: list[Example], algo: Algorithm, settings: TrainSettings
) -> Samples:
    """Score every response of `rollout` against its own prompt; `examples` are the per-prompt
    examples, expanded here in the rollout's [q1]*G + [q2]*G + ... order."""
    G = len(rollout) // len(examples)
    expanded = [e for e in examples for _ in range(G)]  # prompts_expanded order
    result = score_responses(
        task,
        rollout.responses,
        expanded,
        format_weight=settings.format_weight,
        fail_fast=settings.fail_on_reward_error,
    )
    terms = {"correct": result.correct, "format": result.format}
    terms.update(algo.shape_rewards(rollout.lengths, rollout.truncated))
    # what the advantages see: the task's total (correct + weighted format) plus the shaping terms
    terms["total"] = result.total + sum(v for k, v in terms.items() if k not in ("correct", "format"))
    return Samples(rollout, expanded, terms, result.extracted, result.errors, result.error_messages)


def generate_and_score(
    engine: HFRollout,
    task: Task,
    examples: list[Example],
    algo: Algorithm,
    settings: TrainSettings,
    group_size: int | None = None,
) -> Samples:
    """Sample G responses per example in one batched call and score each against its own prompt."""
    rollout = engine.sample([e.prompt for e in examples], group_size=group_size or engine.group_size)
    return score_samples(task, rollout, examples, algo, settings)


def collect(
    engine: HFRollout,
    task: Task,
    stream: PromptStream,
    algo: Algorithm,
    settings: TrainSettings,
    group_filter: GroupFilter | None,
    flat_groups: FlatGroups | None = None,
    dist: DistContext = SINGLE,
) -> tuple[Samples | None, dict[str, float]]:
    """Roll out batch_size groups; with a group filter, refill until batch_size groups are kept;
    with `flat_groups`, grow all-equal groups instead (see `resample_flat_groups`).

    Data parallel: every rank takes the same global batch from the stream and rolls out its own
    contiguous share (batch_size / world_size prompts), so groups never span ranks and the stream
    stays in step on all ranks; with a filter, generation rounds go on until every rank is full.

    Dynamic sampling (DAPO Algorithm 1, lines 3-8): groups whose *task correctness* is all equal
    carry no signal (zero advantage) and are dropped. The filter reads the correctness term, not
    the shaped total: the paper filters "prompts with accuracy equal to 1 and 0" (verl makes it a
    setting). After max_num_gen_batches the step trains on what was kept (possibly fewer groups)
    instead of failing; with nothing kept it returns None and the step skips its update.
    """
    G = engine.group_size
    target = settings.batch_size // dist.world_size  # this rank's groups
    if group_filter is None:
        samples = generate_and_score(
            engine, task, dist.shard(stream.take(settings.batch_size)), algo, settings
        )
        stats: dict[str, float] = {"sampling/gen_batches": 1}
        if flat_groups is not None:
            samples, resample_stats = resample_flat_groups(engine, task, samples, algo, settings, flat_groups)
            stats.update(resample_stats)
        stats["sampling/samples"] = len(samples.rollout)
        stats["sampling/tokens"] = int(samples.rollout.lengths.sum())
        return samples, stats
    kept: list[Samples] = []
    n_kept = n_seen = n_generated = n_tokens = 0
    gen_batch = 0
    while gen_batch < settings.max_num_gen_batches:
        gen_batch += 1
        examples = dist.shard(stream.take(settings.batch_size))  # every rank advances the stream
        if n_kept < target:
            samples = generate_and_score(engine, task, examples, algo, settings)
            keep = group_filter(samples.terms["correct"], G)  # (n_prompts,)
            n_seen += keep.numel()
            n_generated += samples.rollout.input_ids.shape[0]
            n_tokens += int(samples.rollout.lengths.sum())
            take = keep.nonzero().flatten()[: target - n_kept]
            if take.numel():
                rows = (take.unsqueeze(1) * G + torch.arange(G)).flatten()  # group ids -> row ids
                kept.append(samples.select(rows))
                n_kept += take.numel()
        if not dist.any(n_kept < target):
            break
    stats = {
        "sampling/gen_batches": gen_batch,
        "sampling/samples": n_generated,
        "sampling/tokens": n_tokens,
        "sampling/groups_kept": n_kept,
        "sampling/groups_dropped": n_seen - n_kept,
        "sampling/kept_group_frac": n_kept / max(n_seen, 1),
    }
    if n_kept < target:
        log.warning(
            "dynamic sampling: %d of %d groups kept after %d generation batches (max_num_gen_batches); %s",
            n_kept,
            target,
            gen_batch,
            "training on the kept groups" if n_kept else "no group has mixed rewards, skipping this update",
        )
    return (Samples.concat(kept) if kept else None), stats


def resample_flat_groups(
    engine: HFRollout,
    task: Task,
    samples: Samples,
    algo: Algorithm,
    settings: TrainSettings,
    flat_groups: FlatGroups,
) -> tuple[Samples, dict[str, float]]:
    """Grow every group whose correctness rewards are all equal (std < 1e-6) by one response at a
    time, batched across such groups, until its rewards differ or it holds settings.max_samples.

    The design notes' dynamic sampling, an alternative to DAPO's filter: no prompt is dropped,
    but groups end up with unequal sizes. The new rows carry their group's id, so the advantages
    (common.advantage.compute_group_relative_advantages) see ragged groups. Like the filter, it
    reads the correctness term, not the shaped total.

    Example (G = 2, max_samples = 4): correctness [1, 1 | 0, 1] -> group 0 is flat, one more
    response for q1; if it scores 0 the groups are [1, 1, 0 | 0, 1] and sampling stops.
    """
    extra = rounds = 0
    while True:
        group_index = samples.rollout.group_index  # (N,)
        flat = flat_groups(samples.terms["correct"], group_index)  # group ids
        flat = flat[torch.bincount(group_index)[flat] < settings.max_samples]
        if flat.numel() == 0:
            break
        first_row = {g: i for i, g in reversed(list(enumerate(group_index.tolist())))}
        examples = [samples.examples[first_row[g]] for g in flat.tolist()]
        new = generate_and_score(engine, task, examples, algo, settings, group_size=1)
        new.rollout.group_index = flat.clone()  # the new responses join their groups
        samples = Samples.concat([samples, new], offset_groups=False)
        extra += len(examples)
        rounds += 1
    still_flat = flat_groups(samples.terms["correct"], samples.rollout.group_index).numel()
    return samples, {
        "sampling/extra_samples": extra,
        "sampling/resample_rounds": rounds,
        "sampling/flat_groups_left": still_flat,
    }


@torch.no_grad()
def batched_forward(
    forward: Callable[[dict[str, Any]], torch.Tensor], batch: dict[str, Any], micro_batch_size: int
) -> torch.Tensor:
    """Run `forward(micro_batch) -> (B, t)` over the batch in micro-batches; returns (N, T), zero-padded."""
    out = []
    for rows in torch.arange(batch["input_ids"].shape[0]).split(micro_batch_size):
        out.append(_pad_right(forward(micro_batch(batch, rows)), batch["response_mask"].shape[1]))
    return torch.cat(out)


def logprob_fn(model: torch.nn.Module, temperature: float) -> Callable[[dict[str, Any]], torch.Tensor]:
    """mb -> (B, T) log-probs of the taken tokens under `model`."""

    def forward(mb: dict[str, Any]) -> torch.Tensor:
        logprob, _ = sequence_logprobs(
            model,
            mb["input_ids"],
            mb["attention_mask"],
            mb["prompt_len"],
            temperature=temperature,
            prompt_groups=mb.get("group_index"),
        )
        return logprob

    return forward


def value_fn(critic: torch.nn.Module) -> Callable[[dict[str, Any]], torch.Tensor]:
    """mb -> (B, T) critic values V(s_t) at the response positions."""
    return lambda mb: critic(mb["input_ids"], mb["attention_mask"], mb["prompt_len"])


def _pad_right(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def micro_batch(batch: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """Rows of the batch, trimmed to the columns they use: leading all-padding prompt columns and
    trailing response columns past the longest response go, so short micro-batches cost less."""
    P = batch["prompt_len"]
    attention = batch["attention_mask"][rows]
    first = int(attention[:, :P].any(0).nonzero().min()) if attention[:, :P].any() else P
    T = int(batch["response_mask"][rows].sum(1).max().clamp(min=1))
    mb = {"prompt_len": P - first}
    for key, value in batch.items():
        if key == "prompt_len":
            continue
        if key in ("input_ids", "attention_mask"):
            mb[key] = value[rows, first : P + T]
        elif value.dim() == 2:
            mb[key] = value[rows, :T]
        else:
            mb[key] = value[rows]
    return mb


class WeightedMeans:
    """Token-weighted means of stats dicts; a NaN (an undefined stat, e.g. PPO's explained variance
    of constant returns) is left out of its key's mean instead of poisoning it."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)

    def add(self, stats: dict[str, float], weight: float) -> None:
        for key, value in stats.items():
            if math.isfinite(value):
                self.sums[key] += value * weight
                self.weights[key] += weight

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.weights[k] if self.weights[k] else float("nan") for k in self.sums}


def autocast(device: torch.device, bf16: bool) -> torch.autocast:
    """bfloat16 autocast on `device` when bf16 is set, else a no-op context."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def micro_batch_order(batch: dict[str, Any], rows: torch.Tensor) -> torch.Tensor:
    """`rows` longest response first: micro-batches of similar lengths carry little padding (and the
    first one fails fast if memory is short). Rows of one group that share a micro-batch also share
    their prompt's forward (sequence_logprobs)."""
    return rows[batch["response_mask"][rows].sum(1).argsort(descending=True, stable=True)]


def accumulate_gradients(
    model: torch.nn.Module,
    algo: Algorithm,
    batch: dict[str, Any],
    rows: torch.Tensor,
    micro_batch_size: int,
    temperature: float,
    critic: torch.nn.Module | None = None,
    bf16: bool = False,
    dist: DistContext = SINGLE,
) -> tuple[float, dict[str, float], float]:
    """Backward the loss of the mini-batch `rows` in micro-batches; gradients accumulate in .grad.

    Each micro-batch loss is normalised by the *mini-batch's* denominator (token count for
    token-mean, sequence count for the seq-mean modes), so the accumulated gradient equals the
    gradient of the whole mini-batch's loss, whatever the micro-batch size (DAPO Eq. 12 holds
    across micro-batches). With a critic (PPO) its values enter the same loss, so one backward
    fills both models' gradients. `bf16` runs the forward passes under bfloat16 autocast (the
    backward follows the forward's dtypes; log-probs and losses stay float32).

    Data parallel (`dist`, with `model` and `critic` wrapped in DDP): the denominator is summed over
    ranks, so it is the global mini-batch's; DDP averages gradients over the W ranks, so each
    rank's loss is scaled by W and the all-reduced gradient is the global loss's gradient:
        grad = sum_r grad(sum_{i in r} l_i / D_global) = W * mean_r grad(...).
    Gradients are all-reduced once, in the backward of the last micro-batch (`no_sync` before it).
    Every rank runs the same number of backward passes (DDP's collectives must match): a rank with
    fewer micro-batches adds zero-weight passes over its first row. With sharded weights (FSDP,
    zero_stage 2-3) every forward gathers weights, so each micro-batch runs exactly one forward:
    the shared-prompt forward (two per micro-batch, only where rows share a prompt) is off, and the
    gradients are reduce-scattered after every micro-batch.

    Returns:
        (this rank's share of the mini-batch loss, token-weighted means of the algorithm's stats,
        loss tokens)
    """
    denominator = dist.all_reduce(aggregation_denominator(batch["loss_mask"][rows], algo.loss_agg))
    total, means, n_total = 0.0, WeightedMeans(), 0.0
    rows = micro_batch_order(batch, rows)
    micros = list(rows.split(micro_batch_size))
    n_passes = int(dist.all_reduce(len(micros), "max"))
    for i in range(n_passes):
        real = i < len(micros)
        micro = micros[i] if real else (rows[:1] if rows.numel() else torch.zeros(1, dtype=torch.long))
        mb = micro_batch(batch, micro)
        with no_sync([model, critic], skip=i < n_passes - 1):
            with autocast(batch["input_ids"].device, bf16):
                logprob, entropy = sequence_logprobs(
                    model,
                    mb["input_ids"],
                    mb["attention_mask"],
                    mb["prompt_len"],
                    temperature=temperature,
                    return_entropy=True,
                    prompt_groups=None if dist.shards_params else mb.get("group_index"),
                )  # (B, T), (B, T)
                values = None
                if critic is not None:
                    values = critic(mb["input_ids"], mb["attention_mask"], mb["prompt_len"]).float()  # (B, T)
            loss, stats = algo.loss(mb, logprob, denominator=denominator, entropy=entropy, values=values)
            (loss * (dist.world_size if real else 0.0)).backward()
        if not real:
            continue
        total += loss.item()
        n_tokens = float(mb["loss_mask"].sum())
        mask = mb["response_mask"]
        stats["policy/entropy"] = float((entropy.detach() * mask).sum() / mask.sum().clamp(min=1))
        means.add(stats, max(n_tokens, 1.0))
        n_total += n_tokens
    return total, means.means(), n_total


def update_policy(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    algo: Algorithm,
    batch: dict[str, Any],
    settings: TrainSettings,
    temperature: float,
    generator: torch.Generator,
    critic: Critic | None = None,
    update_actor: bool = True,
    dist: DistContext = SINGLE,
) -> dict[str, float]:
    """`algo.epochs` passes over the batch, each split into mini-batches of one optimizer step.

    With a critic, its optimizer steps beside the policy's; `update_actor=False` (critic warm-up)
    steps the critic alone. Data parallel: see `accumulate_gradients`; the reported loss is the
    global mini-batch's (summed over ranks), so a non-finite loss on any rank skips the step on all.
    """
    N = batch["input_ids"].shape[0]
    n_minibatches = max(1, settings.batch_size // settings.mini_batch_size)
    means = WeightedMeans()
    losses, grad_norms, skipped = [], [], 0
    model.train()
    critic_model = critic.model.train() if critic is not None else None
    for _ in range(algo.epochs):
        reshuffle = algo.epochs > 1 or n_minibatches > 1
        order = torch.randperm(N, generator=generator) if reshuffle else torch.arange(N)
        for rows in order.tensor_split(n_minibatches):
            optimizer.zero_grad(set_to_none=True)
            if critic is not None:
                critic.optimizer.zero_grad(set_to_none=True)
            total, stats, n_tokens = accumulate_gradients(
                model,
                algo,
                batch,
                rows,
                settings.micro_batch_size,
                temperature,
                critic_model,
                settings.bf16,
                dist,
            )
            total = dist.all_reduce(total)
            grad_norm = scalar(torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm))
            finite = math.isfinite(total) and bool(torch.isfinite(grad_norm))
            if critic is not None:
                critic_norm = scalar(
                    torch.nn.utils.clip_grad_norm_(critic.model.parameters(), critic.max_grad_norm)
                )
                stats["critic/grad_norm"] = critic_norm.item()
                finite = finite and bool(torch.isfinite(critic_norm))
            if not finite:
                log.warning("non-finite loss (%s) or gradient norm: update skipped", total)
                skipped += 1
                continue
            if critic is not None:
                critic.optimizer.step()
            if update_actor:
                optimizer.step()
                scheduler.step()
            losses.append(total)
            grad_norms.append(grad_norm.item())
            means.add(stats, max(n_tokens, 1.0))
    metrics = means.means()
    metrics.update(
        {
            "policy/loss": float(np.mean(losses)) if losses else float("nan"),
            "policy/grad_norm": float(np.mean(grad_norms)) if grad_norms else float("nan"),
            "policy/lr": scheduler.get_last_lr()[0],
            "policy/skipped_updates": skipped,
            "policy/updated": float(update_actor),
        }
    )
    return metrics


def evaluate(
    engine: HFRollout,
    task: Task,
    examples: list[Example],
    format_weight: float,
    chunk: int = 32,
    dist: DistContext = SINGLE,
) -> dict[str, float]:
    """Greedy pass@1 on held-out prompts: accuracy (mean correctness), mean reward, format rate, length.

    Data parallel: each rank decodes every W-th example (a collective: every rank calls it), and
    the means are over all examples, so the result is the one-process evaluation's in 1/W the time.
    """
    sums = {"eval/accuracy": 0.0, "eval/reward": 0.0, "eval/format": 0.0, "eval/response_length": 0.0}
    mine = examples[dist.rank :: dist.world_size]
    for start in range(0, len(mine), chunk):
        part = mine[start : start + chunk]
        rollout = engine.sample([e.prompt for e in part], group_size=1, do_sample=False)
        result = score_responses(task, rollout.responses, part, format_weight=format_weight)
        sums["eval/accuracy"] += result.correct.sum().item()
        sums["eval/reward"] += result.total.sum().item()
        sums["eval/format"] += result.format.sum().item()
        sums["eval/response_length"] += rollout.lengths.float().sum().item()
    per_rank = dist.gather_objects(sums)
    return {key: sum(s[key] for s in per_rank) / len(examples) for key in sums}


def rollout_metrics(samples: Samples, group_size_hint: int) -> dict[str, float]:
    """reward/<term> means, group signal and response statistics of one step's training batch."""
    r = samples.rollout
    metrics = {f"reward/{k}": v.float().mean().item() for k, v in samples.terms.items()}
    metrics["reward/errors"] = samples.errors
    # share of groups whose rewards differ: only those carry a learning signal
    totals, groups = samples.terms["total"], r.group_index
    n_groups = int(groups.unique().numel())
    empty = torch.zeros(int(groups.max()) + 1)
    spread = empty.scatter_reduce(0, groups, totals, "amax", include_self=False)
    spread -= empty.scatter_reduce(0, groups, totals, "amin", include_self=False)
    metrics["reward/mixed_group_frac"] = float((spread > 1e-6).sum()) / max(n_groups, 1)
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
    return batch


class RunInterruptedError(Exception):
    """Ctrl-C or SIGTERM: the current step was finished and checkpointed at `path`."""

    def __init__(self, step: int, path: Path) -> None:
        super().__init__(f"interrupted after step {step}; checkpoint saved to {path}")
        self.step, self.path = step, path


class RunAbortedError(RuntimeError):
    """The run cannot go on (e.g. non-finite losses step after step); the last good state is saved."""


class StopRequest:
    """First Ctrl-C / SIGTERM: finish the current step, checkpoint, stop. A second one stops at once.

    A step is never cut in half, so the checkpoint is exactly the state after a completed step and
    a resumed run continues as if nothing had happened.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("%s received: stopping after this step (again to stop now)", signal.Signals(signum).name)

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
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

    def _rng_state(self) -> dict[str, Any]:
        return {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "update": self.generator.get_state(),
        }

    def state_dict(self, loop: LoopState, run_id: str | None) -> dict[str, Any]:
        """Everything but the policy weights that an exact resume needs. Data parallel: a
        collective (every rank calls it; sharded optimizer states are gathered to rank 0);
        "rank_rng" holds each rank's sampling RNG streams."""
        rng = self._rng_state()
        state = {
            "step": loop.step,
            "loop": vars(loop).copy(),
            "optimizer": optimizer_state_dict(self.model, self.optimizer, self.dist),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "rank_rng": self.dist.gather_objects(rng),
            "data": self.stream.state_dict(),
            "algorithm": self.algo.state_dict(),
            "wandb_run_id": run_id,
        }
        if self.critic is not None:
            state["critic"] = model_state_dict(self.critic.model, self.dist)
            state["critic_optimizer"] = optimizer_state_dict(
                self.critic.model, self.critic.optimizer, self.dist
            )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> LoopState:
        """The inverse of `state_dict` (the policy weights are loaded by common.checkpoint)."""
        try:
            load_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
            if self.critic is not None:
                load_model_state_dict(self.critic.model, state["critic"])
                load_optimizer_state_dict(self.critic.model, self.critic.optimizer, state["critic_optimizer"])
        except DistributedError as err:
            raise CheckpointError(f"resume: {err}") from err
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["data"])
        self.algo.load_state_dict(state["algorithm"])
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


def add_logprobs_and_values(
    batch: dict[str, Any],
    model: torch.nn.Module,
    reference: torch.nn.Module | None,
    critic: Critic | None,
    algo: Algorithm,
    settings: TrainSettings,
    temperature: float,
    device: torch.device,
    dist: DistContext = SINGLE,
) -> None:
    """Fill batch["old_logprob"] (only when the batch takes several optimizer steps),
    batch["ref_logprob"] (only with a reference model) and batch["values"] (PPO), all (N, T)."""
    micro = settings.micro_batch_size
    # no DDP and gathered FSDP weights in no-grad passes: ranks may run different numbers of them
    with autocast(device, settings.bf16):
        # several mini-batches make all but the first off-policy: their ratio needs pi_old
        if algo.needs_old_logprob or settings.mini_batch_size < settings.batch_size:
            with gathered([model], dist):
                batch["old_logprob"] = batched_forward(logprob_fn(unwrap(model), temperature), batch, micro)
        if reference is not None:
            with gathered([reference], dist):
                batch["ref_logprob"] = batched_forward(logprob_fn(reference, temperature), batch, micro)
        if critic is not None:
            with gathered([critic.model], dist):
                values = batched_forward(value_fn(unwrap(critic.model).eval()), batch, micro)
            batch["values"] = values.float()


def train_step(
    *,
    step: int,
    model: torch.nn.Module,
    reference: torch.nn.Module | None,
    engine: HFRollout,
    algo: Algorithm,
    task: Task,
    stream: PromptStream,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    settings: TrainSettings,
    device: torch.device,
    generator: torch.Generator,
    group_filter: GroupFilter | None,
    flat_groups: FlatGroups | None,
    critic: Critic | None,
    dist: DistContext = SINGLE,
) -> tuple[Samples | None, dict[str, float]]:
    """One step: rollout -> reward -> log-probs -> advantages -> update. Returns the step's batch
    (None when dynamic sampling kept nothing and the update was skipped) and this rank's metrics.
    Data parallel: `model` (and the critic's model) are DDP-wrapped or FSDP-sharded; the engine and
    the reference hold the plain modules (FSDP: the same, sharded, module; the reference sharded)."""
    t0 = time.perf_counter()
    # 1. rollout + reward (+ dynamic sampling): rows grouped [q1]*G + [q2]*G + ...
    with gathered([model], dist):  # ranks decode different numbers of tokens
        samples, metrics = collect(engine, task, stream, algo, settings, group_filter, flat_groups, dist)
    t_rollout = time.perf_counter()
    metrics["perf/rollout_s"] = t_rollout - t0
    if dist.any(samples is None):  # every rank skips the update together (DDP)
        if samples is not None:
            log.warning("dynamic sampling kept no group on another rank: update skipped on all ranks")
        return None, metrics
    batch = build_batch(samples, algo, device)
    # 2. log-probs: behaviour policy (only when the batch is reused), reference (only with KL), values
    add_logprobs_and_values(batch, model, reference, critic, algo, settings, engine.temperature, device, dist)
    t_logprob = time.perf_counter()
    # 3. advantages (and, for PPO, returns and KL-shaped token rewards)
    metrics.update(algo.compute_advantages(batch, reduce=dist.sum))  # PPO: global whitening, KL
    # 4. policy (and critic) update; during critic warm-up only the critic steps
    update_actor = critic is None or step > critic.warmup_steps
    metrics.update(
        update_policy(
            model,
            optimizer,
            scheduler,
            algo,
            batch,
            settings,
            engine.temperature,
            generator,
            critic=critic,
            update_actor=update_actor,
            dist=dist,
        )
    )
    if engine.syncs_weights:  # a separate generation engine (vLLM) gets the new weights
        with gathered([model], dist):
            engine.sync_weights(unwrap(model))
    t_update = time.perf_counter()
    metrics.update(rollout_metrics(samples, algo.group_size))
    state_bytes = train_state_bytes(
        [model, reference, critic and critic.model], [optimizer, critic and critic.optimizer]
    )
    metrics.update(
        {
            "perf/train_state_mb": state_bytes / 2**20,
            "perf/peak_rss_mb": peak_rss_mb(),
            "perf/logprob_s": t_logprob - t_rollout,
            "perf/update_s": t_update - t_logprob,
            "perf/step_s": t_update - t0,
            "perf/rollout_tokens_per_s": int(samples.rollout.lengths.sum()) / max(t_rollout - t0, 1e-9),
        }
    )
    return samples, metrics


def step_summary(step: int, max_steps: int, metrics: dict[str, float]) -> str:
    """The one-line console summary of a step."""
    if "reward/total" not in metrics:
        return f"Step {step}/{max_steps} | no group kept by dynamic sampling: update skipped"
    line = (
        f"Step {step}/{max_steps} | reward {metrics['reward/total']:.3f} "
        f"| correct {metrics['reward/correct']:.3f} | len {metrics['rollout/response_length']:.1f} "
        f"| {metrics['perf/step_s']:.1f}s"
    )
    if "eval/accuracy" in metrics:
        line += f" | eval accuracy {metrics['eval/accuracy']:.3f}"
    return line


def train(
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    reference: torch.nn.Module | None,
    engine: HFRollout,
    algo: Algorithm,
    task: Task,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    logger: RunLogger | None,
    settings: TrainSettings,
    run_dir: Path,
    device: torch.device,
    group_filter: GroupFilter | None = None,
    flat_groups: FlatGroups | None = None,
    critic: Critic | None = None,
    resume_state: dict[str, Any] | None = None,
    dist: DistContext = SINGLE,
) -> dict[str, float]:
    """Run up to settings.max_steps steps; returns the last step's metrics (with the last evaluation).

    `resume_state` is a checkpoint's trainer state (its weights already loaded into `model`): the
    run continues after the checkpoint's step with the same RNG streams, data order and optimizer.
    Raises RunInterruptedError after a Ctrl-C / SIGTERM (the step in flight finishes and is
    checkpointed) and RunAbortedError after settings.max_bad_steps steps in a row without a finite
    update (the last good state is checkpointed).

    Data parallel (`dist`): every rank runs this loop with its DDP-wrapped `model`; metrics are
    reduced over ranks, evaluation is split over them, and only rank 0 (whose `logger` is the only
    one, others pass None) logs and writes checkpoints.
    """
    stream = PromptStream(task.train, settings.seed)
    eval_examples = task.test[: settings.eval_num_prompts]
    generator = torch.Generator().manual_seed(settings.seed)
    loop = LoopState()
    resumable = Resumable(model, optimizer, scheduler, stream, algo, critic, generator, dist)
    if resume_state is not None:
        loop = resumable.load_state_dict(resume_state)
        log.info("resumed after step %d", loop.step)
    last: dict[str, float] = {}
    t_start = time.perf_counter() - loop.wall_s

    def checkpoint(name: str) -> Path:
        loop.wall_s = time.perf_counter() - t_start
        state = resumable.state_dict(loop, logger.wandb_run_id if logger else None)  # all ranks
        weights = model_state_dict(model, dist) if dist.shards_params else None  # all ranks
        path = run_dir / "checkpoints" / name
        if dist.is_main:
            save_checkpoint(path, model=unwrap(model), tokenizer=tokenizer, state=state, weights=weights)
            prune_checkpoints(run_dir, settings.keep_last_checkpoints)
        return path

    def maybe_eval(step: int) -> dict[str, float]:
        due = (
            step % settings.eval_every == 0 or step == settings.max_steps
            if settings.eval_every > 0
            else False
        )
        if not (due and eval_examples):
            return {}
        t = time.perf_counter()
        with gathered([model], dist):  # every rank decodes its share of the held-out prompts
            metrics = evaluate(engine, task, eval_examples, settings.format_weight, dist=dist)
        metrics["perf/eval_s"] = time.perf_counter() - t
        return metrics

    progress = tqdm(
        total=settings.max_steps,
        initial=loop.step,
        desc=algo.name,
        unit="step",
        dynamic_ncols=True,
        disable=not dist.is_main,
    )
    with StopRequest() as stop, progress:
        if loop.step == 0 and (initial := maybe_eval(0)) and logger:
            logger.log(0, initial)
            tqdm.write(f"Step 0/{settings.max_steps} | eval accuracy {initial['eval/accuracy']:.3f}")
        while loop.step < settings.max_steps:
            step = loop.step + 1
            samples, metrics = train_step(
                step=step,
                model=model,
                reference=reference,
                engine=engine,
                algo=algo,
                task=task,
                stream=stream,
                optimizer=optimizer,
                scheduler=scheduler,
                settings=settings,
                device=device,
                generator=generator,
                group_filter=group_filter,
                flat_groups=flat_groups,
                critic=critic,
                dist=dist,
            )
            metrics = reduce_metrics(metrics, dist)
            # the compute axis counts every generated sample and token, kept or dropped
            loop.step = step
            loop.samples_total += metrics["sampling/samples"]
            loop.tokens_total += metrics["sampling/tokens"]
            metrics["sampling/samples_total"] = loop.samples_total
            metrics["sampling/tokens_total"] = loop.tokens_total
            metrics["perf/wall_s"] = time.perf_counter() - t_start
            if samples is not None and samples.errors:
                log.warning(
                    "step %d: %d reward errors, e.g. %s", step, samples.errors, samples.error_messages[0]
                )
            metrics.update(maybe_eval(step))
            if logger:
                logger.log(step, metrics)
            if (
                logger
                and samples is not None
                and settings.log_samples_every > 0
                and step % settings.log_samples_every == 0
            ):
                logger.log_samples(step, sample_rows(samples, settings.num_samples_logged))
            progress.update(1)
            if dist.is_main:
                tqdm.write(step_summary(step, settings.max_steps, metrics))
            last = metrics
            # 5. faults: a step whose every update was non-finite changed nothing; K in a row end the run
            failed = (
                samples is not None
                and metrics["policy/skipped_updates"] > 0
                and math.isnan(metrics["policy/loss"])
            )
            loop.bad_steps = loop.bad_steps + 1 if failed else 0
            if loop.bad_steps >= settings.max_bad_steps:
                path = checkpoint(f"step_{step}")
                raise RunAbortedError(
                    f"non-finite loss or gradient in {loop.bad_steps} steps in a row "
                    f"(trainer.max_bad_steps); the last good state is saved in {path}"
                )
            if dist.any(stop.requested) and step < settings.max_steps:
                raise RunInterruptedError(step, checkpoint(f"step_{step}"))
            if settings.save_every > 0 and step % settings.save_every == 0 and step < settings.max_steps:
                try:
                    checkpoint(f"step_{step}")
                except OSError as err:  # disk full, quota: the previous checkpoint is intact
                    log.error("checkpoint at step %d failed (%s); training goes on", step, err)
    path = checkpoint("final")
    if dist.is_main:
        log.info("final policy saved to %s", path)
    return last
