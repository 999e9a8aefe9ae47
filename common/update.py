"""The update: no-grad log-prob and value passes, micro-batches, gradient accumulation (DDP / FSDP)
and the optimizer steps of `epochs` x mini-batches.

A mini-batch is one optimizer step; it runs in micro-batches of `trainer.micro_batch_size`
sequences (and, if set, about `trainer.max_tokens_per_micro_batch` tokens) whose gradients
accumulate, each normalised by the whole mini-batch's denominator, so the result does not depend
on how the mini-batch is split (DAPO Eq. 12 holds across micro-batches).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from common.algorithm import Algorithm, RolloutCorrection
from common.config import RunSettings, TrainerConfig
from common.distributed import SINGLE, DistContext, gathered, no_sync, scalar, unwrap
from common.finite import step_or_undo
from common.logprobs import eval_mode, sequence_logprobs
from common.losses import aggregation_denominator
from common.rollout_correction import (
    IS_LEVELS,
    icepop_weights,
    mismatch_metrics,
    normalize_is_weights,
    rejection_mask,
    sequence_tis_weights,
    tis_weights,
)

log = logging.getLogger("rl_lab")


@dataclass
class Critic:
    """PPO's value model with its own optimizer. For the first `warmup_steps` steps only the critic
    learns (the policy's optimizer does not step), so advantages start from sensible values."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    max_grad_norm: float
    warmup_steps: int


@torch.no_grad()
def batched_forward(
    forward: Callable[[dict[str, Any]], torch.Tensor],
    batch: dict[str, Any],
    micro_batches: list[torch.Tensor],
) -> torch.Tensor:
    """Run `forward(micro_batch) -> (B, t)` over the micro-batches (row indices, e.g. from
    split_micro_batches); returns (N, T), each row where it was, zero-padded."""
    N, T = batch["response_mask"].shape
    out = None
    for rows in micro_batches:
        values = _pad_right(forward(micro_batch(batch, rows)), T)  # (B, T)
        if out is None:
            out = values.new_zeros(N, T)
        out[rows] = values
    return out


def logprob_fn(
    model: torch.nn.Module, temperature: float, packed: bool = True, chunked: bool = True
) -> Callable[[dict[str, Any]], torch.Tensor]:
    """mb -> (B, T) log-probs of the taken tokens under `model` (packed / chunked: the training pass's
    switches, trainer.packed_forward and trainer.chunked_logprobs)."""

    def forward(mb: dict[str, Any]) -> torch.Tensor:
        logprob, _ = sequence_logprobs(
            model,
            mb["input_ids"],
            mb["attention_mask"],
            mb["prompt_len"],
            temperature=temperature,
            response_mask=mb["response_mask"],
            prompt_groups=mb.get("group_index"),
            packed=packed,
            chunked=chunked,
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


def split_micro_batches(
    batch: dict[str, Any], rows: torch.Tensor, micro_batch_size: int, max_tokens: int | None = None
) -> list[torch.Tensor]:
    """`rows` in micro-batches of at most `micro_batch_size` rows and, with `max_tokens` set, at
    most `max_tokens` tokens where it can (a row longer than that goes alone); verl's dynamic batch
    size (use_dynamic_bsz, ppo_max_token_len_per_gpu). The tokens of a micro-batch are what its
    packed forward runs (sequence_logprobs): each group's prompt once plus every response through EOS.

    Rows go group by group, the group with most tokens first (the first micro-batch fails fast if
    memory is short), so rows that share a prompt share a micro-batch and its prompt's forward.
    The split changes the cost of a step, not its gradient: every micro-batch loss is normalised
    by the whole mini-batch's denominator (accumulate_gradients).
    """
    P = batch["prompt_len"]
    # bookkeeping on the CPU, whatever device the batch is on
    groups = batch["group_index"][rows].cpu() if "group_index" in batch else torch.arange(len(rows))  # (n,)
    responses = batch["response_mask"][rows].sum(dim=1).long().cpu()  # (n,)
    prompts = batch["attention_mask"][rows, :P].sum(dim=1).long().cpu()  # (n,)
    _, group = torch.unique(groups, return_inverse=True)  # (n,) 0 .. n_groups-1
    size = torch.zeros(int(group.max()) + 1 if len(rows) else 0, dtype=torch.long)
    size.index_add_(0, group, responses)
    # groups by size, largest first (ties: lower group id); rows keep their order within a group
    order = sorted(range(len(rows)), key=lambda i: (-int(size[group[i]]), int(group[i]), i))
    micros, current, tokens, open_groups = [], [], 0, set()
    for i in order:
        g = int(group[i])
        cost = int(responses[i]) + (0 if g in open_groups else int(prompts[i]))
        if current and (len(current) == micro_batch_size or (max_tokens and tokens + cost > max_tokens)):
            micros.append(rows[current])
            current, tokens, open_groups = [], 0, set()
            cost = int(responses[i]) + int(prompts[i])
        current.append(i)
        tokens += cost
        open_groups.add(g)
    if current:
        micros.append(rows[current])
    return micros


def accumulate_gradients(
    model: torch.nn.Module,
    algo: Algorithm,
    batch: dict[str, Any],
    rows: torch.Tensor,
    trainer: TrainerConfig,
    temperature: float,
    critic: torch.nn.Module | None = None,
    dist: DistContext = SINGLE,
) -> tuple[float, dict[str, float], float]:
    """Backward the loss of the mini-batch `rows` in micro-batches; gradients accumulate in .grad.

    Each micro-batch loss is normalised by the *mini-batch's* denominator (token count for
    token-mean, count of sequences with loss tokens for the seq-mean modes, times C =
    algo.loss_scale_factor for seq-mean-token-sum-norm), so the accumulated gradient equals the
    gradient of the whole mini-batch's loss, whatever the micro-batch size (DAPO Eq. 12 holds
    across micro-batches). With a critic (PPO) its values enter the same loss, so one backward
    fills both models' gradients. Of `trainer`: micro_batch_size and max_tokens_per_micro_batch
    (`split_micro_batches`); bf16 runs the forward passes under bfloat16 autocast (the backward
    follows the forward's dtypes; log-probs and losses stay float32); packed_forward and
    chunked_logprobs are the training pass's switches (common.logprobs.sequence_logprobs).

    Data parallel (`dist`, with `model` and `critic` wrapped in DDP): the denominator is summed over
    ranks, so it is the global mini-batch's; DDP averages gradients over the W ranks, so each
    rank's loss is scaled by W and the all-reduced gradient is the global loss's gradient:
        grad = sum_r grad(sum_{i in r} l_i / D_global) = W * mean_r grad(...).
    Gradients are all-reduced once, in the backward of the last micro-batch (`no_sync` before it).
    Every rank runs the same number of backward passes (DDP's collectives must match): a rank with
    fewer micro-batches adds zero-weight passes over its first row. With sharded weights (FSDP,
    zero_stage 2-3) every forward gathers weights; each micro-batch runs exactly one forward (the
    packed pass of sequence_logprobs), and the gradients are reduce-scattered after every micro-batch.

    Returns:
        (this rank's share of the mini-batch loss, token-weighted means of the algorithm's stats,
        loss tokens)
    """
    # summed over ranks first, then clamped: an empty mini-batch (all rows masked) trains on nothing
    part = aggregation_denominator(batch["loss_mask"][rows], algo.loss_agg, algo.loss_scale_factor)
    denominator = dist.all_reduce(part) or 1.0
    total, means, n_total = 0.0, WeightedMeans(), 0.0
    micros = split_micro_batches(batch, rows, trainer.micro_batch_size, trainer.max_tokens_per_micro_batch)
    n_passes = int(dist.all_reduce(len(micros), "max"))
    for i in range(n_passes):
        real = i < len(micros)
        micro = micros[i] if real else (rows[:1] if rows.numel() else torch.zeros(1, dtype=torch.long))
        mb = micro_batch(batch, micro)
        with no_sync([model, critic], skip=i < n_passes - 1):
            with autocast(batch["input_ids"].device, trainer.bf16):
                logprob, entropy = sequence_logprobs(
                    model,
                    mb["input_ids"],
                    mb["attention_mask"],
                    mb["prompt_len"],
                    temperature=temperature,
                    return_entropy=True,
                    response_mask=mb["response_mask"],
                    prompt_groups=mb.get("group_index"),
                    packed=trainer.packed_forward,
                    chunked=trainer.chunked_logprobs,
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
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    algo: Algorithm,
    batch: dict[str, Any],
    settings: RunSettings,
    temperature: float,
    generator: torch.Generator,
    critic: Critic | None = None,
    dist: DistContext = SINGLE,
) -> dict[str, float]:
    """`algo.epochs` passes over the batch, each split into mini-batches of one optimizer step.

    With a critic, its optimizer steps beside the policy's; `optimizer=None` (critic warm-up) steps
    the critic alone. Data parallel: see `accumulate_gradients`; the reported loss is the global
    mini-batch's (summed over ranks), so a non-finite loss on any rank skips the step on all.
    """
    N = batch["input_ids"].shape[0]
    trainer = settings.trainer
    n_minibatches = max(1, trainer.batch_size // trainer.mini_batch_prompts)
    means = WeightedMeans()
    losses, grad_norms, skipped = [], [], 0
    model.train()
    critic_model = critic.model.train() if critic is not None else None
    for _ in range(algo.epochs):
        reshuffle = algo.epochs > 1 or n_minibatches > 1
        order = torch.randperm(N, generator=generator) if reshuffle else torch.arange(N)
        for rows in order.tensor_split(n_minibatches):
            model.zero_grad(set_to_none=True)  # the policy's gradients, also when it does not step
            if critic is not None:
                critic.optimizer.zero_grad(set_to_none=True)
            total, stats, n_tokens = accumulate_gradients(
                model, algo, batch, rows, trainer, temperature, critic_model, dist
            )
            total = dist.all_reduce(total)
            grad_norm = clip_and_step(
                model, optimizer, scheduler, critic, total, stats, settings.optim.max_grad_norm, dist
            )
            if grad_norm is None:
                skipped += 1
                continue
            losses.append(total)
            grad_norms.append(grad_norm)
            means.add(stats, max(n_tokens, 1.0))
    metrics = means.means()
    metrics.update(
        {
            "policy/loss": float(np.mean(losses)) if losses else float("nan"),
            "policy/grad_norm": float(np.mean(grad_norms)) if grad_norms else float("nan"),
            "policy/lr": scheduler.get_last_lr()[0],
            "policy/skipped_updates": skipped,
            "policy/updated": float(optimizer is not None),
            # the policy's optimizer steps taken (none during the critic's warm-up): the update budget
            "policy/optimizer_steps": float(len(losses)) if optimizer is not None else 0.0,
        }
    )
    return metrics


def clip_and_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    critic: Critic | None,
    total: float,
    stats: dict[str, float],
    max_grad_norm: float,
    dist: DistContext = SINGLE,
) -> float | None:
    """Clip the accumulated gradients and step the optimizers (the policy's only when `optimizer`
    is given); stats gain critic/grad_norm. Returns the policy's gradient norm, or None when the
    update did not happen: the loss `total` or a gradient norm is not finite (nothing steps), or
    the step would leave a non-finite weight or moment (common.finite.step_or_undo undoes it)."""
    grad_norm = scalar(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
    finite = math.isfinite(total) and bool(torch.isfinite(grad_norm))
    # max|g| <= the clipped gradient's norm: the bound that proves most steps finite
    steppers = [(optimizer, min(grad_norm.item(), max_grad_norm))] if optimizer is not None else []
    if critic is not None:
        critic_norm = scalar(torch.nn.utils.clip_grad_norm_(critic.model.parameters(), critic.max_grad_norm))
        stats["critic/grad_norm"] = critic_norm.item()
        finite = finite and bool(torch.isfinite(critic_norm))
        steppers.insert(0, (critic.optimizer, min(critic_norm.item(), critic.max_grad_norm)))
    if not finite:
        log.warning("non-finite loss (%s) or gradient norm: update skipped", total)
        return None
    if not step_or_undo([o for o, _ in steppers], [g for _, g in steppers], dist):
        log.warning("the optimizer step left a non-finite weight or moment: update undone")
        return None
    if optimizer is not None:
        scheduler.step()
    return grad_norm.item()


def needs_old_logprob(algo: Algorithm, settings: RunSettings) -> bool:
    """pi_old is computed when the algorithm asks for it (a reused batch, PPO's KL reward), when a batch
    takes several optimizer steps (all but the first are off-policy), and when the rollout is
    corrected or its mismatch logged (both compare pi_old with the engine's own log-probs)."""
    return (
        algo.needs_old_logprob
        or settings.trainer.mini_batch_prompts < settings.trainer.batch_size
        or algo.rollout_correction.enabled
        or settings.trainer.log_rollout_mismatch
    )


def add_logprobs_and_values(
    batch: dict[str, Any],
    model: torch.nn.Module,
    reference: torch.nn.Module | None,
    critic: Critic | None,
    algo: Algorithm,
    settings: RunSettings,
    temperature: float,
    device: torch.device,
    dist: DistContext = SINGLE,
) -> dict[str, float]:
    """Fill batch["old_logprob"] (only when `needs_old_logprob`), batch["ref_logprob"] (only with a
    reference model) and batch["values"] (PPO), all (N, T); then the rollout correction
    (`correct_rollout`). Returns the rollout mismatch and correction metrics, when pi_old and the
    engine's log-probs are there."""
    N, trainer = batch["input_ids"].shape[0], settings.trainer
    micro = split_micro_batches(
        batch, torch.arange(N), trainer.micro_batch_size, trainer.max_tokens_per_micro_batch
    )
    passes = (trainer.packed_forward, trainer.chunked_logprobs)
    # no DDP and gathered FSDP weights in no-grad passes: ranks may run different numbers of them
    with autocast(device, trainer.bf16):
        # Eval mode: pi_old is the policy that sampled (generation runs in eval mode), without dropout noise
        if needs_old_logprob(algo, settings):
            with gathered([model], dist), eval_mode(unwrap(model)):
                batch["old_logprob"] = batched_forward(
                    logprob_fn(unwrap(model), temperature, *passes), batch, micro
                )
        if reference is not None:
            with gathered([reference], dist):
                batch["ref_logprob"] = batched_forward(
                    logprob_fn(reference, temperature, *passes), batch, micro
                )
        if critic is not None:
            with gathered([critic.model], dist):
                values = batched_forward(value_fn(unwrap(critic.model).eval()), batch, micro)
            batch["values"] = values.float()
    return correct_rollout(batch, algo)


def correct_rollout(batch: dict[str, Any], algo: Algorithm) -> dict[str, float]:
    """The mismatch metrics between pi_old and the engine's log-probs, and algo.rollout_correction
    applied (common.rollout_correction, as verl's rollout correction): with rollout_is, the importance
    weights batch["rollout_is_weights"] (N, T) that the policy loss multiplies in (batch-normalised
    with rollout_is_batch_normalize); with rollout_rs, the rejected tokens or responses leave
    batch["loss_mask"], so they do not train. Both are computed on the whole response mask, as verl
    does; the normalisation's mean is this rank's batch's. {} without pi_old or rollout log-probs."""
    correction = algo.rollout_correction
    if correction.enabled and "rollout_logprob" not in batch:
        raise ValueError("algorithm.rollout_correction needs the engine's rollout log-probs in the batch")
    if "old_logprob" not in batch or "rollout_logprob" not in batch:
        return {}
    old, rollout, mask = batch["old_logprob"], batch["rollout_logprob"], batch["response_mask"]
    metrics = mismatch_metrics(old, rollout, mask)
    if correction.rollout_is is not None:
        weights, stats = importance_weights(old, rollout, mask, correction)
        if correction.rollout_is_batch_normalize:
            weights, norm = normalize_is_weights(weights, mask, IS_LEVELS[correction.rollout_is])
            stats.update(norm)
        batch["rollout_is_weights"] = weights
        metrics.update(stats)
    if correction.rollout_rs is not None:
        keep, stats = rejection_mask(
            old, rollout, mask, correction.rollout_rs, correction.rollout_rs_threshold
        )
        batch["loss_mask"] = batch["loss_mask"] * keep.to(batch["loss_mask"].dtype)
        metrics.update(stats)
    return metrics


def importance_weights(
    old_logprob: torch.Tensor,
    rollout_logprob: torch.Tensor,
    mask: torch.Tensor,
    correction: RolloutCorrection,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The (N, T) importance weights of correction.rollout_is: token / sequence truncate the ratio at
    rollout_is_threshold (tis_weights, sequence_tis_weights); token_mask / sequence_mask keep it
    inside [rollout_is_threshold_lower (null: 1 / threshold), rollout_is_threshold] (icepop_weights)."""
    level, cap = IS_LEVELS[correction.rollout_is], correction.rollout_is_threshold
    if correction.rollout_is.endswith("_mask"):
        low = correction.rollout_is_threshold_lower or 1.0 / cap
        return icepop_weights(old_logprob, rollout_logprob, mask, low, cap, level=level)
    truncated = tis_weights if level == "token" else sequence_tis_weights
    return truncated(old_logprob, rollout_logprob, mask, cap)
