"""Sampling one step's batch: the prompt stream, scored rollouts, and dynamic sampling.

`collect` rolls out `trainer.batch_size` groups of G responses (rows [q1]*G + [q2]*G + ...),
scores every response against its own prompt, and, with dynamic sampling (DAPO Eq. 11), drops
flat groups and refills from new prompts (`group_filter`, the filter mode) or grows flat groups
one response at a time (`flat_groups`, the resample mode). The group tests themselves are pure
functions in dapo/sampling.py, passed in by scripts/build.py. Under a token budget
(trainer.max_generated_tokens) the step that reaches it samples only what the budget has left
(`sample_within_budget`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from common.advantage import mixed_groups
from common.algorithm import Algorithm
from common.config import FilterSampling, ResampleSampling, RunSettings
from common.distributed import SINGLE, DistContext
from common.rewards import RewardError, score_responses
from common.rollout import RolloutBatch
from common.rollout.engine import RolloutEngine
from common.tasks import Example, Task

log = logging.getLogger("rl_lab")

# (rewards (N,), G) -> keep (n_groups,) bool: DAPO's filter_groups
GroupFilter = Callable[[torch.Tensor, int], torch.Tensor]
# (rewards (N,), group_index (N,)) -> ids of groups whose rewards are all equal: dapo.groups_to_resample
FlatGroups = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
    task: Task, rollout: RolloutBatch, examples: list[Example], algo: Algorithm, settings: RunSettings
) -> Samples:
    """Score every response of `rollout` against its own prompt; `examples` are the per-prompt
    examples, expanded here in the rollout's [q1]*G + [q2]*G + ... order."""
    G = len(rollout) // len(examples)
    expanded = [e for e in examples for _ in range(G)]  # prompts_expanded order
    # a raising reward scores 0 and is recorded; check_reward_errors stops the step, on every rank
    result = score_responses(task, rollout.responses, expanded, format_weight=settings.reward.format_weight)
    terms = {"correct": result.correct, "format": result.format}
    terms.update(algo.shape_rewards(rollout.lengths, rollout.truncated))
    # what the advantages see: the task's total (correct + weighted format) plus the shaping terms
    terms["total"] = result.total + sum(v for k, v in terms.items() if k not in ("correct", "format"))
    return Samples(rollout, expanded, terms, result.extracted, result.errors, result.error_messages)


def check_reward_errors(samples: Samples | None, settings: RunSettings, dist: DistContext = SINGLE) -> None:
    """trainer.fail_on_reward_error: raise RewardError naming the first sample whose reward function
    raised in `samples` (this rank's latest scored rollout; None: none this round). Whatever the
    setting, a rollout whose every reward failed raises too: there is nothing to learn from. Data
    parallel: a collective, so every rank raises together at the same point of the step."""
    message = samples.error_messages[0] if samples is not None and samples.errors else None
    if settings.trainer.fail_on_reward_error and dist.any(message is not None):
        raise RewardError(f"reward function raised on sample {message or 'of another data-parallel rank'}")
    if dist.any(samples is not None and samples.errors == len(samples.rollout) > 0):
        first = message or "of another data-parallel rank"
        raise RewardError(f"reward function failed on every sample of the rollout, the first: sample {first}")


def generate_and_score(
    engine: RolloutEngine,
    task: Task,
    examples: list[Example],
    algo: Algorithm,
    settings: RunSettings,
    group_size: int | None = None,
) -> Samples:
    """Sample G responses per example in one batched call and score each against its own prompt."""
    rollout = engine.sample([e.prompt for e in examples], group_size=group_size or engine.group_size)
    return score_samples(task, rollout, examples, algo, settings)


