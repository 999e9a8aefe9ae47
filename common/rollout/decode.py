"""The fast decode engine (rollout.engine=hf, or decode): each distinct prompt prefilled once (their
shared prefix once), then one batched loop samples a token per live row per step, finished rows
leaving the batch.

Its speed tricks each have a switch (`DecodeTricks`, from rollout.prepack_linears,
rollout.preallocated_cache, rollout.inplace_row_removal, rollout.shared_prefix) and a feature check
that falls back to the plain path, with one warning, when the internals they need are missing or
changed (common.fences): prepacked linears (prepack.py), the preallocated KV cache and in-place row
removal (kv_cache.py), the shared-prefix prefill (here). With all of them off it runs transformers'
DynamicCache and public forward arguments only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import Cache

from common.fences import Fence, base_model, full_attention_only, takes_logits_to_keep
from common.logprobs import eval_mode
from common.rollout.base import BaseRollout
from common.rollout.batch import RolloutBatch
from common.rollout.kv_cache import PREALLOCATED_CACHE, keep_order, preallocate
from common.rollout.prepack import PrepackPolicy, prepacked_linears
from common.rollout.sampler import TokenSampler

TRAIN_YAML = Path(__file__).resolve().parents[2] / "configs" / "train.yaml"


@dataclass(frozen=True)
class DecodeTricks:
    """The decode engine's speed tricks: rollout.prepack_linears (auto: measured once per run,
    always or never), rollout.preallocated_cache, rollout.inplace_row_removal, rollout.shared_prefix.
    Their defaults are configs/train.yaml's alone (`from_train_yaml`)."""

    prepack_linears: str
    preallocated_cache: bool
    inplace_row_removal: bool
    shared_prefix: bool

    @classmethod
    @functools.cache
    def from_train_yaml(cls) -> DecodeTricks:
        """The switches as configs/train.yaml sets them: an engine built outside a run (the seed's
        `generate_responses`, scripts, tests) runs the tricks a run would."""
        rollout = OmegaConf.load(TRAIN_YAML).rollout
        return cls(**{f.name: rollout[f.name] for f in dataclasses.fields(cls)})


def probe_shared_prefix() -> str | None:
    """None when the cache can repeat its rows (Cache.batch_repeat_interleave), else why not."""
    if not callable(getattr(DynamicCache, "batch_repeat_interleave", None)):
        return "transformers' DynamicCache has no batch_repeat_interleave"
    return None


SHARED_PREFIX = Fence("rollout.shared_prefix", probe_shared_prefix, "every prompt runs whole")

# An extra forward costs about what this many prompt tokens cost (one pass over the weights, on
# CPU): a prefix whose sharing saves fewer tokens, (prompts - 1) x its length, runs with the rest.
MIN_SHARED_PREFIX_SAVING = 32


def shared_prefix_length(prompt_ids: Tensor, prompt_mask: Tensor) -> int:
    """How many tokens every prompt starts with, the same in all: the system message and chat
    template's header, an instruction shared by a task's questions. At most the shortest prompt's
    length - 1: each prompt keeps a token of its own, whose logits the prompt pass returns.

    Args:
        prompt_ids, prompt_mask: (U, P), left-padded.
    """
    lengths = prompt_mask.long().sum(dim=1)  # (U,)
    start = prompt_ids.shape[1] - lengths  # (U,) each prompt's first column
    columns = start[:, None] + torch.arange(int(lengths.min()) - 1, device=prompt_ids.device)  # (U, m)
    aligned = prompt_ids.gather(1, columns)  # (U, m) the first m tokens of each prompt
    differs = (aligned != aligned[:1]).any(dim=0)  # (m,)
    return int(differs.int().argmax()) if differs.any() else aligned.shape[1]


