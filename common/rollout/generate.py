"""The plain engine (rollout.engine=generate): transformers' public `model.generate`, one batched call.

No private internals and no speed tricks: the N = n_prompts x G rows (each prompt repeated G times)
go through `generate` together, with a GenerationConfig that sets everything that shapes the
distribution (so a checkpoint's own generation defaults, e.g. a repetition penalty, do not apply).
It is the reference the decode engine is tested against, the fallback when a transformers release
breaks the decode engine's internals, and the benchmark's honest baseline. Its cost against the
decode engine: every prompt runs G times, and finished rows keep decoding padding until the
longest response ends. Its rollout log-probs come from the processed scores `generate` returns
(`output_scores`: one (N, V) tensor per step, after temperature, top-k and top-p), which it keeps for
the whole response: T x N x V floats more memory than the decode engine, which keeps none.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import GenerationConfig

from common.logprobs import eval_mode
from common.rollout.base import BaseRollout
from common.rollout.batch import RolloutBatch


class GenerateRollout(BaseRollout):
    """G responses per prompt from `model.generate` in one batched call. Arguments: BaseRollout's."""

    def generation_config(self, do_sample: bool, max_new_tokens: int) -> GenerationConfig:
        """Sampling at the temperature with top-k / top-p (0 / 1.0 switch them off) and EOS masked for
        the first min_new_tokens (`min_tokens`), or greedy."""
        sampling = dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p) if do_sample else {}
        return GenerationConfig(
            do_sample=do_sample,
            max_new_tokens=max_new_tokens,
            min_new_tokens=self.min_tokens(do_sample, max_new_tokens),
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            return_dict_in_generate=True,
            output_scores=do_sample,  # the distributions drawn from, for the rollout log-probs
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
        with eval_mode(self.model), torch.inference_mode(), self.rollout_weights() as model:
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=self.generation_config(do_sample, max_new_tokens),
            )  # out.sequences (N, P + T), T <= max_new_tokens: the longest response
            response_ids = out.sequences[:, input_ids.shape[1] :]  # (N, T)
            if do_sample:
                rollout_logprob = chosen_logprobs(out.scores, response_ids)
            else:  # greedy draws from a point mass
                rollout_logprob = torch.zeros(response_ids.shape, device=device)
        # leave inference mode (see decode.py)
        response_ids, rollout_logprob = response_ids.clone(), rollout_logprob.clone()
        return self.assemble(prompts, G, input_ids, attention_mask, response_ids, rollout_logprob)


def chosen_logprobs(scores: tuple[Tensor, ...], response_ids: Tensor) -> Tensor:
    """log softmax(scores_t)[y_t] per step: the log-prob of each sampled token y_t under the processed
    scores it was drawn from (`generate`'s output_scores: T tensors (N, V)) -> (N, T) float32."""
    return torch.stack(
        [
            torch.log_softmax(step.float(), dim=-1).gather(1, tokens[:, None]).squeeze(1)
            for step, tokens in zip(scores, response_ids.T, strict=True)
        ],
        dim=1,
    )
