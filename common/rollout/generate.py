"""The plain engine (rollout.engine=generate): transformers' public `model.generate`, one batched call.

No private internals and no speed tricks: the N = n_prompts x G rows (each prompt repeated G times)
go through `generate` together, with a GenerationConfig that sets everything that shapes the
distribution (so a checkpoint's own generation defaults, e.g. a repetition penalty, do not apply).
It is the reference the decode engine is tested against, the fallback when a transformers release
breaks the decode engine's internals, and the benchmark's honest baseline. Its cost against the
decode engine: every prompt runs G times, and finished rows keep decoding padding until the
longest response ends.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from common.distributed import unwrap
from common.logprobs import eval_mode
from common.rollout.base import BaseRollout
from common.rollout.batch import RolloutBatch


class GenerateRollout(BaseRollout):
    """G responses per prompt from `model.generate` in one batched call. Arguments: BaseRollout's."""

    def generation_config(self, do_sample: bool, max_new_tokens: int) -> GenerationConfig:
        """Sampling at the temperature with top-k / top-p (0 / 1.0 switch them off), or greedy."""
        sampling = dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p) if do_sample else {}
        return GenerationConfig(
            do_sample=do_sample,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            **sampling,
        )

    def sample(
        self,
        prompts: list[str],
        group_size: int | None = None,
        *,
        do_sample: bool = True,
        max_new_tokens: int | None = None,
    ) -> RolloutBatch:
        """G responses for each prompt, all n_prompts * G rows in ONE `generate` call (see
        BaseRollout.sample)."""
        G = group_size or self.group_size
        max_new_tokens = max_new_tokens or self.max_new_tokens
        assert prompts, "sample needs at least one prompt"
        device = next(self.model.parameters()).device
        enc = self.encode_prompts(prompts, max_new_tokens)
        input_ids = enc["input_ids"].repeat_interleave(G, dim=0).to(device)  # (n_prompts, P) -> (N, P)
        attention_mask = enc["attention_mask"].repeat_interleave(G, dim=0).to(device)  # (N, P)
        with eval_mode(self.model), torch.inference_mode():
            sequences = unwrap(self.model).generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=self.generation_config(do_sample, max_new_tokens),
            )  # (N, P + T), T <= max_new_tokens: the longest response
        response_ids = sequences[:, input_ids.shape[1] :].clone()  # leave inference mode (see decode.py)
        return self.assemble(prompts, G, input_ids, attention_mask, response_ids)