def prefill(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    rows: Tensor,
    capacity: int,
    *,
    share_prefix: bool = True,
    preallocated: bool = True,
    in_place: bool = True,
) -> tuple[Cache, Tensor, Tensor]:
    """Run each distinct prompt once, their shared prefix once, and hand the KV cache and
    next-token logits to the rows.

    The G rows of a group share their prompt, so their prompt keys and values are identical: the
    prompt runs once per distinct prompt (not G times, as `generate` on the expanded batch does) and
    is gathered to the rows. With `share_prefix`, a prefix that all prompts share
    (`shared_prefix_length`, e.g. the system message) runs once in a pass of its own when that saves
    at least MIN_SHARED_PREFIX_SAVING tokens, and full-attention models only (`run_shared_prefix`).
    With `preallocated`, full-attention layers move into PreallocatedLayer buffers of `capacity`
    tokens (finished rows later leave them `in_place`). Positions follow the mask, as `generate`
    computes them: the same positions, and the same keys and values (float rounding aside), as one
    pass over the prompt.

    Args:
        prompt_ids, prompt_mask: (U, P), left-padded, one row per distinct prompt.
        rows: (N,) the prompt of each row, e.g. [0]*G + [1]*G + ... for the rollout order.
        capacity: prompt plus response tokens the cache must hold, P + max_new_tokens.
    Returns:
        the cache with N rows of P tokens, the logits (N, V) of each row's first response token,
        and the cache's attention mask (N, P) for `decode`.
    """
    cache = DynamicCache(config=base_model(model).config)
    keep = {"logits_to_keep": 1} if takes_logits_to_keep(model) else {}
    U, P = prompt_ids.shape
    mask = prompt_mask.long()  # (U, P) the cache's mask
    shared = 0
    if share_prefix and U > 1 and full_attention_only(model):
        shared = shared_prefix_length(prompt_ids, prompt_mask)
        shared = shared if (U - 1) * shared >= MIN_SHARED_PREFIX_SAVING else 0
    if shared:
        mask = run_shared_prefix(model, prompt_ids, mask, shared, cache)
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, shared:]  # (U, P - C)
    logits = model(
        input_ids=prompt_ids[:, shared:],  # (U, P - C): each prompt's own tokens, left-padded
        attention_mask=mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        **keep,
    ).logits[:, -1]  # (U, V)
    if preallocated:
        preallocate(cache, rows, capacity, in_place)
    else:
        cache.batch_select_indices(rows)
    return cache, logits[rows], mask[rows]


def run_shared_prefix(
    model: torch.nn.Module, prompt_ids: Tensor, mask: Tensor, shared: int, cache: Cache
) -> Tensor:
    """Run the first `shared` tokens, which every prompt starts with, once (a (1, C) pass) into
    `cache`, and repeat their keys and values to the U prompts, which then run their own tokens.
    Returns the cache's mask (U, P): [prefix | padding | own tokens] per row."""
    U, P = prompt_ids.shape
    first = P - int(mask[0].sum())  # prompt 0's first column
    model(
        input_ids=prompt_ids[:1, first : first + shared],  # (1, C)
        position_ids=torch.arange(shared, device=prompt_ids.device)[None],
        past_key_values=cache,
        use_cache=True,
        **({"logits_to_keep": 1} if takes_logits_to_keep(model) else {}),
    )
    cache.batch_repeat_interleave(U)
    own = mask.sum(dim=1, keepdim=True) - shared  # (U, 1) tokens after the prefix
    columns = torch.arange(shared, P, device=prompt_ids.device)  # (P - C,)
    return torch.cat([mask.new_ones(U, shared), (columns >= P - own).long()], dim=1)


@torch.inference_mode()
def decode(
    model: torch.nn.Module,
    cache: Cache,
    logits: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    sampler: Callable[[Tensor], tuple[Tensor, Tensor]],
    in_place: bool = True,
    min_new_tokens: int = 0,
) -> tuple[Tensor, Tensor]:
    """Sample the responses of all rows in one batched loop, one token per step; a row that samples
    EOS leaves the batch (its cache rows go too; with `in_place`, an unfinished row from the end of
    the batch takes its slot, `keep_order`, else the kept rows keep their order), so every step runs
    only unfinished rows.

    `generate` keeps finished rows in the batch until the longest response ends: with responses of
    mixed lengths most of its rows compute padding. Here a step costs what its live rows cost.

    Args:
        cache: the prompts' KV cache, N rows of P tokens (`prefill`).
        logits: (N, V) next-token logits after the prompt.
        attention_mask: (N, P) the mask of the cached prompt tokens (`prefill`), padding 0.
        sampler: logits (n, V) -> tokens (n,) and their log-probs (n,), e.g. a TokenSampler.
        min_new_tokens: EOS's logit is -inf at the steps before this one (transformers'
            MinNewTokensLengthLogitsProcessor), so no row ends before it.
    Returns:
        (N, T) response ids, T = the longest response (<= max_new_tokens), each row padded with
        pad_token_id after its EOS; (N, T) float32 log-probs of the sampled tokens under the
        distribution the sampler drew them from (0 after EOS).
    """
    N = logits.shape[0]
    out = torch.full((N, max_new_tokens), pad_token_id, dtype=torch.long, device=logits.device)  # (N, T)
    out_logprob = torch.zeros(N, max_new_tokens, device=logits.device)  # (N, T)
    live = torch.arange(N, device=logits.device)  # rows still decoding
    mask = attention_mask.long()  # (n, P + t)
    position = mask.sum(dim=1, keepdim=True)  # (n, 1) position of the next token
    width = 0
    for t in range(max_new_tokens):
        if t < min_new_tokens:
            logits = logits.index_fill(1, logits.new_tensor([eos_token_id], dtype=torch.long), -torch.inf)
        token, logprob = sampler(logits)  # (n,), (n,)
        out[live, t], out_logprob[live, t] = token, logprob
        width = t + 1
        going = token != eos_token_id  # (n,)
        if t == max_new_tokens - 1 or not going.any():
            break
        if not going.all():
            keep = keep_order(going) if in_place else going.nonzero().flatten()  # (n,) unfinished rows
            live, token, mask, position = live[keep], token[keep], mask[keep], position[keep]
            cache.batch_select_indices(keep)
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        logits = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=position,
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1]  # (n, V)
        position = position + 1
    return out[:, :width], out_logprob[:, :width]


