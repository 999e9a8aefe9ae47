"""Reward composition: each term on its own, the total, and per-sample verifier failures."""

import pytest
import torch

from common.rewards import RewardError, RewardResult, score_responses
from common.tasks import AdditionTask, CharShareTask, Example, Task


class EchoTask(Task):
    """Correct iff the response equals the answer; "boom" makes the verifier raise."""

    name = "echo"

    def __init__(self):
        self._set_splits([Example("p", "a")], [Example("p", "a")])

    def correctness(self, response, example):
        if response == "boom":
            raise KeyError("verifier exploded")
        if response == "nan":
            return float("nan")
        return float(response.strip("<>") == example.answer)

    def has_format(self, response):
        return response.startswith("<")


def test_terms_and_total_on_addition():
    task = AdditionTask(min_operand=0, max_operand=9, num_train=2, num_test=2, seed=0)
    ex = Example(prompt="What is 2 + 3?", answer="5")
    responses = ["<answer>5</answer>", "2 + 3 = 5", "<answer>4</answer>", "no idea"]
    result = score_responses(task, responses, [ex] * 4, format_weight=0.1)
    # correct = [1, 1, 0, 0]; format = [1, 0, 1, 0]; total = correct + 0.1 * format
    torch.testing.assert_close(result.correct, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(result.format, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(result.total, torch.tensor([1.1, 1.0, 0.1, 0.0]))
    assert result.correct.dtype == result.format.dtype == result.total.dtype == torch.float32
    assert result.extracted == ["5", "5", "4", None]
    assert result.errors == 0 and result.error_messages == []


def test_each_response_is_graded_against_its_own_example():
    # group order [q1]*2 + [q2]*2: the same response "7" is right for q1 and wrong for q2
    task = AdditionTask(min_operand=0, max_operand=9, num_train=2, num_test=2, seed=0)
    q1, q2 = Example("What is 3 + 4?", "7"), Example("What is 4 + 4?", "8")
    result = score_responses(task, ["7", "8", "7", "8"], [q1, q1, q2, q2], format_weight=0.0)
    torch.testing.assert_close(result.correct, torch.tensor([1.0, 0.0, 0.0, 1.0]))


def test_format_weight_zero_and_partial_credit():
    task = CharShareTask(target_chars="a")
    ex = task.train[0]
    result = score_responses(task, ["aab", "bbbb"], [ex, ex], format_weight=0.5)
    # char_share: 2/3 and 0; has_format is always False, so the total is the correctness
    torch.testing.assert_close(result.correct, torch.tensor([2 / 3, 0.0]))
    torch.testing.assert_close(result.total, result.correct)


def test_verifier_error_scores_zero_and_is_counted():
    task = EchoTask()
    ex = Example("p", "a")
    result = score_responses(task, ["<a>", "boom", "a", "nan"], [ex] * 4, format_weight=1.0)
    assert isinstance(result, RewardResult)
    # samples 1 and 3 fail: 0 on every term; the others are scored as usual
    torch.testing.assert_close(result.correct, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(result.format, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(result.total, torch.tensor([2.0, 0.0, 1.0, 0.0]))
    assert result.errors == 2
    assert result.error_messages[0] == "1: KeyError: 'verifier exploded' (prompt 'p', response 'boom')"
    assert result.error_messages[1].startswith("3: ValueError: verifier returned nan")
    assert result.extracted[1] is None and result.extracted[3] is None


def test_single_error_count():
    task = EchoTask()
    ex = Example("p", "a")
    result = score_responses(task, ["a", "boom", "x"], [ex] * 3, format_weight=0.0)
    assert result.errors == 1
    torch.testing.assert_close(result.correct, torch.tensor([1.0, 0.0, 0.0]))


def test_fail_fast_reraises_with_sample_index():
    task = EchoTask()
    ex = Example("p", "a")
    with pytest.raises(RewardError, match="sample 2: KeyError") as info:
        score_responses(task, ["a", "a", "boom"], [ex] * 3, format_weight=0.0, fail_fast=True)
    assert isinstance(info.value.__cause__, KeyError)


def test_length_mismatch_is_rejected():
    with pytest.raises(ValueError, match="one example per response"):
        score_responses(EchoTask(), ["a", "b"], [Example("p", "a")], format_weight=0.0)


def test_empty_batch():
    result = score_responses(EchoTask(), [], [], format_weight=0.1)
    assert result.total.shape == (0,) and result.errors == 0
