"""The update step as the presets run it: DAPO's Clip-Higher acts, partial batches keep the
token-mean normaliser honest, and dropout never separates the behaviour policy from the trained one."""

from __future__ import annotations

import copy

import pytest
import torch

from common.rollout import HFRollout
from common.update import add_logprobs_and_values, clip_and_step, split_micro_batches, update_policy
from scripts.build import build_algorithm, build_optimizer, build_policy, build_settings
from tests.conftest import compose_train, micro_batches

TINY = ("model=tiny", "task=char_share", "logger=none", "group_size=g4", "rollout.max_new_tokens=8")


def fixed_batch(engine: HFRollout, n_rows: int, response: str) -> dict:
    """n_rows copies of one prompt and one fixed response (no sampling), every token in the loss."""
    enc = engine.encode_prompts(["Say the vowels."], engine.max_new_tokens)
    response_ids = engine.tokenizer(response, add_special_tokens=False, return_tensors="pt")["input_ids"]
    rollout = engine.assemble(
        ["Say the vowels."],
        n_rows,
        enc["input_ids"].repeat(n_rows, 1),
        enc["attention_mask"].repeat(n_rows, 1),
        response_ids.repeat(n_rows, 1),
        torch.zeros(n_rows, response_ids.shape[1]),  # no engine sampled these: no rollout log-probs
    )
    return {
        "input_ids": rollout.input_ids,
        "attention_mask": rollout.attention_mask,
        "response_mask": rollout.response_mask,
        "loss_mask": rollout.response_mask.clone(),
        "group_index": rollout.group_index,
        "prompt_len": rollout.prompt_len,
    }


def dapo_update(cfg, model, batch: dict) -> dict[str, float]:
    """One step's update under cfg (old log-probs recorded as the trainer does), every advantage +1."""
    algo, settings = build_algorithm(cfg.algorithm), build_settings(cfg)
    optimizer, scheduler = build_optimizer(model, cfg)
    batch = dict(batch, advantages=torch.ones(batch["input_ids"].shape[0]))
    add_logprobs_and_values(batch, model, None, None, algo, settings, 1.0, torch.device("cpu"))
    assert "old_logprob" in batch  # several optimizer steps per rollout batch: pi_old is recorded
    generator = torch.Generator().manual_seed(0)
    return update_policy(model, optimizer, scheduler, algo, batch, settings, 1.0, generator)


def test_clip_higher_acts_under_the_dapo_preset(cache_dir):
    """The preset's mini-batches (2 prompts of the 4 here: 2 optimizer steps) move the ratio; at a
    learning rate that moves the policy, tokens pass 1 + clip_high and clip_high changes the loss.

    Constructed so that it must hold: every row is the same prompt and response with advantage +1, so
    the first optimizer step raises exactly the log-probs the second mini-batch is scored on. Adam's
    first step moves every weight by about lr in the direction that raises them, a first-order gain
    of lr * sum|grad| in log-prob; at lr 3e-2 the ratio of the second mini-batch ends far above 1.28.
    """
    overrides = (*TINY, "algorithm=dapo", "trainer.batch_size=4", "optim.lr=3e-2", "optim.warmup_steps=0")
    cfg = compose_train(*overrides, f"paths.cache_dir={cache_dir}")
    assert cfg.trainer.mini_batch_size == 2 and cfg.algorithm.clip_high == 0.28
    model, tokenizer = build_policy(cfg)
    engine = HFRollout(model, tokenizer, group_size=4, max_new_tokens=8)
    batch = fixed_batch(engine, 16, " a e i o u a e")
    start = copy.deepcopy(model.state_dict())

    metrics = dapo_update(cfg, model, batch)
    # the first mini-batch is on-policy (ratio 1, nothing clipped): the mean over both is half the second's
    assert metrics["policy/ratio_max"] > 1.28 + 0.1
    assert metrics["policy/clipfrac_high"] > 0.1
    assert metrics["policy/clipfrac_low"] == 0.0  # no negative advantage

    symmetric = compose_train(*overrides, "algorithm.clip_high=0.2", f"paths.cache_dir={cache_dir}")
    model.load_state_dict(start)
    metrics_symmetric = dapo_update(symmetric, model, batch)
    # the same first step; on the second, tokens above the clip count min(ratio, 1 + clip_high) * A:
    # a ceiling of 1.28 instead of 1.2 lowers the loss by 0.08 per such token
    assert metrics["policy/loss"] < metrics_symmetric["policy/loss"] - 0.01


