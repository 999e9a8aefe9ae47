"""PPO for language models: a learned critic, GAE, the KL penalty in the per-token reward.

Equation numbers follow the DAPO paper (arXiv:2503.14476), which restates PPO: clipped objective
Eq. 1, GAE Eq. 2-3. The reward shaping is InstructGPT's (arXiv:2203.02155, Eq. 2):
r_t = -beta * KL_t on every token plus the task reward on the last one, with beta fixed or steered
by Ziegler et al.'s controller (arXiv:1909.08593). Relative to GRPO (grpo/): 1) a critic V(s_t)
is the baseline, not the group mean, so one response per prompt suffices; 2) advantages are per
token (GAE), whitened over the batch; 3) the KL to the reference is a reward term, not a loss
term; 4) the loss adds vf_coef times a clipped value loss.
Implementation anchors: verl trainer/ppo/core_algos.py, TRL PPOTrainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from common.advantage import ADV_ESTIMATORS, AdvantageInputs, masked_whiten
from common.algorithm import BaseAlgorithm, Reduce
from common.config import require, require_option
from common.kl import kl_penalty
from common.losses import aggregate_loss, masked_mean, value_loss
from ppo.kl_control import AdaptiveKLController, FixedKLController

KL_CONTROLLERS = ("fixed", "adaptive")


def token_level_rewards(
    rewards: Tensor, response_mask: Tensor, kl: Tensor | None = None, kl_coef: float = 0.0
) -> Tensor:
    """Per-token rewards with the KL penalty folded in (InstructGPT Eq. 2, Ziegler et al. 2019).

        r_t = -kl_coef * KL_t                      on every response token t
        r_t = -kl_coef * KL_t + R                  on the last response token

    The last token is the last position where response_mask is 1 (index length - 1 with right
    padding); a row without response tokens gets no reward. KL_t under mask 0 is never read
    (set to 0), so padding cannot leak into the returns.

    Example (kl_coef = 0.5, x = padding):
        rewards = [1, 2],  mask = [[1, 1, 1], [1, 0, 0]],  kl = [[0.2, 0.2, 0.2], [0.4, x, x]]
        ->  [[-0.1, -0.1, 0.9],
             [ 1.8,  0,   0  ]]

    Args:
        rewards: (N,) scalar task reward per response.
        response_mask: (N, T), 1 on response tokens.
        kl: optional (N, T) per-token KL estimate, e.g. kl_penalty(old_logprob, ref_logprob, "k1").
        kl_coef: beta.

    Returns:
        (N, T) float32 token rewards.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    keep = torch.as_tensor(response_mask, device=rewards.device).bool()
    N, T = keep.shape
    assert rewards.shape == (N,), f"rewards must be (N,) = ({N},), got {tuple(rewards.shape)}"
    token_rewards = torch.zeros(N, T, dtype=torch.float32, device=rewards.device)
    if kl is not None and kl_coef != 0:
        kl = torch.as_tensor(kl, dtype=torch.float32, device=rewards.device)
        token_rewards = -kl_coef * torch.where(keep, kl, 0.0)  # (N, T)
    positions = torch.arange(T, device=rewards.device).expand(N, T)  # (N, T)
    last = torch.where(keep, positions, -1).max(dim=1).values  # (N,), -1 for an empty row
    rows = (last >= 0).nonzero().flatten()
    token_rewards[rows, last[rows]] += rewards[rows]
    return token_rewards


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor, min_var: float = 1e-6) -> float:
    """1 - Var(R - V) / Var(R) over masked-in tokens (biased variances; 1 = perfect critic, 0 = a
    constant predictor, < 0 worse).

    Undefined (NaN) when the returns hardly vary (Var(R) < min_var), e.g. a batch in which every
    response failed: the ratio would be a huge negative number that says nothing about the critic.
    """
    keep = mask.bool()
    residual = returns - values
    var_res = masked_mean((residual - masked_mean(residual, keep)) ** 2, keep)
    var_ret = masked_mean((returns - masked_mean(returns, keep)) ** 2, keep)
    if var_ret < min_var:
        return float("nan")
    return float(1.0 - var_res / var_ret)


