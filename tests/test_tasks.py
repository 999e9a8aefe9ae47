"""Tasks: dataset building, splits, verifiers and format checks, on hand-written responses."""

import json
import re
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from common.tasks import (
    AdditionTask,
    CharShareTask,
    Example,
    GSM8KTask,
    JsonlTask,
    TaskError,
    answer_tag_content,
    build_task,
)
from common.tasks.base import last_number, parse_integer
from common.tasks.gsm8k import gsm8k_reference

GSM8K_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def make_addition(**overrides):
    kwargs = dict(min_operand=0, max_operand=99, num_train=50, num_test=20, seed=0)
    kwargs.update(overrides)
    return AdditionTask(**kwargs)


def operands(example):
    """Operand tuple of an addition prompt: "What is 3 + (-5)? ..." -> (3, -5)."""
    question = re.match(r"What is (.*?)\?", example.prompt).group(1)
    return tuple(int(term.strip("()")) for term in question.split(" + "))


ANSWER_42 = Example(prompt="What is 40 + 2?", answer="42")


# --- shared helpers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<answer>7</answer>", "7"),
        ("<answer>3</answer> then <answer> 4 </answer>", "4"),  # the LAST pair counts, stripped
        ("<answer>a<answer>b</answer>", "b"),  # innermost pair
        ("<answer>\n12\n</answer>", "12"),
        ("<answer>7", None),
        ("no tags", None),
    ],
)
def test_answer_tag_content(response, expected):
    assert answer_tag_content(response) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("12 + 30 = 42.", "42"),
        ("it is -5", "-5"),
        ("3-5", "5"),  # a minus after a digit is subtraction, not a sign
        ("total 1,234 apples", "1234"),
        ("1,2345", "2345"),  # not thousands grouping
        ("pi is 3.14", "3.14"),
        ("none here", None),
    ],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_parse_integer():
    assert parse_integer(" -7 ") == -7
    assert parse_integer("1,234") == 1234
    assert parse_integer("7.5") is None
    assert parse_integer("7 apples") is None


# --- addition ---------------------------------------------------------------------------------------


def test_addition_is_deterministic_by_seed():
    a, b, c = make_addition(seed=3), make_addition(seed=3), make_addition(seed=4)
    assert a.train == b.train and a.test == b.test
    assert a.train != c.train


def test_addition_splits_are_disjoint_and_sized():
    # 10 * 10 = 100 distinct problems; asking for 95 forces the dedupe to work hard
    task = make_addition(min_operand=0, max_operand=9, num_train=80, num_test=15)
    train_ops = [operands(ex) for ex in task.train]
    test_ops = [operands(ex) for ex in task.test]
    assert len(train_ops) == 80 and len(test_ops) == 15
    assert len(set(train_ops) | set(test_ops)) == 95
    assert not set(train_ops) & set(test_ops)


def test_addition_too_few_distinct_problems():
    with pytest.raises(TaskError, match="only 9 distinct"):
        make_addition(min_operand=1, max_operand=3, num_train=8, num_test=2)


def test_addition_operand_range_and_answers():
    task = make_addition(min_operand=-5, max_operand=5, num_operands=3, num_train=40, num_test=10)
    for ex in task.train + task.test:
        ops = operands(ex)
        assert len(ops) == 3
        assert all(-5 <= x <= 5 for x in ops)
        assert int(ex.answer) == sum(ops)
    # negative operands do occur and are parenthesised
    assert any("(-" in ex.prompt for ex in task.train)


def test_addition_prompt_template():
    # operands in {1, 2}: all four problems, so the prompt set is known exactly
    task = make_addition(
        min_operand=1, max_operand=2, num_train=2, num_test=2, prompt_template="Q: {question} ="
    )
    assert {ex.prompt for ex in task.train + task.test} == {
        "Q: 1 + 1 =",
        "Q: 1 + 2 =",
        "Q: 2 + 1 =",
        "Q: 2 + 2 =",
    }
    with pytest.raises(TaskError, match="placeholder"):
        make_addition(prompt_template="no placeholder")
    with pytest.raises(TaskError, match="not valid"):
        make_addition(prompt_template="{question} {other}")


