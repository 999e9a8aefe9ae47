"""Countdown (as in TinyZero): reach a target with + - * / over given numbers, each used once.

A problem is a list of numbers and a target; a solution is an arithmetic expression that uses each
given number exactly once, as written (no concatenation such as 2, 5 -> 25, no other numbers, no
unary minus), with + - * / and parentheses, and evaluates exactly to the target:

    numbers 44, 19, 3   target 75   ->   "(44 - 19) * 3"

Problems are generated from a seed, so every one is solvable: numbers are drawn uniformly from
[min_number, max_number], a random expression tree is built over them and evaluated with exact
fractions, and the problem is kept if the value is an integer in [1, max_target]; that value is
the target. The Example's `answer` is this reference expression, so an example holds all a
verifier needs: the numbers are its integer literals and the target is its value.

Grading never calls eval(): the text is checked against a character whitelist, parsed with `ast`,
and every node must be a binary + - * / or an integer literal (anything else, such as names,
calls, powers, floats or unary minus, is rejected before any arithmetic is done). The value is
then computed with Fractions; division by zero scores 0. An optional trailing "= <target>"
("(44 - 19) * 3 = 75") is accepted; its right side must be the target itself.
"""

from __future__ import annotations

import ast
import functools
import random
import re
import warnings
from collections import Counter
from fractions import Fraction

from common.tasks.base import (
    Example,
    Task,
    TaskError,
    answer_tag_content,
    parse_integer,
    single_answer_content,
)

DEFAULT_PROMPT_TEMPLATE = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use +, -, *, / "
    "and parentheses, and each number must be used exactly once. Put the final expression in "
    "<answer></answer> tags, for example <answer>(1 + 2) / 3</answer>."
)

# Longer answers are rejected unread: no problem here needs more, and it bounds the parser's work.
MAX_EXPRESSION_CHARS = 256
_ALLOWED_CHARS_RE = re.compile(r"[\d\s+\-*/()]+")
# A fallback line (response without tags): only expression characters, an operator and a digit,
# optionally followed by "= N".
_EXPRESSION_LINE_RE = re.compile(r"(?=.*\d)(?=.*[+\-*/])[\d\s+\-*/()]+(=\s*\d+)?")
_MAX_DRAWS_WITHOUT_NEW = 20_000
_OPERATORS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


class ExpressionError(ValueError):
    """Text that is not an allowed countdown expression; the message says why."""


def parse_expression(text: str) -> ast.expr:
    """The syntax tree of `text` if it is an allowed expression, else ExpressionError.

    Allowed: integer literals written in decimal digits, binary + - * /, parentheses, spaces.
    Rejected before any evaluation: names and calls ("__import__('os')"), attributes, powers
    ("9**9**9"), floor division, unary signs ("-3"), floats, and text over MAX_EXPRESSION_CHARS.
    """
    text = text.strip()
    if not text:
        raise ExpressionError("empty expression")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    if not _ALLOWED_CHARS_RE.fullmatch(text):
        raise ExpressionError("only digits, + - * /, parentheses and spaces are allowed")
    try:
        with warnings.catch_warnings():  # "2 (3)" parses as a call, with a SyntaxWarning
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
        raise ExpressionError(f"not a valid expression ({type(exc).__name__})") from exc
    # The whitelist above already excludes most of this; the node check is what guarantees it.
    for node in ast.walk(tree.body):
        if isinstance(node, ast.BinOp):
            if type(node.op) not in _OPERATORS:
                raise ExpressionError(f"operator {type(node.op).__name__} is not allowed")
        elif isinstance(node, ast.Constant):
            if type(node.value) is not int:  # excludes floats, complex, strings and bools
                raise ExpressionError(f"literal {node.value!r} is not an integer")
        elif not isinstance(node, ast.operator):
            raise ExpressionError(f"{type(node).__name__} is not allowed")
    return tree.body


def expression_numbers(tree: ast.expr) -> list[int]:
    """The integer literals of a parsed expression, in reading order."""
    literals = [n for n in ast.walk(tree) if isinstance(n, ast.Constant)]
    return [n.value for n in sorted(literals, key=lambda n: (n.lineno, n.col_offset))]


