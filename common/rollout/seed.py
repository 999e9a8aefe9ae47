"""The seed's contract: `generate_responses(prompts) -> (responses, log_probs, prompts_expanded)`.

The interface the design card fixes (ARCHITECTURE.md, "Core API"): one batched, sampled generation
of G responses per prompt, in the order [q1]*G + [q2]*G + ..., with the log-probs of the sampled
tokens under the policy at the sampling temperature. Every engine offers it (BaseRollout).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from common.logprobs import eval_mode, sequence_logprobs

if TYPE_CHECKING:  # the engines import this module
    from common.rollout.base import BaseRollout


def generate_responses(engine: BaseRollout, prompts: list[str]) -> tuple[list[str], Tensor, list[str]]:
    """Sample G responses per prompt with `engine` (do_sample=True, one batched call) and score them
    with the policy's training forward.

    Returns:
        responses: (N,) decoded texts, N = len(prompts) * G.
        log_probs: (N, T) float32 log-probs at the sampling temperature, 0 where response_mask is 0.
        prompts_expanded: (N,) [q1]*G + [q2]*G + ...; reward response i against prompts_expanded[i].
    The full batch (ids, masks, lengths) is kept in `engine.last_batch`.
    """
    batch = engine.sample(prompts)
    with eval_mode(engine.model), torch.no_grad():
        logprob, _ = sequence_logprobs(
            engine.model,
            batch.input_ids,
            batch.attention_mask,
            batch.prompt_len,
            temperature=engine.temperature,
        )
    engine.last_batch = batch
    return batch.responses, logprob * batch.response_mask, batch.prompts_expanded
