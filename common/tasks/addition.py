"""Integer addition: the default task, generated from a seed, with no files to download.

Grading reads the last <answer>...</answer> pair if the response has one, and otherwise falls back
to the LAST number in the response. The fallback matters in practice: the pretrained
SmolLM2-135M-Instruct almost never writes the tags on its own, so without it a run starts with
(almost) zero reward and no learning signal. `strict=True` turns the fallback off, for studying
how a policy learns the format; the format term (`has_format`, weighted by the reward's
`format_weight`) rewards the tags in either mode.
"""

from __future__ import annotations

import random

from common.tasks.base import (
    Example,
    Task,
    TaskError,
    answer_tag_content,
    check_prompt_template,
    last_number,
    parse_integer,
    parse_number,
    single_answer_content,
)

DEFAULT_PROMPT_TEMPLATE = "What is {question}? Put the final answer in <answer></answer> tags."


class AdditionTask(Task):
    """Problems "a + b" (or "a + b + c", ...) with operands drawn uniformly from
    [min_operand, max_operand].

    Train and test never share a problem: the num_train + num_test operand tuples are drawn
    WITHOUT replacement from all (max - min + 1) ** num_operands ordered tuples, so "3 + 5" and
    "5 + 3" are distinct problems. The draw depends only on `seed`. Python's random.sample draws one
    problem after the other, so a larger num_test appends held-out problems and keeps the training
    split and the earlier held-out ones, as long as sample() picks the same algorithm for both sizes
    (it does for operands 5..40 with 300 + 100 and 300 + 400: tests/test_heldout.py).

    Args:
        min_operand, max_operand: inclusive operand range (negative operands are shown in
            parentheses: "7 + (-3)").
        num_train, num_test: split sizes.
        seed: seed of the problem generator (independent of the training seed).
        num_operands: terms per problem, at least 2.
        prompt_template: the user message, with "{question}" where "a + b" goes.
        strict: grade only the content of the last <answer> pair, which must be an integer;
            without tags the answer is wrong. Default False: fall back to the last number.
    """

    name = "addition"

    def __init__(
        self,
        *,
        min_operand: int,
        max_operand: int,
        num_train: int,
        num_test: int,
        seed: int,
        num_operands: int = 2,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        strict: bool = False,
    ):
        if min_operand > max_operand:
            raise TaskError(
                f"addition: min_operand ({min_operand}) is larger than max_operand ({max_operand})"
            )
        if num_operands < 2:
            raise TaskError(f"addition: num_operands must be at least 2, got {num_operands}")
        if num_train < 1 or num_test < 1:
            raise TaskError(
                f"addition: num_train and num_test must be at least 1, got {num_train}, {num_test}"
            )
        check_prompt_template(prompt_template, "question")
        self.strict = strict
        self.prompt_template = prompt_template

        n_values = max_operand - min_operand + 1
        n_problems = n_values**num_operands
        n_needed = num_train + num_test
        if n_needed > n_problems:
            raise TaskError(
                f"addition: operands in [{min_operand}, {max_operand}] give only {n_problems} distinct "
                f"{num_operands}-term problems, fewer than num_train + num_test = {n_needed}"
            )
        # Sampling indices without replacement dedupes by construction; random.sample on a range
        # never materialises it, so huge operand ranges cost nothing.
        indices = random.Random(seed).sample(range(n_problems), n_needed)
        problems = [_index_to_operands(i, n_values, num_operands, min_operand) for i in indices]
        examples = [self._make_example(ops) for ops in problems]
        self._set_splits(examples[:num_train], examples[num_train:])

    def _make_example(self, operands: tuple[int, ...]) -> Example:
        question = " + ".join(str(x) if x >= 0 else f"({x})" for x in operands)
        return Example(prompt=self.prompt_template.format(question=question), answer=str(sum(operands)))

    def extract_answer(self, response: str) -> str | None:
        """The text graded as the answer: the last tag pair's content (its last number unless
        strict), or, without tags and not strict, the last number in the response."""
        content = answer_tag_content(response)
        if self.strict:
            return content
        return last_number(content if content is not None else response)

    def correctness(self, response: str, example: Example) -> float:
        graded = self.extract_answer(response)
        if graded is None:
            return 0.0
        if self.strict:
            value = parse_integer(graded)
        else:
            # "42.0" counts as 42; "42.5" is not an integer and is wrong
            number = parse_number(graded)
            value = int(number) if number is not None and number.denominator == 1 else None
        return float(value is not None and value == int(example.answer))

    def has_format(self, response: str) -> bool:
        """Exactly one <answer>...</answer> pair, holding just an integer."""
        content = single_answer_content(response)
        return content is not None and parse_integer(content) is not None


def _index_to_operands(index: int, n_values: int, num_operands: int, min_operand: int) -> tuple[int, ...]:
    """Decode an index in [0, n_values ** num_operands) into an operand tuple (base-n_values digits)."""
    operands = []
    for _ in range(num_operands):
        index, digit = divmod(index, n_values)
        operands.append(min_operand + digit)
    return tuple(operands)