def evaluate_expression(tree: ast.expr) -> Fraction:
    """Exact value of a tree from `parse_expression`; raises ZeroDivisionError on division by 0."""
    if isinstance(tree, ast.Constant):
        return Fraction(tree.value)
    left, right = evaluate_expression(tree.left), evaluate_expression(tree.right)
    op = type(tree.op)
    if op is ast.Add:
        return left + right
    if op is ast.Sub:
        return left - right
    if op is ast.Mult:
        return left * right
    return left / right


def check_solution(text: str, numbers: list[int], target: int) -> bool:
    """True if `text` is an allowed expression using exactly `numbers` (as a multiset) whose value
    is `target`; an optional trailing "= target" is accepted.

    The multiset is checked before evaluating, so the number of literals, and with it the size of
    every intermediate value, is bounded by the problem itself.

    >>> check_solution("(44 - 19) * 3", [3, 19, 44], 75), check_solution("44 - 19 + 3 * 3", [3, 19, 44], 75)
    (True, False)
    """
    expression, equals, rhs = text.partition("=")
    if equals and parse_integer(rhs) != target:
        return False
    try:
        tree = parse_expression(expression)
    except ExpressionError:
        return False
    if Counter(expression_numbers(tree)) != Counter(numbers):
        return False
    try:
        return evaluate_expression(tree) == target
    except ZeroDivisionError:
        return False


@functools.lru_cache(maxsize=8192)
def reference_problem(reference: str) -> tuple[tuple[int, ...], int]:
    """(numbers, target) of a reference expression: its literals and its value."""
    tree = parse_expression(reference)
    value = evaluate_expression(tree)
    if value.denominator != 1:
        raise TaskError(f"countdown: reference {reference!r} has the non-integer value {value}")
    return tuple(expression_numbers(tree)), int(value)


def last_expression_line(response: str) -> str | None:
    """The last line of `response` made only of expression characters (with an operator and a
    digit, optionally ending in "= N"), stripped; None if there is none."""
    for line in reversed(response.splitlines()):
        if _EXPRESSION_LINE_RE.fullmatch(line.strip()):
            return line.strip()
    return None


def random_expression(rng: random.Random, numbers: list[int]) -> tuple[str, Fraction] | None:
    """A random expression tree over `numbers` in the given order: (text, exact value), or None
    when it divides by zero.

    The list is split at a random point, each side becomes a subtree, and a random operator joins
    them; compound subtrees are parenthesised, so the text reads the way the tree evaluates.
    """
    if len(numbers) == 1:
        return str(numbers[0]), Fraction(numbers[0])
    split = rng.randint(1, len(numbers) - 1)
    left = random_expression(rng, numbers[:split])
    right = random_expression(rng, numbers[split:])
    if left is None or right is None:
        return None
    (left_text, left_value), (right_text, right_value) = left, right
    op = rng.choice("+-*/")
    if op == "/" and right_value == 0:
        return None
    value = {
        "+": lambda: left_value + right_value,
        "-": lambda: left_value - right_value,
        "*": lambda: left_value * right_value,
        "/": lambda: left_value / right_value,
    }[op]()
    if split > 1:
        left_text = f"({left_text})"
    if len(numbers) - split > 1:
        right_text = f"({right_text})"
    return f"{left_text} {op} {right_text}", value


