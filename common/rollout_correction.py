"""Correcting for a sampler that differs from the trainer, pure functions of the log-probs: importance
weights (token or sequence level, truncated or masked), their batch normalisation, rejection of
tokens or whole responses by a divergence estimator, and the mismatch metrics.

The rollout engine samples from pi_rollout, its own numerics (vLLM's kernels, a bf16 copy of the
weights), while the update's ratio and KL use pi_old, the training forward's log-probs of the same
policy. The two differ, so the samples are slightly off-policy. Two remedies, as verl's rollout
correction has them (verl/trainer/ppo/rollout_corr_helper.py, config `algorithm.rollout_correction`:
`rollout_is`, `rollout_is_threshold`, `rollout_is_batch_normalize`, `rollout_rs`, `rollout_rs_threshold`):

1) importance sampling (IS): each token's policy-gradient loss times a constant weight built from
   ratio = pi_old / pi_rollout, per token or per response, truncated at C (TIS: Yao et al. 2025, "Your
   Efficient RL Framework Secretly Brings You Off-Policy RL Training", https://fengyao.notion.site/off-policy-rl;
   sequence level: Liu, Li et al. 2025, "When Speed Kills Stability", https://richardli.xyz/rl-collapse)
   or zeroed outside [low, high] (masked IS, IcePop: Ling Team 2025, Ring-1T, arXiv 2510.18855);
2) rejection sampling (RS): tokens or responses whose divergence estimate is out of bounds leave the
   loss mask (verl's `rollout_rs` options).

Throughout d = old_logprob - rollout_logprob = log(pi_old / pi_rollout). All tensors (N, T); entries
under mask 0 are never read.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from common.kl import kl_penalty
from common.losses import masked_mean

# algorithm.rollout_correction.rollout_is (null = off) -> the level of its weights (normalize_is_weights):
# token / sequence truncate the ratio at C (verl); token_mask / sequence_mask zero it outside [low, high]
# (IcePop; TRL's vllm_importance_sampling_mode names)
IS_LEVELS = {"token": "token", "sequence": "sequence", "token_mask": "token", "sequence_mask": "sequence"}
# algorithm.rollout_correction.rollout_rs (null = off): verl's names, <reduction>_<estimator>
RS_OPTIONS = (
    "token_k1", "token_k2", "token_k3",
    "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
    "seq_mean_k1", "seq_mean_k2", "seq_mean_k3",
    "seq_max_k2", "seq_max_k3",
)  # fmt: skip


def _log_ratio(old_logprob: Tensor, rollout_logprob: Tensor, keep: Tensor) -> Tensor:
    """d = old - rollout, (N, T) float32, 0 under mask 0 (junk there never reaches exp or a sum)."""
    return torch.where(keep, old_logprob.float() - rollout_logprob.float(), 0.0)


def tis_weights(
    old_logprob: Tensor, rollout_logprob: Tensor, mask: Tensor, cap: float
) -> tuple[Tensor, dict[str, float]]:
    """Token-level truncated importance sampling weights (Yao et al. 2025; verl rollout_is=token):

        w_t = min(pi_old(y_t) / pi_rollout(y_t), C) = min(exp(old_logprob_t - rollout_logprob_t), C)

    The weight multiplies token t's policy-gradient loss (common.losses.policy_loss, token_weights);
    it is a constant (no gradient). 0 under mask 0. C is verl's rollout_is_threshold.

    Example: pi_old = (0.5, 0.2), pi_rollout = (0.25, 0.4), C = 1.5: ratios (2, 0.5), weights
    (1.5, 0.5); the first token is truncated.

    Returns:
        weights (N, T) float32; stats: rollout/is_weight_mean (over masked-in tokens) and
        rollout/is_clipfrac (the share of them whose ratio exceeds C).
    """
    keep = torch.as_tensor(mask).bool()
    ratio = torch.exp(_log_ratio(old_logprob, rollout_logprob, keep))  # (N, T)
    weights = torch.where(keep, ratio.clamp(max=cap), 0.0).detach()
    stats = {
        "rollout/is_weight_mean": float(masked_mean(weights, keep)),
        "rollout/is_clipfrac": float(masked_mean((ratio > cap).float(), keep)),
    }
    return weights, stats


def _row_stats(values: Tensor, rows: Tensor) -> float:
    """Mean of a per-row statistic (N,) over the non-empty rows `rows` (N,) bool; 0 if there are none."""
    return float(masked_mean(values.float(), rows))


def sequence_tis_weights(
    old_logprob: Tensor, rollout_logprob: Tensor, mask: Tensor, cap: float
) -> tuple[Tensor, dict[str, float]]:
    """Sequence-level truncated importance sampling weights (Liu, Li et al. 2025, Seq-TIS; verl
    rollout_is=sequence; TRL vllm_importance_sampling_mode=sequence_truncate):

        w_i = min(prod_t pi_old(y_t) / pi_rollout(y_t), C) = min(exp(sum_t m_t (old_t - rollout_t)), C)

    on every mask token of row i: one weight per response, the ratio of the whole response's
    probabilities, unbiased before truncation (a token-level weight is not). Computed as
    exp(min(sum, log C)), so a long response's large sum never overflows. 0 under mask 0 and on a
    fully masked row.

    Example: row 1 log-ratios (ln 2, ln 2) -> ratio 4, C = 3 -> weight 3 on both tokens; row 2
    (ln 2, -ln 2) -> ratio 1 -> weight 1; row 3 fully masked -> weights 0.

    Returns:
        weights (N, T) float32; stats over non-empty rows: rollout/is_weight_mean (mean row weight)
        and rollout/is_clipfrac (share of rows whose ratio exceeds C).
    """
    keep = torch.as_tensor(mask).bool()
    rows = keep.any(dim=1)  # (N,)
    log_ratio = _log_ratio(old_logprob, rollout_logprob, keep).sum(dim=1)  # (N,)
    row_weight = torch.exp(log_ratio.clamp(max=math.log(cap)))  # (N,)
    weights = torch.where(keep, row_weight.unsqueeze(1), 0.0).detach()  # (N, 1) broadcasts over T
    stats = {
        "rollout/is_weight_mean": _row_stats(row_weight, rows),
        "rollout/is_clipfrac": _row_stats(log_ratio > math.log(cap), rows),
    }
    return weights, stats


def icepop_weights(
    old_logprob: Tensor,
    rollout_logprob: Tensor,
    mask: Tensor,
    low: float,
    high: float,
    level: str = "token",
) -> tuple[Tensor, dict[str, float]]:
    """Masked importance sampling weights, IcePop (Ling Team 2025, Ring-1T, arXiv 2510.18855, and
    https://ringtech.notion.site/icepop; the masked IS of Liu, Li et al. 2025, which verl expresses as
    rollout_rs with k1 bounds; TRL vllm_importance_sampling_mode=token_mask / sequence_mask):

        ratio = exp(d_t)  (level token)   or   exp(sum_t m_t d_t) on every token of the row  (sequence)
        w     = ratio  if low <= ratio <= high,  else 0

    The ratio itself inside the band, 0 outside: an out-of-band token (or response) is dropped, not
    truncated to the bound as in TIS. 0 under mask 0; at sequence level a fully masked row is 0.

    Example (token): ratios (2, 0.5, 6), [low, high] = [0.5, 5] -> weights (2, 0.5, 0); the bounds
    are inclusive, the 6 is dropped where TIS would keep it at 5.

    Returns:
        weights (N, T) float32; stats: rollout/is_weight_mean and rollout/is_maskfrac (the share of
        tokens outside [low, high]); at sequence level both over non-empty rows.
    """
    keep = torch.as_tensor(mask).bool()
    log_ratio = _log_ratio(old_logprob, rollout_logprob, keep)  # (N, T)
    if level == "sequence":
        log_ratio = log_ratio.sum(dim=1, keepdim=True).expand_as(log_ratio)  # (N, 1) -> (N, T)
    elif level != "token":
        raise ValueError(f"icepop_weights: level must be token or sequence, got {level!r}")
    inside = (log_ratio >= math.log(low)) & (log_ratio <= math.log(high))  # in log space: no overflow
    weights = torch.where(keep & inside, torch.exp(log_ratio.clamp(max=math.log(high))), 0.0).detach()
    if level == "token":
        stats = {
            "rollout/is_weight_mean": float(masked_mean(weights, keep)),
            "rollout/is_maskfrac": float(masked_mean((~inside).float(), keep)),
        }
    else:  # each response counts once; a row's weight is its max (>= 0, the same on its tokens)
        rows = keep.any(dim=1)  # (N,)
        stats = {
            "rollout/is_weight_mean": _row_stats(weights.amax(dim=1), rows),
            "rollout/is_maskfrac": _row_stats(~inside[:, 0], rows),
        }
    return weights, stats


def normalize_is_weights(weights: Tensor, mask: Tensor, level: str) -> tuple[Tensor, dict[str, float]]:
    """Importance weights divided by their batch mean, so they average 1 (verl
    rollout_is_batch_normalize; self-normalised IS, which trades a small bias for lower variance):

        token:     w / mean_{t in mask} w_t
        sequence:  w / mean_{i non-empty} (mean_{t in mask_i} w_it)    (each response counts once)

    A mean of 0 (every weight masked or dropped) leaves the weights as they are.

    Example: weights [[2, 2], [1, ·]] (· masked): token mean (2 + 2 + 1) / 3 = 5/3 -> [[1.2, 1.2],
    [0.6, 0]]; at sequence level the row means are (2, 1), mean 1.5 -> [[4/3, 4/3], [2/3, 0]].

    Returns:
        weights (N, T) float32, 0 under mask 0; stats: rollout/is_batch_norm_factor (the mean divided by).
    """
    keep = torch.as_tensor(mask).bool()
    if level == "token":
        mean = masked_mean(weights, keep)
    elif level == "sequence":
        mean = masked_mean(masked_mean(weights, keep, dim=1), keep.any(dim=1))  # (N,) -> scalar
    else:
        raise ValueError(f"normalize_is_weights: level must be token or sequence, got {level!r}")
    factor = float(mean) if float(mean) > 0 else 1.0
    return torch.where(keep, weights.float() / factor, 0.0), {"rollout/is_batch_norm_factor": factor}


def k1_bounds(threshold: float | tuple[float, float] | list[float]) -> tuple[float, float]:
    """The (low, high) ratio bounds of a k1 rejection option: a pair as given, a single u as (1/u, u)
    (verl's rollout_rs_threshold "low_high" string or single value)."""
    if isinstance(threshold, (tuple, list)):
        low, high = (float(v) for v in threshold)
        return low, high
    return 1.0 / float(threshold), float(threshold)


def _rs_statistic(old_logprob: Tensor, rollout_logprob: Tensor, keep: Tensor, option: str) -> Tensor:
    """The divergence statistic of a rejection option: (N, T) per token for token_*, (N, 1) per row
    for seq_sum / seq_mean / seq_max (over mask tokens; a fully masked row gives 0). The estimators
    are KL(pi_rollout || pi_old)'s, common.kl.kl_penalty(rollout, old): 0 under mask 0."""
    reduction, _, estimator = option.rpartition("_")
    k = kl_penalty(rollout_logprob, old_logprob, estimator, mask=keep)  # (N, T)
    if reduction == "token":
        return k
    if reduction == "seq_sum":
        return k.sum(dim=1, keepdim=True)
    if reduction == "seq_mean":
        return masked_mean(k, keep, dim=1).unsqueeze(1)
    return k.amax(dim=1, keepdim=True)  # seq_max, of k2 or k3 >= 0: the 0 under mask 0 never wins


def rejection_mask(
    old_logprob: Tensor,
    rollout_logprob: Tensor,
    mask: Tensor,
    option: str,
    threshold: float | tuple[float, float] | list[float],
) -> tuple[Tensor, dict[str, float]]:
    """Rejection sampling of tokens or whole responses by a divergence estimate (verl rollout_rs,
    rollout_rs_threshold; Liu, Li et al. 2025). With d_t = log(pi_old / pi_rollout) on mask tokens:

        k1 = -d        k2 = d^2 / 2        k3 = e^d - 1 - d          (Schulman 2020)
        token_kX      reject token t when its kX is out of bounds
        seq_sum_kX    sum_t kX over the row's mask tokens      } out of bounds:
        seq_mean_kX   mean_t kX                                } the whole row is
        seq_max_kX    max_t kX  (k2, k3 only)                  } rejected
        bounds: k2, k3: statistic <= threshold (an upper bound);
                k1: log(low) <= statistic <= log(high), threshold = (low, high) or u meaning (1/u, u)

    k1 is compared as verl does: exp(k1) = pi_rollout / pi_old must lie in [low, high], which for a
    symmetric pair (1/u, u) is the same as pi_old / pi_rollout in it. A fully masked row stays 0.

    Example: d = (ln 2, -ln 2) on one row. token_k1, u = 1.5: exp(k1) = (0.5, 2), both outside
    [2/3, 1.5]: both rejected; with the pair (0.5, 2) both kept. seq_sum_k1: sum 0 -> exp 1, kept.
    token_k2, 0.2: k2 = ln(2)^2 / 2 = 0.24 on both: rejected; seq_max_k3, 0.3: k3 = (1 - ln 2,
    -0.5 + ln 2) = (0.307, 0.193), max 0.307 > 0.3: the row is rejected.

    Args:
        old_logprob, rollout_logprob, mask: (N, T).
        option: one of RS_OPTIONS.
        threshold: the upper bound (k2, k3), or the k1 ratio bounds.

    Returns:
        new_mask (N, T), `mask`'s dtype: mask with the rejected tokens / rows set to 0; stats:
        rollout/rs_rejected_frac (share of mask tokens rejected), rollout/rs_rejected_seq_frac (share
        of non-empty rows with a rejected token), rollout/rs_stat_mean (the statistic's mean over
        mask tokens, or over non-empty rows for seq_* options).
    """
    if option not in RS_OPTIONS:
        raise ValueError(f"rejection_mask: option must be one of {', '.join(RS_OPTIONS)}, got {option!r}")
    keep = torch.as_tensor(mask).bool()
    rows = keep.any(dim=1)  # (N,)
    stat = _rs_statistic(old_logprob, rollout_logprob, keep, option)  # (N, T) or (N, 1)
    if option.endswith("k1"):
        low, high = k1_bounds(threshold)
        accept = (stat >= math.log(low)) & (stat <= math.log(high))
    elif isinstance(threshold, (tuple, list)):
        raise ValueError(f"rejection_mask: {option} takes one upper bound, got {threshold!r}")
    else:
        accept = stat <= threshold
    new_keep = keep & accept  # (N, 1) broadcasts over T: a seq_* option keeps or drops the row
    rejected = keep & ~new_keep
    per_row = option.startswith("seq_")
    stats = {
        "rollout/rs_rejected_frac": float(masked_mean(rejected.float(), keep)),
        "rollout/rs_rejected_seq_frac": _row_stats(rejected.any(dim=1), rows),
        "rollout/rs_stat_mean": _row_stats(stat[:, 0], rows) if per_row else float(masked_mean(stat, keep)),
    }
    return new_keep.to(torch.as_tensor(mask).dtype), stats


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
