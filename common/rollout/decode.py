"""The fast decode engine (rollout.engine=hf): each distinct prompt prefilled once (its shared prefix
once), then one batched loop samples a token per live row per step, finished rows leaving the batch."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from common.distributed import unwrap
from common.fences import base_model, takes_logits_to_keep
from common.logprobs import eval_mode, sequence_logprobs
from common.rollout.batch import RolloutBatch, response_mask_from_ids
from common.rollout.kv_cache import PreallocatedLayer, keep_order
from common.rollout.prepack import prepacked_linears
from common.rollout.sampler import TokenSampler

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
    model: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, rows: Tensor, capacity: int
) -> tuple[Cache, Tensor, Tensor]:
    """Run each distinct prompt once, their shared prefix once, and hand the KV cache and
    next-token logits to the rows.

    The G rows of a group share their prompt, so their prompt keys and values are identical: the
    prompt runs once per distinct prompt (not G times, as `generate` on the expanded batch does) and
    is gathered to the rows. A prefix that all prompts share (`shared_prefix_length`, e.g. the
    system message) runs once in a pass of its own when that saves at least
    MIN_SHARED_PREFIX_SAVING tokens, and full-attention models only; its cache is repeated to the
    prompts, which then run their own tokens. The cache then holds [prefix | padding | own
    tokens] per row, and its mask says so. Full-attention layers move into PreallocatedLayer
    buffers of `capacity` tokens. Positions follow the mask, as `generate` computes them: the same
    positions, and the same keys and values (float rounding aside), as one pass over the prompt.

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
    if U > 1 and all(type(layer) is DynamicLayer for layer in cache.layers):
        shared = shared_prefix_length(prompt_ids, prompt_mask)
        shared = shared if (U - 1) * shared >= MIN_SHARED_PREFIX_SAVING else 0
    if shared:
        first = P - int(mask[0].sum())  # prompt 0's first column
        model(
            input_ids=prompt_ids[:1, first : first + shared],  # (1, C)
            position_ids=torch.arange(shared, device=prompt_ids.device)[None],
            past_key_values=cache,
            use_cache=True,
            **keep,
        )
        cache.batch_repeat_interleave(U)
        own = mask.sum(dim=1, keepdim=True) - shared  # (U, 1) tokens after the prefix
        columns = torch.arange(shared, P, device=prompt_ids.device)  # (P - C,)
        mask = torch.cat([mask.new_ones(U, shared), (columns >= P - own).long()], dim=1)
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, shared:]  # (U, P - C)
    logits = model(
        input_ids=prompt_ids[:, shared:],  # (U, P - C): each prompt's own tokens, left-padded
        attention_mask=mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        **keep,
    ).logits[:, -1]  # (U, V)
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.is_initialized:
            cache.layers[i] = PreallocatedLayer(
                layer.keys.index_select(0, rows), layer.values.index_select(0, rows), capacity
            )
        else:  # other layer kinds (sliding windows) keep their own storage
            layer.batch_select_indices(rows)
    return cache, logits[rows], mask[rows]


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
    sampler: Callable[[Tensor], Tensor],
) -> Tensor:
    """Sample the responses of all rows in one batched loop, one token per step; a row that samples
    EOS leaves the batch (its cache rows go too; an unfinished row from the end of the batch takes
    its slot, `keep_order`), so every step runs only unfinished rows.

    `generate` keeps finished rows in the batch until the longest response ends: with responses of
    mixed lengths most of its rows compute padding. Here a step costs what its live rows cost.

    Args:
        cache: the prompts' KV cache, N rows of P tokens (`prefill`).
        logits: (N, V) next-token logits after the prompt.
        attention_mask: (N, P) the mask of the cached prompt tokens (`prefill`), padding 0.
        sampler: logits (n, V) -> tokens (n,), e.g. a TokenSampler.
    Returns:
        (N, T) response ids, T = the longest response (<= max_new_tokens); each row is padded with
        pad_token_id after its EOS.
    """
    N = logits.shape[0]
    out = torch.full((N, max_new_tokens), pad_token_id, dtype=torch.long, device=logits.device)  # (N, T)
    live = torch.arange(N, device=logits.device)  # rows still decoding
    mask = attention_mask.long()  # (n, P + t)
    position = mask.sum(dim=1, keepdim=True)  # (n, 1) position of the next token
    width = 0
    for t in range(max_new_tokens):
        token = sampler(logits)  # (n,)
        out[live, t] = token
        width = t + 1
        going = token != eos_token_id  # (n,)
        if t == max_new_tokens - 1 or not going.any():
            break
        if not going.all():
            keep = keep_order(going)  # (n,) the unfinished rows, in their new order
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
    return out[:, :width]


