import math

import pytest
import torch

from common.advantage import (
    ADV_ESTIMATORS,
    AdvantageInputs,
    batch_std,
    compute_gae,
    compute_group_relative_advantages,
    compute_reinforce_plus_plus_advantages,
    compute_relative_rewards,
    compute_rloo_advantages,
    group_stats,
    masked_whiten,
)
from common.losses import masked_mean

# ---------------------------------------------------------------- group-relative (GRPO, DAPO Eq. 4)


def test_relative_rewards_one_correct_out_of_four():
    # mean = 0.25; deviations (0.75, -0.25, -0.25, -0.25); unbiased var = 0.75 / 3 = 0.25 -> std = 0.5
    adv, base = compute_relative_rewards([1.0, 0.0, 0.0, 0.0], group_size=4)
    torch.testing.assert_close(adv, torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=1e-5, rtol=0)
    torch.testing.assert_close(base, torch.full((4,), 0.25))
    assert adv.dtype == base.dtype == torch.float32


def test_relative_rewards_seed_baselines():
    # group 1: (0.8 + 0.6 + 0.9 + 0.7) / 4 = 0.75; group 2: (0.85 + 0.75 + 0.80 + 0.90) / 4 = 0.825
    rewards = [0.8, 0.6, 0.9, 0.7, 0.85, 0.75, 0.80, 0.90]
    adv, base = compute_relative_rewards(rewards, group_size=4)
    # exact on any machine: group sums run in float64, where a few float32 rewards add up without
    # rounding in any order, so the baseline is the correctly rounded mean
    assert base[0] == 0.75
    assert base[4] == 0.825
    assert base.shape == adv.shape == (8,)
    # group 1 deviations (0.05, -0.15, 0.15, -0.05); sum of squares 0.05; unbiased std = sqrt(0.05 / 3)
    std = math.sqrt(0.05 / 3)
    expected = torch.tensor([0.05, -0.15, 0.15, -0.05]) / (std + 1e-6)
    torch.testing.assert_close(adv[:4], expected, atol=1e-5, rtol=0)


def test_relative_rewards_matches_torch_std_reference():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(6 * 5, generator=g)
    grouped = rewards.view(6, 5)
    mean = grouped.mean(dim=1, keepdim=True)
    expected = ((grouped - mean) / (grouped.std(dim=1, keepdim=True) + 1e-6)).reshape(-1)
    adv, base = compute_relative_rewards(rewards, group_size=5)
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base, mean.expand(6, 5).reshape(-1))


def test_relative_rewards_without_std_is_dr_grpo():
    # group means 0.5 and 2; A = R - mean
    adv, base = compute_relative_rewards([1.0, 0.0, 3.0, 1.0], group_size=2, scale_rewards="none")
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, 1.0, -1.0]))
    torch.testing.assert_close(base, torch.tensor([0.5, 0.5, 2.0, 2.0]))


