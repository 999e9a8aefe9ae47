"""reasoning-gym adapter: splits, binary grading, error messages. Skipped without the package,
except the check that its absence names the install command."""

import sys

import pytest

from common.tasks import ReasoningGymTask, TaskError
from scripts.build import build_task_from
from tests.conftest import compose_train


def make_task(**overrides):
    kwargs = dict(dataset="basic_arithmetic", num_train=30, num_test=10, seed=0)
    kwargs.update(overrides)
    return ReasoningGymTask(**kwargs)


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # makes `import reasoning_gym` fail
    with pytest.raises(TaskError, match="pip install reasoning-gym"):
        make_task()


def test_size_and_seed_belong_to_the_task():
    with pytest.raises(TaskError, match="'seed'"):
        make_task(dataset_kwargs={"seed": 3})


@pytest.fixture(scope="module")
def task():
    pytest.importorskip("reasoning_gym")
    return make_task()


def test_splits_are_seeded_and_disjoint(task):
    assert make_task().train == task.train
    train_q = {e.prompt for e in task.train}
    assert len(train_q) == 30 and not train_q & {e.prompt for e in task.test}
    example = task.test[0]
    assert example.prompt.startswith(task.entry(example)["question"])
    assert example.prompt.endswith("<answer></answer> tags.")


def test_grading_is_binary(task):
    example = task.test[0]
    answer = example.answer
    assert task.correctness(f"work...<answer>{answer}</answer>", example) == 1.0
    assert task.correctness(answer, example) == 1.0  # no tags: the whole response is graded
    # the dataset's own score gives partial credit to an answer that contains the right one
    wrong = f"1{answer}1"
    assert 0.0 < task.dataset.score_answer(answer=wrong, entry=task.entry(example)) < 1.0
    assert task.correctness(f"<answer>{wrong}</answer>", example) == 0.0
    assert task.extract_answer(f"<answer>{wrong}</answer>") == wrong


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(dataset="basic_arithmetc"), "did you mean: basic_arithmetic"),
        (dict(dataset_kwargs={"no_such_option": 1}), "no_such_option"),
        (dict(dataset_kwargs={"min_terms": 5, "max_terms": 2}), "rejects its options"),
    ],
)
def test_bad_dataset_options(task, overrides, message):
    with pytest.raises(TaskError, match=message):
        make_task(**overrides)


def test_config_builds_the_task(task):
    # composed as a run composes it (the YAML's defaults list names its typed schema)
    cfg = compose_train("task=reasoning_gym", "task.num_train=5", "task.num_test=5")
    built = build_task_from(cfg)
    assert isinstance(built, ReasoningGymTask) and built.dataset_name == cfg.task.dataset