@pytest.mark.parametrize(
    "response, strict, expected",
    [
        ("<answer>42</answer>", False, 1.0),
        ("<answer>41</answer>", False, 0.0),
        ("<answer> 42 </answer>", True, 1.0),
        ("40 + 2 = 42", False, 1.0),  # last-number fallback
        ("40 + 2 = 42", True, 0.0),  # strict: no tags, no answer
        ("The answer is 42, not 43", False, 0.0),  # the LAST number is graded
        ("I say 42. <answer>43</answer>", False, 0.0),  # tags win over the fallback
        ("<answer>the sum is 42</answer>", False, 1.0),  # last number inside the tags
        ("<answer>the sum is 42</answer>", True, 0.0),  # strict: the content must be an integer
        ("<answer>42.0</answer>", False, 1.0),
        ("<answer>42.5</answer>", False, 0.0),
        ("no number at all", False, 0.0),
        ("", False, 0.0),
    ],
)
def test_addition_correctness(response, strict, expected):
    task = make_addition(strict=strict)
    assert task.correctness(response, ANSWER_42) == expected


def test_addition_negative_answers():
    task = make_addition()
    example = Example(prompt="What is (-7) + 2?", answer="-5")
    assert task.correctness("(-7) + 2 = -5", example) == 1.0
    assert task.correctness("<answer>-5</answer>", example) == 1.0
    assert task.correctness("<answer>5</answer>", example) == 0.0
    assert task.correctness("7-2 gives 5", example) == 0.0


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<answer>42</answer>", True),
        ("work... <answer>-3</answer>", True),
        ("<answer>forty-two</answer>", False),
        ("<answer>4.2</answer>", False),
        ("<answer>1</answer><answer>2</answer>", False),  # exactly one pair
        ("</answer>42<answer>", False),
        ("<answer>42", False),
        ("42", False),
    ],
)
def test_addition_has_format(response, expected):
    assert make_addition().has_format(response) is expected


def test_addition_extract_answer():
    task = make_addition()
    assert task.extract_answer("so 1 + 2 = 3") == "3"
    assert task.extract_answer("<answer>7</answer> 9") == "7"
    assert task.extract_answer("nothing") is None


# --- build_task -------------------------------------------------------------------------------------


def test_build_task_unknown_name_lists_options():
    with pytest.raises(TaskError, match="unknown task 'countup'.*addition.*gsm8k"):
        build_task("countup")


def test_build_task_bad_kwargs_name_the_key():
    with pytest.raises(TaskError, match="unknown option 'max_operant'"):
        build_task("addition", min_operand=0, max_operant=9, num_train=2, num_test=2, seed=0)
    with pytest.raises(TaskError, match="missing option 'seed'"):
        build_task("addition", min_operand=0, max_operand=9, num_train=2, num_test=2)


def test_build_task_empty_dataset():
    with pytest.raises(TaskError, match="at least 1"):
        build_task("addition", min_operand=0, max_operand=9, num_train=2, num_test=0, seed=0)
    with pytest.raises(TaskError, match="at least 1"):
        build_task("char_share", num_train=0)


def test_build_task_builds_each_kind(tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"p{i}", "answer": str(i)}) for i in range(10)))
    assert isinstance(
        build_task("addition", min_operand=0, max_operand=9, num_train=3, num_test=2, seed=0), AdditionTask
    )
    assert isinstance(build_task("jsonl", path=str(data)), JsonlTask)
    assert isinstance(build_task("char_share"), CharShareTask)


# --- jsonl ------------------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return str(path)


def test_jsonl_round_trip_with_test_file(tmp_path):
    train = write_jsonl(
        tmp_path / "train.jsonl",
        [{"prompt": "Capital of France?", "answer": "Paris"}, "", {"prompt": "2+2?", "answer": 4}],
    )
    test = write_jsonl(tmp_path / "test.jsonl", [{"prompt": "Capital of Italy?", "answer": " Rome "}])
    task = JsonlTask(path=train, test_path=test)
    assert task.train == [Example("Capital of France?", "Paris"), Example("2+2?", "4")]  # blank line skipped
    assert task.test == [Example("Capital of Italy?", "Rome")]


