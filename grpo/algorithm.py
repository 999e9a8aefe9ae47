"""GRPO: group-relative advantages, the clipped surrogate, and a KL penalty to the reference in the loss.

Equation numbers follow the DAPO paper (arXiv:2503.14476), which restates GRPO: advantage Eq. 4,
objective Eq. 5. Relative to PPO (ppo/): 1) no critic, the group mean is the baseline;
2) the KL to the reference is a loss term (k3, DeepSeekMath), not a per-token reward;
3) one scalar advantage per response, broadcast over its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from common.advantage import compute_group_relative_advantages
from common.algorithm import BaseAlgorithm, Reduce
from common.config import require
from common.kl import kl_penalty
from common.losses import aggregate_loss


@dataclass(frozen=True)
class GRPO(BaseAlgorithm):
    """Field values come from configs/algorithm/grpo.yaml; there are deliberately no defaults here.

    The loop meets it through common.algorithm.Algorithm; the clip, KL and aggregation fields and
    the defaults (no critic, no reward shaping, every response token trains) are BaseAlgorithm's.
    """

    scale_by_std: bool
    num_iterations: int

    group_relative: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.group_size >= 2,
            "rollout.group_size",
            f"{self.name} compares responses within a group and needs group_size >= 2",
            self.group_size,
        )
        require(self.num_iterations >= 1, "algorithm.num_iterations", "must be >= 1", self.num_iterations)

    @property
    def epochs(self) -> int:
        """Passes over each rollout batch (mu)."""
        return self.num_iterations

    @property
    def needs_old_logprob(self) -> bool:
        """Behaviour-policy log-probs are needed only when the batch is reused (mu > 1); with mu = 1
        they equal the current policy's, detached."""
        return self.num_iterations > 1

    def compute_advantages(
        self, batch: dict[str, torch.Tensor], reduce: Reduce | None = None
    ) -> dict[str, float]:
        """batch["advantages"] = (r_i - mean_g) / (std_g + eps) per group (DAPO Eq. 4): (N,).

        Groups are read from batch["group_index"], so ragged groups (dynamic resampling) work too.
        `reduce` (summing over data-parallel ranks) is not needed: a group never spans ranks.
        Returns stats to log (none for GRPO: the reward terms are logged by the trainer).
        """
        batch["advantages"], _ = compute_group_relative_advantages(
            batch["rewards"], batch["group_index"], scale_by_std=self.scale_by_std
        )
        return {}

    def loss(
        self,
        batch: dict[str, torch.Tensor],
        logprob: torch.Tensor,
        *,
        denominator: float,
        entropy: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Clipped surrogate (PPO Eq. 1 with GRPO's advantages) + kl_coef * KL(pi || pi_ref) (GRPO Eq. 5).

        Args:
            batch: rows of one micro-batch: "advantages" (B,), "loss_mask" (B, T), optionally
                "old_logprob" (B, T) (only when epochs > 1) and "ref_logprob" (B, T) (when kl_coef > 0).
            logprob: (B, T) log-probs of the taken tokens under the current policy, with grad.
            denominator: the normaliser of the whole mini-batch (tokens, or sequences times
                loss_scale_factor for seq-mean-token-sum-norm, see common.losses.aggregation_denominator),
                so micro-batch losses add up to the mini-batch loss.
            entropy, values: (B, T) token entropies and critic values; unused by GRPO (PPO's loss takes them).
        """
        mask = batch["loss_mask"]
        loss, stats = self.clipped_surrogate(batch, logprob, denominator)
        # stats are means over this micro-batch's tokens; the trainer averages them weighted by tokens
        metrics = {f"policy/{k}": v for k, v in stats.items()}
        if self.kl_coef > 0:
            kl = kl_penalty(logprob, batch["ref_logprob"], self.kl_kind, mask=mask)  # (B, T), 0 under mask 0
            loss = loss + self.kl_coef * aggregate_loss(kl, mask, self.loss_agg, denominator=denominator)
            metrics["kl/value"] = ((kl.detach() * mask).sum() / mask.sum().clamp(min=1)).item()
        return loss, metrics
