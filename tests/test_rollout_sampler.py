"""common.rollout.sampler: the truncated softmax of generate, drawn by a two-level inverse CDF."""

from __future__ import annotations

import pytest
import torch

from common.rollout.sampler import TokenSampler, sample_categorical


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # sampling is random: the same draws on every run of one machine


@pytest.mark.parametrize(("top_k", "top_p", "kept"), [(0, 1.0, 6), (2, 1.0, 2), (0, 0.9, 2), (3, 0.99, 3)])
def test_token_sampler_draws_the_truncated_softmax(top_k, top_p, kept):
    """TokenSampler draws from softmax(logits / T) restricted to generate's top-k, then top-p set.
    Scores [4, 2, 1, 0, -2, -6] at T = 0.5: probabilities 0.829, 0.112, 0.041, 0.015, 0.002, 4e-5;
    top-p 0.9 keeps the two tokens whose mass first reaches 0.9, top-p 0.99 after top-k 3 keeps 3."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 40000
    sampler = TokenSampler(True, temperature=0.5, top_k=top_k, top_p=top_p)
    tokens, logprob = sampler(logits.expand(n, -1))
    p = torch.zeros(6, dtype=torch.float64)
    p[:kept] = torch.softmax(logits[:kept].double() / 0.5, dim=0)  # the kept tokens, renormalised
    freq = torch.bincount(tokens, minlength=6).double() / n
    assert (freq[kept:] == 0).all()  # filtered tokens are never drawn
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all(), (freq, p)
    # each draw's log-prob is that of the kept, renormalised distribution
    torch.testing.assert_close(logprob, p.log().float()[tokens])
    greedy, greedy_logprob = TokenSampler(False)(logits.expand(3, -1))
    assert torch.equal(greedy, torch.zeros(3, dtype=torch.long)) and (greedy_logprob == 0).all()


@pytest.mark.parametrize("block", [4, 512])
def test_sample_categorical_draws_each_row_from_its_weights(block):
    """Unnormalised weights, zeros inside blocks, an all-zero block and a vocabulary that is not a
    multiple of the block (11 tokens in blocks of 4: 4 + 4 + 3 and one padding): row 0 has
    p = [0, 3, 0, 1, 0, 0, 4, 2, 0, 0, 0] / 10, row 1 puts all its mass on token 10 (the last block),
    row 2 is uniform over 11 tokens. Zero-weight tokens are never drawn; the others within 5
    standard errors of n = 30000 draws."""
    weights = torch.zeros(3, 11)
    weights[0] = torch.tensor([0, 3, 0, 1, 0, 0, 4, 2, 0, 0, 0.0])
    weights[1, 10] = 0.5
    weights[2] = 7.0
    n = 30000
    tokens = sample_categorical(weights.repeat_interleave(n, dim=0), block=block).view(3, n)  # (3, n)
    assert tokens.dtype == torch.long and tokens.min() >= 0 and tokens.max() <= 10
    for row in range(3):
        p = (weights[row] / weights[row].sum()).double()  # (11,)
        freq = torch.bincount(tokens[row], minlength=11).double() / n
        assert (freq[p == 0] == 0).all(), freq  # zero weight: never drawn
        assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt()).all(), (row, freq, p)


def test_sample_categorical_edges_of_the_uniform_pick_weighted_tokens_inside_the_vocabulary():
    """Uniforms of exactly 0, 1 - 2^-53, 1 - 1e-16 (rounds to 1 in float64) and 1.0, on weights with
    zeros at both ends and inside, and an 11-token vocabulary in blocks of 4 (one padding weight at
    the end of the last block): each draw is a token of positive weight with an index below 11.
    Without the clamp, u = 1 lands past the last block's mass on the padding: index 11."""
    weights = torch.tensor(
        [
            [0, 0, 1e-3, 5, 0, 3, 0, 2, 0, 7e-4, 0.0],  # zeros first and last
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1.0],  # all mass on the last real token
            [1.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # all mass on the first token
            [0, 1e-30, 0, 0, 0, 0, 0, 0, 0, 0, 1e-30],  # tiny masses
        ]
    )
    edges = torch.tensor([0.0, 1 - 2**-53, 1 - 1e-16, 1.0], dtype=torch.float64)
    for uniform in edges:
        for block in (4, 512):
            tokens = sample_categorical(weights, block=block, uniform=uniform.expand(len(weights)))
            assert (tokens < 11).all(), (uniform, block, tokens)
            assert (weights[torch.arange(len(weights)), tokens] > 0).all(), (uniform, block, tokens)
    # the first and the last weighted token are what the edges pick
    first = sample_categorical(weights, block=4, uniform=torch.zeros(4, dtype=torch.float64))
    last = sample_categorical(weights, block=4, uniform=torch.ones(4, dtype=torch.float64))
    assert first.tolist() == [2, 10, 0, 1] and last.tolist() == [9, 10, 0, 10]
