"""Dynamic sampling: which groups carry no learning signal (DAPO Eq. 11, arXiv:2503.14476).

A group whose rewards are all equal has zero group-relative advantage for every response, so it
adds nothing to the policy gradient. Two modes use these functions: "filter" (the paper) drops such
groups and samples more prompts to refill the batch; "resample" adds responses to such a group
until its rewards differ. Both are pure; the sampling loop itself lives in common/sampling.py.
"""

import torch
from torch import Tensor

from common.advantage import group_stats


def filter_groups(rewards: Tensor, group_size: int) -> Tensor:
    """Keep mask over groups with differing rewards (DAPO Eq. 11: 0 < |{correct}| < G).

        keep_g = max_g(R) - min_g(R) > 1e-6

    The check is on the reward spread rather than on a count of correct answers, so it also
    applies to non-binary rewards (e.g. with overlong shaping added). Groups are contiguous.

    Example (G = 2):
        rewards = [1, 1,   0, 1,   0, 0]
        keep    = [False,  True,   False]

    Args:
        rewards: (N,) with N = n_groups * group_size, laid out [q1]*G + [q2]*G + ...
        group_size: G.

    Returns:
        (n_groups,) bool, True = keep the group.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"number of rewards ({rewards.numel()}) must be a multiple of group_size ({group_size})"
        )
    group_index = torch.arange(rewards.numel(), device=rewards.device) // group_size  # (N,)
    return group_stats(rewards, group_index).spread > 1e-6  # (n_groups,)


def groups_to_resample(rewards: Tensor, group_index: Tensor, std_threshold: float = 1e-6) -> Tensor:
    """Ids of the groups whose rewards are all equal, for the "resample" mode (DAPO Eq. 11).

        resample_g = std_g(R) < std_threshold

    std is unbiased, as in compute_relative_rewards; a group of one response has std 0 and is
    returned. Groups may differ in size and ids need be neither contiguous nor sorted.

    Example:
        rewards     = [1, 0, 1, 1, 0]
        group_index = [0, 0, 1, 1, 2]
        std         = (0.71, 0, 0)  -> [1, 2]

    Args:
        rewards: (N,) one reward per response.
        group_index: (N,) integer group id of each row.
        std_threshold: a group with a smaller std counts as all-equal.

    Returns:
        Sorted 1-D LongTensor of group ids (values taken from group_index).
    """
    stats = group_stats(rewards, torch.as_tensor(group_index).long())
    return stats.ids[stats.std < std_threshold]
