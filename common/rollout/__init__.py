"""Rollout engines: G sampled responses per prompt in one batched generation, as a RolloutBatch.

    batch.py        RolloutBatch (token ids, masks, lengths, groups), response masks through EOS
    decode.py       the fast decode engine (rollout.engine=hf): prefill once per prompt, decode loop
    kv_cache.py     its KV cache: preallocated buffers, finished rows removed in place
    prepack.py      its prepacked oneDNN linears
    sampler.py      its sampler: generate's distribution by a two-level inverse CDF
    vllm_engine.py  vLLM (rollout.engine=vllm, GPU only, optional)

The training log-prob pass (packing, chunked log-probs) is common.logprobs.
"""

from common.logprobs import eval_mode, sequence_logprobs
from common.rollout.batch import RolloutBatch, response_mask_from_ids
from common.rollout.decode import HFRollout

__all__ = ["HFRollout", "RolloutBatch", "eval_mode", "response_mask_from_ids", "sequence_logprobs"]
