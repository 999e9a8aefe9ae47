"""Fences around the speed tricks that rest on private internals of transformers or torch.

Each trick has a config switch, and a feature check that decides whether the internals it needs are
there and still behave as the trick expects:

    prepacked linears (rollout.prepack_linears): torch.ops.mkldnn._reorder_linear_weight and
        torch.ops.mkldnn._linear_pointwise
    preallocated KV cache and in-place removal of finished rows (rollout.preallocated_cache,
        rollout.inplace_row_removal): a subclass of transformers.cache_utils.DynamicLayer, and
        DynamicCache.layers
    shared-prefix prefill (rollout.shared_prefix): Cache.batch_repeat_interleave, and the config's
        attention layer types (every layer full attention)
    packed training pass (trainer.packed_forward): config._attn_implementation (sdpa and eager take
        a custom 4D mask), every layer full attention

When a check fails (after a transformers or torch upgrade, or for a model the trick does not fit),
the plain path runs instead and one warning per process says why, instead of training breaking.
A process-wide check is a `Fence` (probed once, on first use); a per-model one calls `warn_once`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import ClassVar

import torch

from common.distributed import unwrap

log = logging.getLogger("rl_lab")

# the private config attribute that names a model's attention kernel (read by `attention_implementation`)
ATTN_IMPLEMENTATION_ATTR = "_attn_implementation"

_warned: set[str] = set()  # messages logged so far: one warning per process and reason


def warn_once(message: str) -> None:
    """Log `message` as a warning the first time it comes up in this process."""
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


class Fence:
    """A trick's process-wide feature check: `probe()` returns None when the internals are usable,
    else the reason they are not. It runs once, on the first `available()`; a failed probe is
    warned about once, naming the switch and the plain path that runs instead."""

    instances: ClassVar[list[Fence]] = []

    def __init__(self, switch: str, probe: Callable[[], str | None], fallback: str) -> None:
        self.switch = switch
        self.probe = probe
        self.fallback = fallback
        self._reason: str | None = None
        self._probed = False
        Fence.instances.append(self)

    def available(self) -> bool:
        if not self._probed:
            self._reason, self._probed = self.probe(), True
            if self._reason is not None:
                warn_once(f"{self.switch}: {self._reason}; {self.fallback} instead")
        return self._reason is None

    @classmethod
    def reset_all(cls) -> None:
        """Forget every probe's result and the warnings given (tests that take an internal away)."""
        for fence in cls.instances:
            fence._probed, fence._reason = False, None
        _warned.clear()


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP and peft (LoRA) wrappers."""
    inner = unwrap(model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the causal LM can compute logits for the last k positions only (`logits_to_keep`);
    a peft wrapper's forward takes **kwargs and hands them to its base model, so that one is asked."""
    return "logits_to_keep" in inspect.signature(base_model(model).forward).parameters


def attention_implementation(model: torch.nn.Module) -> str | None:
    """The model's attention kernel (the private config._attn_implementation), e.g. "sdpa"; None when
    the attribute is gone."""
    return getattr(base_model(model).config, ATTN_IMPLEMENTATION_ATTR, None)


def attention_layer_types(model: torch.nn.Module) -> list[str]:
    """Each decoder layer's attention kind: the config's `layer_types` (e.g. "full_attention",
    "sliding_attention"), or, for configs without it (Mistral), one kind for all layers inferred as
    transformers' DynamicCache does: a `sliding_window` or an `attention_chunk_size` set, else full."""
    config = base_model(model).config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    if getattr(config, "layer_types", None):
        return list(config.layer_types)
    if getattr(config, "sliding_window", None) is not None:
        kind = "sliding_attention"
    elif getattr(config, "attention_chunk_size", None) is not None:
        kind = "chunked_attention"
    else:
        kind = "full_attention"
    return [kind] * config.num_hidden_layers


def full_attention_only(model: torch.nn.Module) -> bool:
    """Every layer attends to all earlier tokens (Llama, SmolLM2, Qwen2 without its window): what a
    dense 4D mask (the packed pass) and a cache shared by prompts (the shared prefix) assume."""
    return all(kind == "full_attention" for kind in attention_layer_types(model))
