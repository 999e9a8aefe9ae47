"""What every rollout engine shares, whatever generates the tokens: the sampling settings, chat-templated
and length-checked prompts, the assembly of a RolloutBatch, and the seed's `generate_responses`.

The engines (common/rollout/decode.py, generate.py, vllm_engine.py) subclass `BaseRollout` and add
`sample`; none inherits another's generation. The loop sees them only as common.rollout.engine.RolloutEngine.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from common.distributed import unwrap
from common.rollout.batch import RolloutBatch, response_mask_from_ids
from common.rollout.seed import generate_responses

# rollout.dtype: the dtype of the weights the engine samples with
ROLLOUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@contextlib.contextmanager
def weights_in(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[torch.nn.Module]:
    """`model` itself when its floating-point parameters already are `dtype`; else a copy of it whose
    parameters are cast to `dtype` once, made on entry and freed on exit (per rollout: the weights
    change after every update). Not autocast, which casts every weight at every call.

    The copy shares nothing with `model` that training changes: deepcopy with the parameters replaced
    by their cast (a tied LM head stays tied: one parameter, one cast); buffers (e.g. rotary
    frequencies) are copied as they are. It holds one more copy of the weights at `dtype`'s size
    (half of float32's for bfloat16) during the rollout.
    """
    params = [p for p in model.parameters() if p.is_floating_point()]
    if all(p.dtype == dtype for p in params):
        yield model
        return
    cast = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in params}
    replica = copy.deepcopy(model, memo=cast)
    try:
        yield replica
    finally:
        del replica, cast


class PromptTooLongError(ValueError):
    """A prompt over the length limit: "prompt <index> <detail>"; `index` is its position in the
    list checked, `detail` says its length and the limit (for a message that names it otherwise)."""

    def __init__(self, index: int, detail: str) -> None:
        super().__init__(f"prompt {index} {detail}")
        self.index, self.detail = index, detail


class BaseRollout:
    """The sampling settings and prompt handling of an engine; subclasses implement `sample`.

    Args:
        model, tokenizer: from `common.models.load_policy` (left padding, pad token set).
        group_size: G, responses per prompt.
        max_new_tokens: response budget in tokens, EOS included.
        min_new_tokens: EOS cannot be sampled before this many tokens (its logit masked to -inf, as
            transformers' MinNewTokensLengthLogitsProcessor does; vLLM: min_tokens); 0 = off. Sampling
            only: greedy decoding (evaluation) stops at EOS. min = max gives every response exactly
            max_new_tokens (equal work for benchmarks); the rollout log-probs are then those of the
            masked distribution the tokens were drawn from.
        temperature, top_p, top_k: sampling; top_p = 1.0 and top_k = 0 switch those filters off.
        system_prompt: system message; None keeps the chat template's default.
        max_prompt_len: longest prompt in tokens after the chat template; None = context - max_new_tokens.
        dtype: rollout.dtype, the weights' dtype while sampling (ROLLOUT_DTYPES): "bfloat16" samples
            from a bf16 copy made per rollout (`rollout_weights`); the engine's log-probs are then
            the bf16 model's (the rollout log-probs that algorithm.rollout_correction corrects for).
    """

    # whether `sync_weights` has work to do after an update (an engine with its own copy of the weights)
    syncs_weights = False

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        group_size: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        system_prompt: str | None = None,
        max_prompt_len: int | None = None,
        dtype: str = "float32",
        min_new_tokens: int = 0,
    ) -> None:
        if group_size < 1 or max_new_tokens < 1:
            raise ValueError(f"group_size ({group_size}) and max_new_tokens ({max_new_tokens}) must be >= 1")
        if not 0 <= min_new_tokens <= max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({min_new_tokens}) must be in [0, max_new_tokens ({max_new_tokens})]"
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling (got {temperature}); use do_sample=False")
        if tokenizer.padding_side != "left":
            raise ValueError("the tokenizer must pad on the left (load it with common.models.load_policy)")
        if dtype not in ROLLOUT_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(ROLLOUT_DTYPES)} (got {dtype!r})")
        self.model = model
        self.tokenizer = tokenizer
        self.group_size = group_size
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.system_prompt = system_prompt
        self.max_prompt_len = max_prompt_len
        self.dtype = dtype
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        )
        self.last_batch: RolloutBatch | None = None

    def rollout_weights(self) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """The module to sample with, for one rollout: the policy (outside DDP), or its copy in
        self.dtype (`weights_in`)."""
        return weights_in(unwrap(self.model), ROLLOUT_DTYPES[self.dtype])

    def min_tokens(self, do_sample: bool, max_new_tokens: int) -> int:
        """The tokens before which EOS is masked in this generation: min_new_tokens when sampling
        (at most max_new_tokens), 0 when greedy."""
        return min(self.min_new_tokens, max_new_tokens) if do_sample else 0

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
        """Raise PromptTooLongError (a ValueError) for the first prompt that would not fit (checked
        once at start-up); its `index` is the prompt's position in `prompts`."""
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
                    raise PromptTooLongError(
                        i, f"is {length} tokens long, over the limit of {limit} ({what})"
                    )

    def sample(
        self,
        prompts: list[str],
        group_size: int | None = None,
        *,
        do_sample: bool = True,
        max_new_tokens: int | None = None,
    ) -> RolloutBatch:
        """G responses for each prompt in ONE batched generation, rows [q1]*G + [q2]*G + ...;
        do_sample=False decodes greedily (evaluation). The model's train/eval mode is restored."""
        raise NotImplementedError(f"{type(self).__name__} must implement sample")

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
        rollout_logprob: Tensor,
    ) -> RolloutBatch:
        """The RolloutBatch of generated responses: prompt block (N, P) and its mask as sampled,
        response ids (N, T) masked through each row's first EOS and padded after it, decoded text,
        and the engine's log-probs (N, T) of the sampled tokens (0 after EOS, whatever they were)."""
        response_mask, lengths, truncated = response_mask_from_ids(response_ids, self.eos_token_id)
        response_ids = response_ids.masked_fill(response_mask == 0, self.pad_token_id)
        rollout_logprob = rollout_logprob.float().masked_fill(response_mask == 0, 0.0)  # -inf after EOS -> 0
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
            rollout_logprob=rollout_logprob,
        )

    def sync_weights(self, model: torch.nn.Module) -> None:
        """After an update: nothing to do when the engine samples from the policy module itself."""

    def generate_responses(self, prompts: list[str]) -> tuple[list[str], Tensor, list[str]]:
        """The seed's contract (common.rollout.seed.generate_responses); the batch is kept in `last_batch`."""
        return generate_responses(self, prompts)
