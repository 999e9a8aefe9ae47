"""Any prompt set stored as JSON Lines: one {"prompt": ..., "answer": ...} object per line.

    {"prompt": "What is the capital of France? Answer in <answer></answer> tags.", "answer": "Paris"}
    {"prompt": "Compute 12 * 7.", "answer": "84"}

Blank lines are skipped. Every problem in the file is reported as a TaskError naming the file and
the line, e.g. "data/q.jsonl:17: missing field 'answer'" or "data/q.jsonl:3: not valid UTF-8 ...".
A prompt that repeats an earlier line's is dropped (one warning says how many), and the held-out
split never shares a prompt with the training split. Each example keeps its "file:line" (`source`),
which later messages about it (e.g. a prompt too long for rollout.max_prompt_len) name.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

from common.tasks.base import (
    Example,
    Task,
    TaskError,
    graded_text,
    last_number,
    math_extract,
    math_verify_equal,
    parse_number,
)

ANSWER_TYPES = ("exact", "number", "math")

log = logging.getLogger("rl_lab")


def read_jsonl(path: str | Path, fields: tuple[str, ...]) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of `path`; each object must hold `fields`.

    Raises:
        TaskError: file not found, a line that is not a JSON object, or a missing field.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise TaskError(f"task file not found: {path}")
    records = []
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                byte = f"0x{raw[exc.start]:02x} at column {exc.start + 1}"
                raise TaskError(
                    f"{path}:{line_no}: not valid UTF-8 (byte {byte}); save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskError(f"{path}:{line_no}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(record, dict):
                raise TaskError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            for field in fields:
                if field not in record:
                    raise TaskError(f"{path}:{line_no}: missing field {field!r}")
            records.append((line_no, record))
    return records


def _text_field(path: Path, line_no: int, record: dict[str, Any], field: str) -> str:
    """A field as text: strings as they are, numbers written out ("answer": 42 -> "42")."""
    value = record[field]
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise TaskError(
        f"{path}:{line_no}: field {field!r} must be a string or a number, got {type(value).__name__}"
    )


class JsonlTask(Task):
    """Prompts and reference answers from JSONL files.

    Args:
        path: the training file (and the test set too, when test_path is None).
        test_path: a separate test file. If None, a seeded `test_fraction` of `path` becomes the test set.
        test_fraction: share of `path` held out for testing when there is no test_path (at least 1 line).
        seed: seed of that split.
        prompt_field, answer_field: keys of the prompt and the reference answer in each object.
        answer_type: how a response is graded against the reference. The graded text is the last
            <answer>...</answer> pair's content if present, else the whole response.
              exact   graded text == answer, after stripping whitespace
              number  the last number in the graded text equals the answer numerically
                      ("1,234" == "1234.0"); every answer must be a number
              math    math-verify's symbolic equality ("\\frac{1}{2}" == "0.5")
    """

    name = "jsonl"

    def __init__(
        self,
        path: str,
        test_path: str | None = None,
        test_fraction: float = 0.1,
        seed: int = 0,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        answer_type: str = "exact",
    ):
        if answer_type not in ANSWER_TYPES:
            raise TaskError(
                f"jsonl: unknown answer_type {answer_type!r}; expected one of {', '.join(ANSWER_TYPES)}"
            )
        self.answer_type = answer_type
        self.prompt_field = prompt_field
        self.answer_field = answer_field

        train = self._load(path)
        if test_path is not None:
            test = self._load(test_path)
            held_out = {ex.prompt for ex in test}
            shared = [ex for ex in train if ex.prompt in held_out]
            if len(shared) == len(train):
                raise TaskError(f"{path}: every prompt is also in {test_path}: nothing is left to train on")
            if shared:
                log.warning(
                    "%s: %d prompt(s) are also in %s (e.g. %s): left out of training",
                    path,
                    len(shared),
                    test_path,
                    shared[0].source,
                )
                train = [ex for ex in train if ex.prompt not in held_out]
        else:
            if not 0.0 < test_fraction < 1.0:
                raise TaskError(f"jsonl: test_fraction must be in (0, 1), got {test_fraction}")
            n_test = max(1, round(len(train) * test_fraction))
            if n_test >= len(train):
                raise TaskError(
                    f"{path}: {len(train)} example(s) are too few to hold out a test set; "
                    "add lines or pass test_path"
                )
            # a seeded choice of test lines; both splits keep the file's order
            test_ids = set(random.Random(seed).sample(range(len(train)), n_test))
            test = [ex for i, ex in enumerate(train) if i in test_ids]
            train = [ex for i, ex in enumerate(train) if i not in test_ids]
        self._set_splits(train, test)

    def _load(self, path: str) -> list[Example]:
        records = read_jsonl(path, (self.prompt_field, self.answer_field))
        if not records:
            raise TaskError(f"{path}: no examples (the file is empty)")
        examples: dict[str, Example] = {}  # by prompt: the first line of each
        duplicates = []
        for line_no, record in records:
            prompt = _text_field(Path(path), line_no, record, self.prompt_field)
            answer = _text_field(Path(path), line_no, record, self.answer_field).strip()
            if self.answer_type == "number" and parse_number(answer) is None:
                raise TaskError(f"{path}:{line_no}: answer {answer!r} is not a number (answer_type=number)")
            if prompt in examples:
                duplicates.append((line_no, examples[prompt]))
                continue
            examples[prompt] = Example(prompt=prompt, answer=answer, source=f"{path}:{line_no}")
        if duplicates:
            line_no, first = duplicates[0]
            log.warning(
                "%s: %d duplicate prompt(s) removed, the first line of each kept (e.g. line %d repeats %s)",
                path,
                len(duplicates),
                line_no,
                first.source,
            )
        return list(examples.values())

    def extract_answer(self, response: str) -> str | None:
        if self.answer_type == "exact":
            return graded_text(response)
        if self.answer_type == "number":
            return last_number(graded_text(response))
        return math_extract(response)[1]

    def correctness(self, response: str, example: Example) -> float:
        if self.answer_type == "math":
            return float(math_verify_equal(response, example.answer))
        graded = self.extract_answer(response)
        if graded is None:
            return 0.0
        if self.answer_type == "exact":
            return float(graded == example.answer.strip())
        value = parse_number(graded)
        return float(value is not None and value == parse_number(example.answer))
