"""Rewards: each response graded against its own example by the task's verifier, the terms composed,
and the shaping terms that depend on token counts. Equation numbers follow the DAPO paper
(arXiv:2503.14476).

    total_i = correct_i + format_weight * format_i          (score_responses)

Shaping that depends on token counts (DAPO's overlong penalty, Eq. 13, `overlong_penalty`) is not
part of this sum: it is a pure function of lengths, applied by the algorithm (dapo/). This module
holds no model and no tensors other than its results.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from common.tasks.base import Example, Task, checked_score

# characters of a prompt or response quoted in a reward error message
EXCERPT_CHARS = 60


class RewardError(RuntimeError):
    """A verifier raised while grading one sample and the caller asked to stop (fail_fast=True)."""


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """`text` quoted on one line (repr escapes newlines), cut to `limit` characters with "..."."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


@dataclass
class RewardResult:
    """Reward terms per response, each kept on its own.

    Every term is logged separately (reward/correct, reward/format, reward/total), because a
    rising total alone cannot tell a policy that learns to solve the task from one that only learns
    to write the tags; and algorithms need the terms apart: DAPO's dynamic sampling filters groups
    on accuracy (`correct`), not on the shaped total.

    Attributes:
        correct: (N,) float32, the task verifier's score (0/1, or in [0, 1] for partial credit).
        format: (N,) float32, 1.0 where `task.has_format(response)`, else 0.0.
        total: (N,) float32, correct + format_weight * format.
        errors: number of samples whose grading raised (they score 0 on every term).
        error_messages: one "i: ExceptionType: message (prompt '...', response '...')" line per
            such sample, the texts cut to EXCERPT_CHARS characters.
        extracted: per sample, the text that was graded (`task.extract_answer`), for sample logs.
    """

    correct: torch.Tensor
    format: torch.Tensor
    total: torch.Tensor
    errors: int = 0
    error_messages: list[str] = field(default_factory=list)
    extracted: list[str | None] = field(default_factory=list)


def score_responses(
    task: Task,
    responses: list[str],
    examples: list[Example],
    *,
    format_weight: float,
    fail_fast: bool = False,
) -> RewardResult:
    """Grade responses[i] against examples[i] and compose the reward terms.

        correct_i = task.correctness(responses[i], examples[i])
        format_i  = 1.0 if task.has_format(responses[i]) else 0.0
        total_i   = correct_i + format_weight * format_i

    The caller expands prompts in group order ([q1]*G + [q2]*G + ...), so examples has one entry
    per response, not one per prompt. A verifier that raises, or returns anything but a finite
    number inside the task's `score_range` (common.tasks.base.checked_score), on one sample costs
    only that sample: it scores 0 on every term, is counted in `errors` and
    described in `error_messages`, and grading goes on. With fail_fast=True the first such
    failure is raised instead, as a RewardError naming the sample index.

    Example (addition, format_weight=0.1):
        responses = ["<answer>5</answer>", "it is 5", "<answer>4</answer>"], answer "5" for all
        correct = [1, 1, 0], format = [1, 0, 1], total = [1.1, 1.0, 0.1]

    Returns:
        RewardResult with (N,) float32 tensors, N = len(responses).
    """
    if len(responses) != len(examples):
        raise ValueError(f"{len(responses)=} != {len(examples)=}: pass one example per response")
    n = len(responses)
    correct = [0.0] * n
    formatted = [0.0] * n
    extracted: list[str | None] = [None] * n
    error_messages = []
    for i, (response, example) in enumerate(zip(responses, examples, strict=True)):
        try:
            score = checked_score(task.correctness(response, example), task.score_range)
            has_format = bool(task.has_format(response))
            answer = task.extract_answer(response)
        except Exception as exc:
            detail = " ".join(str(exc).split())  # one line, whatever the exception printed
            message = (
                f"{i}: {type(exc).__name__}: {detail} "
                f"(prompt {excerpt(example.prompt)}, response {excerpt(response)})"
            )
            if fail_fast:
                raise RewardError(f"grading sample {message}") from exc
            error_messages.append(message)
            continue
        # assigned only once every call succeeded, so a failing sample keeps 0 on every term
        correct[i], formatted[i], extracted[i] = score, float(has_format), answer

    correct_t = torch.tensor(correct, dtype=torch.float32)  # (N,)
    format_t = torch.tensor(formatted, dtype=torch.float32)  # (N,)
    return RewardResult(
        correct=correct_t,
        format=format_t,
        total=correct_t + format_weight * format_t,
        errors=len(error_messages),
        error_messages=error_messages,
        extracted=extracted,
    )


def overlong_penalty(lengths: Tensor, max_len: int, buffer_len: int, factor: float = 1.0) -> Tensor:
    """Soft overlong punishment, added to the task reward (DAPO Eq. 13).

        R_length(L) = 0                                        if L <= max_len - buffer_len
                    = ((max_len - buffer_len) - L) / buffer_len * factor   if inside the buffer
                    = -factor                                  if L > max_len

    max_len is L_max and buffer_len is L_cache in the paper; factor scales the penalty (1 in the
    paper). The penalty falls linearly from 0 to -factor across the last buffer_len tokens and stays
    at -factor past max_len. A response cut off by the generation limit gets the full penalty
    only if max_len is below that limit.

    Example (max_len 20, buffer_len 4, so the buffer starts after 16 tokens):
        lengths = [10, 16, 18,              20,             25]
        penalty = [ 0,  0, (16 - 18) / 4, (16 - 20) / 4,    -1] = [0, 0, -0.5, -1, -1]

    Args:
        lengths: (N,) response lengths in tokens.
        max_len: L_max.
        buffer_len: L_cache, 0 < buffer_len <= max_len.
        factor: penalty scale.

    Returns:
        (N,) float32 penalty, <= 0.
    """
    if buffer_len <= 0 or buffer_len > max_len:
        raise ValueError(f"need 0 < buffer_len <= max_len, got buffer_len={buffer_len}, max_len={max_len}")
    lengths = torch.as_tensor(lengths, dtype=torch.float32)
    expected_len = max_len - buffer_len
    in_buffer = (expected_len - lengths) / buffer_len * factor
    penalty = torch.where(lengths <= expected_len, torch.zeros_like(lengths), in_buffer)
    return torch.where(lengths > max_len, torch.full_like(lengths, -factor), penalty)