class DecodeRollout(BaseRollout):
    """The fast decode engine (rollout.engine=hf, or decode): G responses per prompt from a Hugging
    Face causal LM in one batched decode loop (`prefill` + `decode`: the sampling distribution of
    `generate`, without its padding work). Arguments: BaseRollout's, and the speed tricks'
    switches (`tricks`); the prepacking decision of rollout.prepack_linears=auto lives in `prepack`.
    """

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, *, tricks: DecodeTricks | None = None, **kwargs: Any
    ) -> None:
        super().__init__(model, tokenizer, **kwargs)
        self.tricks = tricks or DecodeTricks.from_train_yaml()
        self.prepack = PrepackPolicy(self.tricks.prepack_linears)

    def sample(
        self,
        prompts: list[str],
        group_size: int | None = None,
        *,
        do_sample: bool = True,
        max_new_tokens: int | None = None,
    ) -> RolloutBatch:
        """G responses for each prompt, all n_prompts * G rows in ONE batched decode: each distinct
        prompt runs once (`prefill`), then one loop samples every row's tokens (`decode`).

        do_sample=False decodes greedily (evaluation); then the G rows of a group are identical.
        The model is put in eval mode for generation and restored to its previous mode after.
        """
        G = group_size or self.group_size
        max_new_tokens = max_new_tokens or self.max_new_tokens
        assert prompts, "sample needs at least one prompt"
        device = next(self.model.parameters()).device
        enc = self.encode_prompts(prompts, max_new_tokens)
        input_ids = enc["input_ids"].repeat_interleave(G, dim=0).to(device)  # (n_prompts, P) -> (N, P)
        attention_mask = enc["attention_mask"].repeat_interleave(G, dim=0).to(device)  # (N, P)
        rows = torch.arange(len(prompts), device=device).repeat_interleave(G)  # [0]*G + [1]*G + ...
        sampler = TokenSampler(do_sample, self.temperature, self.top_k, self.top_p)
        with eval_mode(self.model), torch.inference_mode():
            response_ids, rollout_logprob = self.decode_rows(
                enc["input_ids"].to(device), enc["attention_mask"].to(device), rows, max_new_tokens, sampler
            )  # (N, T), (N, T); T <= max_new_tokens: the longest response
        # Leave inference mode: inference tensors cannot be saved for backward by the loss pass.
        response_ids, rollout_logprob = response_ids.clone(), rollout_logprob.clone()
        return self.assemble(prompts, G, input_ids, attention_mask, response_ids, rollout_logprob)

    def decode_rows(
        self,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        rows: Tensor,
        max_new_tokens: int,
        sampler: TokenSampler,
    ) -> tuple[Tensor, Tensor]:
        """`prefill` the distinct prompts (U, P), then `decode` the N = len(rows) rows, with the
        rollout's weights (`rollout_weights`: the policy, or its copy in rollout.dtype) and the tricks
        that are switched on and whose internals work here."""
        preallocated = self.tricks.preallocated_cache and PREALLOCATED_CACHE.available()
        in_place = preallocated and self.tricks.inplace_row_removal
        share_prefix = self.tricks.shared_prefix and SHARED_PREFIX.available()
        with contextlib.ExitStack() as stack:
            model = stack.enter_context(self.rollout_weights())
            if self.prepack.use(model, len(rows), max_new_tokens):
                stack.enter_context(prepacked_linears(model, len(rows)))
            cache, logits, cache_mask = prefill(
                model,
                prompt_ids,
                prompt_mask,
                rows,
                prompt_ids.shape[1] + max_new_tokens,
                share_prefix=share_prefix,
                preallocated=preallocated,
                in_place=in_place,
            )
            return decode(
                model,
                cache,
                logits,
                cache_mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id,
                sampler=sampler,
                in_place=in_place,
                min_new_tokens=self.min_tokens(sampler.do_sample, max_new_tokens),
            )


# the engine's first name, as configs, docs and callers know it (rollout.engine=hf)
HFRollout = DecodeRollout
