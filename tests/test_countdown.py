"""Countdown: seeded generation, solvability, disjoint splits, and the safe expression checker."""

import re

import pytest

from common.tasks import CountdownTask, Example, TaskError, build_task
from common.tasks.countdown import (
    ExpressionError,
    check_solution,
    evaluate_expression,
    expression_numbers,
    last_expression_line,
    parse_expression,
    reference_problem,
)
from scripts.eval import task_config


def make_countdown(**overrides):
    kwargs = dict(num_train=200, num_test=50, seed=0)
    kwargs.update(overrides)
    return CountdownTask(**kwargs)


def prompt_problem(example):
    """(numbers, target) as shown in the default prompt: "Using the numbers 4, 5, 6, ... equals 7."."""
    match = re.match(r"Using the numbers ([\d, ]+), create an equation that equals (\d+)\.", example.prompt)
    return [int(x) for x in match.group(1).split(", ")], int(match.group(2))


# 44, 19, 3 -> 75: (44 - 19) * 3
EXAMPLE_75 = Example(
    prompt="Using the numbers 44, 19, 3, create an equation that equals 75.", answer="(44 - 19) * 3"
)


# --- generation -------------------------------------------------------------------------------------


def test_same_seed_same_problems_other_seed_other_problems():
    a, b, c = make_countdown(), make_countdown(), make_countdown(seed=1)
    assert a.train == b.train and a.test == b.test
    assert a.train != c.train


@pytest.mark.parametrize("num_numbers", [2, 3, 4])
def test_every_problem_is_solved_by_its_reference(num_numbers):
    task = make_countdown(num_numbers=num_numbers, max_number=20, max_target=50)
    for example in task.train + task.test:
        numbers, target = prompt_problem(example)
        # the prompt shows the reference's numbers (maybe in another order) and its value
        assert sorted(numbers) == sorted(reference_problem(example.answer)[0])
        assert target == reference_problem(example.answer)[1]
        assert len(numbers) == num_numbers and all(1 <= x <= 20 for x in numbers)
        assert 1 <= target <= 50
        assert task.correctness(f"<answer>{example.answer}</answer>", example) == 1.0
        assert task.has_format(f"<answer>{example.answer}</answer>")


def test_splits_are_disjoint_on_sorted_numbers_and_target():
    task = make_countdown(num_train=300, num_test=100, max_number=10)
    keys = {}
    for split in ("train", "test"):
        problems = [reference_problem(e.answer) for e in getattr(task, split)]
        keys[split] = {(tuple(sorted(numbers)), target) for numbers, target in problems}
        assert len(keys[split]) == len(problems)  # no duplicate within a split either
    assert not keys["train"] & keys["test"]


def test_too_small_a_problem_space_fails_at_start_up():
    # numbers 1, 1 reach only targets 1 (1 * 1, 1 / 1) and 2 (1 + 1): two distinct problems
    with pytest.raises(TaskError, match="only 2 distinct problems"):
        make_countdown(num_train=2, num_test=1, num_numbers=2, min_number=1, max_number=1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_numbers=1), "num_numbers"),
        (dict(min_number=0), "min_number"),
        (dict(min_number=9, max_number=3), "min_number"),
        (dict(max_target=0), "max_target"),
        (dict(num_test=0), "num_test"),
        (dict(prompt_template="Reach {target}."), "{numbers}"),
        (dict(prompt_template="{numbers} {target} {other}"), "not valid"),
    ],
)
def test_invalid_options(overrides, message):
    with pytest.raises(TaskError, match=re.escape(message)):
        make_countdown(**overrides)


def test_config_builds_the_task():
    # configs/task/countdown.yaml as scripts/eval.py reads it (without its schema line)
    cfg = task_config("countdown", [], None)
    task = build_task(cfg.pop("name"), **cfg)
    assert isinstance(task, CountdownTask)
    assert (len(task.train), len(task.test)) == (cfg["num_train"], cfg["num_test"])