def test_jsonl_seeded_split(tmp_path):
    path = write_jsonl(tmp_path / "all.jsonl", [{"prompt": f"p{i}", "answer": str(i)} for i in range(20)])
    a = JsonlTask(path=path, test_fraction=0.25, seed=1)
    b = JsonlTask(path=path, test_fraction=0.25, seed=1)
    c = JsonlTask(path=path, test_fraction=0.25, seed=2)
    assert (len(a.train), len(a.test)) == (15, 5)
    assert a.test == b.test and a.test != c.test
    assert sorted(ex.prompt for ex in a.train + a.test) == sorted(f"p{i}" for i in range(20))


def test_jsonl_custom_fields(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"q": "hi", "a": "x"}])
    held_out = write_jsonl(tmp_path / "t.jsonl", [{"q": "bye", "a": "y"}])
    task = JsonlTask(path=path, test_path=held_out, prompt_field="q", answer_field="a")
    assert task.train == [Example("hi", "x")] and task.test == [Example("bye", "y")]


def test_jsonl_bad_encoding_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "answer": "b"}\n{"prompt": "caf\xe9", "answer": "c"}\n')
    with pytest.raises(TaskError, match=r"latin1\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 16\)"):
        JsonlTask(path=str(path))


def test_jsonl_duplicate_prompts_are_removed_with_a_warning_and_never_held_out(tmp_path, caplog):
    # 30 copies of one prompt and 10 distinct ones: the copies become one example
    rows = [{"prompt": "same", "answer": "1"}] * 30 + [
        {"prompt": f"p{i}", "answer": str(i)} for i in range(10)
    ]
    path = write_jsonl(tmp_path / "dup.jsonl", rows)
    task = JsonlTask(path=path, test_fraction=0.2, seed=0)
    assert "dup.jsonl: 29 duplicate prompt(s) removed" in caplog.text and "line 2 repeats" in caplog.text
    prompts = [ex.prompt for ex in task.train + task.test]
    assert sorted(prompts) == sorted(["same", *(f"p{i}" for i in range(10))])  # each once
    assert not {ex.prompt for ex in task.train} & {ex.prompt for ex in task.test}
    # 30 identical prompts alone cannot be split
    with pytest.raises(TaskError, match="1 example\\(s\\) are too few to hold out a test set"):
        JsonlTask(path=write_jsonl(tmp_path / "same.jsonl", rows[:30]))


def test_jsonl_test_file_prompts_are_left_out_of_training(tmp_path, caplog):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": p, "answer": "x"} for p in ("a", "b", "c")])
    test = write_jsonl(tmp_path / "test.jsonl", [{"prompt": "b", "answer": "x"}])
    task = JsonlTask(path=train, test_path=test)
    assert [ex.prompt for ex in task.train] == ["a", "c"] and "1 prompt(s) are also in" in caplog.text
    assert "train.jsonl:2" in caplog.text  # the line named
    with pytest.raises(TaskError, match="every prompt is also in"):
        JsonlTask(path=test, test_path=test)


def test_jsonl_examples_know_their_file_and_line(tmp_path):
    path = write_jsonl(
        tmp_path / "q.jsonl", [{"prompt": "a", "answer": "1"}, "", {"prompt": "b", "answer": "2"}]
    )
    held_out = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "c", "answer": "3"}])
    task = JsonlTask(path=path, test_path=held_out)
    assert [ex.source for ex in task.train] == [f"{path}:1", f"{path}:3"]
    assert task.test[0].source == f"{held_out}:1"
    assert task.train[0] == Example("a", "1")  # the source is not part of equality


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl", [{"prompt": "a", "answer": "b"}, "", '{"prompt": "c", "answer": ']
    )
    with pytest.raises(TaskError, match=r"bad\.jsonl:3: not valid JSON"):
        JsonlTask(path=path)


def test_jsonl_missing_field(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "a", "answer": "b"}, {"answer": "c"}])
    with pytest.raises(TaskError, match=r"q\.jsonl:2: missing field 'prompt'"):
        JsonlTask(path=path)


def test_jsonl_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", ["[1, 2]"])
    with pytest.raises(TaskError, match=r"q\.jsonl:1: expected a JSON object"):
        JsonlTask(path=path)


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(TaskError, match="task file not found: .*nope.jsonl"):
        JsonlTask(path=str(tmp_path / "nope.jsonl"))


def test_jsonl_empty_file(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(TaskError, match="no examples"):
        JsonlTask(path=path)


def test_jsonl_too_few_lines_to_split(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "a", "answer": "b"}])
    with pytest.raises(TaskError, match="too few"):
        JsonlTask(path=path)


