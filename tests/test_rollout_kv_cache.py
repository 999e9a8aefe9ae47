"""common.rollout.kv_cache and prepack: the preallocated cache, in-place row removal, prepacked linears."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from common.rollout.kv_cache import PreallocatedLayer, keep_order
from common.rollout.prepack import prepacked_linears


def test_keep_order_moves_one_row_per_finished_row():
    """Slots below n = (unfinished rows) whose row finished take the unfinished rows from n on."""
    T, F = True, False
    assert keep_order(torch.tensor([T, F, T, T])).tolist() == [0, 3, 2]
    assert keep_order(torch.tensor([F, F, T, T, T])).tolist() == [3, 4, 2]
    assert keep_order(torch.tensor([T, T, F, F])).tolist() == [0, 1]  # nothing moves
    assert keep_order(torch.tensor([F, F])).tolist() == []


@pytest.mark.parametrize("indices", [[0, 3, 2], [3, 4, 2], [0, 2, 3], [4, 0], [1, 2, 3, 4, 0]])
def test_preallocated_layer_keeps_rows_in_place_like_a_dynamic_layer(indices):
    """In-place row selection (only moved rows copied, buffers narrowed) holds what a DynamicLayer's
    copy holds, for any order (moved rows that are also sources included); later writes land in
    the right rows."""
    keys, values = torch.randn(5, 2, 3, 4), torch.randn(5, 2, 3, 4)  # (B, H, L, D)
    plain = DynamicLayer()
    plain.update(keys, values)
    layer = PreallocatedLayer(keys, values, capacity=6)
    index = torch.tensor(indices)
    plain.batch_select_indices(index)
    layer.batch_select_indices(index)
    assert torch.equal(layer.keys, plain.keys) and torch.equal(layer.values, plain.values)
    new_k, new_v = torch.randn(len(indices), 2, 1, 4), torch.randn(len(indices), 2, 1, 4)
    ours, theirs = layer.update(new_k, new_v), plain.update(new_k, new_v)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_prepacked_linears_match_plain_linears_and_are_restored(tiny):
    """Inside the block the model's linears run on prepacked oneDNN weights with float32 results
    (summation order aside); after it the plain forward is back, also after an exception."""
    model, tokenizer = tiny
    enc = tokenizer(["q1", "a longer question"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        plain = model(**enc).logits
        with prepacked_linears(model, rows=2):
            if torch.backends.mkldnn.is_available():
                assert "forward" in model.lm_head.__dict__  # the packed path is the one measured
            packed = model(**enc).logits
    torch.testing.assert_close(packed, plain, atol=1e-4, rtol=1e-4)
    assert all("forward" not in m.__dict__ for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"), prepacked_linears(model, rows=2):
        raise RuntimeError("boom")
    assert all("forward" not in m.__dict__ for m in model.modules())