# --- the checker ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, numbers, target, expected",
    [
        ("(44 - 19) * 3", [44, 19, 3], 75, True),
        ("3*(44-19)", [44, 19, 3], 75, True),  # any order, no spaces
        ("((44 - 19)) * (3)", [44, 19, 3], 75, True),  # redundant parentheses
        ("(44 - 19) * 3 = 75", [44, 19, 3], 75, True),  # trailing "= target"
        ("(44 - 19) * 3 = 76", [44, 19, 3], 75, False),  # the right side must be the target
        ("44 - 19 * 3", [44, 19, 3], 75, False),  # 44 - 57 = -13: precedence matters
        ("(44 - 19) * 19", [44, 19, 3], 75, False),  # 19 reused, 3 missing
        ("(44 - 19) * 3 * 1", [44, 19, 3], 75, False),  # an extra number
        ("75", [44, 19, 3], 75, False),  # numbers missing
        ("25 * 3", [2, 5, 3], 75, False),  # 2, 5 concatenated into 25
        ("6 / 3 * 4", [6, 3, 4], 8, True),
        ("1 / 49 * 49", [1, 49, 49], 1, True),  # exact fractions; floats give 0.9999999999999999
        ("7 / 2", [7, 2], 3, False),  # 3.5, not 3
        ("2 / (5 - 5)", [2, 5, 5], 0, False),  # division by zero
        ("-3 + 5", [3, 5], 2, False),  # unary minus: numbers are used as given
        ("5.0 - 3", [5, 3], 2, False),  # floats
        ("5 // 3 + 1", [5, 3, 1], 2, False),  # floor division
        ("9**9**9", [9, 9, 9], 1, False),  # a power: rejected before any arithmetic
        ("__import__('os').system('true')", [], 0, False),
        ("", [44, 19, 3], 75, False),
    ],
)
def test_check_solution(text, numbers, target, expected):
    assert check_solution(text, numbers, target) is expected


@pytest.mark.parametrize(
    "text, reason",
    [
        ("__import__('os')", "only digits"),  # names and calls never reach the parser
        ("True + 1", "only digits"),
        ("0x10 + 1", "only digits"),
        ("1_0 + 1", "only digits"),
        ("2 ** 3", "Pow"),  # whitelisted characters, but not an allowed node
        ("9**9**9", "Pow"),
        ("7 // 2", "FloorDiv"),
        ("-3", "UnaryOp"),
        ("2 (3)", "Call"),  # parses as calling 2
        ("(1 + 2", "not a valid expression"),
        ("1 +" * 100 + " 1", "longer than"),
        ("   ", "empty"),
    ],
)
def test_parse_expression_rejects(text, reason):
    with pytest.raises(ExpressionError, match=re.escape(reason)):
        parse_expression(text)


def test_numbers_and_value_of_an_expression():
    tree = parse_expression("(10 - 4) / 4 * 2")
    assert expression_numbers(tree) == [10, 4, 4, 2]
    assert evaluate_expression(tree) == 3  # 6 / 4 * 2 = 3, exactly


# --- responses --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<answer>(44 - 19) * 3</answer>", 1.0),
        ("<answer>(44 - 19) * 3 = 75</answer>", 1.0),
        ("<answer>(44 - 19) * 19</answer>", 0.0),
        ("<answer>1 + 2</answer> no, <answer>3 * (44 - 19)</answer>", 1.0),  # the last pair counts
        ("44 - 19 = 25\nThen:\n(44 - 19) * 3 = 75", 1.0),  # no tags: the last expression line
        ("(44 - 19) * 3 = 75\n44 - 19 + 3", 0.0),  # ... which here is a wrong one
        ("The answer is 75.", 0.0),
        ("<answer>__import__('os')</answer>", 0.0),
    ],
)
def test_correctness(response, expected):
    assert make_countdown(num_train=1, num_test=1).correctness(response, EXAMPLE_75) == expected


def test_strict_ignores_untagged_lines():
    response = "(44 - 19) * 3 = 75"
    assert make_countdown(num_train=1, num_test=1, strict=True).correctness(response, EXAMPLE_75) == 0.0
    assert make_countdown(num_train=1, num_test=1).extract_answer(response) == response


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<answer>(44 - 19) * 3</answer>", True),
        ("<answer>1 + 2 = 3</answer>", True),  # wrong, but well formed
        ("<answer>1 + 2 = three</answer>", False),
        ("<answer>seventy-five</answer>", False),
        ("<answer>1 + 2</answer><answer>3</answer>", False),
        ("(44 - 19) * 3", False),
    ],
)
def test_has_format(response, expected):
    assert make_countdown(num_train=1, num_test=1).has_format(response) is expected


@pytest.mark.parametrize(
    "response, expected",
    [
        ("I try 1 + 2\n(1 + 2) * 3\nDone.", "(1 + 2) * 3"),
        ("  4 * 5 = 20  ", "4 * 5 = 20"),
        ("The answer: 4 * 5", None),  # words on the line
        ("20\n", None),  # a number alone is not an expression line
    ],
)
def test_last_expression_line(response, expected):
    assert last_expression_line(response) == expected
