"""The in-training evaluation (common/evaluation.py): its schedule in steps and in generated tokens,
and the sampled mean@k beside greedy pass@1."""

from __future__ import annotations

import pytest
import torch

from common.config import ConfigError
from common.evaluation import evaluation_due, mean_at_k
from common.models import load_policy
from common.rollout import HFRollout
from common.tasks import Example, Task
from scripts.build import build_settings
from tests.conftest import compose_train


def trainer(*overrides: str):
    return build_settings(compose_train(*overrides)).trainer


def test_token_points_evaluate_the_first_step_that_crosses_each_multiple():
    # eval_every_tokens=1000, steps ending at 640, 1310, 1950, 2020 and 4100 tokens: 1310 crosses
    # 1000, 2020 crosses 2000, 4100 crosses 3000 and 4000 (one evaluation); 640 and 1950 cross nothing
    t = trainer("trainer.eval_every=0", "trainer.eval_every_tokens=1000")
    ends = [0, 640, 1310, 1950, 2020, 4100]
    due = [evaluation_due(t, step, ends[step - 1], ends[step], False) for step in range(1, 6)]
    assert due == [False, True, False, True, True]
    assert evaluation_due(t, 0, 0, 0, False)  # step 0
    assert evaluation_due(t, 3, 1310, 1950, last=True)  # the run's last step


def test_steps_and_tokens_combine_and_neither_turns_evaluation_off():
    both = trainer("trainer.eval_every=2", "trainer.eval_every_tokens=1000")
    assert evaluation_due(both, 2, 100, 200, False) and evaluation_due(both, 3, 900, 1100, False)
    assert not evaluation_due(both, 3, 100, 200, False)
    off = trainer("trainer.eval_every=0")  # eval_every_tokens is null by default
    assert not any(evaluation_due(off, s, 0, 10_000, s == 5) for s in range(6))


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.eval_every_tokens=0", "trainer.eval_every_tokens"),
        ("trainer.eval_num_samples=-1", "trainer.eval_num_samples"),
        ("trainer.eval_temperature=0", "trainer.eval_temperature"),
    ],
)
def test_bad_evaluation_settings_fail_at_start_up_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        trainer(override)


def test_the_sampled_evaluation_takes_the_rollout_temperature_unless_set():
    assert trainer("rollout.temperature=0.7").eval_temperature == 0.7
    assert trainer("rollout.temperature=0.7", "trainer.eval_temperature=0.6").eval_temperature == 0.6


class HalfRightTask(Task):
    """Every response to prompt "a" is right, every response to "b" wrong."""

    name = "half_right"

    def __init__(self) -> None:
        self._set_splits([Example("a", "1")], [Example("a", "1"), Example("b", "1")])

    def correctness(self, response: str, example: Example) -> float:
        return float(example.prompt == "a")


@pytest.fixture(scope="module")
def engine(cache_dir):
    cfg = compose_train("model=tiny", "logger=none")
    model, tokenizer = load_policy("tiny", cache_dir=cache_dir, tiny=dict(cfg.model.tiny), seed=0)
    return HFRollout(model, tokenizer, group_size=4, max_new_tokens=4)


def test_mean_at_k_averages_every_sampled_response(engine):
    # prompts a (right) and b (wrong), k = 3: (3 x 1 + 3 x 0) / (2 x 3) = 0.5, whatever is sampled;
    # chunk=4 puts one prompt in each batched call (4 // 3 = 1)
    task = HalfRightTask()
    assert mean_at_k(engine, task, task.test, k=3, temperature=1.0, seed=0, chunk=4) == 0.5
    assert mean_at_k(engine, task, task.test[:1], k=2, temperature=1.0, seed=0) == 1.0


def test_mean_at_k_leaves_the_training_rng_and_temperature_as_they_were(engine):
    task = HalfRightTask()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    seen = []
    original = engine.sample

    def spy(prompts, group_size=None, **kwargs):
        seen.append(engine.temperature)
        return original(prompts, group_size, **kwargs)

    engine.sample = spy
    try:
        mean_at_k(engine, task, task.test, k=2, temperature=0.5, seed=7)
    finally:
        del engine.sample
    assert seen == [0.5] and engine.temperature == 1.0
    assert torch.equal(torch.get_rng_state(), before)  # training samples on as if nothing happened


def responses_of(engine, examples: list[Example], seed: int) -> list[str]:
    """The responses mean_at_k samples (k = 4) for `examples` with `seed`."""
    captured = []
    original = engine.sample

    def spy(prompts, group_size=None, **kwargs):
        batch = original(prompts, group_size, **kwargs)
        captured.extend(batch.responses)
        return batch

    engine.sample = spy
    try:
        mean_at_k(engine, HalfRightTask(), examples, k=4, temperature=1.0, seed=seed)
    finally:
        del engine.sample
    return captured


def test_mean_at_k_with_one_seed_draws_the_same_responses(engine):
    examples = [Example("What is 2 + 3?", "5")]
    first = responses_of(engine, examples, seed=3)
    torch.manual_seed(99)  # the training RNG moves on: no effect on the evaluation
    assert responses_of(engine, examples, seed=3) == first and len(set(first)) > 1
