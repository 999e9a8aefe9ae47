"""common.rollout.decode: one batched decode per sample(), masks through EOS, the seed's contract."""

from __future__ import annotations

import pytest
import torch

import common.rollout.decode as decode_module
from common.rollout import HFRollout
from common.rollout.decode import TokenSampler, decode, prefill, shared_prefix_length
from tests.conftest import EOS


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
        self.decode = decode_module.decode
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

        out, logprob = self.decode(model, cache, logits, attention_mask, **{**kwargs, "sampler": no_eos})
        self.sampled.append(out.clone())  # (N, T) before any EOS is written
        if self.eos_at is not None:
            out = out.clone()
            for row, col in enumerate(self.eos_at):
                if col is not None and col < out.shape[1]:
                    out[row, col] = EOS
                    out[row, col + 1 :] = kwargs["pad_token_id"]
        return out, logprob


def test_seed_contract_two_prompts_group_of_four(rollout, monkeypatch):
    spy = DecodeSpy(eos_at=[1, None, 3, 0, None, 2, None, 4])
    monkeypatch.setattr(decode_module, "decode", spy)
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
    monkeypatch.setattr(decode_module, "decode", spy)
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


def test_sample_masks_lengths_and_truncation(rollout, monkeypatch):
    eos_at = [0, 2, None, 5]  # max_new_tokens = 6: EOS at the last column is not truncated
    monkeypatch.setattr(decode_module, "decode", DecodeSpy(eos_at=eos_at))
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
    monkeypatch.setattr(decode_module, "decode", DecodeSpy())  # no EOS: all run long
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
    assert 3 * C >= decode_module.MIN_SHARED_PREFIX_SAVING  # the prefix is worth sharing
    rows = torch.arange(4).repeat_interleave(2)

    def run():
        shapes = []
        hook = model.register_forward_pre_hook(
            lambda _m, _a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
        )
        try:
            with torch.no_grad():
                cache, logits, mask = prefill(model, ids, prompt_mask, rows, P + 8)
                out, _ = decode(
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
    monkeypatch.setattr(decode_module, "MIN_SHARED_PREFIX_SAVING", 10**9)
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

    def first_live_row_ends(logits):  # (n, V) -> (n,), (n,)
        token = torch.full((logits.shape[0],), 5)
        token[0] = EOS
        return token, torch.full((logits.shape[0],), -0.5)

    try:
        with torch.no_grad():
            cache, logits, mask = prefill(model, enc["input_ids"], enc["attention_mask"], torch.arange(4), 20)
            out, logprob = decode(
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
    # each row's sampled log-probs land in its own row, through its EOS, 0 after it
    assert logprob.tolist() == [[-0.5, 0, 0, 0], [-0.5] * 4, [-0.5] * 3 + [0], [-0.5] * 2 + [0, 0]]
