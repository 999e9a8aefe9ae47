"""The PPO critic: a transformer body with a scalar value head, one value per response token.

V(s_t) is read from the hidden state that also produces the policy's logits for token t, i.e. the
state after the prompt and the first t response tokens. This is the alignment of verl's critic
(`values[:, -response_length - 1 : -1]`) and of TRL's PPOTrainer value model.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn
from transformers import AutoModel, PreTrainedModel

from common.config import HEAD_INITS
from common.models import is_lora, merged_copy


class ValueModel(nn.Module):
    """Transformer backbone (no LM head) + nn.Linear(hidden, 1).

    The head's initialisation (`head_init`, config critic.head_init):
        normal  weight ~ N(0, 1 / (hidden + 1)), bias 0: the scalar-head initialisation of OpenAI's
                lm-human-preferences as reproduced by Huang et al. 2024 (arXiv:2403.17031). The first
                values are of the final hidden state's scale: on SmolLM2-135M (hidden RMS 2.0) about
                +-1 per token, a mean of -0.2 to 1.3 depending on the seed, the reward's whole range.
        zeros   weight and bias 0: the first values are exactly 0, so the first GAE advantages are
                the discounted rewards (KL term included). The head gets the gradient at once
                (d value / d weight = the hidden state); the backbone from the head's first update on.

    Args:
        backbone: a Hugging Face base model returning `last_hidden_state` (e.g. LlamaModel).
        head_init: "normal" or "zeros" (HEAD_INITS).
    """

    def __init__(self, backbone: PreTrainedModel, head_init: str = "normal") -> None:
        super().__init__()
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init {head_init!r}: expected one of {', '.join(HEAD_INITS)}")
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        if head_init == "normal":
            nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(hidden + 1))
        else:
            nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, prompt_len: int) -> Tensor:
        """Values of the response positions.

            values[:, t] = head(h[:, P - 1 + t])      t = 0 .. T-1,  T = input_ids.shape[1] - P

        h[:, P - 1 + t] is the state before response token t is generated: the same columns as the
        log-probs of common.logprobs.sequence_logprobs (logits[:, P-1:-1]). Position ids follow the
        attention mask, so left padding in the prompt leaves a row's values unchanged.

        Args:
            input_ids, attention_mask: (B, P+T), prompt left-padded, response right-padded.
            prompt_len: P.

        Returns:
            (B, T) float32 values; positions past a row's response are computed but meaningless
            (the caller masks them with response_mask).
        """
        T = input_ids.shape[1] - prompt_len
        assert prompt_len >= 1 and T >= 1, f"{prompt_len=} and response width {T=} must both be >= 1"
        position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, P+T)
        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state  # (B, P+T, H)
        hidden = hidden[:, prompt_len - 1 : -1]  # (B, T, H): column P-1+t precedes token P+t
        return self.head(hidden.float()).squeeze(-1)  # (B, T)


def build_critic(
    policy: PreTrainedModel, name_or_path: str | None = None, head_init: str = "normal"
) -> ValueModel:
    """The critic of a PPO run, in float32.

    Without `name_or_path` the backbone is a deep copy of the policy's base model (for a
    LlamaForCausalLM, `policy.model`), so critic and policy start from the same weights but share
    no parameter (tied embeddings included). A LoRA policy's body is copied merged and trains in
    full: the critic has no adapters. With `name_or_path` (local folder or Hugging Face id)
    the backbone is `AutoModel.from_pretrained(name_or_path)`; a causal-LM checkpoint loads
    without its LM head.

    Args:
        policy: the policy model (a Hugging Face causal LM).
        name_or_path: optional separate checkpoint for the critic body.
        head_init: the value head's initialisation (ValueModel).

    Returns:
        A ValueModel on the policy's device.
    """
    device = next(policy.parameters()).device
    if name_or_path is None and is_lora(policy):
        # the merged policy's body, all of it trainable: the critic gets no adapters of its own
        backbone = merged_copy(policy).base_model.requires_grad_(True)
    elif name_or_path is None:
        backbone = copy.deepcopy(policy.base_model)
    else:
        try:
            backbone = AutoModel.from_pretrained(name_or_path, dtype=torch.float32)
        except OSError:
            raise ValueError(
                f"critic_name_or_path {name_or_path!r}: no such model folder or reachable Hugging Face id"
            ) from None
    return ValueModel(backbone, head_init).float().to(device)
