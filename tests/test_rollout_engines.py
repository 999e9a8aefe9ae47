"""Every engine behind common.rollout.engine.RolloutEngine: the seed's contract, one batched
generation, the same greedy text; the loop's modules import no concrete engine."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from common.rollout import make_engine
from tests.conftest import ROOT

CPU_ENGINES = ["hf", "decode", "generate"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # sampling is random: the same draws on every run of one machine


def forward_batches(model: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """Record the batch size of every forward of `model`."""
    rows: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    return rows, hook


@pytest.mark.parametrize("name", CPU_ENGINES)
def test_seed_contract_for_every_engine(tiny, name):
    """generate_responses(prompts) -> (responses, log_probs, prompts_expanded): N = 2 x G rows in
    [q1]*G + [q2]*G order, float32 log-probs, 0 after EOS and < 0 on response tokens; sampled
    (do_sample=True), in one batched generation: at most one forward per token plus the prompt
    passes, where a loop per sample would run G x 2 times as many."""
    model, tokenizer = tiny
    engine = make_engine(name, model, tokenizer, group_size=4, max_new_tokens=6)
    rows, hook = forward_batches(model)
    try:
        with torch.no_grad():
            responses, log_probs, prompts_expanded = engine.generate_responses(["q1", "q2"])
    finally:
        hook.remove()
    batch = engine.last_batch
    assert len(responses) == 8 and prompts_expanded == ["q1"] * 4 + ["q2"] * 4
    assert batch.group_index.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert log_probs.shape == batch.response_mask.shape and log_probs.dtype == torch.float32
    assert (log_probs[batch.response_mask == 0] == 0).all()
    assert (log_probs[batch.response_mask == 1] < 0).all()  # a random model is never certain
    generation = rows[:-1]  # the last forward scores the batch (the seed's log-probs)
    assert len(generation) <= 6 + 2 and max(generation) <= 8 and rows[-1] == 8
    responses_ids = batch.response_ids
    assert not (responses_ids[:4] == responses_ids[0]).all(), "sampling, not greedy: a group's rows differ"


def test_generate_engine_greedy_equals_the_decode_engine(sharp):
    """The plain engine (transformers' generate) and the fast decode loop give the same greedy
    tokens, while rows end at different steps (this model's top-2 logit gaps are > 0.6, float32
    rounding ~1e-6)."""
    model, tokenizer = sharp
    prompts = ["q1", "a longer second question", "q3 with words", "four"]
    batches = [
        make_engine(name, model, tokenizer, group_size=2, max_new_tokens=12).sample(prompts, do_sample=False)
        for name in ("hf", "generate")
    ]
    decoded, generated = batches
    assert torch.equal(decoded.input_ids, generated.input_ids)
    assert torch.equal(decoded.response_mask, generated.response_mask)
    assert decoded.responses == generated.responses


def test_generate_engine_ignores_the_checkpoints_generation_defaults(tiny):
    """A checkpoint's generation_config (here a repetition penalty and greedy decoding) does not change
    what the generate engine samples from: its GenerationConfig sets every knob of the distribution."""
    model, tokenizer = tiny
    engine = make_engine("generate", model, tokenizer, group_size=3, max_new_tokens=5)
    torch.manual_seed(1)
    plain = engine.sample(["q1"])
    saved = model.generation_config
    model.generation_config = type(saved)(repetition_penalty=5.0, do_sample=False, top_k=3)
    try:
        torch.manual_seed(1)
        with_defaults = engine.sample(["q1"])
    finally:
        model.generation_config = saved
    assert torch.equal(plain.input_ids, with_defaults.input_ids)


def test_unknown_engine_is_named():
    with pytest.raises(
        ValueError, match="unknown rollout engine 'sglang'; options: hf, decode, generate, vllm"
    ):
        make_engine("sglang", torch.nn.Linear(1, 1), None)


def test_the_loop_imports_no_concrete_engine():
    """The loop, sampling, evaluation and the update know engines only as the RolloutEngine protocol."""
    code = (
        "import sys, common.trainer, common.sampling, common.evaluation, common.update; "
        "print(sorted(m for m in sys.modules if m.startswith('common.rollout')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = set(eval(out.stdout))
    assert "common.rollout.engine" in loaded
    assert not loaded & {"common.rollout.decode", "common.rollout.generate", "common.rollout.vllm_engine"}


@pytest.mark.parametrize("name", CPU_ENGINES)
@pytest.mark.parametrize("top_k", [0, 5])
def test_rollout_logprobs_are_those_of_the_distribution_sampled_from(tiny, name, top_k):
    """Every engine returns each sampled token's log-prob under the distribution it drew it from:
    in float32 at temperature 0.7 that is the training forward's log softmax(logits / 0.7) (to
    kernel rounding; the decode engine's cache and prepacked linears sum in other orders), and with
    top-k the same renormalised over the k kept tokens. 0 after EOS, and 0 for greedy decoding."""
    model, tokenizer = tiny
    engine = make_engine(name, model, tokenizer, group_size=3, max_new_tokens=6, temperature=0.7, top_k=top_k)
    batch = engine.sample(["q1", "a longer second question"])
    with torch.no_grad():
        position_ids = (batch.attention_mask.cumsum(1) - 1).clamp(min=0)
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids
        )
        scores = logits.logits[:, batch.prompt_len - 1 : -1] / 0.7  # (N, T, V)
        if top_k:
            kth = scores.topk(top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, -torch.inf)
        expected = torch.log_softmax(scores, dim=-1).gather(-1, batch.response_ids[..., None]).squeeze(-1)
    mask = batch.response_mask.bool()
    assert batch.rollout_logprob.shape == mask.shape and batch.rollout_logprob.dtype == torch.float32
    torch.testing.assert_close(batch.rollout_logprob[mask], expected[mask], atol=1e-4, rtol=1e-4)
    assert (batch.rollout_logprob[~mask] == 0).all()
    greedy = engine.sample(["q1"], do_sample=False)
    assert (greedy.rollout_logprob == 0).all()


def test_rollout_logprobs_follow_rows_through_select_and_concat(tiny):
    model, tokenizer = tiny
    engine = make_engine("hf", model, tokenizer, group_size=2, max_new_tokens=4)
    a, b = engine.sample(["q1"]), engine.sample(["q2"], max_new_tokens=2)
    both = type(a).concat([a, b.select([1])])
    assert both.rollout_logprob.shape == (3, 4)
    assert torch.equal(both.rollout_logprob[:2], a.rollout_logprob)
    assert (
        torch.equal(both.rollout_logprob[2, :2], b.rollout_logprob[1])
        and (both.rollout_logprob[2, 2:] == 0).all()
    )
