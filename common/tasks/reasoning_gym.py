"""Any dataset of reasoning-gym (https://github.com/open-thought/reasoning-gym) as a task.

reasoning-gym is an optional extra (`pip install reasoning-gym`): it is imported only when this
task is built. Its procedural generators cover arithmetic, algebra, logic, puzzles, games and
more; `reasoning_gym.factory.DATASETS` lists the names ("basic_arithmetic", "countdown",
"chain_sum", "word_sorting", ...), and each takes its own keyword options (`dataset_kwargs`).

Each entry is a dict with a question, an answer and metadata; the dataset's own `score_answer`
grades a response against the entry. Its score gives partial credit (e.g. 0.01 or a length ratio
for a wrong but well-formed answer); here it is made binary: correct means a score of 1.0.
"""

from __future__ import annotations

import difflib
from typing import Any

from common.tasks.base import Example, Task, TaskError, check_prompt_template, graded_text

INSTALL = "pip install reasoning-gym"
DEFAULT_PROMPT_TEMPLATE = "{question}\nPut your final answer in <answer></answer> tags."


class ReasoningGymTask(Task):
    """Questions drawn from one reasoning-gym dataset, graded by that dataset's `score_answer`.

    One dataset is drawn with `seed` and deduplicated on the question text; the first num_train
    distinct questions are the train split and the next num_test the test split, so the splits
    never share a question. The draw looks at most 2 * (num_train + num_test) + 100 entries and
    fails if the generator repeats itself more than that (a small problem space).

    The graded text is the last <answer>...</answer> pair's content if the response has one, else
    the whole response (as `base.graded_text`).

    Args:
        dataset: a name of `reasoning_gym.factory.DATASETS`.
        num_train, num_test: split sizes.
        seed: seed of the generator (independent of the training seed).
        dataset_kwargs: options of that dataset's config (for example {"min_terms": 2}); `size`
            and `seed` are set by this task.
        prompt_template: the user message, with "{question}" where the entry's question goes.
    """

    name = "reasoning_gym"

    def __init__(
        self,
        *,
        dataset: str,
        num_train: int,
        num_test: int,
        seed: int,
        dataset_kwargs: dict[str, Any] | None = None,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    ):
        if num_train < 1 or num_test < 1:
            raise TaskError(
                f"reasoning_gym: num_train and num_test must be at least 1, got {num_train}, {num_test}"
            )
        kwargs = dict(dataset_kwargs or {})
        for key in ("size", "seed"):
            if key in kwargs:
                raise TaskError(f"reasoning_gym: dataset_kwargs may not set {key!r}; it is set by the task")
        check_prompt_template(prompt_template, "question")
        self.prompt_template = prompt_template
        self.dataset_name = dataset

        n_needed = num_train + num_test
        self.dataset = _create_dataset(dataset, size=2 * n_needed + 100, seed=seed, **kwargs)
        # The Example holds only text; the entry (answer metadata for score_answer) is kept here.
        self._entries: dict[Example, dict[str, Any]] = {}
        examples = []
        questions = set()
        for index in range(len(self.dataset)):  # entries are generated on access, one by one
            entry = self.dataset[index]
            if entry["question"] in questions:
                continue
            questions.add(entry["question"])
            example = Example(
                prompt=prompt_template.format(question=entry["question"]),
                answer="" if entry.get("answer") is None else str(entry["answer"]),
            )
            self._entries[example] = entry
            examples.append(example)
            if len(examples) == n_needed:
                break
        if len(examples) < n_needed:
            raise TaskError(
                f"reasoning_gym: dataset {dataset!r} gave only {len(examples)} distinct questions in "
                f"{len(self.dataset)} draws, fewer than num_train + num_test = {n_needed}"
            )
        self._set_splits(examples[:num_train], examples[num_train:])

    def entry(self, example: Example) -> dict[str, Any]:
        """The reasoning-gym entry an example was made from (KeyError for a foreign example)."""
        return self._entries[example]

    def extract_answer(self, response: str) -> str | None:
        return graded_text(response)

    def correctness(self, response: str, example: Example) -> float:
        score = self.dataset.score_answer(answer=graded_text(response), entry=self.entry(example))
        return float(score is not None and score >= 1.0)


def _create_dataset(name: str, **kwargs: Any) -> Any:
    """`reasoning_gym.create_dataset(name, **kwargs)` with one-line TaskErrors."""
    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError as exc:
        raise TaskError(f"task reasoning_gym needs the reasoning-gym package; run: {INSTALL}") from exc
    if name not in DATASETS:
        close = difflib.get_close_matches(name, list(DATASETS), n=3)
        hint = f"; did you mean: {', '.join(close)}" if close else ""
        raise TaskError(
            f"reasoning_gym: unknown dataset {name!r}{hint} (all {len(DATASETS)} names are in "
            "reasoning_gym.factory.DATASETS)"
        )
    try:
        return reasoning_gym.create_dataset(name, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:  # unknown option or a failed validate()
        raise TaskError(f"reasoning_gym: dataset {name!r} rejects its options: {exc}") from exc