def test_jsonl_unknown_answer_type(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "a", "answer": "b"}] * 3)
    with pytest.raises(TaskError, match="unknown answer_type 'fuzzy'"):
        JsonlTask(path=path, answer_type="fuzzy")


def test_jsonl_number_answers_must_be_numbers(tmp_path):
    path = write_jsonl(
        tmp_path / "q.jsonl", [{"prompt": "a", "answer": "12"}, {"prompt": "b", "answer": "twelve"}]
    )
    with pytest.raises(TaskError, match=r"q\.jsonl:2: answer 'twelve' is not a number"):
        JsonlTask(path=path, test_path=path, answer_type="number")


@pytest.mark.parametrize(
    "answer_type, response, answer, expected",
    [
        ("exact", "<answer> Paris </answer>", "Paris", 1.0),
        ("exact", "  Paris\n", "Paris", 1.0),  # no tags: the whole response, stripped
        ("exact", "It is Paris", "Paris", 0.0),
        ("exact", "<answer>paris</answer>", "Paris", 0.0),  # case matters
        ("number", "so 1,234 in total", "1234", 1.0),
        ("number", "<answer>0.50</answer>", "0.5", 1.0),
        ("number", "<answer>12</answer> or 13", "13", 0.0),
        ("number", "no digits", "3", 0.0),
        ("math", "<answer>\\frac{1}{2}</answer>", "0.5", 1.0),
        ("math", "so the answer is $\\frac{1}{2}$", "1/2", 1.0),
        ("math", "<answer>1/3</answer>", "0.5", 0.0),
    ],
)
def test_jsonl_correctness(tmp_path, answer_type, response, answer, expected):
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "q", "answer": answer}])
    held_out = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "t", "answer": answer}])
    task = JsonlTask(path=path, test_path=held_out, answer_type=answer_type)
    assert task.correctness(response, task.train[0]) == expected


# --- gsm8k ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "solution, expected",
    [
        ("2 + 3 = <<2+3=5>>5\n#### 5", "5"),
        ("... apples.\n#### 1,234", "1234"),
        ("#### -7 ", "-7"),
        ("no final line", None),
    ],
)
def test_gsm8k_reference(solution, expected):
    assert gsm8k_reference(solution) == expected


def write_gsm8k_dir(root, n_train=3, n_test=2):
    root.mkdir()
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [{"question": f"{split} q{i}?", "answer": f"step\n#### {i + 1},000"} for i in range(n)]
        write_jsonl(root / f"{split}.jsonl", rows)
    return str(root)


def test_gsm8k_local_dir_and_limits(tmp_path):
    path = write_gsm8k_dir(tmp_path / "g", n_train=3, n_test=2)
    task = GSM8KTask(path=path, num_train=2, prompt_template="Q: {question}")
    assert task.train == [Example("Q: train q0?", "1000"), Example("Q: train q1?", "2000")]
    assert task.test == [Example("Q: test q0?", "1000"), Example("Q: test q1?", "2000")]


def test_gsm8k_missing_final_answer(tmp_path):
    root = tmp_path / "g"
    write_gsm8k_dir(root)
    write_jsonl(
        root / "test.jsonl", [{"question": "q", "answer": "#### 1"}, {"question": "q", "answer": "no hashes"}]
    )
    with pytest.raises(TaskError, match=r"test\.jsonl:2: answer has no final"):
        GSM8KTask(path=str(root))


def test_gsm8k_missing_dir(tmp_path):
    with pytest.raises(TaskError, match="task file not found: .*train.jsonl"):
        GSM8KTask(path=str(tmp_path / "absent"))


