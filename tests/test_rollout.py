"""common.rollout: one batched decode per sample(), masks through the first EOS, log-probs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers.cache_utils import DynamicLayer

import common.rollout as rollout_module
from common.models import load_policy
from common.rollout import (
    ChunkedTokenLogprobs,
    HFRollout,
    PreallocatedLayer,
    RolloutBatch,
    TokenSampler,
    decode,
    keep_order,
    pack_responses,
    prefill,
    prepacked_linears,
    response_mask_from_ids,
    sample_categorical,
    sequence_logprobs,
    shared_prefix_length,
    token_logprobs,
)

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
EOS = 2


@pytest.fixture(scope="module")
def tiny(cache_dir):
    return load_policy("tiny", cache_dir=cache_dir, tiny=TINY, seed=0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # sampling is random: the same draws on every run of one machine


@pytest.fixture
def rollout(tiny):
    model, tokenizer = tiny
    return HFRollout(model, tokenizer, group_size=4, max_new_tokens=6)


class DecodeSpy:
    """Wraps common.rollout.decode: counts calls, records the rows per call, the sampler and the ids
    as sampled, and can cut responses short by writing EOS at a given response column per row. The
    model itself never samples EOS here (its logit is masked before the sampler sees it), so a
    response ends exactly where `eos_at` says, whatever the draws."""

    def __init__(self, eos_at=None):
        self.decode = rollout_module.decode
        self.eos_at = eos_at
        self.calls = []
        self.samplers = []
        self.sampled = []

    def __call__(self, model, cache, logits, attention_mask, **kwargs):
        self.calls.append(logits.shape[0])
        sampler = kwargs["sampler"]
        self.samplers.append(sampler)

        def no_eos(step_logits):
            return sampler(step_logits.masked_fill(torch.arange(step_logits.shape[1]) == EOS, -torch.inf))

        out = self.decode(model, cache, logits, attention_mask, **{**kwargs, "sampler": no_eos})
        self.sampled.append(out.clone())  # (N, T) before any EOS is written
        if self.eos_at is not None:
            out = out.clone()
            for row, col in enumerate(self.eos_at):
                if col is not None and col < out.shape[1]:
                    out[row, col] = EOS
                    out[row, col + 1 :] = kwargs["pad_token_id"]
        return out


def test_seed_contract_two_prompts_group_of_four(rollout, monkeypatch):
    spy = DecodeSpy(eos_at=[1, None, 3, 0, None, 2, None, 4])
    monkeypatch.setattr(rollout_module, "decode", spy)
    responses, log_probs, prompts_expanded = rollout.generate_responses(["q1", "q2"])
    assert len(responses) == 8
    assert prompts_expanded[:4] == ["q1"] * 4 and prompts_expanded[4:] == ["q2"] * 4
    batch = rollout.last_batch
    assert log_probs.shape == (8, batch.response_mask.shape[1]) and log_probs.dtype == torch.float32
    assert (log_probs <= 0).all()
    assert (log_probs[batch.response_mask == 0] == 0).all()
    assert (log_probs[batch.response_mask == 1] < 0).all()  # a random model is never certain
    assert spy.calls == [8]
    # sampling, not greedy decoding, reaches the decode loop, and the G responses of a group differ
    assert spy.samplers[0].do_sample is True and spy.samplers[0].temperature == rollout.temperature
    # identical rows need identical first tokens: P(all G alike) <= sum_v p_v^G <= p_max^(G-1), with
    # p the first response token's distribution (the same for every row of a group: same prompt)
    for g, prompt in enumerate(["q1", "q2"]):
        assert first_token_max_prob(rollout, prompt) ** 3 < 1e-6  # so the check below cannot be luck
        rows = spy.sampled[0][4 * g : 4 * g + 4]  # (G, T)
        assert not (rows == rows[0]).all(), f"the 4 responses to {prompt} are identical"


def first_token_max_prob(rollout: HFRollout, prompt: str) -> float:
    """max_v p(v | prompt) of the first response token at the sampling temperature."""
    enc = rollout.encode_prompts([prompt], rollout.max_new_tokens)
    with torch.no_grad():
        logits = rollout.model(**enc).logits[0, -1] / rollout.temperature  # (V,)
    return float(torch.softmax(logits.float(), dim=-1).max())


def test_one_decode_call_with_all_rows_grouped_by_prompt(rollout, monkeypatch):
    spy = DecodeSpy()
    monkeypatch.setattr(rollout_module, "decode", spy)
    batch = rollout.sample(["q1", "a longer second question", "q3"], group_size=3)
    assert spy.calls == [9]
    assert batch.group_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    prompts = batch.input_ids[:, : batch.prompt_len]
    for g in range(3):
        assert (prompts[3 * g : 3 * g + 3] == prompts[3 * g]).all()
    assert not torch.equal(prompts[0], prompts[3])
    # left padding: the shorter prompt starts later, every prompt ends at column P - 1
    assert batch.attention_mask[0, 0] == 0 and batch.attention_mask[3, 0] == 1
    assert (batch.attention_mask[:, batch.prompt_len - 1] == 1).all()


def test_response_mask_from_ids_hand_example():
    ids = torch.tensor([[7, 8, EOS, EOS], [7, 7, 7, 7], [EOS, 9, EOS, 9]])
    mask, lengths, truncated = response_mask_from_ids(ids, EOS)
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert lengths.tolist() == [3, 4, 1] and truncated.tolist() == [False, True, False]


def test_sample_masks_lengths_and_truncation(rollout, monkeypatch):
    eos_at = [0, 2, None, 5]  # max_new_tokens = 6: EOS at the last column is not truncated
    monkeypatch.setattr(rollout_module, "decode", DecodeSpy(eos_at=eos_at))
    batch = rollout.sample(["q1"])
    assert batch.response_mask.shape == (4, 6)
    assert batch.response_mask.tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1],
    ]
    assert batch.lengths.tolist() == [1, 3, 6, 6]
    assert torch.equal(batch.lengths, batch.response_mask.sum(1).long())
    assert batch.truncated.tolist() == [False, False, True, False]
    assert torch.equal(batch.attention_mask[:, batch.prompt_len :], batch.response_mask.long())
    assert batch.response_ids[0].tolist() == [EOS] * 6  # EOS, then pad (= EOS for SmolLM2)
    assert batch.responses[0] == ""  # special tokens skipped
    expected = rollout.tokenizer.decode(batch.response_ids[2].tolist(), skip_special_tokens=True)
    assert batch.responses[2] == expected


def test_short_max_new_tokens_truncates_everything(rollout, monkeypatch):
    monkeypatch.setattr(rollout_module, "decode", DecodeSpy())  # no EOS: all run long
    batch = rollout.sample(["q1", "q2"], max_new_tokens=2)
    assert batch.response_mask.shape == (8, 2)
    assert batch.truncated.all() and (batch.lengths == 2).all()


def test_greedy_gives_identical_rows_within_a_group(rollout):
    batch = rollout.sample(["q1", "q2"], group_size=3, do_sample=False)
    ids = batch.response_ids
    assert torch.equal(ids[0], ids[1]) and torch.equal(ids[0], ids[2])


def test_model_mode_is_restored(rollout):
    rollout.model.train()
    rollout.generate_responses(["q1"])
    assert rollout.model.training
    rollout.model.eval()
    try:
        rollout.sample(["q1"])
        assert not rollout.model.training
    finally:
        rollout.model.train()


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


def test_too_long_prompts_fail_with_index_and_lengths(tiny):
    model, tokenizer = tiny
    short = HFRollout(model, tokenizer, group_size=2, max_new_tokens=4, max_prompt_len=40)
    with pytest.raises(ValueError, match=r"prompt 1 is \d+ tokens long, over the limit of 40"):
        short.sample(["hi", "word " * 50])
    # context 256 - max_new_tokens 200 leaves 56 prompt tokens
    long_answers = HFRollout(model, tokenizer, group_size=2, max_new_tokens=200)
    with pytest.raises(ValueError, match=r"prompt 0 .* limit of 56"):
        long_answers.sample(["word " * 60])


def test_format_prompts_uses_the_chat_template_and_system_prompt(tiny):
    model, tokenizer = tiny
    rollout = HFRollout(model, tokenizer, group_size=1, max_new_tokens=4, system_prompt="Answer briefly.")
    (text,) = rollout.format_prompts(["2+2?"])
    assert text == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


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


@pytest.mark.parametrize("do_sample", [False, True])
def test_shared_prompt_prefill_samples_like_one_prefill_per_row(rollout, do_sample):
    """The prompt is prefilled once per prompt and its cache repeated G times: with the same seed the
    responses equal those of a batch whose G copies of each prompt are prefilled separately."""
    prompts = ["q1", "a longer second question", "q3"]
    torch.manual_seed(3)
    shared = rollout.sample(prompts, group_size=3, do_sample=do_sample)
    torch.manual_seed(3)
    separate = rollout.sample([p for p in prompts for _ in range(3)], group_size=1, do_sample=do_sample)
    # exact token ids from two paths, portable all the same: both draw the same random numbers from
    # logits that differ by float32 rounding (~1e-6). Greedy picks agree since this model's top-2
    # logit gaps are > 0.3; a sampled token changes only for a draw within ~1e-6 of the edge
    # between two tokens' probability intervals (a chance of ~1e-6 per token)
    assert shared.responses == separate.responses
    assert torch.equal(shared.input_ids, separate.input_ids)
    assert len(set(shared.responses)) > 3 if do_sample else len(set(shared.responses)) <= 3


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


@pytest.fixture(scope="module")
def sharp(tiny):
    """The tiny model with an untied N(0, 1) LM head: peaked next-token distributions (the first
    token's top probability ~0.4-0.6) and greedy responses that differ between prompts, where the
    tiny model itself repeats one token."""
    model, tokenizer = tiny
    model = copy.deepcopy(model).eval()
    g = torch.Generator().manual_seed(0)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=g))
    return model, tokenizer


def test_greedy_decode_equals_generate_while_rows_leave_early(sharp):
    """The decode loop (each prompt prefilled once, finished rows dropped, preallocated cache) gives
    transformers' `generate` tokens at temperature 0. A token of one greedy response stands in for EOS,
    so rows end at different steps and the batch shrinks while the others go on."""
    model, tokenizer = sharp
    prompts = ["q1", "a longer second question", "q3 with words", "four"]
    rollout = HFRollout(model, tokenizer, group_size=2, max_new_tokens=12)
    enc = rollout.encode_prompts([p for p in prompts for _ in range(2)], 12)

    def generate(eos):
        with torch.no_grad():
            out = model.generate(
                **enc, do_sample=False, max_new_tokens=12, eos_token_id=eos, pad_token_id=EOS
            )
        return out[:, enc["input_ids"].shape[1] :]

    stop = int(generate(EOS)[2, 3])  # row 2 (second prompt) ends at column 3 at the latest
    expected = generate(stop)
    rollout.eos_token_id = stop
    batch = rollout.sample(prompts, do_sample=False)
    # greedy picks from two paths agree: this model's top-2 logit gaps are > 0.6, float32 rounding ~1e-6
    assert len(set(batch.lengths.tolist())) > 1, "the rows must end at different steps"
    assert torch.equal(batch.response_ids, expected.masked_fill(batch.response_mask == 0, EOS))


def test_shared_prefix_length_hand_examples():
    """Left-padded prompts [5 6 7 8], [5 6 7 9 9 9], [5 6 7 8 2] share 3 tokens; [5 6 7] and
    [5 6 7 8] share 3, but each prompt keeps one token of its own: 2; [5 6] and [4 6] share none."""
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [5, 6, 7, 9, 9, 9], [0, 5, 6, 7, 8, 2]])
    assert shared_prefix_length(ids, ids != 0) == 3
    ids = torch.tensor([[0, 5, 6, 7], [5, 6, 7, 8]])
    assert shared_prefix_length(ids, ids != 0) == 2
    ids = torch.tensor([[5, 6], [4, 6]])
    assert shared_prefix_length(ids, ids != 0) == 0


def test_shared_prefix_runs_once_and_leaves_logits_and_greedy_tokens_as_one_pass(sharp, monkeypatch):
    """Chat-templated prompts share the system message: it runs once in a (1, C) pass, then each
    prompt's own tokens. The first-token logits equal those of one pass over the whole prompts
    (float32 rounding: 1e-5), and greedy decoding from either cache gives the same tokens."""
    model, tokenizer = sharp
    rollout = HFRollout(model, tokenizer, group_size=2, max_new_tokens=8)
    enc = rollout.encode_prompts(["q1", "a longer second question", "q3 with words", "four"], 8)
    ids, prompt_mask = enc["input_ids"], enc["attention_mask"]
    C, P = shared_prefix_length(ids, prompt_mask), ids.shape[1]
    assert 3 * C >= rollout_module.MIN_SHARED_PREFIX_SAVING  # the prefix is worth sharing
    rows = torch.arange(4).repeat_interleave(2)

    def run():
        shapes = []
        hook = model.register_forward_pre_hook(
            lambda _m, _a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
        )
        try:
            with torch.no_grad():
                cache, logits, mask = prefill(model, ids, prompt_mask, rows, P + 8)
                out = decode(
                    model,
                    cache,
                    logits,
                    mask,
                    max_new_tokens=8,
                    eos_token_id=EOS,
                    pad_token_id=0,
                    sampler=TokenSampler(False),
                )
        finally:
            hook.remove()
        return shapes, logits, mask, out

    shapes, logits, mask, out = run()
    assert shapes[:2] == [(1, C), (4, P - C)]
    assert mask.shape == (8, P) and (mask[:, :C] == 1).all()
    assert torch.equal(mask.sum(dim=1), prompt_mask[rows].sum(dim=1))  # every prompt token cached once
    monkeypatch.setattr(rollout_module, "MIN_SHARED_PREFIX_SAVING", 10**9)
    one_shapes, one_logits, one_mask, one_out = run()
    assert one_shapes[0] == (4, P) and torch.equal(one_mask, prompt_mask[rows].long())
    torch.testing.assert_close(logits, one_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(out, one_out)  # top-2 logit gaps > 0.6 against rounding ~1e-6


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_first_tokens_follow_the_distribution_generate_samples(sharp, temperature):
    """In distribution: the first tokens of 600 sampled rows hit each likely token as often as its
    softmax probability says (within 5 standard errors), for the decode loop and, as the check of
    the check, for transformers' `generate` with the same settings."""
    model, tokenizer = sharp
    n = 600
    rollout = HFRollout(model, tokenizer, group_size=n, max_new_tokens=1, temperature=temperature)
    enc = rollout.encode_prompts(["q3 with words"], 1)
    with torch.no_grad():
        p = torch.softmax(model(**enc).logits[0, -1] / temperature, dim=-1)  # (V,)
        plain = model.generate(
            input_ids=enc["input_ids"].expand(n, -1),
            attention_mask=enc["attention_mask"].expand(n, -1),
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=1,
            pad_token_id=EOS,
        )[:, -1]
    ours = rollout.sample(["q3 with words"]).response_ids[:, 0]
    likely = (p > 0.05).nonzero().flatten()
    assert p[likely].sum() > 0.5  # most of the mass is checked token by token
    for tokens in (ours, plain):
        freq = torch.bincount(tokens, minlength=p.numel()).double() / n
        bound = 5 * (p * (1 - p) / n).sqrt().double()
        assert ((freq - p.double()).abs()[likely] <= bound[likely]).all(), (freq[likely], p[likely])
        assert abs(freq[likely].sum() - p[likely].sum()) <= 5 * (0.25 / n) ** 0.5


@pytest.mark.parametrize(("top_k", "top_p", "kept"), [(0, 1.0, 6), (2, 1.0, 2), (0, 0.9, 2), (3, 0.99, 3)])
def test_token_sampler_draws_the_truncated_softmax(top_k, top_p, kept):
    """TokenSampler draws from softmax(logits / T) restricted to generate's top-k, then top-p set.
    Scores [4, 2, 1, 0, -2, -6] at T = 0.5: probabilities 0.829, 0.112, 0.041, 0.015, 0.002, 4e-5;
    top-p 0.9 keeps the two tokens whose mass first reaches 0.9, top-p 0.99 after top-k 3 keeps 3."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 40000
    sampler = TokenSampler(True, temperature=0.5, top_k=top_k, top_p=top_p)
    tokens = sampler(logits.expand(n, -1))
    p = torch.zeros(6, dtype=torch.float64)
    p[:kept] = torch.softmax(logits[:kept].double() / 0.5, dim=0)  # the kept tokens, renormalised
    freq = torch.bincount(tokens, minlength=6).double() / n
    assert (freq[kept:] == 0).all()  # filtered tokens are never drawn
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all(), (freq, p)
    assert torch.equal(TokenSampler(False)(logits.expand(3, -1)), torch.zeros(3, dtype=torch.long))


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


def test_decode_runs_only_unfinished_rows(tiny):
    """A row that samples EOS leaves the batch: with a sampler that ends the first row of the batch
    at each step, the decode forwards see 3, 2, 1 rows. The last row takes a finished row's slot
    (`keep_order`): the batch runs rows [0, 1, 2, 3], then [3, 1, 2], [2, 1], [1], so rows 0, 3, 2, 1
    end with EOS at columns 0, 1, 2, 3."""
    model, tokenizer = tiny
    enc = tokenizer(["q1", "a longer question", "q3", "q4"], return_tensors="pt", padding=True)
    rows_seen = []
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: rows_seen.append(kw["input_ids"].shape[0]), with_kwargs=True
    )

    def first_live_row_ends(logits):  # (n, V) -> (n,)
        token = torch.full((logits.shape[0],), 5)
        token[0] = EOS
        return token

    try:
        with torch.no_grad():
            cache, logits, mask = prefill(model, enc["input_ids"], enc["attention_mask"], torch.arange(4), 20)
            out = decode(
                model,
                cache,
                logits,
                mask,
                max_new_tokens=6,
                eos_token_id=EOS,
                pad_token_id=0,
                sampler=first_live_row_ends,
            )
    finally:
        hook.remove()
    assert rows_seen == [4, 3, 2, 1]  # the prefill's 4 prompts, then one decode step per live set
    assert out.tolist() == [[EOS, 0, 0, 0], [5, 5, 5, EOS], [5, 5, EOS, 0], [5, EOS, 0, 0]]


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
