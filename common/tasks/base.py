"""What every task provides: examples, a verifier, a format check, and shared answer parsing.

A task is a prompt set plus a verifier. Prompts are plain user messages: the chat template and any
system prompt are applied by the rollout, so the same task works for chat and base models.

Answer conventions shared by the tasks:
    <answer>...</answer>   the final answer; when a response has several pairs, the LAST one counts
    numbers                "-12", "1,234", "3.5"; commas are thousands separators and are removed
"""

from __future__ import annotations

import abc
import functools
import math
import numbers
import re
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from typing import ClassVar

ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"

# Innermost pair: "<answer>a<answer>b</answer>" yields "b", not "a<answer>b".
_ANSWER_RE = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)

# A minus sign counts only when no digit precedes it, so "3-5" reads as 3 and 5, "x = -5" as -5.
# "1,234" is one number; "1,2345" is not grouped in thousands, so it reads as 1 and 2345.
_NUMBER_RE = re.compile(r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+(?![\d,])|\d+)(?:\.\d+)?")
_INTEGER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)")


@dataclass(frozen=True)
class Example:
    """One prompt and its reference answer.

    prompt: the user message, plain text; the chat template is applied by the rollout, not here.
    answer: the reference answer as text (for GSM8K, only the final number, not the worked solution).
    source: where it was read, "file:line" (JSONL input), for messages about it; None when generated.
        Not part of equality: the same prompt and answer are the same example wherever they stand.
    """

    prompt: str
    answer: str
    source: str | None = field(default=None, compare=False)


class TaskError(ValueError):
    """A task cannot be built from its inputs. The message is one line naming the problem
    (file and line number for JSONL input)."""


class Task(abc.ABC):
    """A prompt set with train/test splits and a verifier.

    Subclasses set `name`, fill `train` and `test` through `_set_splits`, and implement
    `correctness`. `has_format` and `extract_answer` have defaults based on the answer tags.
    `score_range` declares what `correctness` may return; a score outside it is a reward error
    (`checked_score`).
    """

    name: str
    train: list[Example]
    test: list[Example]
    # (low, high) of `correctness`: [0, 1] for every task here (0/1 accuracy, char_share's share)
    score_range: ClassVar[tuple[float, float]] = (0.0, 1.0)

    def _set_splits(self, train: list[Example], test: list[Example]) -> None:
        """Store the splits; an empty split is a configuration error, caught here at start-up."""
        if not train:
            raise TaskError(f"task {self.name!r}: no train examples")
        if not test:
            raise TaskError(f"task {self.name!r}: no test examples")
        self.train = list(train)
        self.test = list(test)

    @abc.abstractmethod
    def correctness(self, response: str, example: Example) -> float:
        """The task verifier: 1.0 if `response` answers `example` correctly, else 0.0
        (a task may return a value in [0, 1] for partial credit)."""

    def has_format(self, response: str) -> bool:
        """True if the response holds exactly one <answer>...</answer> pair with non-empty content."""
        return bool(single_answer_content(response))

    def extract_answer(self, response: str) -> str | None:
        """The part of the response that was graded, for sample logs (None if nothing was found)."""
        return answer_tag_content(response)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, train={len(self.train)}, test={len(self.test)})"


def checked_score(score: object, score_range: tuple[float, float]) -> float:
    """A verifier's score as a float, or ValueError naming what is wrong with it: it must be a real
    number (int, float, bool; a string "0.5" or None is an error, not a number), finite, and inside
    the task's declared `score_range` (374.17 from a 0/1 verifier is a bug, not a high reward).

    >>> checked_score(1, (0.0, 1.0))
    1.0
    """
    if not isinstance(score, numbers.Real):
        raise ValueError(f"verifier returned {score!r} of type {type(score).__name__}, not a number")
    value = float(score)
    low, high = score_range
    if not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"verifier returned {value}, outside the task's range [{low}, {high}]")
    return value


def answer_tag_content(response: str) -> str | None:
    """Content of the LAST <answer>...</answer> pair, stripped; None if there is no complete pair.

    >>> answer_tag_content("I think <answer>3</answer>, no: <answer> 4 </answer>")
    '4'
    """
    matches = _ANSWER_RE.findall(response)
    return matches[-1].strip() if matches else None