def budget_share(tokens_left: int | None, dist: DistContext = SINGLE) -> int | None:
    """This rank's share of the tokens the budget has left, rounded up so that the shares add up to
    at least `tokens_left` (None: no budget)."""
    return None if tokens_left is None else -(-tokens_left // dist.world_size)


def sample_within_budget(
    engine: RolloutEngine,
    task: Task,
    examples: list[Example],
    algo: Algorithm,
    settings: RunSettings,
    tokens_left: int | None,
) -> Samples:
    """Roll out G responses for each of `examples`, stopping once `tokens_left` response tokens are
    generated: the token budget's last step ends at the budget, not a whole batch past it.

    When even the longest responses (G x rollout.max_new_tokens per group) cannot pass the budget,
    one batched call, as without a budget. Otherwise in chunks of as many groups as cannot pass
    it, at least one, until the budget is reached or the examples run out: only a one-group chunk
    can pass the budget, so the rollout ends past it by less than G x max_new_tokens tokens. The
    examples after the last chunk are not sampled (the step is the run's last: they are not needed).

    Example (G = 4, max_new_tokens = 48: at most 192 tokens a group; 4 examples, 500 tokens left):
    a chunk of 500 // 192 = 2 groups generates 130 tokens, then 370 // 192 = 1 group 60 tokens, then
    1 group 70 tokens: 260 in all, the last example is sampled with 240 left; the step holds 4
    groups and the run goes on. With 100 left, one group (50 tokens), then another (45): 95 < 100,
    then the third: the budget is passed, the step holds 3 groups and is the run's last.

    Args:
        tokens_left: the response tokens this rank may still generate (`budget_share`); None = no budget.
    """
    worst = engine.group_size * engine.max_new_tokens  # the most tokens one group can generate
    if tokens_left is None or len(examples) * worst <= tokens_left:
        return generate_and_score(engine, task, examples, algo, settings)
    parts: list[Samples] = []
    used = 0
    while examples and used < tokens_left:
        n = max(1, (tokens_left - used) // worst)  # groups that cannot pass the budget, at least one
        parts.append(generate_and_score(engine, task, examples[:n], algo, settings))
        used += int(parts[-1].rollout.lengths.sum())
        examples = examples[n:]
    return Samples.concat(parts)


def collect(
    engine: RolloutEngine,
    task: Task,
    stream: PromptStream,
    algo: Algorithm,
    settings: RunSettings,
    group_filter: GroupFilter | None,
    flat_groups: FlatGroups | None = None,
    dist: DistContext = SINGLE,
    tokens_left: int | None = None,
) -> tuple[Samples | None, dict[str, float]]:
    """Roll out batch_size groups; with a group filter, refill until batch_size groups are kept
    (see `fill_with_filtered_groups`); with `flat_groups`, grow all-equal groups instead (see
    `resample_flat_groups`). `tokens_left`: what the token budget has left (None: no budget); the
    rollout stops there (`sample_within_budget`), with fewer than batch_size groups.

    Data parallel: every rank takes the same global batch from the stream and rolls out its own
    contiguous share (batch_size / world_size prompts), so groups never span ranks and the stream
    stays in step on all ranks; with a filter, generation rounds go on until every rank is full.
    Under a token budget each rank stops at its share of what is left (`budget_share`).
    """
    if group_filter is not None:
        return fill_with_filtered_groups(
            engine, task, stream, algo, settings, group_filter, dist, tokens_left
        )
    share = budget_share(tokens_left, dist)
    examples = dist.shard(stream.take(settings.trainer.batch_size))
    samples = sample_within_budget(engine, task, examples, algo, settings, share)
    stats: dict[str, float] = {"sampling/gen_batches": 1}
    if flat_groups is not None:
        samples, resample_stats = resample_flat_groups(
            engine, task, samples, algo, settings, flat_groups, share
        )
        stats.update(resample_stats)
    check_reward_errors(samples, settings, dist)
    stats["sampling/samples"] = len(samples.rollout)
    stats["sampling/tokens"] = int(samples.rollout.lengths.sum())
    stats.update(sampled_reward_metrics([samples]))
    return samples, stats


def sampled_reward_metrics(parts: list[Samples]) -> dict[str, float]:
    """The step's reward over everything it sampled, before any filter: the same footing for every
    algorithm (DAPO's kept groups are selected for being mixed, so their reward is higher by
    construction; the trainer logs that as reward/kept_<term>).

        reward/<term>             mean of each reward term over every sampled response
        reward/mixed_group_frac   share of the sampled groups that are mixed in correctness
                                  (common.advantage.mixed_groups, the filter's own test); in the
                                  resample mode, after its groups have grown

    Args:
        parts: the step's scored rollouts (each generation round of the filter mode, or one).
    """
    terms = {k: torch.cat([p.terms[k] for p in parts]) for k in parts[0].terms}  # (N_all,) each
    metrics = {f"reward/{k}": v.float().mean().item() for k, v in terms.items()}
    mixed = torch.cat([mixed_groups(p.terms["correct"], p.rollout.group_index) for p in parts])  # (n_groups,)
    metrics["reward/mixed_group_frac"] = mixed.float().mean().item()
    return metrics


class DynamicSamplingError(RuntimeError):
    """dynamic_sampling.on_exhausted=error: max_num_gen_batches rounds did not fill the batch."""


def fill_with_filtered_groups(
    engine: RolloutEngine,
    task: Task,
    stream: PromptStream,
    algo: Algorithm,
    settings: RunSettings,
    group_filter: GroupFilter,
    dist: DistContext = SINGLE,
    tokens_left: int | None = None,
) -> tuple[Samples | None, dict[str, float]]:
    """Dynamic sampling (DAPO Algorithm 1, lines 3-8), as verl's DAPO recipe runs it: each round
    samples dynamic_sampling.prompts_per_round prompts (verl's gen_batch_size, an oversampling factor times
    batch_size), drops the groups whose *task correctness* is all equal (no signal: zero advantage)
    and keeps the first ones until batch_size groups are kept; the surplus is discarded. The filter
    reads the correctness term, not the shaped total: the paper filters "prompts with accuracy equal
    to 1 and 0" (verl makes it a setting).

    After max_num_gen_batches rounds without a full batch, dynamic_sampling.on_exhausted decides: "partial"
    trains on the kept groups (a warning; none kept: the update is skipped), "skip" skips the
    update, "error" raises DynamicSamplingError (verl's behaviour). Under data parallel the
    decision is the same on every rank. A partial batch is normalised by its own tokens (or rows):
    the loss denominators count what is in the batch, never the nominal batch_size x G.

    Under a token budget (`tokens_left`: what it has left; None = none) a round samples only what
    the budget has left (`sample_within_budget`, each rank its `budget_share`) and no round starts
    once it is spent: the step trains on the groups kept so far (none kept: the update is skipped),
    whatever on_exhausted says, and is the run's last.
    """
    ds = settings.dynamic_sampling
    if not isinstance(ds, FilterSampling):
        raise TypeError(f"dynamic sampling by filter needs dynamic_sampling=filter, not {ds.mode}")
    G, batch_size = engine.group_size, settings.trainer.batch_size
    target = batch_size // dist.world_size  # this rank's groups
    gen_batch_size = ds.prompts_per_round(batch_size)
    kept: list[Samples] = []
    sampled: list[Samples] = []  # every round's rollout, for the step's reward before the filter
    n_kept = n_seen = n_generated = n_tokens = gen_batch = 0
    share = budget_share(tokens_left, dist)
    short, spent = True, False
    while gen_batch < ds.max_num_gen_batches and short and not spent:
        gen_batch += 1
        examples = dist.shard(stream.take(gen_batch_size))  # every rank advances the stream
        samples = None
        if n_kept < target and (share is None or n_tokens < share):
            left = None if share is None else share - n_tokens
            samples = sample_within_budget(engine, task, examples, algo, settings, left)
            sampled.append(samples)
            keep = group_filter(samples.terms["correct"], G)  # (n_prompts,)
            n_seen += keep.numel()
            n_generated += samples.rollout.input_ids.shape[0]
            n_tokens += int(samples.rollout.lengths.sum())
            take = keep.nonzero().flatten()[: target - n_kept]
            if take.numel():
                rows = (take.unsqueeze(1) * G + torch.arange(G)).flatten()  # group ids -> row ids
                kept.append(samples.select(rows))
                n_kept += take.numel()
        check_reward_errors(samples, settings, dist)  # every round, on every rank
        short = dist.any(n_kept < target)
        spent = tokens_left is not None and dist.all_reduce(n_tokens) >= tokens_left
    stats = {
        "sampling/gen_batches": gen_batch,
        "sampling/samples": n_generated,
        "sampling/tokens": n_tokens,
        "sampling/groups_kept": n_kept,
        "sampling/groups_dropped": n_seen - n_kept,
        "sampling/kept_group_frac": n_kept / max(n_seen, 1),
    }
    stats.update(sampled_reward_metrics(sampled))  # every rank samples in the first round
    counts = (n_kept, target, gen_batch)
    return kept_batch(kept, counts, short=short, spent=spent, on_exhausted=ds.on_exhausted), stats


def kept_batch(
    kept: list[Samples], counts: tuple[int, int, int], *, short: bool, spent: bool, on_exhausted: str
) -> Samples | None:
    """What a step of dynamic sampling trains on once its rounds end (`fill_with_filtered_groups`):
    every kept group when the batch is full or the token budget ended the rounds (`spent`); after
    max_num_gen_batches rounds short of it (`short`, on any rank), dynamic_sampling.on_exhausted
    decides. `counts`: this rank's (groups kept, groups wanted, rounds). None: skip the update."""
    n_kept, target, gen_batch = counts
    if short and spent:  # the token budget ended the step, not max_num_gen_batches
        log.info("dynamic sampling: %d of %d groups kept when the token budget ran out", n_kept, target)
        return Samples.concat(kept) if kept else None
    shortfall = (
        f"dynamic sampling: {n_kept} of {target} groups kept after {gen_batch} generation batches "
        "(dynamic_sampling.max_num_gen_batches)"
    )
    if short and on_exhausted == "error":
        raise DynamicSamplingError(
            f"{shortfall}; the prompts are too easy or too hard for the policy: raise max_num_gen_batches "
            "or gen_batch_size_factor, or set dynamic_sampling.on_exhausted=partial or skip"
        )
    if short and (on_exhausted == "skip" or not kept):
        log.warning("%s; skipping this update", shortfall)
        return None
    if n_kept < target:
        log.warning("%s; training on the kept groups", shortfall)
    return Samples.concat(kept)


def resample_flat_groups(
    engine: RolloutEngine,
    task: Task,
    samples: Samples,
    algo: Algorithm,
    settings: RunSettings,
    flat_groups: FlatGroups,
    tokens_left: int | None = None,
) -> tuple[Samples, dict[str, float]]:
    """Grow every group whose correctness rewards are all equal (std < 1e-6) by one response at a
    time, batched across such groups, until its rewards differ or it holds dynamic_sampling.max_samples,
    or, under a token budget, until the batch holds `tokens_left` response tokens (None: no budget;
    the last round may pass it by one response per flat group).

    The design notes' dynamic sampling, an alternative to DAPO's filter: no prompt is dropped,
    but groups end up with unequal sizes. The new rows carry their group's id, so the advantages
    (common.advantage.compute_group_relative_advantages) see ragged groups. Like the filter, it
    reads the correctness term, not the shaped total.

    Example (G = 2, max_samples = 4): correctness [1, 1 | 0, 1] -> group 0 is flat, one more
    response for q1; if it scores 0 the groups are [1, 1, 0 | 0, 1] and sampling stops.
    """
    ds = settings.dynamic_sampling
    if not isinstance(ds, ResampleSampling):
        raise TypeError(f"resampling flat groups needs dynamic_sampling=resample, not {ds.mode}")
    extra = rounds = 0
    while tokens_left is None or int(samples.rollout.lengths.sum()) < tokens_left:
        group_index = samples.rollout.group_index  # (N,)
        flat = flat_groups(samples.terms["correct"], group_index)  # group ids
        flat = flat[torch.bincount(group_index)[flat] < ds.max_samples]
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