class DropoutEverywhere(torch.nn.Module):
    """Both kinds of dropout a hub model may hold: a torch Dropout module and a float attribute
    passed to an attention kernel (Llama's `attention_dropout`)."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = torch.nn.Dropout(0.1)
        self.attention_dropout = 0.3
        self.inner = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.0))


def test_disable_dropout_zeroes_modules_and_attention_attributes():
    from common.models import disable_dropout

    model = DropoutEverywhere()
    assert disable_dropout(model) == 2  # the Dropout(0.0) was already off
    assert model.drop.p == 0.0 and model.attention_dropout == 0.0 and model.inner[1].p == 0.0
    assert isinstance(model.attention_dropout, float)


def dropout_policy(cache_dir: str, disable: bool):
    """The tiny policy with attention dropout 0.5 (a hub model with dropout, in small)."""
    cfg = compose_train(
        *TINY,
        "+model.tiny.attention_dropout=0.5",
        f"model.disable_dropout={disable}",
        f"paths.cache_dir={cache_dir}",
    )
    model, tokenizer = build_policy(cfg)
    return cfg, model, HFRollout(model, tokenizer, group_size=4, max_new_tokens=8)


@pytest.mark.parametrize("disable", [True, False])
def test_first_step_is_on_policy_with_a_dropout_model(cache_dir, disable):
    """model.disable_dropout (the default): the old log-probs (eval mode, as in generation) and the
    update's forward (train mode) are the same function, so the ratio is 1 and the KL to an identical
    reference 0. Without it the update's forward drops attention weights: ratio and KL move."""
    from common.models import make_reference
    from common.update import accumulate_gradients

    cfg, model, engine = dropout_policy(cache_dir, disable)
    overrides = (
        "algorithm=grpo",
        "trainer.batch_size=2",
        "trainer.mini_batch_size=1",
        "algorithm.kl_coef=0.04",
    )
    cfg = compose_train(*TINY, *overrides)
    algo, settings = build_algorithm(cfg.algorithm), build_settings(cfg)
    batch = dict(fixed_batch(engine, 8, " a e i o u a e"), advantages=torch.ones(8))
    model.train()
    add_logprobs_and_values(
        batch, model, make_reference(model), None, algo, settings, 1.0, torch.device("cpu")
    )
    assert model.training  # the eval-mode log-prob pass restores the mode
    torch.manual_seed(0)
    _, stats, _ = accumulate_gradients(model, algo, batch, torch.arange(8), micro_batches(8), temperature=1.0)
    if disable:
        assert stats["policy/ratio_max"] == pytest.approx(1.0, abs=1e-5)
        assert abs(stats["kl/value"]) < 1e-6
    else:
        assert stats["policy/ratio_max"] > 1.01 and stats["kl/value"] > 1e-4


def test_old_log_probs_come_from_eval_mode_even_without_disable_dropout(cache_dir):
    from common.logprobs import sequence_logprobs

    _, model, engine = dropout_policy(cache_dir, disable=False)
    cfg = compose_train(*TINY, "algorithm=grpo", "trainer.batch_size=2", "trainer.mini_batch_size=1")
    algo, settings = build_algorithm(cfg.algorithm), build_settings(cfg)
    batch = fixed_batch(engine, 4, " a e i o u")
    model.train()
    add_logprobs_and_values(batch, model, None, None, algo, settings, 1.0, torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        expected, _ = sequence_logprobs(
            model, batch["input_ids"], batch["attention_mask"], batch["prompt_len"]
        )
    # the same eval-mode function, one forward against another (shared-prompt cache or not): float rounding
    torch.testing.assert_close(batch["old_logprob"], expected, atol=1e-5, rtol=1e-5)


def test_split_micro_batches_keeps_groups_together_and_caps_tokens():
    """Three groups of two rows, prompts of 3, 2, 3 tokens, responses of 2, 4 | 1, 1 | 5, 5 tokens.
    The largest group (10 response tokens) goes first, then 6, then 2. By rows (4): [4, 5, 0, 1],
    [2, 3]. At most 12 tokens (a prompt counts once per micro-batch): 3 + 5 = 8 and + 5 > 12, so
    row 4 alone, row 5 alone (8 + 3 + 2 > 12), rows 0, 1, 2 (5 + 4 + 2 + 1 = 12), row 3 (2 + 1)."""
    lengths, prompts = [2, 4, 1, 1, 5, 5], [3, 3, 2, 2, 3, 3]
    batch = {
        "prompt_len": 3,
        "group_index": torch.tensor([0, 0, 1, 1, 2, 2]),
        "response_mask": (torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]).float(),
        "attention_mask": torch.cat(
            [(torch.arange(3)[None, :] >= 3 - torch.tensor(prompts)[:, None]).long(), torch.ones(6, 5)], 1
        ),
    }
    rows = torch.arange(6)
    by_rows = split_micro_batches(batch, rows, 4)
    assert [m.tolist() for m in by_rows] == [[4, 5, 0, 1], [2, 3]]
    by_tokens = split_micro_batches(batch, rows, 6, max_tokens=12)
    assert [m.tolist() for m in by_tokens] == [[4], [5], [0, 1, 2], [3]]
    # a subset of rows (a mini-batch) comes back as those rows
    assert [m.tolist() for m in split_micro_batches(batch, torch.tensor([3, 0, 2]), 8)] == [[0, 3, 2]]


@pytest.mark.parametrize(
    "max_grad_norm, applied",
    [
        (1.0, [-0.6, -0.8]),  # gradient [3, 4] has norm 5: scaled by 1 / 5 to norm 1
        (10.0, [-3.0, -4.0]),  # under the limit: stepped as it is
    ],
)
def test_clip_and_step_clips_the_gradient_to_max_grad_norm(max_grad_norm, applied):
    # SGD at lr 1 moves the weights by exactly the gradient it is given (AdamW's first step would
    # hide the scale: it moves every weight by lr whatever the gradient's size)
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    model.weight.grad = torch.tensor([[3.0, 4.0]])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    grad_norm = clip_and_step(
        model, optimizer, scheduler, None, total=0.5, stats={}, max_grad_norm=max_grad_norm
    )
    assert grad_norm == pytest.approx(5.0)  # the norm before clipping, as logged in policy/grad_norm
    torch.testing.assert_close(model.weight.detach(), torch.tensor([applied]))