class HFRollout:
    """Samples G responses per prompt from a Hugging Face causal LM in one batched decode loop
    (`prefill` + `decode`: the sampling distribution of `generate`, without its padding work).

    Args:
        model, tokenizer: from `common.models.load_policy` (left padding, pad token set).
        group_size: G, responses per prompt.
        max_new_tokens: response budget in tokens, EOS included.
        temperature, top_p, top_k: sampling; top_p = 1.0 and top_k = 0 switch those filters off.
        system_prompt: system message; None keeps the chat template's default.
        max_prompt_len: longest prompt in tokens after the chat template; None = context - max_new_tokens.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        group_size: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        system_prompt: str | None = None,
        max_prompt_len: int | None = None,
    ):
        if group_size < 1 or max_new_tokens < 1:
            raise ValueError(f"group_size ({group_size}) and max_new_tokens ({max_new_tokens}) must be >= 1")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling (got {temperature}); use do_sample=False")
        if tokenizer.padding_side != "left":
            raise ValueError("the tokenizer must pad on the left (load it with common.models.load_policy)")
        self.model = model
        self.tokenizer = tokenizer
        self.group_size = group_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.system_prompt = system_prompt
        self.max_prompt_len = max_prompt_len
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        )
        self.last_batch: RolloutBatch | None = None

    def format_prompts(self, prompts: list[str]) -> list[str]:
        """Chat-template each user prompt, ending with the assistant header (add_generation_prompt)."""
        if getattr(self.tokenizer, "chat_template", None) is None:  # base model: plain text
            return [f"{self.system_prompt}\n\n{p}" if self.system_prompt else p for p in prompts]
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [
            self.tokenizer.apply_chat_template(
                system + [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]

    def check_prompts(self, prompts: list[str]) -> None:
        """Raise ValueError naming the first prompt that would not fit (checked once at start-up)."""
        enc = self.tokenizer(self.format_prompts(prompts), add_special_tokens=False)
        self._check_prompt_lengths([len(ids) for ids in enc["input_ids"]], self.max_new_tokens)

    def _check_prompt_lengths(self, prompt_lengths: list[int], max_new_tokens: int) -> None:
        context = getattr(self.model.config, "max_position_embeddings", None)
        limits = []
        if self.max_prompt_len is not None:
            limits.append((self.max_prompt_len, f"max_prompt_len {self.max_prompt_len}"))
        if context is not None:
            limits.append((context - max_new_tokens, f"context {context} - max_new_tokens {max_new_tokens}"))
        for i, length in enumerate(prompt_lengths):
            for limit, what in limits:
                if length > limit:
                    raise ValueError(
                        f"prompt {i} is {length} tokens long, over the limit of {limit} ({what})"
                    )

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
        n_prompts = len(prompts)
        assert n_prompts > 0, "sample needs at least one prompt"
        device = next(self.model.parameters()).device

        enc = self.encode_prompts(prompts, max_new_tokens)
        input_ids = enc["input_ids"].repeat_interleave(G, dim=0).to(device)  # (n_prompts, P) -> (N, P)
        attention_mask = enc["attention_mask"].repeat_interleave(G, dim=0).to(device)  # (N, P)
        P = input_ids.shape[1]

        sampler = TokenSampler(do_sample, self.temperature, self.top_k, self.top_p)
        model = unwrap(self.model)
        with eval_mode(self.model), torch.inference_mode(), prepacked_linears(model, len(input_ids)):
            rows = torch.arange(n_prompts, device=device).repeat_interleave(G)  # [0]*G + [1]*G + ...
            cache, logits, cache_mask = prefill(
                model, enc["input_ids"].to(device), enc["attention_mask"].to(device), rows, P + max_new_tokens
            )
            response_ids = decode(
                model,
                cache,
                logits,
                cache_mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id,
                sampler=sampler,
            )  # (N, T), T <= max_new_tokens: the longest response
        # Leave inference mode: inference tensors cannot be saved for backward by the loss pass.
        response_ids = response_ids.clone()

        return self.assemble(prompts, G, input_ids, attention_mask, response_ids)

    def encode_prompts(self, prompts: list[str], max_new_tokens: int) -> dict[str, Tensor]:
        """Chat-templated prompts tokenised once each, left-padded to (n_prompts, P); raises
        ValueError for a prompt that does not fit. The template already holds the special tokens."""
        enc = self.tokenizer(
            self.format_prompts(prompts), return_tensors="pt", padding=True, add_special_tokens=False
        )
        self._check_prompt_lengths(enc["attention_mask"].sum(dim=1).tolist(), max_new_tokens)
        return enc

    def assemble(
        self,
        prompts: list[str],
        group_size: int,
        input_ids: Tensor,
        attention_mask: Tensor,
        response_ids: Tensor,
    ) -> RolloutBatch:
        """The RolloutBatch of generated responses: prompt block (N, P) and its mask as sampled,
        response ids (N, T) masked through each row's first EOS and padded after it, decoded text."""
        response_mask, lengths, truncated = response_mask_from_ids(response_ids, self.eos_token_id)
        response_ids = response_ids.masked_fill(response_mask == 0, self.pad_token_id)
        texts = self.tokenizer.batch_decode(
            [row[:n].tolist() for row, n in zip(response_ids, lengths.tolist(), strict=True)],
            skip_special_tokens=True,
        )
        return RolloutBatch(
            input_ids=torch.cat([input_ids, response_ids], dim=1),  # (N, P + T)
            attention_mask=torch.cat([attention_mask, response_mask.long()], dim=1),
            response_mask=response_mask,
            prompt_len=input_ids.shape[1],
            prompts_expanded=[p for p in prompts for _ in range(group_size)],
            responses=texts,
            lengths=lengths,
            truncated=truncated,
            group_index=torch.arange(len(prompts), device=input_ids.device).repeat_interleave(group_size),
            pad_token_id=self.pad_token_id,
        )

    # whether `sync_weights` has work to do after an update (an engine with its own copy of the weights)
    syncs_weights = False

    def sync_weights(self, model: torch.nn.Module) -> None:
        """After an update: nothing to do, this engine samples from the policy module itself."""

    def generate_responses(self, prompts: list[str]) -> tuple[list[str], Tensor, list[str]]:
        """Sample G responses per prompt and score them (the seed's contract).

        Returns:
            responses: (N,) decoded texts, N = len(prompts) * G.
            log_probs: (N, T) float32 log-probs at the sampling temperature, 0 where response_mask is 0.
            prompts_expanded: (N,) [q1]*G + [q2]*G + ...; reward response i against prompts_expanded[i].
        The full batch (ids, masks, lengths) is kept in `self.last_batch`.
        """
        batch = self.sample(prompts)
        with eval_mode(self.model), torch.no_grad():
            logprob, _ = sequence_logprobs(
                self.model,
                batch.input_ids,
                batch.attention_mask,
                batch.prompt_len,
                temperature=self.temperature,
            )
        self.last_batch = batch
        return batch.responses, logprob * batch.response_mask, batch.prompts_expanded
