"""Rollout engines: G sampled responses per prompt in one batched generation, as a RolloutBatch.

    batch.py        RolloutBatch (token ids, masks, lengths, groups), response masks through EOS
    engine.py       RolloutEngine, the protocol the loop is typed against; make_engine(rollout.engine)
    base.py         what every engine shares: sampling settings, chat-templated prompts, batch assembly
    seed.py         the seed's contract, generate_responses(prompts)
    decode.py       the fast decode engine (rollout.engine=hf or decode): prefill once per prompt, decode loop
    kv_cache.py     its KV cache: preallocated buffers, finished rows removed in place
    prepack.py      its prepacked oneDNN linears
    sampler.py      its sampler: generate's distribution by a two-level inverse CDF
    generate.py     the plain engine (rollout.engine=generate): transformers' public generate
    vllm_engine.py  vLLM (rollout.engine=vllm, GPU only, optional)

The training log-prob pass (packing, chunked log-probs) is common.logprobs. The engine classes load on
first use (`common.rollout.HFRollout`), so importing this package (the loop does) loads none of them.
"""

import importlib
from typing import Any

from common.logprobs import eval_mode, sequence_logprobs
from common.rollout.batch import RolloutBatch, response_mask_from_ids
from common.rollout.engine import ENGINES, RolloutEngine, make_engine

# name -> the module that defines it, imported on first access (PEP 562)
_ENGINE_CLASSES = {
    "HFRollout": "common.rollout.decode",
    "DecodeRollout": "common.rollout.decode",
    "GenerateRollout": "common.rollout.generate",
}

__all__ = [
    "ENGINES",
    "RolloutBatch",
    "RolloutEngine",
    "eval_mode",
    "make_engine",
    "response_mask_from_ids",
    "sequence_logprobs",
    *_ENGINE_CLASSES,
]


def __getattr__(name: str) -> Any:
    if name in _ENGINE_CLASSES:
        return getattr(importlib.import_module(_ENGINE_CLASSES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
