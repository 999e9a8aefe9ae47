"""vLLM rollout engine (`rollout.engine=vllm`): generation on a GPU through vLLM, the same batch as
the other engines (BaseRollout's prompts and assembly; a vllm.LLM does the sampling).

Only the sampling moves to vLLM (paged attention, continuous batching, prefix sharing within a
group); the training forward still computes every log-prob (old, reference, current), so the loss
never sees vLLM's numbers. After each update `sync_weights` copies the policy's weights into the
engine (the TRL "colocate" pattern: one process, one GPU, vLLM holding `gpu_memory_utilization` of
its memory).

vLLM is an optional extra (`pip install vllm`, CUDA only) imported lazily: nothing here runs on
import, and `VLLMRollout` raises a clear error when vLLM or CUDA is missing.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

from common.models import is_lora, merged_copy
from common.rollout.base import BaseRollout
from common.rollout.batch import RolloutBatch


class VLLMUnavailableError(RuntimeError):
    """vLLM or a CUDA device is missing."""


def vllm_available() -> tuple[bool, str]:
    """(usable, reason): vLLM needs the package and a CUDA device."""
    if importlib.util.find_spec("vllm") is None:
        return False, "vLLM is not installed (pip install vllm; GPU only)"
    if not torch.cuda.is_available():
        return False, "vLLM needs a CUDA GPU and none is available"
    return True, ""


def _load_weights(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Runs inside vLLM's worker (LLM.collective_rpc): load HF-named tensors into its model."""
    worker.model_runner.model.load_weights(weights=weights)


class VLLMRollout(BaseRollout):
    """The engine interface (common.rollout.engine.RolloutEngine) with a vllm.LLM doing the sampling.

    Args (besides BaseRollout's):
        model_path: a local HF folder with the policy's weights (config + tokenizer), from which vLLM
            builds its copy; the caller passes the converted / downloaded model folder.
        gpu_memory_utilization: share of the GPU vLLM may take for weights and KV cache (verl:
            rollout.gpu_memory_utilization; TRL: vllm_gpu_memory_utilization).
        seed: vLLM's sampling seed.
    BaseRollout's `dtype` (rollout.dtype) is vLLM's weight dtype.
    """

    syncs_weights = True  # vLLM holds its own copy of the weights

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        model_path: str,
        gpu_memory_utilization: float = 0.3,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        usable, reason = vllm_available()
        if not usable:
            raise VLLMUnavailableError(f"rollout.engine=vllm: {reason}")
        super().__init__(model, tokenizer, **kwargs)
        # one process: the engine core in this process, so weights sync without a copy to another
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import vllm

        self._vllm = vllm
        self.llm = vllm.LLM(
            model=model_path,
            tokenizer=model_path,
            dtype=self.dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            enable_prefix_caching=True,
            # the log-probs it returns are those of the distribution it samples from (after temperature,
            # top-k, top-p), not of the raw logits: the rollout log-probs of the batch
            logprobs_mode="processed_logprobs",
        )
        self.sync_weights(model)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy the policy's current weights into the vLLM engine (after every update); a LoRA
        policy is merged first, so vLLM gets plain HF parameter names. An FSDP-sharded policy must
        be inside `common.distributed.gathered` (the trainer does that): its parameters are then
        whole tensors. Parameters, not `state_dict()`: FSDP's state-dict hook hands out the shards
        (and Llama keeps no persistent buffer that vLLM needs; a tied head comes once)."""
        source = merged_copy(model) if is_lora(model) else model
        weights = [(name, p.detach()) for name, p in source.named_parameters()]
        self.llm.collective_rpc(_load_weights, args=(weights,))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def sample(
        self,
        prompts: list[str],
        group_size: int | None = None,
        *,
        do_sample: bool = True,
        max_new_tokens: int | None = None,
    ) -> RolloutBatch:
        """G responses per prompt from vLLM (SamplingParams.n = G keeps them in group order),
        assembled into the same left-padded prompt + right-padded response batch as every engine."""
        G = group_size or self.group_size
        max_new_tokens = max_new_tokens or self.max_new_tokens
        enc = self.encode_prompts(prompts, max_new_tokens)
        prompt_lengths = enc["attention_mask"].sum(dim=1)  # (n_prompts,)
        P = enc["input_ids"].shape[1]
        requests = [
            {"prompt_token_ids": row[P - n :].tolist()}
            for row, n in zip(enc["input_ids"], prompt_lengths, strict=True)
        ]
        params = self._vllm.SamplingParams(
            n=G,
            max_tokens=max_new_tokens,
            min_tokens=self.min_tokens(do_sample, max_new_tokens),
            temperature=self.temperature if do_sample else 0.0,
            top_p=self.top_p if do_sample else 1.0,
            top_k=self.top_k if (do_sample and self.top_k > 0) else -1,
            stop_token_ids=[self.eos_token_id],
            logprobs=0 if do_sample else None,  # 0: the sampled token's log-prob only
        )
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        completions = [c for out in outputs for c in out.outputs]  # (N,) [q1]*G + ...
        T = max(len(c.token_ids) for c in completions)
        response_ids = torch.full((len(completions), T), self.pad_token_id, dtype=torch.long)
        rollout_logprob = torch.zeros(len(completions), T)  # greedy: a point mass, log-prob 0
        for i, c in enumerate(completions):
            response_ids[i, : len(c.token_ids)] = torch.tensor(list(c.token_ids), dtype=torch.long)
            if do_sample:  # c.logprobs: per token, {token id: Logprob}
                steps = [step[token].logprob for step, token in zip(c.logprobs, c.token_ids, strict=True)]
                rollout_logprob[i, : len(steps)] = torch.tensor(steps)
        device = next(self.model.parameters()).device
        input_ids = enc["input_ids"].repeat_interleave(G, dim=0).to(device)  # (N, P)
        attention_mask = enc["attention_mask"].repeat_interleave(G, dim=0).to(device)  # (N, P)
        return self.assemble(
            prompts, G, input_ids, attention_mask, response_ids.to(device), rollout_logprob.to(device)
        )
