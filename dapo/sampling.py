"""Dynamic sampling: which groups carry no learning signal (DAPO Eq. 11, arXiv:2503.14476).

A group whose rewards are all equal has zero group-relative advantage for every response, so it
adds nothing to the policy gradient. Two modes use these functions: "filter" (the paper) drops such
groups and samples more prompts to refill the batch; "resample" adds responses to such a group
until its rewards differ. Both are pure; the sampling loop itself lives in common/sampling.py.
"""

import torch
from torch import Tensor

from common.advantage import mixed_groups


def filter_groups(rewards: Tensor, group_size: int) -> Tensor:
    """Keep mask over groups with differing rewards (DAPO Eq. 11: 0 < |{correct}| < G): the mixed
    groups of common.advantage.mixed_groups, for contiguous groups of G.

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
    return mixed_groups(rewards, group_index)  # (n_groups,)


def groups_to_resample(rewards: Tensor, group_index: Tensor) -> Tensor:
    """Ids of the groups whose rewards are all equal, for the "resample" mode (DAPO Eq. 11): the
    groups that common.advantage.mixed_groups does not call mixed.

        resample_g = max_g(R) - min_g(R) <= 1e-6

    A group of one response is returned. Groups may differ in size and ids need be neither
    contiguous nor sorted.

    Example:
        rewards     = [1, 0, 1, 1, 0]
        group_index = [0, 0, 1, 1, 2]
        spread      = (1, 0, 0)  -> [1, 2]

    Args:
        rewards: (N,) one reward per response.
        group_index: (N,) integer group id of each row.

    Returns:
        Sorted 1-D LongTensor of group ids (values taken from group_index).
    """
    group_index = torch.as_tensor(group_index).long()
    ids = torch.unique(group_index)  # (n_groups,) sorted, the order of mixed_groups
    return ids[~mixed_groups(rewards, group_index)]
