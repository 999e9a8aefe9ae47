import pytest
import torch

import dapo
from common.advantage import compute_relative_rewards, mixed_groups
from dapo.sampling import filter_groups, groups_to_resample


def test_filter_groups_hand_values():
    # groups (1, 1): all equal -> drop; (0, 1): keep; (0, 0): drop
    keep = filter_groups([1, 1, 0, 1, 0, 0], 2)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [False, True, False]


def test_filter_groups_is_exported_from_dapo():
    assert dapo.filter_groups is filter_groups
    assert "filter_groups" in dapo.__all__


def test_filter_groups_continuous_rewards_and_tolerance():
    # spreads: 0.3 (keep), 5e-7 below the 1e-6 tolerance (drop), 1e-3 (keep)
    rewards = torch.tensor([0.5, 0.2, 0.7, 0.7 + 5e-7, -1.0, -1.001])
    assert filter_groups(rewards, 2).tolist() == [True, False, True]


def test_filter_groups_keeps_exactly_the_groups_with_nonzero_advantage():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (10 * 4,), generator=g).float()
    keep = filter_groups(rewards, 4)
    adv, _ = compute_relative_rewards(rewards, 4)
    has_signal = adv.view(10, 4).abs().sum(dim=1) > 0
    assert keep.tolist() == has_signal.tolist()
    assert keep.any() and not keep.all()


def test_filter_groups_rejects_indivisible_batch():
    with pytest.raises(ValueError, match="group_size"):
        filter_groups([1, 0, 1], 2)


def test_groups_to_resample_hand_values():
    # group 0: (1, 0) std 0.71 -> keep; group 1: (1, 1) std 0 -> resample; group 2: one row -> resample
    out = groups_to_resample([1.0, 0.0, 1.0, 1.0, 0.0], [0, 0, 1, 1, 2])
    assert out.dtype == torch.long
    assert out.tolist() == [1, 2]


def test_groups_to_resample_ragged_unsorted_ids():
    # group 9 = rows 0, 3, 5: (0.5, 0.5, 0.5) equal; group 4 = rows 1, 4: (1, 0); group 7 = row 2 alone
    rewards = [0.5, 1.0, 0.3, 0.5, 0.0, 0.5]
    group_index = torch.tensor([9, 4, 7, 9, 4, 9])
    assert groups_to_resample(rewards, group_index).tolist() == [7, 9]


def test_filter_resample_and_metric_share_one_definition_of_a_mixed_group():
    # G = 3, contiguous: (1, 1, 1) flat, (0, 1, 0) mixed, (0, 0, 0) flat, (0.5, 0.5, 0.5 + 1e-7) flat
    # (a spread of 1e-7 is within MIXED_SPREAD = 1e-6), (0, 0, 1e-5) mixed
    rewards = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0, 0, 0.5, 0.5, 0.5 + 1e-7, 0, 0, 1e-5])
    group_index = torch.arange(15) // 3
    mixed = mixed_groups(rewards, group_index)
    assert mixed.tolist() == [False, True, False, False, True]
    assert filter_groups(rewards, 3).tolist() == mixed.tolist()
    assert groups_to_resample(rewards, group_index).tolist() == [0, 2, 3]
