"""Advantage estimators: per-group statistics and group-relative advantages (GRPO, DAPO; with the
group's or the batch's std), RLOO, REINFORCE++, GAE (PPO), and masked whitening; and the estimators
by verl's names (`ADV_ESTIMATORS`: grpo, rloo, reinforce_plus_plus, gae), which
`algorithm.adv_estimator` picks.

Equation numbers follow the DAPO paper (arXiv:2503.14476): Eq. 2-3 GAE, Eq. 4 the GRPO
group-normalised advantage (Eq. 9 restates it for DAPO). Dr. GRPO is arXiv:2503.20783, the batch
std Lite PPO's ("Tricks or Traps?", arXiv:2508.08221), RLOO Ahmadian et al. 2024 (arXiv:2402.14740),
REINFORCE++ Hu 2025 (arXiv:2501.03262).
Every function is pure: tensors (or lists) in, float32 tensors out (group_stats keeps its float64 sums).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


def masked_whiten(
    values: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Whiten `values` with the mean and variance of its masked entries (PPO advantage normalisation).

        mu  = masked_mean(v, m)
        var = sum(m * (v - mu)^2) / (sum(m) - 1)       unbiased, as verl's masked_var
        out = (v - mu) / sqrt(var + eps)                if shift_mean
        out = (v - mu) / sqrt(var + eps) + mu           otherwise (rescale only)

    Statistics pool all masked entries of the batch, not one row at a time. Entries under mask 0
    are ignored and set to 0 in the output. With fewer than two masked entries the variance is
    taken as 0 (no NaN). Kept apart from compute_gae so whitening can be switched off on its own.

    Args:
        values: (B, T), e.g. GAE advantages.
        mask: (B, T), 1 on response tokens.
        shift_mean: subtract the mean (True) or only divide by the std (False).
        eps: added to the variance before the square root.
        reduce: sums a tensor over data-parallel ranks (DistContext.sum); the statistics are then
            the global batch's, as in one process. None: this batch alone.

    Returns:
        (B, T) float32, 0 where mask is 0.
    """
    reduce = reduce or (lambda t: t)
    values = torch.as_tensor(values, dtype=torch.float32)
    keep = torch.as_tensor(mask, device=values.device).bool()
    count = reduce(keep.sum().float())
    mean = reduce(torch.where(keep, values, 0.0).sum()) / count.clamp(min=1)
    centered = torch.where(keep, values - mean, 0.0)
    var = reduce((centered**2).sum()) / (count - 1).clamp(min=1)
    whitened = centered * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(keep, whitened, 0.0)


@dataclass
class GroupStats:
    """Per-group statistics of one value per row (see `group_stats`); all (n_groups,) but `inverse`."""

    ids: Tensor  # (n_groups,) the group ids, sorted
    inverse: Tensor  # (N,) each row's group number 0..n_groups-1 (ids[inverse] = group_index)
    count: Tensor  # (n_groups,) float64 rows per group
    mean: Tensor  # (n_groups,) float64
    std: Tensor  # (n_groups,) float64, unbiased (N_g - 1); 0 for a group of one row
    spread: Tensor  # (n_groups,) max - min, in the values' float32


def group_stats(values: Tensor, group_index: Tensor) -> GroupStats:
    """Count, mean, std and spread of `values` per group, for groups of any size (ragged, unsorted).

        mean_g   = sum_{i in g} v_i / N_g
        std_g    = sqrt( sum_{i in g} (v_i - mean_g)^2 / max(N_g - 1, 1) )     unbiased, as torch.std
        spread_g = max_{i in g} v_i - min_{i in g} v_i

    Sums are accumulated in float64, so the mean is the correctly rounded group mean and a group of
    equal values has std exactly 0. The one place these are computed: the group-relative
    advantages and `mixed_groups` (spread).

    Example:
        values      = [1, 0, 1, 1, 0]
        group_index = [0, 0, 1, 1, 2]
        ids = [0, 1, 2], count = [2, 2, 1], mean = [0.5, 1, 0], std = [0.7071, 0, 0], spread = [1, 0, 0]

    Args:
        values: (N,) one value per row (e.g. its reward).
        group_index: (N,) integer group id of each row.
    """
    values = torch.as_tensor(values, dtype=torch.float32)
    group_index = torch.as_tensor(group_index, device=values.device)
    if values.dim() != 1 or group_index.shape != values.shape:
        raise ValueError(
            f"values and group_index must be 1-D of the same length, got {tuple(values.shape)} "
            f"and {tuple(group_index.shape)}"
        )
    ids, inverse = torch.unique(group_index, return_inverse=True)  # (n_groups,), (N,)
    v64 = values.double()
    count = torch.zeros(ids.numel(), dtype=torch.float64, device=values.device)
    count.index_add_(0, inverse, torch.ones_like(v64))  # (n_groups,)
    mean = torch.zeros_like(count).index_add_(0, inverse, v64) / count  # (n_groups,)
    sq = torch.zeros_like(count).index_add_(0, inverse, (v64 - mean[inverse]) ** 2)  # (n_groups,)
    # a single-row group has sq = 0, so clamping N_g - 1 to 1 gives std 0
    std = (sq / (count - 1).clamp(min=1)).sqrt()  # (n_groups,)
    empty = torch.zeros(ids.numel(), dtype=values.dtype, device=values.device)
    spread = empty.scatter_reduce(0, inverse, values, "amax", include_self=False)
    spread -= empty.scatter_reduce(0, inverse, values, "amin", include_self=False)  # (n_groups,)
    return GroupStats(ids, inverse, count, mean, std, spread)


