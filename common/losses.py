"""Loss functions: the policy losses (by name, `POLICY_LOSSES`) and the clipped value loss; the loss
aggregation they use lives in common.aggregation and is re-exported here.

Equation numbers follow the DAPO paper (arXiv:2503.14476): Eq. 1 PPO clipped objective, Eq. 5
GRPO objective (sample-level mean), Eq. 10 Clip-Higher, Eq. 12 token-level loss. Dual-clip PPO
is arXiv:1912.09729; the constant-normaliser aggregation is Dr. GRPO's (arXiv:2503.20783). The
five aggregation modes are verl's (`agg_loss`), including its handling of fully masked rows.
The policy losses are registered by name as in verl (`register_policy_loss`): `vanilla` (the
clipped surrogate), `gspo` (GSPO, arXiv:2507.18071) and `cispo` (CISPO, MiniMax-M1, arXiv:2506.13585);
`algorithm.policy_loss` picks one. Every function is pure and returns float32; stats come back as a
dict of Python floats.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from common.aggregation import AGG_MODES, aggregate_loss, aggregation_denominator, masked_mean

__all__ = [
    "AGG_MODES",
    "POLICY_LOSSES",
    "aggregate_loss",
    "aggregation_denominator",
    "batch_policy_loss",
    "cispo_policy_loss",
    "clip_stats",
    "entropy_from_logits",
    "get_policy_loss_fn",
    "gspo_policy_loss",
    "masked_mean",
    "policy_loss",
    "register_policy_loss",
    "value_loss",
]

# (loss, stats) from (logprob, old_logprob, advantages, mask, clip_low=, clip_high=, agg=, denominator=,
# token_weights=) and the loss's own keywords (vanilla: dual_clip)
PolicyLossFn = Callable[..., tuple[Tensor, dict[str, float]]]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator: make a policy loss selectable as `algorithm.policy_loss=<name>` (verl's
    register_policy_loss). A name is registered once."""

    def register(fn: PolicyLossFn) -> PolicyLossFn:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is registered twice")
        POLICY_LOSSES[name] = fn
        return fn

    return register


def get_policy_loss_fn(name: str) -> PolicyLossFn:
    """The policy loss registered as `name` (verl's get_policy_loss_fn)."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; expected one of {', '.join(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


def _policy_inputs(
    logprob: Tensor, old_logprob: Tensor, advantages: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The policy losses' inputs as float32 on logprob's device: logprob, old_logprob, advantages
    broadcast to (B, T) (one per response, (B,), or per token), and the mask as bool."""
    logprob = torch.as_tensor(logprob, dtype=torch.float32)
    old_logprob = torch.as_tensor(old_logprob, dtype=torch.float32, device=logprob.device)
    advantages = torch.as_tensor(advantages, dtype=torch.float32, device=logprob.device)
    keep = torch.as_tensor(mask, device=logprob.device).bool()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # (B,) -> (B, 1), broadcasts over T
    return logprob, old_logprob, advantages.expand_as(logprob), keep  # advantages (B, T)


def _weighted(loss_mat: Tensor, token_weights: Tensor | None) -> Tensor:
    """loss_mat times the constant per-token weights (no gradient through them), if any."""
    if token_weights is None:
        return loss_mat
    return loss_mat * torch.as_tensor(token_weights, dtype=torch.float32, device=loss_mat.device).detach()