def single_answer_content(response: str) -> str | None:
    """The content of the only tag pair, or None if the tags are missing, repeated or out of order."""
    if response.count(ANSWER_OPEN) != 1 or response.count(ANSWER_CLOSE) != 1:
        return None
    if response.index(ANSWER_OPEN) > response.index(ANSWER_CLOSE):
        return None
    return answer_tag_content(response)


def check_prompt_template(template: str, field: str) -> None:
    """Fail at start-up if `template` is not a format string using exactly the `{field}` placeholder."""
    try:
        template.format(**{field: "x"})
    except (KeyError, IndexError, ValueError) as exc:
        raise TaskError(
            f"prompt_template {template!r} is not valid: only {{{field}}} may be used ({exc!r})"
        ) from exc
    if "{" + field + "}" not in template:
        raise TaskError(f"prompt_template {template!r} has no {{{field}}} placeholder")


def graded_text(response: str) -> str:
    """What a verifier reads: the last tag pair's content if there is one, else the whole response."""
    content = answer_tag_content(response)
    return content if content is not None else response.strip()


def last_number(text: str) -> str | None:
    """The last number in `text` with thousands commas removed ("... 1,234." -> "1234"), or None."""
    matches = _NUMBER_RE.findall(text)
    return matches[-1].replace(",", "") if matches else None


def parse_number(text: str) -> Fraction | None:
    """`text` as an exact number ("-3", "1,234", "2.50", "1/2"), or None if it is not one."""
    try:
        return Fraction(text.strip().replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def parse_integer(text: str) -> int | None:
    """`text` as an integer if it is written as one ("-7", "1,234"), else None ("7.5", "7 apples")."""
    text = text.strip()
    return int(text.replace(",", "")) if _INTEGER_RE.fullmatch(text) else None


# ---------------------------------------------------------------------------------------------------
# math-verify (https://github.com/huggingface/Math-Verify): symbolic equality of final answers.
#
# Two behaviours of math-verify 0.9 shape this code:
# 1) It extracts nothing from "<answer>42</answer>": the tags must be stripped first.
# 2) Its timeouts use signal.alarm, which raises in any thread but the main one. In the main thread
#    the timeout is kept (a pathological expression cannot hang training); in worker threads it is
#    disabled, which math-verify allows with parsing_timeout=None / timeout_seconds=None.
# ---------------------------------------------------------------------------------------------------

MATH_VERIFY_TIMEOUT_S = 5


def _math_verify_timeout() -> int | None:
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _math_parse(text: str, wrap_in_dollars: bool) -> list:
    """math-verify's parse; bare LaTeX ("\\sqrt{2}") is only found inside $...$, so retry wrapped."""
    from math_verify import parse

    parsed = parse(text, parsing_timeout=_math_verify_timeout())
    if not parsed and wrap_in_dollars:
        parsed = parse(f"${text}$", parsing_timeout=_math_verify_timeout())
    return parsed


@functools.lru_cache(maxsize=8192)
def _parse_reference(reference: str) -> tuple:
    # A dataset repeats each reference G times per step and every epoch: parse each one once.
    return tuple(_math_parse(reference, wrap_in_dollars=True))


def math_extract(response: str) -> tuple[list, str | None]:
    """math-verify's parse of the graded text and the string it extracted (None if nothing)."""
    content = answer_tag_content(response)
    if content is not None:
        parsed = _math_parse(content, wrap_in_dollars=True)
    else:
        parsed = _math_parse(response, wrap_in_dollars=False)
    extracted = next((p for p in parsed if isinstance(p, str)), None)
    return parsed, extracted


def math_verify_equal(response: str, reference: str) -> bool:
    """True if math-verify finds the response's final answer equal to `reference`.

    The graded text is the last <answer> pair's content when present, else the whole response
    (math-verify then takes the last answer-like expression, e.g. "... so the answer is 72" -> 72).
    Any parse or comparison failure counts as not equal.
    """
    from math_verify import verify
    from math_verify.errors import TimeoutException  # a BaseException, so named on its own below

    try:
        gold = _parse_reference(reference)
        pred, _ = math_extract(response)
        if not gold or not pred:
            return False
        return bool(verify(list(gold), pred, timeout_seconds=_math_verify_timeout()))
    except (Exception, TimeoutException):
        # math-verify can raise on odd input (sympy errors, timeouts): a failed parse is a wrong answer
        return False
