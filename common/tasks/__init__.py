"""Prompt sets and their verifiers, built by name: `build_task("addition", min_operand=0, ...)`.

addition    seeded integer addition, the default task (common/tasks/addition.py)
jsonl       any {"prompt", "answer"} JSON Lines file (common/tasks/jsonl.py)
gsm8k       grade-school math, graded with math-verify (common/tasks/gsm8k.py)
char_share  toy reward for tests and smoke runs with a random model (common/tasks/char_share.py)
countdown   reach a target from given numbers with + - * / (common/tasks/countdown.py)
reasoning_gym  any reasoning-gym dataset, an optional extra (common/tasks/reasoning_gym.py)
"""

from __future__ import annotations

import dataclasses
import inspect
import typing

from common.tasks.addition import AdditionTask
from common.tasks.base import Example, Task, TaskError, answer_tag_content
from common.tasks.char_share import CharShareTask
from common.tasks.countdown import CountdownTask
from common.tasks.gsm8k import GSM8KTask
from common.tasks.jsonl import JsonlTask
from common.tasks.reasoning_gym import ReasoningGymTask

TASKS: dict[str, type[Task]] = {
    "addition": AdditionTask,
    "jsonl": JsonlTask,
    "gsm8k": GSM8KTask,
    "char_share": CharShareTask,
    "countdown": CountdownTask,
    "reasoning_gym": ReasoningGymTask,
}

__all__ = [
    "TASKS",
    "AdditionTask",
    "CharShareTask",
    "CountdownTask",
    "Example",
    "GSM8KTask",
    "JsonlTask",
    "ReasoningGymTask",
    "Task",
    "TaskError",
    "answer_tag_content",
    "build_task",
    "task_schema",
]


def _options(cls: type[Task]) -> dict[str, inspect.Parameter]:
    """The task's constructor arguments (its config keys besides `name`)."""
    return {
        p.name: p
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def task_schema(name: str) -> type:
    """The structured-config schema of task `name` (configs/task/<name>.yaml): `name` and the
    constructor's arguments, typed as annotated there, so a value of the wrong type fails while
    the config is composed. An argument with a default keeps it; the others must be set.

    Example: task_schema("char_share") has the fields name: str, target_chars: str = "aeiou",
    num_train: int = 64, num_test: int = 16, seed: int = 0.
    """
    cls = TASKS[name]
    hints = typing.get_type_hints(cls.__init__)
    params = sorted(_options(cls).values(), key=lambda p: p.default is not p.empty)  # required first
    fields = [("name", str)] + [
        (p.name, hints[p.name])
        if p.default is p.empty
        else (p.name, hints[p.name], dataclasses.field(default=p.default))
        for p in params
    ]
    return dataclasses.make_dataclass(f"{cls.__name__}Config", fields)


def build_task(name: str, **kwargs) -> Task:
    """Build the task registered as `name` with its keyword arguments (the task config minus its name).

    Raises:
        TaskError: an unknown task name (the message lists the options), an unknown or missing
            argument (the message names it), invalid values, or an empty train or test split.
    """
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; expected one of: {', '.join(TASKS)}")
    cls = TASKS[name]
    params = _options(cls)
    for key in kwargs:
        if key not in params:
            raise TaskError(f"task {name!r}: unknown option {key!r}; expected one of: {', '.join(params)}")
    for key, p in params.items():
        if p.default is p.empty and key not in kwargs:
            raise TaskError(f"task {name!r}: missing option {key!r}")
    task = cls(**kwargs)
    if not task.train or not task.test:
        raise TaskError(
            f"task {name!r}: empty dataset ({len(task.train)} train, {len(task.test)} test examples)"
        )
    return task