@register_policy_loss("vanilla")
def policy_loss(
    logprob: Tensor,
    old_logprob: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token-mean",
    dual_clip: float | None = None,
    denominator: float | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped surrogate policy loss (PPO, DAPO Eq. 1; decoupled Clip-Higher, Eq. 10), `vanilla`.

        ratio = exp(logprob - old_logprob)
        L     = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)
        L     = min(L, -c * A)   for A < 0, if dual_clip = c         (dual-clip PPO, arXiv:1912.09729)
        L     = w * L            if token_weights w are given         (e.g. TIS, common.rollout_correction)
        loss  = aggregate_loss(L, mask, agg, denominator)

    clip_low = clip_high gives the symmetric PPO clip; DAPO raises clip_high (0.28) so that
    low-probability tokens can grow. Without dual clip the loss of a token with A < 0 grows without
    bound in ratio; dual clip caps it at -c * A (c > 1).

    Masked positions never reach the loss or the stats: their log-ratio is set to 0 before exp, so
    any finite or infinite junk there has no effect on values or gradients.

    Args:
        logprob: (B, T) log-probs of the response tokens under the current policy.
        old_logprob: (B, T) the same under the policy that sampled them.
        advantages: (B,) one per response, broadcast over T, or (B, T) per token.
        mask: (B, T) response mask.
        clip_low: epsilon_low.
        clip_high: epsilon_high.
        agg: aggregation mode, see aggregate_loss.
        dual_clip: c > 1, or None for no dual clip.
        denominator: full-batch normaliser for gradient accumulation, see aggregate_loss.
        token_weights: optional (B, T) constant per-token weights of the loss (no gradient flows
            through them): the rollout correction's importance weights (common.rollout_correction),
            as verl multiplies its policy loss by rollout_is_weights.

    Returns:
        loss: scalar float32.
        stats: dict of Python floats, see `clip_stats`, and dual_clipfrac (the dual-clip cap is
            active; 0 without dual clip).
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    logprob, old_logprob, advantages, keep = _policy_inputs(logprob, old_logprob, advantages, mask)
    log_ratio = torch.where(keep, logprob - old_logprob, 0.0)  # junk under mask 0 -> ratio 1
    ratio = torch.exp(log_ratio)
    clipped_ratio = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * clipped_ratio
    loss_mat = torch.maximum(loss_unclipped, loss_clipped)  # -min(ratio*A, clip(ratio)*A)
    dual_active = None
    if dual_clip is not None:
        loss_dual = -advantages * dual_clip
        capped = torch.minimum(loss_mat, loss_dual)
        dual_active = (advantages < 0) & (loss_mat > loss_dual)
        loss_mat = torch.where(advantages < 0, capped, loss_mat)
    loss = aggregate_loss(_weighted(loss_mat, token_weights), keep, agg, denominator)
    with torch.no_grad():
        low, high = surrogate_clipped(ratio, advantages, clip_low, clip_high)
        stats = clip_stats(log_ratio, keep, low, high)
        dual = 0.0 if dual_active is None else float(masked_mean(dual_active.float(), keep))
    return loss, {**stats, "dual_clipfrac": dual}