def test_gsm8k_without_datasets_package_says_how_to_use_local_files(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(TaskError, match=r"'datasets' package is not installed.*task\.path=DIR"):
        GSM8KTask()


def fake_datasets_module(load_dataset):
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    return module


def test_gsm8k_hub_path_with_a_stand_in_datasets_package(monkeypatch):
    calls = []

    def load_dataset(hub_id, hub_config):
        calls.append((hub_id, hub_config))
        row = {"question": "What is 6 * 7?", "answer": "6 * 7 = 42\n#### 42"}
        return {"train": [row, row], "test": [row]}

    monkeypatch.setitem(sys.modules, "datasets", fake_datasets_module(load_dataset))
    task = GSM8KTask(num_train=1, prompt_template="{question}")
    assert calls == [("openai/gsm8k", "main")]
    assert task.train == [Example("What is 6 * 7?", "42")] and len(task.test) == 1


def test_gsm8k_hub_unreachable_says_how_to_use_local_files(monkeypatch):
    def load_dataset(hub_id, hub_config):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub\n(offline)")

    monkeypatch.setitem(sys.modules, "datasets", fake_datasets_module(load_dataset))
    with pytest.raises(TaskError, match=r"ConnectionError.*task\.path=DIR") as info:
        GSM8KTask()
    assert "\n" not in str(info.value)


def test_gsm8k_real_files():
    if not (GSM8K_DIR / "train.jsonl").is_file() or not (GSM8K_DIR / "test.jsonl").is_file():
        pytest.skip(f"GSM8K data not found at {GSM8K_DIR}")
    task = build_task("gsm8k", path=str(GSM8K_DIR))
    assert (len(task.train), len(task.test)) == (7473, 1319)
    # test[0] is Janet's ducks: 16 - 3 - 4 = 9 eggs at $2 -> 18
    assert task.test[0].answer == "18"
    assert "Janet" in task.test[0].prompt and "{question}" not in task.test[0].prompt
    assert all("#" not in ex.answer and "," not in ex.answer for ex in task.train + task.test)
    assert task.correctness("9 eggs * $2 = $18\n<answer>18</answer>", task.test[0]) == 1.0


GSM_72 = Example(prompt="Natalia sold clips...", answer="72")


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<answer>72</answer>", 1.0),  # math-verify alone extracts nothing from the bare tags
        ("48 + 24 = 72, so the answer is 72", 1.0),
        ("The answer is $72$.", 1.0),
        ("<answer>72.0</answer>", 1.0),
        ("<answer>71</answer>", 0.0),
        ("so the answer is 71", 0.0),
        ("I think 72 <answer>70</answer>", 0.0),  # the tags are graded, not the text around them
        ("", 0.0),
        ("<answer>}{\\frac</answer>", 0.0),  # unparsable: 0, not an exception
    ],
)
def test_gsm8k_correctness(tmp_path, response, expected):
    task = GSM8KTask(path=write_gsm8k_dir(tmp_path / "g"))
    assert task.correctness(response, GSM_72) == expected


def test_gsm8k_extract_answer(tmp_path):
    task = GSM8KTask(path=write_gsm8k_dir(tmp_path / "g"))
    assert task.extract_answer("<answer>72</answer>") == "72"
    assert task.extract_answer("so it is 72") == "72"
    assert task.extract_answer("no idea") is None


def test_gsm8k_correctness_in_worker_threads(tmp_path):
    # math-verify's default timeouts use signal.alarm, which raises outside the main thread.
    task = GSM8KTask(path=write_gsm8k_dir(tmp_path / "g"))
    responses = [
        "<answer>72</answer>",
        "so the answer is 72",
        "<answer>71</answer>",
        "The answer is $\\frac{144}{2}$",
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        scores = list(pool.map(lambda r: task.correctness(r, GSM_72), responses))
    assert scores == [1.0, 1.0, 0.0, 1.0]


# --- char_share -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, target_chars, expected",
    [
        ("banana", "aeiou", 3 / 6),
        ("a e i", "aeiou", 1.0),  # whitespace is not counted
        ("xyz", "aeiou", 0.0),
        ("", "aeiou", 0.0),
        ("  \n", "aeiou", 0.0),
        ("AAaa", "a", 0.5),  # case-sensitive
    ],
)
def test_char_share_correctness(response, target_chars, expected):
    task = CharShareTask(target_chars=target_chars)
    assert task.correctness(response, task.train[0]) == pytest.approx(expected)


def test_char_share_dataset():
    task = CharShareTask(num_train=10, num_test=3, seed=1)
    assert (len(task.train), len(task.test)) == (10, 3)
    assert task.train == CharShareTask(num_train=10, num_test=3, seed=1).train
    assert all(ex.prompt.endswith(".") and ex.answer == "aeiou" for ex in task.train + task.test)
    assert task.has_format("<answer>a</answer>") is False
    with pytest.raises(TaskError, match="target_chars"):
        CharShareTask(target_chars=" ")
