"""The rollout batch: G sampled responses per prompt, their token ids, masks and lengths.

Layout of a batch of N = n_prompts * G rows, grouped contiguously ([q1]*G + [q2]*G + ...):

    input_ids        pad pad p p p p | r r r EOS pad pad      (N, P + T)
    attention_mask    0   0  1 1 1 1 | 1 1 1  1   0   0       (N, P + T)
    response_mask                    | 1 1 1  1   0   0       (N, T)
                     <-- prompt P -->|<------ T ------>

Prompts are left-padded so every response starts at column P; responses are right-padded after
their first EOS (inclusive). A response with no EOS within max_new_tokens is `truncated`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RolloutBatch:
    """One rollout: N rows of prompt + response, grouped contiguously by prompt.

    Example (2 prompts, G = 2, max_new_tokens = 3, EOS = 2, pad = 2):

        input_ids       [[2, 5, 6, 7, 8, 2],     q1: prompt (5, 6), response (7, 8, EOS)
                         [2, 5, 6, 9, 2, 2],     q1: response (9, EOS), then padding
                         [3, 4, 6, 7, 7, 7],     q2: prompt (3, 4, 6), response truncated
                         [3, 4, 6, 2, 2, 2]]     q2: response (EOS)
        prompt_len      3
        response_mask   [[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]]
        lengths         [3, 2, 3, 1]
        truncated       [False, False, True, False]
        group_index     [0, 0, 1, 1]
    """

    input_ids: Tensor  # (N, P+T) long: left-padded prompt + right-padded response
    attention_mask: Tensor  # (N, P+T) long: 1 on real prompt tokens and on response tokens through EOS
    response_mask: Tensor  # (N, T) float: 1 on response tokens through the first EOS
    prompt_len: int  # P: responses start at column P in every row
    prompts_expanded: list[str]  # (N,) the user prompts, [q1]*G + [q2]*G + ...
    responses: list[str]  # (N,) decoded responses, special tokens skipped
    lengths: Tensor  # (N,) long: response length in tokens, EOS included
    truncated: Tensor  # (N,) bool: no EOS within max_new_tokens
    group_index: Tensor  # (N,) long: group id per row; rows with the same id share a prompt
    pad_token_id: int = 0  # fills padding when `concat` widens the prompt or response block
    # (N, T) float32: each sampled token's log-prob under the distribution the engine drew it from
    # (its own numerics: vLLM's kernels, a bf16 copy; after temperature, top-k / top-p), 0 after
    # EOS and for greedy decoding; None for a batch that no engine sampled
    rollout_logprob: Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_ids(self) -> Tensor:
        """(N, T) response token ids (padding after EOS)."""
        return self.input_ids[:, self.prompt_len :]

    def select(self, index: Tensor | Sequence[int] | Sequence[bool]) -> RolloutBatch:
        """Rows by integer index or boolean mask; group ids are kept as they are."""
        index = torch.as_tensor(index, device=self.input_ids.device)
        if index.dtype == torch.bool:
            assert index.numel() == len(self), f"bool mask of {index.numel()} rows for a batch of {len(self)}"
            index = index.nonzero().flatten()
        rows = index.tolist()
        return RolloutBatch(
            input_ids=self.input_ids[index],
            attention_mask=self.attention_mask[index],
            response_mask=self.response_mask[index],
            prompt_len=self.prompt_len,
            prompts_expanded=[self.prompts_expanded[i] for i in rows],
            responses=[self.responses[i] for i in rows],
            lengths=self.lengths[index],
            truncated=self.truncated[index],
            group_index=self.group_index[index],
            pad_token_id=self.pad_token_id,
            rollout_logprob=None if self.rollout_logprob is None else self.rollout_logprob[index],
        )

    @staticmethod
    def concat(batches: list[RolloutBatch], offset_groups: bool = True) -> RolloutBatch:
        """Stack batches row-wise, re-padding to a common prompt width P and response width T.

        Prompts get more left padding, responses more right padding, so responses still start
        at the common column P. With `offset_groups` (the default) the group ids of each batch are
        shifted past those of the batches before it, so groups from different rollouts stay
        distinct; without it the ids are kept, so extra responses can join existing groups.
        rollout_logprob is kept when every batch has it.
        """
        assert batches, "concat needs at least one batch"
        P = max(b.prompt_len for b in batches)
        T = max(b.response_mask.shape[1] for b in batches)
        pad = batches[0].pad_token_id
        input_ids, attention_mask, response_mask, group_index, rollout_logprob = [], [], [], [], []
        offset = 0
        for b in batches:
            dp, dt = P - b.prompt_len, T - b.response_mask.shape[1]
            # F.pad takes (left, right) for the last dim: prompt padding on the left, response on the right
            input_ids.append(torch.nn.functional.pad(b.input_ids, (dp, dt), value=pad))
            attention_mask.append(torch.nn.functional.pad(b.attention_mask, (dp, dt), value=0))
            response_mask.append(torch.nn.functional.pad(b.response_mask, (0, dt), value=0.0))
            if b.rollout_logprob is not None:
                rollout_logprob.append(torch.nn.functional.pad(b.rollout_logprob, (0, dt), value=0.0))
            group_index.append(b.group_index + offset)
            if offset_groups and len(b):
                offset += int(b.group_index.max()) + 1
        return RolloutBatch(
            input_ids=torch.cat(input_ids),
            attention_mask=torch.cat(attention_mask),
            response_mask=torch.cat(response_mask),
            prompt_len=P,
            prompts_expanded=[p for b in batches for p in b.prompts_expanded],
            responses=[r for b in batches for r in b.responses],
            lengths=torch.cat([b.lengths for b in batches]),
            truncated=torch.cat([b.truncated for b in batches]),
            group_index=torch.cat(group_index),
            pad_token_id=pad,
            rollout_logprob=torch.cat(rollout_logprob) if len(rollout_logprob) == len(batches) else None,
        )


def response_mask_from_ids(response_ids: Tensor, eos_token_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Mask of each response through its first EOS (inclusive).

        response_ids [[7, 8, EOS, EOS],  ->  mask [[1, 1, 1, 0],  lengths [3, 4]  truncated [False, True]
                      [7, 7, 7,   7  ]]          [1, 1, 1, 1]]

    Positions after the first EOS are padding whatever their id (pad may equal EOS).

    Returns:
        response_mask: (N, T) float; lengths: (N,) long; truncated: (N,) bool.
    """
    is_eos = response_ids == eos_token_id  # (N, T)
    eos_before = is_eos.long().cumsum(dim=1) - is_eos.long()  # EOS tokens strictly before t
    response_mask = (eos_before == 0).float()  # (N, T)
    return response_mask, response_mask.sum(dim=1).long(), ~is_eos.any(dim=1)
