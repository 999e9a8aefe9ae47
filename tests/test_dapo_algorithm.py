"""DAPO's own code: overlong reward shaping (Eq. 13) and overlong filtering, each a switch."""

from __future__ import annotations

import torch

from scripts.build import build_algorithm
from tests.conftest import compose_train


def dapo(*overrides: str):
    return build_algorithm(compose_train("algorithm=dapo", "rollout.max_new_tokens=20", *overrides).algorithm)


def test_overlong_shaping_adds_the_soft_penalty_as_its_own_term():
    # factor 1, as in Eq. 13 (the preset's 0.5 only scales it)
    algo = dapo("algorithm.overlong_buffer_len=4", "algorithm.overlong_factor=1.0")
    lengths = torch.tensor([10, 16, 18, 20, 25])
    # L_max 20, L_cache 4: 0 up to 16, then -(L - 16) / 4, and -1 beyond 20
    terms = algo.shape_rewards(lengths, lengths >= 20)
    torch.testing.assert_close(terms["overlong"], torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))


def test_overlong_buffer_defaults_to_a_fifth_of_max_len():
    # the paper's L_cache = 4,096 of L_max = 20,480; here max_len 20 -> L_cache 4, penalty after 16
    algo = dapo("algorithm.overlong_factor=1.0")
    assert algo.overlong_buffer_len is None and algo.buffer_len == 4
    terms = algo.shape_rewards(torch.tensor([16, 17, 18, 20]), torch.zeros(4, dtype=torch.bool))
    torch.testing.assert_close(terms["overlong"], torch.tensor([0.0, -0.25, -0.5, -1.0]))
    assert dapo("rollout.max_new_tokens=20480").buffer_len == 4096


def test_overlong_shaping_switch_off_adds_nothing():
    assert (
        dapo("algorithm.overlong_shaping=false").shape_rewards(torch.tensor([25]), torch.tensor([True])) == {}
    )


def test_overlong_filter_masks_truncated_rows_only_when_on():
    mask = torch.ones(3, 4)
    truncated = torch.tensor([False, True, False])
    assert torch.equal(dapo().loss_mask(mask, truncated), mask)
    filtered = dapo("algorithm.overlong_filter=true").loss_mask(mask, truncated)
    assert filtered[1].sum() == 0 and filtered[0].sum() == 4 and filtered[2].sum() == 4