@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, 0.7, -3.3])
def test_relative_rewards_equal_group_is_exactly_zero(value):
    # an all-equal group: mean = value exactly, deviations 0, std 0 -> A = 0 / (0 + eps) = 0
    rewards = [value] * 7 + [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    adv, base = compute_relative_rewards(rewards, group_size=7)
    assert torch.isfinite(adv).all()
    assert (adv[:7] == 0).all()
    assert (base[:7] == torch.tensor(value, dtype=torch.float32)).all()
    assert (adv[7:] != 0).all()


def test_relative_rewards_group_of_one_is_zero():
    adv, base = compute_relative_rewards([0.3, 1.0, 0.0], group_size=1)
    assert torch.isfinite(adv).all()
    assert (adv == 0).all()
    torch.testing.assert_close(base, torch.tensor([0.3, 1.0, 0.0]))


def test_relative_rewards_rejects_indivisible_batch():
    with pytest.raises(ValueError, match="multiple of group_size"):
        compute_relative_rewards([1.0, 0.0, 1.0], group_size=2)


def test_group_relative_ragged_hand_example():
    # group 0 = rows 0, 2, 4: R = (1, 0, 0), mean 1/3, deviations (2/3, -1/3, -1/3),
    #   unbiased var = (4/9 + 1/9 + 1/9) / 2 = 1/3 -> std = 1/sqrt(3), A = (2/sqrt(3), -1/sqrt(3), -1/sqrt(3))
    # group 7 = rows 1, 3: R = (5, 3), mean 4, deviations (1, -1), var = 2 / 1 -> std = sqrt(2),
    #   A = +-1/sqrt(2)
    rewards = [1.0, 5.0, 0.0, 3.0, 0.0]
    group_index = [7, 0, 7, 0, 7]
    adv, base = compute_group_relative_advantages(rewards, group_index, eps=0.0)
    s3, s2 = math.sqrt(3), math.sqrt(2)
    torch.testing.assert_close(adv, torch.tensor([2 / s3, 1 / s2, -1 / s3, -1 / s2, -1 / s3]))
    torch.testing.assert_close(base, torch.tensor([1 / 3, 4.0, 1 / 3, 4.0, 1 / 3]))


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_relative_equals_contiguous_for_equal_groups(scale_rewards, seed):
    g = torch.Generator().manual_seed(seed)
    n_groups, G = 5, 4
    rewards = torch.randint(0, 3, (n_groups * G,), generator=g).float() / 2
    expected_adv, expected_base = compute_relative_rewards(rewards, G, scale_rewards=scale_rewards)
    # same groups, rows shuffled and ids relabelled non-contiguously
    perm = torch.randperm(n_groups * G, generator=g)
    group_index = (torch.arange(n_groups * G) // G) * 10 + 3
    adv, base = compute_group_relative_advantages(
        rewards[perm], group_index[perm], scale_rewards=scale_rewards
    )
    torch.testing.assert_close(adv, expected_adv[perm])
    torch.testing.assert_close(base, expected_base[perm])


def test_group_relative_singleton_and_equal_groups_no_nan():
    # group 0 has one row, group 1 is all-equal, group 2 has spread (0, 1): mean 0.5, std sqrt(0.5)
    adv, _ = compute_group_relative_advantages([0.4, 1.0, 1.0, 0.0, 1.0], [0, 1, 1, 2, 2], eps=0.0)
    torch.testing.assert_close(
        adv, torch.tensor([0.0, 0.0, 0.0, -0.5 / math.sqrt(0.5), 0.5 / math.sqrt(0.5)])
    )


def test_group_relative_rejects_length_mismatch():
    with pytest.raises(ValueError, match="same length"):
        compute_group_relative_advantages([1.0, 0.0], [0, 0, 1])


# ---------------------------------------------------------------- GAE (DAPO Eq. 2-3)


def reference_gae(rewards, values, mask, gamma, lam):
    """Per-row loop: keep only unmasked tokens, run textbook GAE on them, scatter back.

    A masked position takes the advantage of the next unmasked token to its right (0 if none).
    """
    B, T = rewards.shape
    advantages = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        r = [float(rewards[b, t]) for t in idx]
        v = [float(values[b, t]) for t in idx]
        adv = [0.0] * len(idx)
        running = 0.0
        for k in reversed(range(len(idx))):
            next_v = v[k + 1] if k + 1 < len(idx) else 0.0
            running = r[k] + gamma * next_v - v[k] + gamma * lam * running
            adv[k] = running
        carry = 0.0
        for t in reversed(range(T)):
            if mask[b, t]:
                carry = adv[idx.index(t)]
            advantages[b, t] = carry
    return advantages.float()


def test_gae_hand_values_three_tokens():
    # gamma 0.5, lam 0.5; rewards (0, 0, 1), values (1, 2, 3)
    # t=2: delta = 1 + 0 - 3 = -2;            A2 = -2
    # t=1: delta = 0 + 0.5*3 - 2 = -0.5;      A1 = -0.5 + 0.25*(-2) = -1
    # t=0: delta = 0 + 0.5*2 - 1 = 0;         A0 = 0 + 0.25*(-1) = -0.25
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[1.0, 2.0, 3.0]])
    adv, ret = compute_gae(rewards, values, torch.ones(1, 3), gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[-0.25, -1.0, -2.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.75, 1.0, 1.0]]))  # A + V


