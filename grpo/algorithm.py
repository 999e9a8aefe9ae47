"""GRPO: group-relative advantages, the clipped surrogate, and a KL penalty to the reference in the loss.

Equation numbers follow the DAPO paper (arXiv:2503.14476), which restates GRPO: advantage Eq. 4,
objective Eq. 5. Relative to PPO (ppo/): 1) no critic, the group mean is the baseline;
2) the KL to the reference is a loss term (k3, DeepSeekMath), not a per-token reward;
3) one scalar advantage per response, broadcast over its tokens.
The critic-free variants are settings of this class (README.md): adv_estimator rloo or
reinforce_plus_plus, scale_rewards batch, policy_loss gspo or cispo.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.advantage import ADV_ESTIMATORS, SCALE_REWARDS, AdvantageInputs
from common.algorithm import BaseAlgorithm, Reduce
from common.config import require, require_option
from common.kl import kl_penalty
from common.losses import aggregate_loss


@dataclass(frozen=True)
class GRPO(BaseAlgorithm):
    """Field values come from configs/algorithm/grpo.yaml; there are deliberately no defaults here.

    The loop meets it through common.algorithm.Algorithm; the clip, KL and aggregation fields and
    the defaults (no critic, no reward shaping, every response token trains) are BaseAlgorithm's.
    """

    scale_rewards: str
    num_iterations: int

    def __post_init__(self) -> None:
        super().__post_init__()
        require_option("algorithm.scale_rewards", self.scale_rewards, SCALE_REWARDS)
        require(
            self.group_size >= 2 or not self.group_relative,
            "rollout.group_size",
            f"{self.name} with adv_estimator={self.adv_estimator} compares responses within a group and "
            "needs group_size >= 2",
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
        """batch["advantages"] from the estimator adv_estimator (common.advantage.ADV_ESTIMATORS): grpo,
        (r_i - mean_g) / (std + eps) per group (DAPO Eq. 4), std as scale_rewards says, (N,); rloo,
        the leave-one-out baseline, (N,); reinforce_plus_plus, the batch-whitened return, (N, T).

        Groups are read from batch["group_index"], so ragged groups (dynamic resampling) work too; a
        group never spans ranks. `reduce` sums over data-parallel ranks for the batch statistics
        (scale_rewards=batch, reinforce_plus_plus). Returns stats to log (none: the reward terms are
        logged by the trainer).
        """
        inputs = AdvantageInputs(
            rewards=batch["rewards"],
            group_index=batch["group_index"],
            response_mask=batch["response_mask"],
            scale_rewards=self.scale_rewards,
            token_rewards=None,
            values=None,
            gamma=None,
            lam=None,
            reduce=reduce,
        )
        batch["advantages"], _ = ADV_ESTIMATORS[self.adv_estimator].compute(inputs)
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
        """Policy loss (policy_loss: the clipped surrogate, PPO Eq. 1 with GRPO's advantages, or gspo /
        cispo) + kl_coef * KL(pi || pi_ref) (GRPO Eq. 5).

        Args:
            batch: rows of one micro-batch: "advantages" (B,) or (B, T), "loss_mask" (B, T), optionally
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
