"""The rollout engine as the loop sees it (`RolloutEngine`), and the engines by name (`make_engine`).

The training loop, sampling, evaluation and the scripts are typed against the protocol alone and
import no concrete engine; `rollout.engine` picks one:

    hf, decode   common.rollout.decode.DecodeRollout: the fast batched decode loop (CPU or GPU)
    generate     common.rollout.generate.GenerateRollout: transformers' public `generate`, one
                 batched call (the reference, the fallback, the benchmark's baseline)
    vllm         common.rollout.vllm_engine.VLLMRollout: vLLM on a GPU (optional extra)
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from common.rollout.batch import RolloutBatch

ENGINES = ("hf", "decode", "generate", "vllm")


class RolloutEngine(Protocol):
    """Samples G responses per prompt in ONE batched generation (rows [q1]*G + [q2]*G + ...).

    `sample` returns the RolloutBatch, with the engine's own log-probs of the distribution it drew
    each token from (`rollout_logprob`); `generate_responses` is the seed's contract
    (common.rollout.seed). An engine that keeps its own copy of the weights (`syncs_weights`) gets
    the policy's after each update through `sync_weights`. `check_prompts` raises ValueError for a
    prompt that does not fit (run once at start-up); `format_prompts` applies the chat template.
    """

    model: torch.nn.Module
    tokenizer: Any
    group_size: int
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    eos_token_id: int
    pad_token_id: int
    syncs_weights: bool

    def sample(
        self,
        prompts: list[str],
        group_size: int | None = None,
        *,
        do_sample: bool = True,
        max_new_tokens: int | None = None,
    ) -> RolloutBatch: ...

    def generate_responses(self, prompts: list[str]) -> tuple[list[str], Tensor, list[str]]: ...

    def check_prompts(self, prompts: list[str]) -> None: ...

    def format_prompts(self, prompts: list[str]) -> list[str]: ...

    def sync_weights(self, model: torch.nn.Module) -> None: ...


def make_engine(name: str, model: torch.nn.Module, tokenizer: Any, **kwargs: Any) -> RolloutEngine:
    """The engine `name` (one of ENGINES) on `model`; kwargs are its constructor's (BaseRollout's
    sampling settings, plus the decode engine's `tricks` or vLLM's `model_path`, ...). Each engine's
    module is imported here, on demand: vLLM's only when it is asked for."""
    if name in ("hf", "decode"):
        from common.rollout.decode import DecodeRollout

        return DecodeRollout(model, tokenizer, **kwargs)
    if name == "generate":
        from common.rollout.generate import GenerateRollout

        return GenerateRollout(model, tokenizer, **kwargs)
    if name == "vllm":
        from common.rollout.vllm_engine import VLLMRollout

        return VLLMRollout(model, tokenizer, **kwargs)
    raise ValueError(f"unknown rollout engine {name!r}; options: {', '.join(ENGINES)}")
