"""rollout.min_new_tokens: no engine ends a sampled response before it (equal work per step)."""

from __future__ import annotations

import pytest
import torch

from common.rollout import make_engine

PROMPTS = ["q1", "a longer second question", "q3 with words"]
MAX_NEW = 6


def frequent_token(model: torch.nn.Module, engine) -> int:
    """The token the model most likes first after PROMPTS[0]: as EOS, it ends many sampled responses
    at their first token (the `sharp` model's top first-token probability is ~0.4-0.6)."""
    enc = engine.encode_prompts(PROMPTS[:1], MAX_NEW)
    with torch.no_grad():
        return int(model(**enc).logits[0, -1].argmax())


@pytest.mark.parametrize("engine_name", ["decode", "generate"])
def test_min_new_tokens_equal_to_max_gives_every_response_max_tokens(sharp, engine_name):
    """With the model's favourite first token as EOS, min_new_tokens=0 ends some responses early (the
    control: the test could fail); min_new_tokens = max_new_tokens = 6 gives all 3 x 4 responses
    exactly 6 tokens, none of them EOS; min 3 < max: every response at least 3 tokens."""
    model, tokenizer = sharp
    lengths = {}
    for min_new in (0, 3, MAX_NEW):
        engine = make_engine(
            engine_name, model, tokenizer, group_size=4, max_new_tokens=MAX_NEW, min_new_tokens=min_new
        )
        engine.eos_token_id = frequent_token(model, engine)
        torch.manual_seed(0)
        batch = engine.sample(PROMPTS)
        lengths[min_new] = batch.lengths.tolist()
        if min_new == MAX_NEW:
            assert not (batch.response_ids[:, :MAX_NEW] == engine.eos_token_id).any()
    assert min(lengths[0]) < 3, lengths  # EOS does come early without the option
    assert min(lengths[3]) >= 3, lengths
    assert lengths[MAX_NEW] == [MAX_NEW] * 12, lengths


@pytest.mark.parametrize("engine_name", ["decode", "generate"])
def test_min_new_tokens_leaves_greedy_decoding_alone(sharp, engine_name):
    """Evaluation (do_sample=False) stops at EOS whatever min_new_tokens says: the greedy responses
    with min = max equal those with min = 0, and the first prompt's ends at its first token."""
    model, tokenizer = sharp
    batches = []
    for min_new in (0, MAX_NEW):
        engine = make_engine(
            engine_name, model, tokenizer, group_size=1, max_new_tokens=MAX_NEW, min_new_tokens=min_new
        )
        engine.eos_token_id = frequent_token(model, engine)
        batches.append(engine.sample(PROMPTS, do_sample=False))
    assert batches[0].lengths[0] == 1
    assert batches[0].lengths.tolist() == batches[1].lengths.tolist()


def test_min_new_tokens_above_max_is_refused(sharp):
    model, tokenizer = sharp
    with pytest.raises(ValueError, match="min_new_tokens"):
        make_engine("decode", model, tokenizer, group_size=1, max_new_tokens=4, min_new_tokens=5)