@register_policy_loss("gspo")
def gspo_policy_loss(
    logprob: Tensor,
    old_logprob: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
    agg: str = "seq-mean-token-mean",
    token_weights: Tensor | None = None,
    denominator: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Group Sequence Policy Optimization (Zheng et al. 2025, arXiv:2507.18071), `gspo`: one
    importance ratio per response, the length-normalised sequence likelihood ratio, clipped per
    sequence; written per token as the paper's GSPO-token.

        s_i     = exp( mean_t m (logprob - old_logprob) )      = (pi(y_i) / pi_old(y_i))^(1 / |y_i|)
        s_{i,t} = sg[s_i] * exp(logprob_t - sg[logprob_t])     value s_i, gradient s_i * grad logprob_t
        L       = max(-A * s_{i,t}, -A * clip(s_{i,t}, 1 - clip_low, 1 + clip_high))     no dual clip
        loss    = aggregate_loss(w * L, mask, agg, denominator)

    With one A per response and agg seq-mean-token-mean (the default, verl's loss_mode=gspo; TRL's
    importance_sampling_level="sequence") this is GSPO's objective: row i's loss is
    max(-A_i s_i, -A_i clip(s_i)), and its gradient, when unclipped, spreads -A_i s_i / |y_i| evenly
    over the tokens' grad logprob; a clipped response gives no gradient at all. The paper's clip
    range is tiny (clip_low 3e-4, clip_high 4e-4) because s_i is a per-token geometric mean. As in
    verl, log s_{i,t} is capped at 10 so one far-off-policy response cannot make the loss infinite.
    Masked positions (and fully masked rows, s = 1) are never read.

    Example (one response of 2 tokens, A = 1, clip 0.2 / 0.2, seq-mean-token-mean):
        logprob - old_logprob = [0.1, 0.3]  ->  s = exp(0.2) = 1.2214 > 1.2: clipped
        L = max(-1.2214, -1.2) = -1.2 on both tokens, loss -1.2, gradient 0
        with A = -1 instead: L = max(1.2214, 1.2) = 1.2214, loss 1.2214, gradient 1.2214 / 2 per token

    Args:
        logprob, old_logprob: (B, T) log-probs under the current and the behaviour policy.
        advantages: (B,) one per response, or (B, T).
        mask: (B, T) response mask.
        clip_low, clip_high: epsilon_low and epsilon_high of the sequence ratio.
        agg: aggregation mode, see aggregate_loss.
        token_weights: optional (B, T) constant per-token weights (the rollout correction's).
        denominator: full-batch normaliser for gradient accumulation, see aggregate_loss.

    Returns:
        loss: scalar float32.
        stats: see `clip_stats`, of the sequence ratio s_i (counted on each of its tokens).
    """
    logprob, old_logprob, advantages, keep = _policy_inputs(logprob, old_logprob, advantages, mask)
    log_ratio = torch.where(keep, logprob - old_logprob, 0.0)  # (B, T)
    log_seq_ratio = masked_mean(log_ratio, keep, dim=1).unsqueeze(1).expand_as(logprob)  # (B,) -> (B, T)
    # value log s_i, gradient grad logprob_t (logprob - sg[logprob] is 0 in value, 1 in gradient)
    log_token_ratio = torch.where(keep, logprob - logprob.detach(), 0.0) + log_seq_ratio.detach()
    ratio = torch.exp(log_token_ratio.clamp(max=10.0))  # (B, T), s_{i,t}
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss_mat = torch.maximum(loss_unclipped, loss_clipped)
    loss = aggregate_loss(_weighted(loss_mat, token_weights), keep, agg, denominator)
    with torch.no_grad():
        low, high = surrogate_clipped(ratio, advantages, clip_low, clip_high)
        stats = clip_stats(log_seq_ratio, keep, low, high)
    return loss, stats


@register_policy_loss("cispo")
def cispo_policy_loss(
    logprob: Tensor,
    old_logprob: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
    agg: str = "token-mean",
    token_weights: Tensor | None = None,
    denominator: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped IS-weight Policy Optimization (MiniMax-M1, arXiv:2506.13585, Eq. 4-5), `cispo`: the
    clipped importance ratio is a constant weight on REINFORCE's log-likelihood term.

        r = exp(logprob - old_logprob)
        L = -sg[clip(r, 1 - clip_low, 1 + clip_high)] * A * logprob
        loss = aggregate_loss(w * L, mask, agg, denominator)

    The gradient of a token is -clip(r) * A * grad logprob: never 0, also where r is clipped,
    where PPO's surrogate drops the token (MiniMax-M1 Sec. 3.1: rare, high-entropy "fork" tokens
    are clipped after the first update and stop learning). Clipping only bounds the weight.

    Both sides are clipped, as in verl (loss_mode=cispo); the paper bounds only the top ("we did
    not impose a lower bound ... by setting eps_low^IS to a large value"): clip_low = 1 gives that,
    a lower bound of 0, which a ratio never goes below. TRL's loss_type="cispo" clamps r at
    epsilon_high alone (5.0 recommended there, after ScaleRL: clip_low 1, clip_high 4 here).
    The token-mean default is the paper's (Eq. 4 normalises by the batch's token count).

    Example (one token, A = 2, logprob = -1, clip 0.2 / 0.2):
        logprob - old_logprob = 0.5  ->  r = 1.6487, weight clip(r) = 1.2
        L = -1.2 * 2 * (-1) = 2.4, d L / d logprob = -1.2 * 2 = -2.4 (PPO's would be 0)

    Args:
        logprob, old_logprob: (B, T) log-probs under the current and the behaviour policy.
        advantages: (B,) one per response, or (B, T).
        mask: (B, T) response mask.
        clip_low, clip_high: the weight's bounds 1 - clip_low and 1 + clip_high.
        agg: aggregation mode, see aggregate_loss.
        token_weights: optional (B, T) constant per-token weights (the rollout correction's).
        denominator: full-batch normaliser for gradient accumulation, see aggregate_loss.

    Returns:
        loss: scalar float32.
        stats: see `clip_stats`; clipfrac_low / clipfrac_high count weights clipped at either bound,
            whatever the sign of A.
    """
    logprob, old_logprob, advantages, keep = _policy_inputs(logprob, old_logprob, advantages, mask)
    log_ratio = torch.where(keep, logprob - old_logprob, 0.0)  # (B, T)
    ratio = torch.exp(log_ratio)
    weight = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high).detach()  # (B, T), sg[clip(r)]
    loss_mat = -weight * advantages * torch.where(keep, logprob, 0.0)
    loss = aggregate_loss(_weighted(loss_mat, token_weights), keep, agg, denominator)
    with torch.no_grad():
        stats = clip_stats(log_ratio, keep, ratio < 1.0 - clip_low, ratio > 1.0 + clip_high)
    return loss, stats


def surrogate_clipped(
    ratio: Tensor, advantages: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, Tensor]:
    """Where the clipped term of PPO's surrogate is the active one, split by side: (ratio <
    1 - clip_low and A < 0, ratio > 1 + clip_high and A > 0), both (B, T) bool. These are exactly the
    tokens where -A * clip(ratio) > -A * ratio."""
    return (ratio < 1.0 - clip_low) & (advantages < 0), (ratio > 1.0 + clip_high) & (advantages > 0)


def clip_stats(
    log_ratio: Tensor, keep: Tensor, clipped_low: Tensor, clipped_high: Tensor
) -> dict[str, float]:
    """A policy loss's statistics, Python floats, means over masked-in tokens:

        clipfrac       clipped at either bound (clipfrac_low + clipfrac_high)
        clipfrac_low   clipped at the lower bound (`clipped_low`)
        clipfrac_high  clipped at the upper bound (`clipped_high`)
        approx_kl      mean(old_logprob - logprob) = mean(-log_ratio), verl's ppo_kl
        ratio_mean, ratio_max

    All tensor arguments (B, T); log_ratio is 0 under mask 0.
    """
    ratio = torch.exp(log_ratio)  # (B, T)
    stats = {
        "clipfrac": masked_mean((clipped_low | clipped_high).float(), keep),
        "clipfrac_low": masked_mean(clipped_low.float(), keep),
        "clipfrac_high": masked_mean(clipped_high.float(), keep),
        "approx_kl": masked_mean(-log_ratio, keep),
        "ratio_mean": masked_mean(ratio, keep),
        # ratio > 0, so 0 under mask 0 never wins the max; an empty mask gives 0
        "ratio_max": torch.where(keep, ratio, 0.0).max() if ratio.numel() else 0.0,
    }
    return {k: float(v) for k, v in stats.items()}


def batch_policy_loss(
    batch: dict[str, Tensor],
    logprob: Tensor,
    *,
    policy_loss: str,
    clip_low: float,
    clip_high: float,
    agg: str,
    dual_clip: float | None,
    denominator: float | None,
) -> tuple[Tensor, dict[str, float]]:
    """The policy loss registered as `policy_loss` (POLICY_LOSSES: vanilla, gspo, cispo) on a
    micro-batch dict with "advantages" and "loss_mask" (and "old_logprob").

    The ratio is taken against batch["old_logprob"], the behaviour policy, when the batch holds it
    (the trainer records it when the batch is reused or split into several optimizer steps);
    otherwise the behaviour policy is the current one: ratio = 1, but its gradient is not 0.
    batch["rollout_is_weights"] (N, T), when present (algorithm.rollout_correction), weighs each
    token's loss (common.rollout_correction). dual_clip is the vanilla loss's alone (None otherwise).
    """
    old_logprob = batch["old_logprob"] if "old_logprob" in batch else logprob.detach()
    own = {"dual_clip": dual_clip} if dual_clip is not None else {}
    return get_policy_loss_fn(policy_loss)(
        logprob,
        old_logprob,
        batch["advantages"],
        batch["loss_mask"],
        clip_low=clip_low,
        clip_high=clip_high,
        agg=agg,
        denominator=denominator,
        token_weights=batch.get("rollout_is_weights"),
        **own,
    )


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    cliprange_value: float | None = 0.2,
    agg: str = "token-mean",
    denominator: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss of the PPO critic (as in verl / OpenAI baselines).

        v_clipped = old_values + clamp(values - old_values, -c, c)
        L         = 0.5 * max((values - R)^2, (v_clipped - R)^2)
        loss      = aggregate_loss(L, mask, agg, denominator)

    The clip keeps the new value prediction within c of the one used to compute the advantages;
    cliprange_value=None gives the plain squared error 0.5 * (values - R)^2.

    Args:
        values: (B, T) current critic predictions.
        old_values: (B, T) predictions at rollout time.
        returns: (B, T) value targets R (GAE returns).
        mask: (B, T) response mask.
        cliprange_value: c, or None for no clipping.
        agg: aggregation mode, see aggregate_loss.
        denominator: full-batch normaliser for gradient accumulation, see aggregate_loss.

    Returns:
        loss: scalar float32.
        stats: {"vf_clipfrac": share of masked-in tokens where the clipped term is larger,
                "vpred_mean": masked mean of values}.
    """
    values = torch.as_tensor(values, dtype=torch.float32)
    old_values = torch.as_tensor(old_values, dtype=torch.float32, device=values.device)
    returns = torch.as_tensor(returns, dtype=torch.float32, device=values.device)
    keep = torch.as_tensor(mask, device=values.device).bool()
    loss_unclipped = (values - returns) ** 2
    if cliprange_value is None:
        loss_mat = 0.5 * loss_unclipped
        clipfrac = 0.0
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
        loss_clipped = (v_clipped - returns) ** 2
        loss_mat = 0.5 * torch.maximum(loss_unclipped, loss_clipped)
        clipfrac = float(masked_mean((loss_clipped > loss_unclipped).float(), keep))
    loss = aggregate_loss(loss_mat, keep, agg, denominator)
    stats = {"vf_clipfrac": clipfrac, "vpred_mean": float(masked_mean(values.detach(), keep))}
    return loss, stats


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dimension.

        H = logsumexp(z) - sum_v softmax(z)_v * z_v      (= -sum_v p_v log p_v)

    The logsumexp form never takes log of a probability, so it stays finite for large logits.
    Logits must be finite (a -inf logit gives 0 * -inf = NaN).

    Args:
        logits: (..., V).

    Returns:
        (...) float32 entropy in nats.
    """
    logits = torch.as_tensor(logits).float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)
