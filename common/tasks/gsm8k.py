"""GSM8K grade-school math (Cobbe et al., arXiv:2110.14168), graded with math-verify.

Each GSM8K answer is a worked solution whose last line is "#### <number>"; the reference answer
kept here is that number with thousands commas removed ("#### 1,234" -> "1234").

Data comes from a local directory holding train.jsonl and test.jsonl (fields "question" and
"answer", the layout of the original release and of the hub dataset), or, when no path is given,
from the Hugging Face hub through the optional `datasets` package.
"""

from __future__ import annotations

from pathlib import Path

from common.tasks.base import (
    Example,
    Task,
    TaskError,
    check_prompt_template,
    math_extract,
    math_verify_equal,
)
from common.tasks.jsonl import read_jsonl

DEFAULT_PROMPT_TEMPLATE = (
    "{question}\nSolve the problem step by step, then put the final answer (just the number) "
    "in <answer></answer> tags."
)
_NO_HUB_HINT = "pass task.path=DIR, a directory with local train.jsonl and test.jsonl"


def gsm8k_reference(solution: str) -> str | None:
    """The final answer of a GSM8K worked solution: the text after the last "####", commas removed.

    >>> gsm8k_reference("She has 1,000 + 234 = <<1000+234=1234>>1,234 apples.\\n#### 1,234")
    '1234'
    """
    if "####" not in solution:
        return None
    answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
    return answer or None


class GSM8KTask(Task):
    """GSM8K word problems; a response is correct if math-verify finds its final answer equal to
    the reference (the last <answer>...</answer> pair's content if present, else the whole response).

    Args:
        path: directory with train.jsonl and test.jsonl. If None, load `hub_id` from the hub.
        hub_id, hub_config: the hub dataset, used only when path is None.
        num_train, num_test: keep the first n examples of each split (None = all of them).
        prompt_template: the user message, with "{question}" where the problem goes.
    """

    name = "gsm8k"

    def __init__(
        self,
        path: str | None = None,
        hub_id: str = "openai/gsm8k",
        hub_config: str = "main",
        num_train: int | None = None,
        num_test: int | None = None,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    ):
        for key, value in (("num_train", num_train), ("num_test", num_test)):
            if value is not None and value < 1:
                raise TaskError(f"gsm8k: {key} must be at least 1 or null (all), got {value}")
        check_prompt_template(prompt_template, "question")
        self.prompt_template = prompt_template
        if path is not None:
            root = Path(path).expanduser()
            train_rows = _read_split(root / "train.jsonl")
            test_rows = _read_split(root / "test.jsonl")
        else:
            train_rows, test_rows = _load_hub(hub_id, hub_config)
        train = [self._make_example(q, a) for q, a in train_rows[:num_train]]
        test = [self._make_example(q, a) for q, a in test_rows[:num_test]]
        self._set_splits(train, test)

    def _make_example(self, question: str, reference: str) -> Example:
        return Example(prompt=self.prompt_template.format(question=question), answer=reference)

    def correctness(self, response: str, example: Example) -> float:
        return float(math_verify_equal(response, example.answer))

    def extract_answer(self, response: str) -> str | None:
        return math_extract(response)[1]


def _read_split(path: Path) -> list[tuple[str, str]]:
    """(question, reference answer) pairs from a local GSM8K file."""
    rows = []
    for line_no, record in read_jsonl(path, ("question", "answer")):
        reference = gsm8k_reference(str(record["answer"]))
        if reference is None:
            raise TaskError(f"{path}:{line_no}: answer has no final '#### <number>' line")
        rows.append((str(record["question"]), reference))
    return rows


def _load_hub(hub_id: str, hub_config: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, test) rows from the Hugging Face hub; any failure says how to use local files instead."""
    try:
        import datasets
    except ImportError:
        raise TaskError(f"gsm8k: the 'datasets' package is not installed; {_NO_HUB_HINT}") from None
    try:
        data = datasets.load_dataset(hub_id, hub_config)
        splits = []
        for split in ("train", "test"):
            rows = []
            for i, row in enumerate(data[split]):
                reference = gsm8k_reference(row["answer"])
                if reference is None:
                    raise TaskError(f"{hub_id}[{split}][{i}]: answer has no final '#### <number>' line")
                rows.append((row["question"], reference))
            splits.append(rows)
    except TaskError:
        raise
    except Exception as exc:  # offline, unknown id, missing split: all end the same way for the user
        detail = " ".join(str(exc).split())[:300]
        raise TaskError(
            f"gsm8k: could not load {hub_id!r} ({hub_config}) from the Hugging Face hub "
            f"({type(exc).__name__}: {detail}); {_NO_HUB_HINT}"
        ) from exc
    return splits[0], splits[1]
