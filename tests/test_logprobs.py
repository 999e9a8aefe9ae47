"""common.logprobs: the training log-prob pass (padded and packed), chunked log-probs and gradients."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from common import fences
from common.logprobs import (
    ChunkedTokenLogprobs,
    pack_responses,
    packed_logits,
    sequence_logprobs,
    token_logprobs,
)
from common.rollout import HFRollout, RolloutBatch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # sampling is random: the same draws on every run of one machine


@pytest.fixture
def rollout(tiny):
    model, tokenizer = tiny
    return HFRollout(model, tokenizer, group_size=4, max_new_tokens=6)


def test_sampled_ids_can_be_used_for_the_loss_with_grad(rollout):
    batch = rollout.sample(["q1", "q2"])
    logprob, entropy = sequence_logprobs(
        rollout.model, batch.input_ids, batch.attention_mask, batch.prompt_len, return_entropy=True
    )
    (logprob * batch.response_mask).sum().backward()
    grads = [p.grad for p in rollout.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert entropy.shape == logprob.shape and (entropy > 0).all()
    rollout.model.zero_grad(set_to_none=True)


def test_sequence_logprobs_equals_full_log_softmax(rollout):
    batch = rollout.sample(["q1", "a longer second question"], group_size=2)
    model, P, temperature = rollout.model, batch.prompt_len, 0.7
    with torch.no_grad():
        logprob, entropy = sequence_logprobs(
            model, batch.input_ids, batch.attention_mask, P, temperature=temperature, return_entropy=True
        )
        position_ids = (batch.attention_mask.cumsum(1) - 1).clamp(min=0)
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids
        )
        log_p = torch.log_softmax(logits.logits / temperature, dim=-1)  # (N, P+T, V)
        expected = log_p[:, P - 1 : -1].gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
        expected_entropy = -(log_p.exp() * log_p).sum(-1)[:, P - 1 : -1]
    torch.testing.assert_close(logprob, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, expected_entropy, atol=1e-4, rtol=0)


def test_left_padding_does_not_change_a_row(rollout):
    batched = rollout.sample(["q1", "a much longer question with many more tokens"], group_size=1)
    alone = batched.select([0])
    # strip the left padding the longer prompt forced on row 0
    pad = batched.prompt_len - int(batched.attention_mask[0, : batched.prompt_len].sum())
    assert pad > 0
    ids, mask = alone.input_ids[:, pad:], alone.attention_mask[:, pad:]
    with torch.no_grad():
        lp_batched, _ = sequence_logprobs(
            rollout.model, batched.input_ids, batched.attention_mask, batched.prompt_len
        )
        lp_alone, _ = sequence_logprobs(rollout.model, ids, mask, batched.prompt_len - pad)
    torch.testing.assert_close(lp_batched[0], lp_alone[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("share_prompts", [True, False])
def test_packed_pass_gives_the_padded_logprobs_and_gradients(rollout, share_prompts):
    """sequence_logprobs with response_mask packs the rows into one padding-free row (each prompt
    once per group, or once per row): log-probs, entropies and gradients equal the padded pass's on
    the response tokens (float32 rounding of different summation orders), and are 0 after EOS."""
    model = rollout.model
    batch = rollout.sample(["q1", "a longer second question", "q3"], group_size=3, max_new_tokens=8)
    mask = batch.response_mask.clone()
    mask[0, 2:] = 0  # rows of different lengths, so the padded pass computes padding the packed one skips
    mask[4, 5:] = 0
    model.train()
    results = []
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        logprob, entropy = sequence_logprobs(
            model,
            batch.input_ids,
            batch.attention_mask,
            batch.prompt_len,
            return_entropy=True,
            response_mask=mask if packed else None,
            prompt_groups=batch.group_index if packed and share_prompts else None,
        )
        ((logprob * mask).sum() + (entropy * mask).mean()).backward()
        results.append((logprob.detach(), entropy.detach(), [p.grad.clone() for p in model.parameters()]))
    (lp_plain, ent_plain, g_plain), (lp_packed, ent_packed, g_packed) = results
    torch.testing.assert_close(lp_packed, lp_plain * mask, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_packed, ent_plain * mask, atol=1e-5, rtol=1e-5)
    assert (lp_packed[mask == 0] == 0).all()
    for a, b in zip(g_plain, g_packed, strict=True):
        assert (a - b).norm() <= 1e-4 * a.norm() + 1e-7
    # a wrong grouping (q2's rows given q1's prompt) changes the log-probs: the prompt really is shared
    wrong = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1])
    lp_wrong, _ = sequence_logprobs(
        model,
        batch.input_ids,
        batch.attention_mask,
        batch.prompt_len,
        response_mask=mask,
        prompt_groups=wrong,
    )
    assert (lp_wrong - lp_plain * mask).abs().max() > 1e-3


def test_pack_responses_hand_example():
    """Two rows of one prompt and one of another (P = 3, left padding 0): the prompt tokens appear
    once per group, responses through EOS only, positions restart per prompt, and each response
    sees its prompt and itself."""
    input_ids = torch.tensor([[0, 5, 6, 7, 8, 2], [0, 5, 6, 9, 2, 2], [4, 4, 4, 3, 3, 3]])
    attention_mask = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    response_mask = attention_mask[:, 3:].float()
    packed = pack_responses(input_ids, attention_mask, 3, response_mask, torch.tensor([0, 0, 1]))
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 2, 9, 2, 4, 4, 4, 3, 3, 3]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 3, 4, 5]]
    # row 0's tokens 7, 8, 2 come from columns 1 (prompt end), 2, 3; row 1's 9, 2 from 1 and 5
    assert packed.source.tolist() == [1, 2, 3, 1, 5, 9, 10, 11]
    assert packed.target.tolist() == [7, 8, 2, 9, 2, 3, 3, 3]
    assert packed.rows.tolist() == [0, 0, 0, 1, 1, 2, 2, 2] and packed.cols.tolist() == [
        0,
        1,
        2,
        0,
        1,
        0,
        1,
        2,
    ]
    allowed = packed.attention_mask[0, 0]
    assert allowed[5].nonzero().flatten().tolist() == [0, 1, 5]  # row 1's first token: prompt + itself
    assert allowed[6].nonzero().flatten().tolist() == [0, 1, 5, 6]
    assert allowed[9].nonzero().flatten().tolist() == [7, 8, 9]  # the other prompt's last token
    response_mask[1] = 0  # a row with nothing to score adds no tokens
    empty = pack_responses(input_ids, attention_mask, 3, response_mask, torch.tensor([0, 0, 1]))
    assert empty.input_ids.tolist() == [[5, 6, 7, 8, 2, 4, 4, 4, 3, 3, 3]]
    assert empty.rows.tolist() == [0, 0, 0, 2, 2, 2] and len(empty.source) == len(empty.target) == 6


def test_token_logprobs_hand_values_and_gradients():
    """Logits (0, ln 3): p = (1/4, 3/4), log p_1 = ln 0.75, entropy = -(1/4 ln 1/4 + 3/4 ln 3/4)
    = 0.5623; at temperature 0.5 the logits double. Gradients of the chunked function (which
    recomputes the softmax in backward) match autograd through log_softmax, across chunk edges."""
    logits = torch.tensor([[0.0, math.log(3.0)]])
    logprob, entropy = token_logprobs(logits, torch.tensor([1]), 1.0, return_entropy=True)
    assert logprob.item() == pytest.approx(math.log(0.75), abs=1e-6)
    assert entropy.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)
    logprob, _ = token_logprobs(logits, torch.tensor([0]), 0.5, return_entropy=False)  # p = (1/10, 9/10)
    assert logprob.item() == pytest.approx(math.log(0.1), abs=1e-6)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 7, (5,), generator=g)
    w_lp, w_h = (
        torch.randn(5, dtype=torch.float64, generator=g),
        torch.randn(5, dtype=torch.float64, generator=g),
    )
    lp, h = ChunkedTokenLogprobs.apply(x, y, 0.7, 2)  # chunks of 2 rows: 2 + 2 + 1
    (lp @ w_lp + h @ w_h).backward()
    xr = x.detach().clone().requires_grad_()
    lsm = torch.log_softmax(xr / 0.7, dim=-1)
    ref_lp, ref_h = lsm.gather(-1, y[:, None]).squeeze(-1), -(lsm.exp() * lsm).sum(-1)
    (ref_lp @ w_lp + ref_h @ w_h).backward()
    torch.testing.assert_close(lp, ref_lp.detach())
    torch.testing.assert_close(h, ref_h.detach())
    torch.testing.assert_close(x.grad, xr.grad)


def test_packed_pass_with_eager_attention_takes_an_additive_mask(rollout):
    """Eager attention adds its mask to the scores: the packed pass hands it 0 / dtype-min instead of
    sdpa's booleans, and the log-probs still equal the padded pass's."""
    model = copy.deepcopy(rollout.model).eval()
    model.set_attn_implementation("eager")
    batch = rollout.sample(["q1", "a longer second question"], group_size=2, max_new_tokens=6)
    with torch.no_grad():
        padded, _ = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.prompt_len)
        packed, _ = sequence_logprobs(
            model,
            batch.input_ids,
            batch.attention_mask,
            batch.prompt_len,
            response_mask=batch.response_mask,
            prompt_groups=batch.group_index,
        )
    torch.testing.assert_close(packed, padded * batch.response_mask, atol=1e-5, rtol=1e-5)


def _padded_and_packed(model, batch, **switches):
    """The padded pass (masked like the packed one) and the pass with a response mask (packed
    unless a switch or a fallback says otherwise), with entropies, under no_grad."""
    with torch.no_grad():
        padded, padded_entropy = sequence_logprobs(
            model, batch.input_ids, batch.attention_mask, batch.prompt_len, return_entropy=True
        )
        packed, packed_entropy = sequence_logprobs(
            model,
            batch.input_ids,
            batch.attention_mask,
            batch.prompt_len,
            return_entropy=True,
            response_mask=batch.response_mask,
            prompt_groups=batch.group_index,
            **switches,
        )
    mask = batch.response_mask
    return (padded * mask, padded_entropy * mask), (packed, packed_entropy * mask)


def _window_model(kind: str) -> torch.nn.Module:
    """A random 2-layer Mistral, or Qwen2 with its window on, attending over a window of 4 tokens."""
    common = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        sliding_window=4,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**common)).eval()
    return Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, max_window_layers=0, **common)).eval()


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_sliding_window_models_fall_back_to_the_padded_pass(kind, caplog):
    """A dense 4D mask ignores a sliding window: on sequences longer than the window the packed
    logits differ from the windowed padded pass, so the packed request runs padded (one warning)."""
    model = _window_model(kind)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 64, (4, 11), generator=g)  # prompt 5 + response 6 > window 4
    batch = _toy_window_batch(input_ids, prompt_len=5)
    dense = packed_logits(
        model, pack_responses(input_ids, batch.attention_mask, 5, batch.response_mask, batch.group_index)
    )
    with caplog.at_level(logging.WARNING, logger="rl_lab"):
        (padded, padded_h), (fallback, fallback_h) = _padded_and_packed(model, batch)
        _padded_and_packed(model, batch)
    torch.testing.assert_close(fallback, padded, atol=1e-6, rtol=0)
    torch.testing.assert_close(fallback_h, padded_h, atol=1e-6, rtol=0)
    dense_lp, _ = token_logprobs(dense, input_ids[:, 5:].flatten(), 1.0, False)
    assert (dense_lp - padded.flatten()).abs().max() > 1e-3  # the packed pass would have been wrong
    warnings = [r for r in caplog.records if "trainer.packed_forward" in r.getMessage()]
    assert len(warnings) == 1 and "sliding-window" in warnings[0].getMessage()


def _toy_window_batch(input_ids, prompt_len):
    """Rows of ids without padding, all responses whole, each row its own group."""
    N, L = input_ids.shape
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=torch.ones(N, L, dtype=torch.long),
        response_mask=torch.ones(N, L - prompt_len),
        prompt_len=prompt_len,
        prompts_expanded=[""] * N,
        responses=[""] * N,
        lengths=torch.full((N,), L - prompt_len),
        truncated=torch.zeros(N, dtype=torch.bool),
        group_index=torch.arange(N),
    )


def test_packed_pass_falls_back_when_the_attention_attribute_is_gone(rollout, monkeypatch, caplog):
    """The packed pass reads the private config._attn_implementation; if transformers renames it,
    the padded pass runs (same log-probs) with one warning."""
    batch = rollout.sample(["q1", "a longer second question"], group_size=2)
    monkeypatch.setattr(fences, "ATTN_IMPLEMENTATION_ATTR", "_attn_implementation_renamed")
    calls = []
    hook = rollout.model.register_forward_pre_hook(
        lambda _m, _a, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        with caplog.at_level(logging.WARNING, logger="rl_lab"):
            (padded, padded_h), (fallback, fallback_h) = _padded_and_packed(rollout.model, batch)
    finally:
        hook.remove()
    assert calls == [tuple(batch.input_ids.shape)] * 2  # both passes padded: no packed (1, L) row
    torch.testing.assert_close(fallback, padded, atol=1e-6, rtol=0)
    assert sum("trainer.packed_forward" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize(
    "switches", [{"packed": False}, {"chunked": False}, {"packed": False, "chunked": False}]
)
def test_switched_off_tricks_give_the_same_logprobs_entropies_and_gradients(rollout, switches):
    """trainer.packed_forward=false runs the padded pass, trainer.chunked_logprobs=false autograd
    through log_softmax: the values and gradients of the default pass, to float32 rounding."""
    model = rollout.model
    batch = rollout.sample(["q1", "a longer second question", "q3"], group_size=2)
    results = []
    for kwargs in ({}, switches):
        model.zero_grad(set_to_none=True)
        logprob, entropy = sequence_logprobs(
            model,
            batch.input_ids,
            batch.attention_mask,
            batch.prompt_len,
            return_entropy=True,
            response_mask=batch.response_mask,
            prompt_groups=batch.group_index,
            **kwargs,
        )
        mask = batch.response_mask
        ((logprob * mask).sum() + (entropy * mask).mean()).backward()
        results.append(
            (logprob.detach() * mask, entropy.detach() * mask, [p.grad.clone() for p in model.parameters()])
        )
    (lp, h, grads), (lp_off, h_off, grads_off) = results
    torch.testing.assert_close(lp_off, lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_off, h, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, grads_off, strict=True):
        assert (a - b).norm() <= 1e-4 * a.norm() + 1e-7
    model.zero_grad(set_to_none=True)
