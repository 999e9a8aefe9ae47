"""Correcting for a sampler that differs from the trainer: truncated importance sampling (TIS) and
the mismatch metrics, pure functions of the log-probs.

The rollout engine samples from pi_rollout, its own numerics (vLLM's kernels, a bf16 copy of the
weights), while the update's ratio and KL use pi_old, the training forward's log-probs of the same
policy. The two differ, so the samples are slightly off-policy. Yao et al. 2025, "Your Efficient RL
Framework Secretly Brings You Off-Policy RL Training" (https://fengyao.notion.site/off-policy-rl),
weight each token's policy-gradient loss by the importance ratio pi_old / pi_rollout, truncated at
C to bound its variance; verl applies it as `tis_imp_ratio_cap` (later, its rollout correction's
token-level IS weights), multiplying the clipped per-token loss.

All tensors (N, T); entries under mask 0 are never read.
"""

from __future__ import annotations

import torch
from torch import Tensor

from common.kl import kl_penalty
from common.losses import masked_mean

ROLLOUT_CORRECTIONS = ("none", "tis")


def tis_weights(
    old_logprob: Tensor, rollout_logprob: Tensor, mask: Tensor, cap: float
) -> tuple[Tensor, dict[str, float]]:
    """Truncated importance sampling weights (Yao et al. 2025):

        w_t = min(pi_old(y_t) / pi_rollout(y_t), C) = min(exp(old_logprob_t - rollout_logprob_t), C)

    The weight multiplies token t's policy-gradient loss (common.losses.policy_loss, token_weights);
    it is a constant (no gradient). 0 under mask 0.

    Example: pi_old = (0.5, 0.2), pi_rollout = (0.25, 0.4), C = 1.5: ratios (2, 0.5), weights
    (1.5, 0.5); the first token is truncated.

    Returns:
        weights (N, T) float32; stats: rollout/tis_weight_mean (over masked-in tokens) and
        rollout/tis_clipfrac (the share of them whose ratio exceeds C).
    """
    keep = torch.as_tensor(mask).bool()
    log_ratio = torch.where(keep, old_logprob.float() - rollout_logprob.float(), 0.0)  # (N, T)
    ratio = torch.exp(log_ratio)
    weights = torch.where(keep, ratio.clamp(max=cap), 0.0).detach()
    stats = {
        "rollout/tis_weight_mean": float(masked_mean(weights, keep)),
        "rollout/tis_clipfrac": float(masked_mean((ratio > cap).float(), keep)),
    }
    return weights, stats


def mismatch_metrics(old_logprob: Tensor, rollout_logprob: Tensor, mask: Tensor) -> dict[str, float]:
    """How far the rollout's distribution is from the trainer's, on the sampled tokens (means over
    masked-in tokens; the tokens come from pi_rollout):

        rollout/logprob_abs_diff   mean |log pi_old - log pi_rollout|
        rollout/kl                 KL(pi_rollout || pi_old) by k3 (Schulman 2020): with
                                   r = pi_old / pi_rollout, mean(r - 1 - log r), >= 0 per token and
                                   unbiased for samples from pi_rollout (common.kl.kl_penalty)
        rollout/kl_k1              the same by k1: mean(log pi_rollout - log pi_old), unbiased, can be < 0

    Example: log pi_old = log(0.5, 0.2), log pi_rollout = log(0.25, 0.4): r = (2, 0.5);
    abs diff (ln 2 + ln 2) / 2 = 0.693; k3 ((1 - ln 2) + (-0.5 + ln 2)) / 2 = 0.25; k1 (-ln 2 + ln 2) / 2 = 0.
    """
    keep = torch.as_tensor(mask).bool()
    old, rollout = old_logprob.float(), rollout_logprob.float()
    return {
        "rollout/logprob_abs_diff": float(masked_mean((old - rollout).abs(), keep)),
        "rollout/kl": float(masked_mean(kl_penalty(rollout, old, "k3", mask=keep), keep)),
        "rollout/kl_k1": float(masked_mean(kl_penalty(rollout, old, "k1", mask=keep), keep)),
    }