@dataclass(frozen=True)
class PPO(BaseAlgorithm):
    """Field values come from configs/algorithm/ppo.yaml; there are deliberately no defaults here.

    The loop meets it through common.algorithm.Algorithm (the clip, KL and aggregation fields and
    the defaults are BaseAlgorithm's); the critic's own settings are the `critic:` block of the
    config, read by the builder. The KL coefficient lives in `self.kl_controller` (mutable;
    `state_dict` saves it with a checkpoint).
    """

    kl_ctl: str
    kl_target: float
    kl_horizon: int
    gamma: float
    lam: float
    whiten_advantages: bool
    cliprange_value: float | None
    vf_coef: float
    entropy_coef: float
    ppo_epochs: int

    needs_critic: ClassVar[bool] = True

    def __post_init__(self) -> None:
        """Check PPO's own keys (a ConfigError names algorithm.<key>), then make the KL controller."""
        super().__post_init__()
        require(self.ppo_epochs >= 1, "algorithm.ppo_epochs", "must be >= 1", self.ppo_epochs)
        require_option("algorithm.kl_ctl", self.kl_ctl, KL_CONTROLLERS)
        for key in ("gamma", "lam"):
            require(0 <= getattr(self, key) <= 1, f"algorithm.{key}", "must be in [0, 1]", getattr(self, key))
        require(
            self.cliprange_value is None or self.cliprange_value > 0,
            "algorithm.cliprange_value",
            "must be > 0 or null",
            self.cliprange_value,
        )
        require(self.vf_coef >= 0, "algorithm.vf_coef", "must be >= 0", self.vf_coef)
        require(self.entropy_coef >= 0, "algorithm.entropy_coef", "must be >= 0", self.entropy_coef)
        if self.kl_ctl == "adaptive":
            require(self.kl_target > 0, "algorithm.kl_target", "must be > 0", self.kl_target)
            require(self.kl_horizon > 0, "algorithm.kl_horizon", "must be > 0", self.kl_horizon)
            controller = AdaptiveKLController(self.kl_coef, self.kl_target, self.kl_horizon)
        else:
            controller = FixedKLController(self.kl_coef)
        object.__setattr__(self, "kl_controller", controller)  # frozen dataclass, mutable state

    @property
    def epochs(self) -> int:
        """Passes over each rollout batch."""
        return self.ppo_epochs

    @property
    def needs_old_logprob(self) -> bool:
        """Behaviour-policy log-probs: for the KL reward (KL(pi_old || pi_ref)) and for the ratio
        when the batch is reused (epochs > 1)."""
        return self.kl_coef > 0 or self.ppo_epochs > 1

    def state_dict(self) -> dict[str, float]:
        """The mutable part (the KL controller), for checkpoints."""
        return {"kl_controller": self.kl_controller.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.kl_controller.load_state_dict(state["kl_controller"])

    def compute_advantages(self, batch: dict[str, Tensor], reduce: Reduce | None = None) -> dict[str, float]:
        """Token rewards -> GAE (DAPO Eq. 2-3) -> whitening; then one KL-controller update.

            KL_t          = kl_penalty(old_logprob, ref_logprob, kl_kind)       KL(pi_old || pi_ref)
            token_rewards = token_level_rewards(rewards, response_mask, KL, beta)
            A, R          = compute_gae(token_rewards, values, response_mask, gamma, lam)  (estimator gae)
            A             = masked_whiten(A, response_mask)                       if whiten_advantages

        The controller sees the KL per sequence, sum_t KL_t averaged over the batch, as TRL does
        (verl averages per token): Ziegler et al.'s target of 6 nats is a per-sequence KL. It is
        updated after the rewards are built, so this step uses the current beta (logged as kl/coef)
        and the next step the updated one, with n_steps = N responses.

        Writes batch["token_rewards"], batch["advantages"], batch["returns"], all (N, T).

        Args:
            batch: "rewards" (N,), "response_mask" (N, T), "values" (N, T) from the critic at
                rollout time; with kl_coef > 0 also "old_logprob" and "ref_logprob" (N, T).
            reduce: sums a tensor over data-parallel ranks (DistContext.sum): the whitening
                statistics and the controller's KL and n_steps are then the global batch's, so
                every rank keeps the same beta and the advantages equal the one-process ones.

        Returns:
            stats: kl/value (per-token mean, comparable with GRPO's), kl/seq_value (per-sequence,
            the controller's input), kl/coef (only with kl_coef > 0), critic/values_mean,
            critic/returns_mean, critic/token_rewards_mean, policy/advantages_mean.
        """
        if "values" not in batch:
            raise ValueError('compute_advantages needs batch["values"], the critic\'s values at rollout time')
        mask = batch["response_mask"]
        stats: dict[str, float] = {}
        kl, beta = None, self.kl_controller.value
        if self.kl_coef > 0:
            kl = kl_penalty(batch["old_logprob"], batch["ref_logprob"], self.kl_kind, mask=mask)  # (N, T)
        token_rewards = token_level_rewards(batch["rewards"], mask, kl, beta)  # (N, T)
        inputs = AdvantageInputs(
            rewards=batch["rewards"],
            group_index=None,
            response_mask=mask,
            scale_rewards=None,
            token_rewards=token_rewards,
            values=batch["values"],
            gamma=self.gamma,
            lam=self.lam,
            reduce=reduce,
        )
        advantages, returns = ADV_ESTIMATORS[self.adv_estimator].compute(inputs)  # gae: (N, T) each
        if self.whiten_advantages:
            advantages = masked_whiten(advantages, mask, reduce=reduce)
        batch["token_rewards"], batch["advantages"], batch["returns"] = token_rewards, advantages, returns

        if kl is not None:
            reduce = reduce or (lambda t: t)
            n_seqs = reduce(torch.tensor(float(mask.shape[0]), device=kl.device))
            seq_kl = (reduce(kl.sum()) / n_seqs).item()  # sum over tokens, mean over sequences
            self.kl_controller.update(seq_kl, n_steps=int(n_seqs.item()))
            stats.update({"kl/value": masked_mean(kl, mask).item(), "kl/seq_value": seq_kl, "kl/coef": beta})
        stats.update(
            {
                "critic/values_mean": masked_mean(batch["values"], mask).item(),
                "critic/returns_mean": masked_mean(returns, mask).item(),
                "critic/token_rewards_mean": masked_mean(token_rewards, mask).item(),
                "policy/advantages_mean": masked_mean(advantages, mask).item(),
            }
        )
        return stats

    def loss(
        self,
        batch: dict[str, Tensor],
        logprob: Tensor,
        *,
        denominator: float,
        entropy: Tensor | None = None,
        values: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Clipped surrogate (DAPO Eq. 1) + vf_coef * clipped value loss - entropy_coef * entropy.

            L = L_clip(logprob, old_logprob, A) + vf_coef * L_V(values, old_values, R)
                - entropy_coef * H                   (H only if entropy_coef > 0 and entropy given)

        All three terms use the same aggregation (loss_agg) and the same mini-batch denominator, so
        one backward gives the policy and the critic the gradients of the whole mini-batch.

        Args:
            batch: rows of one micro-batch: "advantages", "returns", "values" (old values),
                "loss_mask" (B, T), and "old_logprob" (B, T) when it was computed.
            logprob: (B, T) log-probs of the taken tokens under the current policy, with grad.
            denominator: the normaliser of the whole mini-batch (see common.losses.aggregate_loss).
            entropy: optional (B, T) token entropies of the current policy.
            values: (B, T) the critic's output on this micro-batch, with grad. Required.

        Returns:
            loss, and stats (means over this micro-batch's tokens): policy/<policy_loss stats>,
            critic/value_loss, critic/vf_clipfrac, critic/explained_variance, critic/vpred_mean.
        """
        if values is None:
            raise ValueError(
                "PPO.loss needs values=: the critic's (B, T) output on this micro-batch, with grad "
                "(call the ValueModel on the same rows and pass it)"
            )
        mask = batch["loss_mask"]
        pg_loss, pg_stats = self.clipped_surrogate(batch, logprob, denominator)
        vf_loss, vf_stats = value_loss(
            values,
            batch["values"],
            batch["returns"],
            mask,
            cliprange_value=self.cliprange_value,
            agg=self.loss_agg,
            denominator=denominator,
        )
        loss = pg_loss + self.vf_coef * vf_loss
        if self.entropy_coef > 0 and entropy is not None:
            entropy_bonus = aggregate_loss(entropy, mask, self.loss_agg, denominator=denominator)
            loss = loss - self.entropy_coef * entropy_bonus

        with torch.no_grad():
            vpred = values.detach()
            # the per-token value loss (clipped as used), independent of loss_agg and the denominator
            per_token_vf, _ = value_loss(vpred, batch["values"], batch["returns"], mask, self.cliprange_value)
            stats = {f"policy/{k}": v for k, v in pg_stats.items()}
            stats.update(
                {
                    "critic/value_loss": per_token_vf.item(),
                    "critic/vf_clipfrac": vf_stats["vf_clipfrac"],
                    "critic/explained_variance": explained_variance(vpred, batch["returns"], mask),
                    "critic/vpred_mean": vf_stats["vpred_mean"],
                }
            )
        return loss, stats
