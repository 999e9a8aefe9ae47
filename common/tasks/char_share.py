"""A toy task for tests and smoke runs with a randomly initialised model; not a benchmark.

The reward is the share of target characters in the response, a continuous value in [0, 1] that
even a random policy earns in part, so rewards differ within a group from the first step and every
algorithm gets a learning signal within a few steps. Nothing here needs a dataset or a tokenizer.
"""

from __future__ import annotations

import random

from common.tasks.base import Example, Task, TaskError

PROMPTS = (
    "Say something.",
    "Say anything.",
    "Write something.",
    "Write a few words.",
    "Tell me something.",
    "Type some text.",
    "Reply with a word.",
    "Say a word.",
)


class CharShareTask(Task):
    """Reward = fraction of the response's non-whitespace characters that are in `target_chars`.

        correctness("banana", target_chars="aeiou") = 3 / 6 = 0.5
        correctness("  ", ...) = 0.0   (no characters to count)

    Prompts are short fixed instructions chosen with `seed`; train and test may repeat them, since
    the reward does not depend on the prompt. `has_format` is always False: there is no format.
    `Example.answer` holds `target_chars`, for sample logs.

    Args:
        target_chars: the characters that earn reward (case-sensitive).
        num_train, num_test: split sizes.
        seed: seed of the prompt choice.
    """

    name = "char_share"

    def __init__(self, target_chars: str = "aeiou", num_train: int = 64, num_test: int = 16, seed: int = 0):
        if not target_chars or not target_chars.strip():
            raise TaskError("char_share: target_chars must hold at least one non-whitespace character")
        if num_train < 1 or num_test < 1:
            raise TaskError(
                f"char_share: num_train and num_test must be at least 1, got {num_train}, {num_test}"
            )
        self.target_chars = frozenset(target_chars)
        rng = random.Random(seed)
        examples = [
            Example(prompt=rng.choice(PROMPTS), answer=target_chars) for _ in range(num_train + num_test)
        ]
        self._set_splits(examples[:num_train], examples[num_train:])

    def correctness(self, response: str, example: Example) -> float:
        chars = [c for c in response if not c.isspace()]
        if not chars:
            return 0.0
        return sum(c in self.target_chars for c in chars) / len(chars)

    def has_format(self, response: str) -> bool:
        return False

    def extract_answer(self, response: str) -> str | None:
        return response.strip() or None