# A group is mixed (carries a learning signal) when its rewards differ by more than this
MIXED_SPREAD = 1e-6


def mixed_groups(rewards: Tensor, group_index: Tensor) -> Tensor:
    """Which groups are mixed: their rewards are not all equal (DAPO Eq. 11: 0 < |{correct}| < G).

        mixed_g = max_{i in g} R_i - min_{i in g} R_i > 1e-6

    The one definition of a mixed group, shared by DAPO's filter (dapo.filter_groups), the resample
    mode (dapo.groups_to_resample: the groups that are not mixed) and the logged share of mixed
    groups (reward/mixed_group_frac), which all read the task's correctness. A flat group has zero
    group-relative advantage for every response, so it adds nothing to the policy gradient.

    Example:
        rewards     = [1, 0, 1, 1, 0]
        group_index = [0, 0, 1, 1, 2]
        mixed       = [True, False, False]     (ids 0, 1, 2; a group of one is never mixed)

    Args:
        rewards: (N,) one reward per row.
        group_index: (N,) integer group id of each row (groups ragged, ids unsorted).

    Returns:
        (n_groups,) bool over the sorted group ids (group_stats(...).ids).
    """
    return group_stats(rewards, group_index).spread > MIXED_SPREAD


SCALE_REWARDS = ("group", "batch", "none")


