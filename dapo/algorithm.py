"""DAPO (arXiv:2503.14476) on top of GRPO.

What DAPO changes relative to GRPO, each one a switch in configs/algorithm/dapo.yaml:
  1) Clip-Higher: clip_high > clip_low (Eq. 10) - a GRPO config value, no code here;
  2) token-level loss: loss_agg = token-mean (Eq. 12) - a GRPO config value, no code here;
  3) overlong reward shaping: soft punishment of long responses (Eq. 13) and overlong filtering
     (truncated responses leave the loss) - the code below;
  4) dynamic sampling (Eq. 11): trainer-level, see dapo/sampling.py and configs/dynamic_sampling/;
  5) no KL term: kl_coef = 0, so no reference model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.config import require
from common.rewards import overlong_penalty
from grpo.algorithm import GRPO


@dataclass(frozen=True)
class DAPO(GRPO):
    """GRPO plus overlong shaping and filtering. Values come from configs/algorithm/dapo.yaml."""

    overlong_shaping: bool
    max_len: int
    overlong_buffer_len: int | None
    overlong_factor: float
    overlong_filter: bool

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.max_len >= 1, "algorithm.max_len", "must be >= 1, in tokens", self.max_len)
        require(self.overlong_factor >= 0, "algorithm.overlong_factor", "must be >= 0", self.overlong_factor)
        if self.overlong_shaping and self.overlong_buffer_len is not None:
            require(
                0 < self.overlong_buffer_len <= self.max_len,
                "algorithm.overlong_buffer_len",
                f"must be in (0, algorithm.max_len={self.max_len}] or null",
                self.overlong_buffer_len,
            )

    def shape_rewards(self, lengths: torch.Tensor, truncated: torch.Tensor) -> dict[str, torch.Tensor]:
        """Soft overlong punishment (DAPO Eq. 13), added to the task reward as the term "overlong"."""
        if not self.overlong_shaping:
            return {}
        return {"overlong": overlong_penalty(lengths, self.max_len, self.buffer_len, self.overlong_factor)}

    @property
    def buffer_len(self) -> int:
        """L_cache of Eq. 13: overlong_buffer_len, or a fifth of max_len when that is null (the paper's
        4,096 of L_max = 20,480 tokens, Sec. 4.1)."""
        return self.overlong_buffer_len or max(1, self.max_len // 5)

    def loss_mask(self, response_mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
        """Overlong filtering (DAPO Sec. 3.4): truncated responses contribute no tokens to the loss."""
        if not self.overlong_filter:
            return response_mask
        return response_mask * (~truncated).to(response_mask.dtype).unsqueeze(1)  # (N, 1) broadcasts over T