class CountdownTask(Task):
    """Countdown problems generated from a seed (see the module docstring).

    Train and test never share a problem: problems are deduplicated on (sorted numbers, target)
    before the split, so the same numbers in another order with the same target count as one.
    The generator draws until it has num_train + num_test distinct problems (train first, then
    test) and fails if the number range is too small to give that many.

    Args:
        num_train, num_test: split sizes.
        seed: seed of the problem generator (independent of the training seed).
        num_numbers: numbers per problem, at least 2.
        min_number, max_number: inclusive range of the numbers (at least 1).
        max_target: largest target; targets are integers in [1, max_target].
        prompt_template: the user message, with "{numbers}" ("44, 19, 3") and "{target}".
        strict: grade only the content of the last <answer> pair. Default False: without tags,
            fall back to the last line that is an expression (see `last_expression_line`).
    """

    name = "countdown"

    def __init__(
        self,
        *,
        num_train: int,
        num_test: int,
        seed: int,
        num_numbers: int = 3,
        min_number: int = 1,
        max_number: int = 99,
        max_target: int = 100,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        strict: bool = False,
    ):
        if num_numbers < 2:
            raise TaskError(f"countdown: num_numbers must be at least 2, got {num_numbers}")
        if not 1 <= min_number <= max_number:
            raise TaskError(
                f"countdown: need 1 <= min_number <= max_number, got {min_number} and {max_number}"
            )
        if max_target < 1:
            raise TaskError(f"countdown: max_target must be at least 1, got {max_target}")
        if num_train < 1 or num_test < 1:
            raise TaskError(
                f"countdown: num_train and num_test must be at least 1, got {num_train}, {num_test}"
            )
        _check_template(prompt_template)
        self.prompt_template = prompt_template
        self.strict = strict

        rng = random.Random(seed)
        n_needed = num_train + num_test
        seen: set[tuple[tuple[int, ...], int]] = set()
        examples = []
        draws_since_new = 0  # a long run of rejected draws means the problem space is used up
        while len(examples) < n_needed and draws_since_new < _MAX_DRAWS_WITHOUT_NEW:
            draws_since_new += 1
            numbers = [rng.randint(min_number, max_number) for _ in range(num_numbers)]
            order = rng.sample(numbers, len(numbers))  # the tree's order, hidden from the prompt
            drawn = random_expression(rng, order)
            if drawn is None:
                continue
            expression, value = drawn
            if value.denominator != 1 or not 1 <= value <= max_target:
                continue
            key = (tuple(sorted(numbers)), int(value))
            if key in seen:
                continue
            seen.add(key)
            draws_since_new = 0
            examples.append(self._make_example(numbers, int(value), expression))
        if len(examples) < n_needed:
            raise TaskError(
                f"countdown: found only {len(examples)} distinct problems (no new one in "
                f"{_MAX_DRAWS_WITHOUT_NEW} draws), fewer than num_train + num_test = {n_needed}; "
                "widen [min_number, max_number] or raise max_target"
            )
        self._set_splits(examples[:num_train], examples[num_train:])

    def _make_example(self, numbers: list[int], target: int, expression: str) -> Example:
        prompt = self.prompt_template.format(numbers=", ".join(map(str, numbers)), target=target)
        return Example(prompt=prompt, answer=expression)

    def extract_answer(self, response: str) -> str | None:
        """The graded text: the last tag pair's content, or, without tags and not strict, the
        last expression line of the response."""
        content = answer_tag_content(response)
        if content is not None or self.strict:
            return content
        return last_expression_line(response)

    def correctness(self, response: str, example: Example) -> float:
        numbers, target = reference_problem(example.answer)
        graded = self.extract_answer(response)
        return float(graded is not None and check_solution(graded, list(numbers), target))

    def has_format(self, response: str) -> bool:
        """Exactly one <answer>...</answer> pair, holding an allowed expression (any numbers)."""
        content = single_answer_content(response)
        if content is None:
            return False
        expression, equals, rhs = content.partition("=")
        if equals and parse_integer(rhs) is None:
            return False
        try:
            parse_expression(expression)
        except ExpressionError:
            return False
        return True


def _check_template(template: str) -> None:
    """Fail at start-up unless `template` uses exactly the {numbers} and {target} placeholders."""
    try:
        template.format(numbers="x", target="y")
    except (KeyError, IndexError, ValueError) as exc:
        raise TaskError(
            f"prompt_template {template!r} is not valid: only {{numbers}} and {{target}} may be used "
            f"({exc!r})"
        ) from exc
    for field in ("numbers", "target"):
        if "{" + field + "}" not in template:
            raise TaskError(f"prompt_template {template!r} has no {{{field}}} placeholder")
