"""common.rollout.batch: response masks through the first EOS, select and concat of batches."""

from __future__ import annotations

import torch

from common.rollout.batch import RolloutBatch, response_mask_from_ids
from tests.conftest import EOS


def test_response_mask_from_ids_hand_example():
    ids = torch.tensor([[7, 8, EOS, EOS], [7, 7, 7, 7], [EOS, 9, EOS, 9]])
    mask, lengths, truncated = response_mask_from_ids(ids, EOS)
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert lengths.tolist() == [3, 4, 1] and truncated.tolist() == [False, True, False]


def _toy_batch(prompt_len, width, groups, tag):
    """A hand-made batch: row i has prompt token 10+i and response tokens 100+i, no padding."""
    N = len(groups)
    rows = torch.arange(N)
    input_ids = torch.cat(
        [(10 + rows)[:, None].expand(N, prompt_len), (100 + rows)[:, None].expand(N, width)], 1
    )
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=torch.ones(N, prompt_len + width, dtype=torch.long),
        response_mask=torch.ones(N, width),
        prompt_len=prompt_len,
        prompts_expanded=[f"{tag}-q{g}" for g in groups],
        responses=[f"{tag}-r{i}" for i in range(N)],
        lengths=torch.full((N,), width),
        truncated=torch.zeros(N, dtype=torch.bool),
        group_index=torch.tensor(groups),
        pad_token_id=EOS,
    )


def test_concat_repads_and_keeps_rows_aligned():
    a = _toy_batch(prompt_len=2, width=3, groups=[0, 0, 1, 1], tag="a")
    b = _toy_batch(prompt_len=4, width=1, groups=[0, 0], tag="b")
    c = RolloutBatch.concat([a, b])
    assert c.prompt_len == 4 and c.input_ids.shape == (6, 7) and c.response_mask.shape == (6, 3)
    # a's prompts get 2 more columns of left padding, b's responses 2 more of right padding
    assert c.input_ids[0].tolist() == [EOS, EOS, 10, 10, 100, 100, 100]
    assert c.attention_mask[0].tolist() == [0, 0, 1, 1, 1, 1, 1]
    assert c.input_ids[4].tolist() == [10, 10, 10, 10, 100, EOS, EOS]
    assert c.attention_mask[4].tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert c.response_mask[4].tolist() == [1, 0, 0]
    assert torch.equal(c.response_ids[:4], a.response_ids)
    assert c.responses == a.responses + b.responses
    assert c.prompts_expanded == a.prompts_expanded + b.prompts_expanded
    assert c.group_index.tolist() == [0, 0, 1, 1, 2, 2]  # b's group 0 is a new group
    assert c.lengths.tolist() == [3, 3, 3, 3, 1, 1]


def test_select_then_concat_keeps_groups_distinct():
    a = _toy_batch(prompt_len=2, width=2, groups=[0, 0, 1, 1], tag="a")
    kept = a.select(torch.tensor([False, False, True, True]))
    assert kept.responses == ["a-r2", "a-r3"] and kept.group_index.tolist() == [1, 1]
    assert kept.input_ids[:, 0].tolist() == [12, 13]
    b = _toy_batch(prompt_len=2, width=2, groups=[0, 0, 1, 1], tag="b").select([2, 3, 0])
    assert b.responses == ["b-r2", "b-r3", "b-r0"] and b.prompts_expanded == ["b-q1", "b-q1", "b-q0"]
    c = RolloutBatch.concat([kept, b])
    assert c.group_index.tolist() == [1, 1, 3, 3, 2]
    assert len(set(c.group_index[:2].tolist()) & set(c.group_index[2:].tolist())) == 0
    assert c.input_ids[:, 0].tolist() == [12, 13, 12, 13, 10]
    assert c.responses == ["a-r2", "a-r3", "b-r2", "b-r3", "b-r0"]
