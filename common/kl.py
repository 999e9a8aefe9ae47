"""Per-token estimators of KL(pi_theta || pi_ref) (Schulman, "Approximating KL Divergence", 2020).

Used two ways: GRPO adds beta * k3 to the loss (DeepSeekMath, arXiv:2402.03300), PPO subtracts
beta * k1 from the per-token reward (InstructGPT, arXiv:2203.02155). DAPO drops the term
(arXiv:2503.14476, Sec. 2.3).
"""

import torch
from torch import Tensor

KL_KINDS = ("k1", "k2", "k3")


def kl_penalty(logprob: Tensor, ref_logprob: Tensor, kind: str, mask: Tensor | None = None) -> Tensor:
    """Elementwise KL estimate between the policy and the reference policy (Schulman 2020).

    With log r = ref_logprob - logprob, for tokens sampled from the policy:

        k1 = logprob - ref_logprob        = -log r              unbiased, high variance, can be < 0
        k2 = 0.5 * (logprob - ref_logprob)^2 = 0.5 * (log r)^2   biased (low for nearby policies),
                                                                 low variance, always >= 0
        k3 = exp(log r) - log r - 1                              unbiased, low variance, always >= 0

    All three are 0 where the two log-probs are equal. k3 is computed exactly as written, with no
    clamping of log r (verl's "low_var_kl" clamps to [-10, 10]; this function does not).

    With `mask`, log r is set to 0 under mask 0 *before* exp (as policy_loss does with its ratio), so
    the estimate there is exactly 0 and junk at padded positions (say ref - logp = 1e4, exp = inf)
    can never turn into a NaN gradient; masking the result afterwards would be too late
    (0 * inf = NaN in the backward of exp).
    GRPO puts k3 in the loss (DeepSeekMath); PPO puts k1 into the reward (InstructGPT).

    Example (logprob = log 2, ref_logprob = 0, so log r = -log 2):
        k1 = 0.693,  k2 = 0.5 * 0.693^2 = 0.240,  k3 = 0.5 + 0.693 - 1 = 0.193

    Args:
        logprob: (N, T) per-token log-probs under the current policy.
        ref_logprob: (N, T) per-token log-probs under the reference policy.
        kind: "k1", "k2" or "k3".
        mask: optional (N, T) response mask; positions under 0 give 0 with zero gradient.

    Returns:
        (N, T) float32 per-token estimate; reduce it over the mask (aggregate_loss, masked_mean).
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {', '.join(KL_KINDS)}")
    logprob = torch.as_tensor(logprob, dtype=torch.float32)
    ref_logprob = torch.as_tensor(ref_logprob, dtype=torch.float32, device=logprob.device)
    diff = logprob - ref_logprob  # log(pi / pi_ref) = -log r
    if mask is not None:
        diff = torch.where(torch.as_tensor(mask, device=diff.device).bool(), diff, 0.0)  # junk -> log r = 0
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * diff**2
    log_r = -diff
    return torch.exp(log_r) - log_r - 1