def batch_std(values: Tensor, reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Unbiased std of all of `values` (N,), float64, over data-parallel ranks when `reduce` sums
    across them (then as in one process); 0 with fewer than two values.

    Example: [1, 0, 0, 1] -> mean 0.5, sum of squares 4 * 0.25 = 1, std = sqrt(1 / 3) = 0.5774
    """
    reduce = reduce or (lambda t: t)
    v64 = torch.as_tensor(values, dtype=torch.float32).double()
    count = reduce(torch.tensor(float(v64.numel()), dtype=torch.float64, device=v64.device))
    mean = reduce(v64.sum()) / count.clamp(min=1)
    return (reduce(((v64 - mean) ** 2).sum()) / (count - 1).clamp(min=1)).sqrt()


def compute_group_relative_advantages(
    rewards: Tensor,
    group_index: Tensor,
    scale_rewards: str = "group",
    eps: float = 1e-6,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Group-relative advantages for groups of any size (GRPO, DAPO Eq. 4 / Eq. 9).

        A_i = (R_i - mean_g(R)) / (std_g(R) + eps)    scale_rewards = group (GRPO)
        A_i = (R_i - mean_g(R)) / (std_B(R) + eps)    scale_rewards = batch (Lite PPO, arXiv:2508.08221)
        A_i =  R_i - mean_g(R)                         scale_rewards = none (Dr. GRPO, arXiv:2503.20783)

    where g is the group of row i, given by `group_index[i]`, and B the whole batch (every group,
    on every data-parallel rank: `reduce`). The names are TRL's scale_rewards. Lite PPO reports the
    group mean with the batch std as the robust normaliser: a group's spread no longer inflates the
    advantages of nearly-solved (or nearly-failed) prompts. Groups may differ in size (DAPO's
    "resample" dynamic sampling adds responses to one prompt at a time), and ids need be neither
    contiguous nor sorted.

    stds are unbiased (N - 1), as torch.std (TRL's batch std too). Group sums are accumulated in
    float64 and the result cast to float32, so the baseline is the correctly rounded group mean and a
    group of equal rewards gets exactly A = 0 (also with eps = 0). A group of one response has no
    spread: its std is taken as 0 and its A = 0 (no NaN); so is a batch of equal rewards under batch.

    Example (groups of sizes 3 and 2, rows interleaved):
        rewards     = [1, 5, 0, 3, 0]
        group_index = [0, 1, 0, 1, 0]
        group 0: R = (1, 0, 0), mean 1/3, std = sqrt((4/9 + 1/9 + 1/9) / 2) = 1/sqrt(3)
        group 1: R = (5, 3),    mean 4,   std = sqrt((1 + 1) / 1) = sqrt(2)
        baselines  = [1/3, 4, 1/3, 4, 1/3]
        advantages = [2/sqrt(3), 1/sqrt(2), -1/sqrt(3), -1/sqrt(2), -1/sqrt(3)]   (group, eps aside)
        batch: mean 1.8, std_B = sqrt((0.64 + 10.24 + 3.24 + 1.44 + 3.24) / 4) = sqrt(4.7) = 2.1679
        advantages = [2/3, 1, -1/3, -1, -1/3] / 2.1679                            (batch, eps aside)

    Args:
        rewards: (N,) one scalar reward per response.
        group_index: (N,) integer group id of each row (e.g. the prompt's index).
        scale_rewards: group, batch or none, see above.
        eps: added to the std before dividing.
        reduce: sums a tensor over data-parallel ranks, for the batch std; None: this batch alone.

    Returns:
        advantages: (N,) float32.
        baselines: (N,) float32, the group mean broadcast back to every row.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {scale_rewards!r}")
    stats = group_stats(rewards, group_index)
    mean = stats.mean[stats.inverse]  # (n_groups,) -> (N,)
    advantages = torch.as_tensor(rewards, dtype=torch.float32).double() - mean  # (N,)
    if scale_rewards != "none":
        # (N,) group stds (0 for a single-response group, so its A = 0), or the batch's, broadcast
        group = scale_rewards == "group"
        std = stats.std[stats.inverse] if group else batch_std(rewards, reduce).expand_as(mean)
        # std == 0 only when every deviation is exactly 0; keep A = 0 there even with eps = 0
        advantages = torch.where(std > 0, advantages / (std + eps), 0.0)
    return advantages.float(), mean.float()


def compute_relative_rewards(
    rewards: Tensor, group_size: int, scale_rewards: str = "group", eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Group-relative advantages for contiguous, equal-sized groups (GRPO, DAPO Eq. 4 / Eq. 9).

        A_i = (R_i - mean_g(R)) / (std_g(R) + eps)    scale_rewards = group
        A_i = (R_i - mean_g(R)) / (std_B(R) + eps)    scale_rewards = batch (Lite PPO, arXiv:2508.08221)
        A_i =  R_i - mean_g(R)                         scale_rewards = none (Dr. GRPO, arXiv:2503.20783)

    std is torch.std, i.e. unbiased (G - 1), with eps 1e-6 as in verl. A group whose rewards are all
    equal gets A = 0 exactly; with G = 1 every A is 0. This is compute_group_relative_advantages with
    group ids [0]*G + [1]*G + ..., so both share one implementation.

    Example (G = 4, two prompts):
        rewards   = [0.8, 0.6, 0.9, 0.7,   0.85, 0.75, 0.80, 0.90]
        baselines = [0.75] * 4 + [0.825] * 4
        group 1 deviations (0.05, -0.15, 0.15, -0.05); unbiased std = sqrt(0.05 / 3) = 0.1291
        advantages[:4] = (0.387, -1.162, 1.162, -0.387)

    Args:
        rewards: (N,) with N = n_prompts * group_size, laid out [q1]*G + [q2]*G + ...
        group_size: G, responses sampled per prompt.
        scale_rewards: group, batch or none, see above.
        eps: added to the std before dividing.

    Returns:
        advantages: (N,) float32.
        baselines: (N,) float32, the group mean broadcast back to every sample.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"number of rewards ({rewards.numel()}) must be a multiple of group_size ({group_size}); "
            "rows are laid out [q1]*G + [q2]*G + ..."
        )
    group_index = torch.arange(rewards.numel(), device=rewards.device) // group_size  # (N,)
    return compute_group_relative_advantages(rewards, group_index, scale_rewards=scale_rewards, eps=eps)


def compute_gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens (PPO, DAPO Eq. 2-3).

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                              (value target)

    Masked positions are skipped as in verl's compute_gae_advantage_return: the recursion runs
    backwards over t, and at a position with mask 0 neither the "next value" nor the running
    advantage is updated. So V_{t+1} and A_{t+1} are those of the next *unmasked* token, rewards
    and values under mask 0 are never read, and a right-padded row gives the same A as its
    unpadded version. A masked position carries the running advantage of the next unmasked token to
    its right (0 for right padding); a fully masked row gets A = 0. Past the last token V = 0.
    No whitening here: masked_whiten is a separate step. Computed without gradient.

    Example (gamma = lam = 1, one row, last token is padding):
        rewards = [0, 0, 1, 9],  values = [0.5, 0.5, 0.5, 9],  mask = [1, 1, 1, 0]
        t=2: delta = 1 + 0 - 0.5 = 0.5,  A = 0.5
        t=1: delta = 0 + 0.5 - 0.5 = 0,  A = 0 + 0.5 = 0.5
        t=0: A = 0.5;  advantages = [0.5, 0.5, 0.5, 0],  returns = [1, 1, 1, 9]

    Args:
        rewards: (B, T) per-token rewards (token_rewards: task reward on the last token, KL shaping).
        values: (B, T) critic values V(s_t).
        mask: (B, T) response mask, 1 on response tokens.
        gamma: discount.
        lam: GAE lambda.

    Returns:
        advantages: (B, T) float32.
        returns: (B, T) float32, advantages + values.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    values = torch.as_tensor(values, dtype=torch.float32, device=rewards.device).detach()
    mask = torch.as_tensor(mask, device=rewards.device).bool()
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(
            f"rewards, values and mask must all be (B, T), got {tuple(rewards.shape)}, "
            f"{tuple(values.shape)} and {tuple(mask.shape)}"
        )
    with torch.no_grad():
        B, T = rewards.shape
        next_value = rewards.new_zeros(B)  # (B,) value of the next unmasked token
        last_gae = rewards.new_zeros(B)  # (B,) advantage of the next unmasked token
        advantages_reversed = []
        for t in reversed(range(T)):
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            gae = delta + gamma * lam * last_gae
            # torch.where (not v*m + (1-m)*v) so inf/NaN junk under mask 0 cannot leak in
            next_value = torch.where(mask[:, t], values[:, t], next_value)
            last_gae = torch.where(mask[:, t], gae, last_gae)
            advantages_reversed.append(last_gae)
        advantages = torch.stack(advantages_reversed[::-1], dim=1)  # T x (B,) -> (B, T)
        returns = advantages + values
    return advantages, returns


def compute_rloo_advantages(rewards: Tensor, group_index: Tensor) -> Tensor:
    """REINFORCE Leave-One-Out advantages (Ahmadian et al. 2024, arXiv:2402.14740, Sec. 3.2; Kool et
    al. 2019): each response's baseline is the mean reward of the other responses to its prompt.

        A_i = R_i - (sum_{j in g, j != i} R_j) / (N_g - 1)  =  N_g / (N_g - 1) * (R_i - mean_g(R))

    No std scaling (TRL's RLOOTrainer and verl's rloo neither). The baseline does not depend on R_i,
    so the estimate is unbiased; it is GRPO's scale_rewards=none advantage times N_g / (N_g - 1).
    Groups may be ragged; a group of one response has no other to compare with: A = 0. Sums in
    float64, so a group of equal rewards gets exactly 0.

    Example (one group of G = 4):
        rewards = [1, 0, 0, 1]: A_0 = 1 - (0 + 0 + 1) / 3 = 2/3, A_1 = 0 - (1 + 0 + 1) / 3 = -2/3
        advantages = [2/3, -2/3, -2/3, 2/3]

    Args:
        rewards: (N,) one scalar reward per response.
        group_index: (N,) integer group id of each row.

    Returns:
        (N,) float32 advantages.
    """
    stats = group_stats(rewards, group_index)
    count, mean = stats.count[stats.inverse], stats.mean[stats.inverse]  # (n_groups,) -> (N,)
    deviation = torch.as_tensor(rewards, dtype=torch.float32).double() - mean  # (N,)
    return torch.where(count > 1, deviation * count / (count - 1).clamp(min=1), 0.0).float()


def compute_reinforce_plus_plus_advantages(
    rewards: Tensor, response_mask: Tensor, reduce: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """REINFORCE++ advantages (Hu 2025, arXiv:2501.03262, Sec. 3): no critic and no group baseline;
    each token's return is whitened with the mean and std of the whole batch's returns.

        G_{i,t} = sum_{s >= t} gamma^(s - t) r_{i,s} = R_i         outcome reward on the last token, gamma = 1
        A_{i,t} = (G_{i,t} - mean_B(G)) / sqrt(var_B(G) + 1e-8)   over every response token of the batch

    As verl's compute_reinforce_plus_plus_outcome_advantage with its default gamma = 1 (and no KL in
    the reward: here the KL term stays in the loss, as in GRPO). The statistics pool tokens
    (masked_whiten, unbiased variance), so a long response weighs more in mean and std than a short
    one; across data-parallel ranks when `reduce` sums over them. Unlike GRPO's, a group of equal
    rewards keeps a nonzero advantage (its reward against the batch's mean).

    Example (gamma = 1; x = padding):
        rewards = [1, 0], mask = [[1, 1, 0], [1, 0, 0]]: the token returns are 1, 1, 0
        mean 2/3, deviations (1/3, 1/3, -2/3), var = (1/9 + 1/9 + 4/9) / 2 = 1/3, std = 0.5774
        advantages = [[0.5774, 0.5774, 0], [-1.1547, 0, 0]]

    Args:
        rewards: (N,) one scalar reward per response.
        response_mask: (N, T), 1 on response tokens.
        reduce: sums a tensor over data-parallel ranks (DistContext.sum); None: this batch alone.

    Returns:
        (N, T) float32 advantages, 0 under mask 0.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    returns = rewards.unsqueeze(1).expand(response_mask.shape)  # (N,) -> (N, T)
    return masked_whiten(returns, response_mask, reduce=reduce)


@dataclass(frozen=True)
class AdvantageInputs:
    """What an advantage estimator may read, in the batch's vocabulary; an algorithm fills what it
    has and sets the rest to None (GRPO has no critic, PPO no scale_rewards)."""

    rewards: Tensor  # (N,) total reward per response
    group_index: Tensor | None  # (N,) grpo, rloo: the prompt of each row
    response_mask: Tensor  # (N, T)
    scale_rewards: str | None  # grpo: group, batch or none
    token_rewards: Tensor | None  # (N, T) gae: per-token rewards (the KL-shaped reward of PPO)
    values: Tensor | None  # (N, T) gae: the critic's values at rollout time
    gamma: float | None  # gae
    lam: float | None  # gae
    reduce: Callable[[Tensor], Tensor] | None  # sums over data-parallel ranks; None: one process


@dataclass(frozen=True)
class AdvantageEstimator:
    """One registered estimator: `compute` gives (advantages (N,) or (N, T), returns (N, T) or
    None); `group_relative`: it compares the responses of a group (a flat group gets A = 0, so
    dynamic sampling may drop it, and G >= 2 is needed); `needs_critic`: it reads the critic's values."""

    compute: Callable[[AdvantageInputs], tuple[Tensor, Tensor | None]]
    group_relative: bool
    needs_critic: bool


ADV_ESTIMATORS: dict[str, AdvantageEstimator] = {}

EstimatorFn = Callable[[AdvantageInputs], tuple[Tensor, Tensor | None]]


def register_adv_estimator(
    name: str, *, group_relative: bool, needs_critic: bool = False
) -> Callable[[EstimatorFn], EstimatorFn]:
    """Decorator: make an estimator selectable as `algorithm.adv_estimator=<name>` (verl's
    register_adv_est). A name is registered once."""

    def register(fn: EstimatorFn) -> EstimatorFn:
        if name in ADV_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is registered twice")
        ADV_ESTIMATORS[name] = AdvantageEstimator(fn, group_relative, needs_critic)
        return fn

    return register


@register_adv_estimator("grpo", group_relative=True)
def _grpo(x: AdvantageInputs) -> tuple[Tensor, None]:
    """GRPO's group-relative advantage, scaled as scale_rewards says (compute_group_relative_advantages)."""
    advantages, _ = compute_group_relative_advantages(
        x.rewards, x.group_index, x.scale_rewards, reduce=x.reduce
    )
    return advantages, None


@register_adv_estimator("rloo", group_relative=True)
def _rloo(x: AdvantageInputs) -> tuple[Tensor, None]:
    """The leave-one-out baseline (compute_rloo_advantages)."""
    return compute_rloo_advantages(x.rewards, x.group_index), None


@register_adv_estimator("reinforce_plus_plus", group_relative=False)
def _reinforce_plus_plus(x: AdvantageInputs) -> tuple[Tensor, None]:
    """The batch-whitened return (compute_reinforce_plus_plus_advantages)."""
    return compute_reinforce_plus_plus_advantages(x.rewards, x.response_mask, x.reduce), None


@register_adv_estimator("gae", group_relative=False, needs_critic=True)
def _gae(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """GAE over the per-token rewards with the critic's values (compute_gae): (advantages, returns)."""
    return compute_gae(x.token_rewards, x.values, x.response_mask, x.gamma, x.lam)