def test_gae_right_padding_and_fully_masked_row():
    # row 0: as above, 3 tokens; row 1: 2 tokens, then padding with junk reward/value
    #   t=1: delta = 1 + 0 - 2 = -1, A1 = -1;  t=0: delta = 0 + 0.5*2 - 1 = 0, A0 = 0.25*(-1) = -0.25
    # row 2: fully masked -> A = 0
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 50.0], [3.0, -2.0, 7.0]])
    values = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, -40.0], [5.0, 6.0, 8.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[-0.25, -1.0, -2.0], [-0.25, -1.0, 0.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(ret, adv + values)
    # the padded row equals its unpadded version
    adv_short, _ = compute_gae(rewards[1:2, :2], values[1:2, :2], torch.ones(1, 2), gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv[1:2, :2], adv_short)


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(4, 6, generator=g)
    values = torch.randn(4, 6, generator=g)
    adv, ret = compute_gae(rewards, values, torch.ones(4, 6), gamma=1.0, lam=1.0)
    reward_to_go = rewards.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(adv, reward_to_go - values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, reward_to_go, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed, shape", [(0, (1, 1)), (1, (3, 5)), (2, (4, 9)), (3, (6, 4))])
@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_per_row_reference(seed, shape, gamma, lam):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(*shape, generator=g)
    values = torch.randn(*shape, generator=g)
    mask = torch.rand(*shape, generator=g) > 0.3  # holes anywhere: prompt-style gaps and padding
    adv, ret = compute_gae(rewards, values, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(adv, reference_gae(rewards, values, mask, gamma, lam), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, adv + values)


def test_gae_ignores_values_under_mask():
    g = torch.Generator().manual_seed(5)
    rewards, values = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.4
    adv, _ = compute_gae(rewards, values, mask, gamma=0.9, lam=0.9)
    junk_rewards = torch.where(mask, rewards, torch.full_like(rewards, float("inf")))
    junk_values = torch.where(mask, values, torch.full_like(values, float("nan")))
    adv_junk, _ = compute_gae(junk_rewards, junk_values, mask, gamma=0.9, lam=0.9)
    torch.testing.assert_close(adv_junk, adv)


def test_gae_has_no_gradient_and_rejects_bad_shapes():
    values = torch.zeros(2, 3, requires_grad=True)
    adv, ret = compute_gae(torch.ones(2, 3), values, torch.ones(2, 3))
    assert not adv.requires_grad and not ret.requires_grad
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        compute_gae(torch.ones(2, 3), torch.ones(2, 4), torch.ones(2, 3))


# ---------------------------------------------------------------- masked mean / whitening


def test_group_stats_hand_values_for_ragged_unsorted_groups():
    # group 7: (1, 0, 0): mean 1/3, unbiased var (4/9 + 1/9 + 1/9) / 2 = 1/3, spread 1
    # group 2: (5, 3): mean 4, var (1 + 1) / 1 = 2, spread 2;  group 4: (0.5): std 0, spread 0
    stats = group_stats([1.0, 5.0, 0.0, 3.0, 0.0, 0.5], [7, 2, 7, 2, 7, 4])
    assert stats.ids.tolist() == [2, 4, 7] and stats.inverse.tolist() == [2, 0, 2, 0, 2, 1]
    assert stats.count.tolist() == [2.0, 1.0, 3.0]
    torch.testing.assert_close(stats.mean, torch.tensor([4.0, 0.5, 1 / 3], dtype=torch.float64))
    torch.testing.assert_close(stats.std, torch.tensor([2**0.5, 0.0, 3**-0.5], dtype=torch.float64))
    assert stats.spread.tolist() == [2.0, 0.0, 1.0]


def test_masked_mean_hand_values_and_empty_row():
    values = torch.tensor([[1.0, 3.0, 100.0], [7.0, float("inf"), float("nan")]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    # all: (1 + 3) / 2 = 2; rows: (1 + 3) / 2 = 2 and an empty row -> 0
    assert masked_mean(values, mask).item() == 2.0
    torch.testing.assert_close(masked_mean(values, mask, dim=1), torch.tensor([2.0, 0.0]))


def test_masked_whiten_moments_and_zeroed_padding():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(4, 6, generator=g) * 3 + 2
    mask = torch.rand(4, 6, generator=g) > 0.3
    out = masked_whiten(values, mask)
    kept = out[mask]
    torch.testing.assert_close(kept.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(kept.var(), torch.tensor(1.0), atol=1e-5, rtol=0)  # unbiased
    assert (out[~mask] == 0).all()
    # junk under the mask does not change the result
    junk = torch.where(mask, values, torch.full_like(values, 1e6))
    torch.testing.assert_close(masked_whiten(junk, mask), out)


def test_masked_whiten_hand_values_and_no_shift():
    # masked entries (1, 3, 5): mean 3, unbiased var = (4 + 0 + 4) / 2 = 4 -> std 2
    values = torch.tensor([[1.0, 3.0, 9.0], [5.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(
        masked_whiten(values, mask, eps=0.0), torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    )
    # shift_mean=False keeps the mean: (v - 3) / 2 + 3
    torch.testing.assert_close(
        masked_whiten(values, mask, shift_mean=False, eps=0.0),
        torch.tensor([[2.0, 3.0, 0.0], [4.0, 0.0, 0.0]]),
    )


def test_masked_whiten_single_entry_is_finite():
    out = masked_whiten(torch.tensor([[4.0, 2.0]]), torch.tensor([[1, 0]]))
    torch.testing.assert_close(out, torch.zeros(1, 2))


# ---------------------------------------------------------------- batch std, RLOO, REINFORCE++, registry


def test_batch_std_scales_every_group_by_the_same_std():
    # the docstring's ragged example: group 0 = (1, 0, 0), group 1 = (5, 3); batch mean 1.8,
    # std = sqrt((0.64 + 10.24 + 3.24 + 1.44 + 3.24) / 4) = sqrt(4.7) = 2.167948
    rewards, group_index = [1.0, 5.0, 0.0, 3.0, 0.0], [0, 1, 0, 1, 0]
    assert batch_std(torch.tensor(rewards)).item() == pytest.approx(math.sqrt(4.7))
    adv, base = compute_group_relative_advantages(rewards, group_index, scale_rewards="batch", eps=0.0)
    deviations = torch.tensor([2 / 3, 1.0, -1 / 3, -1.0, -1 / 3])  # R - group mean (1/3 and 4)
    torch.testing.assert_close(adv, deviations / math.sqrt(4.7))
    torch.testing.assert_close(base, torch.tensor([1 / 3, 4.0, 1 / 3, 4.0, 1 / 3]))


def test_batch_std_of_equal_rewards_gives_zero_advantage_and_unknown_scaling_is_refused():
    adv, _ = compute_group_relative_advantages(
        [1.0, 1.0, 1.0, 1.0], [0, 0, 1, 1], scale_rewards="batch", eps=0.0
    )
    assert torch.equal(adv, torch.zeros(4))
    with pytest.raises(ValueError, match="group, batch, none"):
        compute_group_relative_advantages([1.0, 0.0], [0, 0], scale_rewards="std")


def test_batch_std_pools_the_ranks_through_reduce():
    # this rank holds (1, 0), the other (0, 1); reduce adds the other's count 2, sum 1 and squared
    # deviations around the shared mean 0.5 (0.25 + 0.25): the std of (1, 0, 0, 1) = sqrt(1 / 3)
    other_parts = iter([2.0, 1.0, 0.5])
    std = batch_std(torch.tensor([1.0, 0.0]), reduce=lambda t: t + next(other_parts))
    assert std.item() == pytest.approx(math.sqrt(1 / 3))


def test_rloo_leaves_each_response_out_of_its_baseline():
    # group 0 = (1, 0, 0, 1): A_0 = 1 - (0 + 0 + 1) / 3 = 2/3, A_1 = 0 - 2/3; group 1 = (3, 1): A = +-2;
    # group 2 = (5,) alone: 0
    rewards, group_index = [1.0, 0.0, 3.0, 0.0, 1.0, 5.0, 1.0], [0, 0, 1, 0, 1, 2, 0]
    adv = compute_rloo_advantages(rewards, group_index)
    torch.testing.assert_close(adv, torch.tensor([2 / 3, -2 / 3, 2.0, -2 / 3, -2.0, 0.0, 2 / 3]))
    # = G / (G - 1) times GRPO's unscaled advantage
    plain, _ = compute_group_relative_advantages(rewards, group_index, scale_rewards="none")
    torch.testing.assert_close(adv[[0, 1, 3, 6]], plain[[0, 1, 3, 6]] * 4 / 3)
    assert torch.equal(compute_rloo_advantages([0.5, 0.5, 0.5], [0, 0, 0]), torch.zeros(3))


def test_reinforce_plus_plus_whitens_the_return_over_the_batch_tokens():
    # token returns 1, 1 (row 0) and 0 (row 1): mean 2/3, var = (1/9 + 1/9 + 4/9) / 2 = 1/3
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = compute_reinforce_plus_plus_advantages(torch.tensor([1.0, 0.0]), mask)
    std = math.sqrt(1 / 3 + 1e-8)
    torch.testing.assert_close(adv, torch.tensor([[1 / 3 / std, 1 / 3 / std, 0.0], [-2 / 3 / std, 0.0, 0.0]]))
    # a flat group keeps its signal against the batch (no group baseline)
    flat = compute_reinforce_plus_plus_advantages(torch.tensor([1.0, 1.0, 0.0]), torch.ones(3, 2))
    assert (flat[:2] > 0).all() and (flat[2] < 0).all()


def inputs(**changes) -> AdvantageInputs:
    fields = dict(
        rewards=torch.tensor([1.0, 0.0, 0.0, 1.0]),
        group_index=torch.tensor([0, 0, 0, 0]),
        response_mask=torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]]),
        scale_rewards="none",
        token_rewards=None,
        values=None,
        gamma=None,
        lam=None,
        reduce=None,
    )
    return AdvantageInputs(**{**fields, **changes})


def test_estimators_are_registered_by_verls_names_and_say_what_they_need():
    assert list(ADV_ESTIMATORS) == ["grpo", "rloo", "reinforce_plus_plus", "gae"]
    flags = {name: (e.group_relative, e.needs_critic) for name, e in ADV_ESTIMATORS.items()}
    assert flags == {
        "grpo": (True, False),
        "rloo": (True, False),
        "reinforce_plus_plus": (False, False),
        "gae": (False, True),
    }
    # rewards (1, 0, 0, 1), one group: mean 1/2
    grpo, _ = ADV_ESTIMATORS["grpo"].compute(inputs())
    torch.testing.assert_close(grpo, torch.tensor([0.5, -0.5, -0.5, 0.5]))
    rloo, _ = ADV_ESTIMATORS["rloo"].compute(inputs())
    torch.testing.assert_close(rloo, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    rpp, _ = ADV_ESTIMATORS["reinforce_plus_plus"].compute(inputs())
    assert rpp.shape == (4, 2) and rpp[1, 1] == 0
    # gae with gamma = lam = 1 is reward-to-go minus value: reward 1 on the last token, values 0.25
    token_rewards = torch.tensor([[0.0, 1.0]])
    values = torch.full((1, 2), 0.25)
    one_row = dict(
        response_mask=torch.ones(1, 2), token_rewards=token_rewards, values=values, gamma=1.0, lam=1.0
    )
    gae, returns = ADV_ESTIMATORS["gae"].compute(inputs(**one_row))
    torch.testing.assert_close(gae, torch.tensor([[0.75, 0.75]]))
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0]]))
