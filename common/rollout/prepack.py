"""Prepacked linears: during a rollout on CPU the float32 nn.Linear layers run through oneDNN on
weights reordered once per rollout (`prepacked_linears`), where and when that pays (`PrepackPolicy`).

The reorder and the packed product are private torch ops (torch.ops.mkldnn._reorder_linear_weight,
_linear_pointwise): `PREPACKING` checks once per process that they exist and compute x W^T + b; if
not, plain linears run, with one warning. Whether prepacking pays depends on the CPU: it took the
LM head on 4 rows from 26 to 9 ms on machine A, and bought nothing on an AVX-512 Xeon without AMX
(146 vs 135 tokens/s) while costing a reorder per rollout. So rollout.prepack_linears=auto times
both for the shapes of the run's first rollout (as inductor's autotuning picks a kernel), logs the
decision and keeps it for the whole run: a checkpoint carries it (`PrepackPolicy.state_dict`), so a
resumed run takes the same kernels as the run it continues, and timings never make two rollouts of
one run differ. always / never force it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from common.fences import Fence
from common.timing import best_seconds

log = logging.getLogger("rl_lab")

PREPACK_MODES = ("auto", "always", "never")
# the private oneDNN ops the trick needs (torch.ops.mkldnn.<name>)
REORDER_OP, LINEAR_OP = "_reorder_linear_weight", "_linear_pointwise"


def mkldnn_op(name: str) -> Callable[..., Tensor]:
    """torch.ops.mkldnn.<name>; AttributeError when this torch has no such op."""
    return getattr(torch.ops.mkldnn, name)


def reorder_weight(weight: Tensor, rows: int) -> Tensor:
    """`weight` (out, in) in oneDNN's blocked layout for products with `rows`-row inputs."""
    return mkldnn_op(REORDER_OP)(weight, rows)


def packed_linear(weight: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    """x W^T + b with W from `reorder_weight`: (rows, in) -> (rows, out)."""
    return mkldnn_op(LINEAR_OP)(x, weight, bias, "none", [], "")


def probe_prepacking() -> str | None:
    """None when the oneDNN ops exist and compute x W^T + b on a small case, else why not."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN"
    g = torch.Generator().manual_seed(0)  # not the global generator: sampling must not shift
    weight, bias, x = (
        torch.randn(8, 16, generator=g),
        torch.randn(8, generator=g),
        torch.randn(2, 16, generator=g),
    )
    try:
        y = packed_linear(reorder_weight(weight, 2), bias, x)
    except (AttributeError, RuntimeError, TypeError) as err:
        return f"torch.ops.mkldnn.{REORDER_OP} / {LINEAR_OP} failed ({type(err).__name__}: {err})"
    if not torch.allclose(y, torch.nn.functional.linear(x, weight, bias), atol=1e-4):
        return f"torch.ops.mkldnn.{LINEAR_OP} no longer computes x W^T + b"
    return None


PREPACKING = Fence("rollout.prepack_linears", probe_prepacking, "plain linears run")


def cpu_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The float32 nn.Linear layers of `model` on the CPU: the ones prepacking applies to."""
    return [
        m
        for m in model.modules()
        if type(m) is torch.nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
    ]


@contextlib.contextmanager
def prepacked_linears(model: torch.nn.Module, rows: int) -> Iterator[None]:
    """Inside the block, on CPU, every float32 nn.Linear of `model` runs through oneDNN with its
    weight reordered once into oneDNN's blocked layout for `rows`-row inputs (the weight prepacking
    that torch.compile's inductor applies to CPU linears when it freezes weights). Inference only.

    A decode step multiplies a few rows by every weight matrix: the plain `F.linear` can run such
    small-M products at a fraction of the machine's rate (SmolLM2-135M's LM head on 4 rows: 26 ms,
    prepacked 9 ms; a 576 x 1536 projection: 394 us vs 152 us; machine A, 2 CPU threads). The
    products stay float32 (summation order aside), so sampling draws from the same distribution.
    The reordered copies (one more copy of the weights) are freed when the block ends; the weights
    change after each update, so they are made per rollout. A no-op without such linears, or where
    the oneDNN ops are unusable (`PREPACKING`).
    """
    linears = cpu_linears(model)
    if not (linears and PREPACKING.available()):
        yield
        return
    try:
        for m in linears:
            bias = m.bias.detach() if m.bias is not None else None
            m.forward = functools.partial(packed_linear, reorder_weight(m.weight.detach(), rows), bias)
        yield
    finally:
        for m in linears:
            m.__dict__.pop("forward", None)


@dataclass(frozen=True)
class LinearTimes:
    """Seconds of one pass of a `rows`-row input through every linear of a model, plain and prepacked,
    and of reordering every weight once (`time_linears`)."""

    plain_s: float
    packed_s: float
    reorder_s: float


def prepack_pays(times: LinearTimes, steps: int) -> bool:
    """Prepacking pays when a rollout's decode steps save more than the reorder costs:

        steps x (plain_s - packed_s) > reorder_s

    Example: plain 30 ms, packed 20 ms, reorder 50 ms: pays over 6 steps (60 ms > 50 ms), not 5.
    """
    return steps * (times.plain_s - times.packed_s) > times.reorder_s


def time_linears(linears: list[torch.nn.Linear], rows: int, repeats: int = 3) -> LinearTimes:
    """Time each distinct weight shape of `linears` once on a (rows, in) input (`time_linear`); totals
    weigh each shape by how many linears have it (a model's layers repeat a handful of shapes)."""
    shapes: dict[tuple[int, ...], list[torch.nn.Linear]] = {}
    for m in linears:
        shapes.setdefault((*m.weight.shape, m.bias is not None), []).append(m)
    totals = [0.0, 0.0, 0.0]
    for same in shapes.values():
        times = time_linear(same[0], rows, repeats)
        totals = [total + len(same) * t for total, t in zip(totals, times, strict=True)]
    return LinearTimes(*totals)


def time_linear(linear: torch.nn.Linear, rows: int, repeats: int) -> tuple[float, float, float]:
    """Seconds of `linear` on a (rows, in) input, plain F.linear and prepacked (best of `repeats`),
    and of one reorder of its weight."""
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    x = torch.ones(rows, weight.shape[1])  # (rows, in)
    with torch.inference_mode():
        packed_weight = reorder_weight(weight, rows)
        plain = best_seconds(lambda: torch.nn.functional.linear(x, weight, bias), repeats)
        packed = best_seconds(lambda: packed_linear(packed_weight, bias, x), repeats)
        reorder = best_seconds(lambda: reorder_weight(weight, rows), 1)
    return plain, packed, reorder


class PrepackPolicy:
    """Whether a rollout runs prepacked linears (rollout.prepack_linears): never, always (where the
    ops work), or auto: measured once, at the run's first rollout, with `measure` (default
    time_linears), then kept (`decision`, with its `times`) for every later rollout of the run and
    in its checkpoints."""

    def __init__(self, mode: str = "auto", measure: Callable[..., LinearTimes] | None = None) -> None:
        if mode not in PREPACK_MODES:
            raise ValueError(f"prepack_linears must be one of {', '.join(PREPACK_MODES)} (got {mode!r})")
        self.mode, self.measure = mode, measure
        self.decision: bool | None = None
        self.times: LinearTimes | None = None
        self.rows = self.steps = 0  # the rollout the decision was measured on

    def use(self, model: torch.nn.Module, rows: int, steps: int) -> bool:
        """Prepack the linears of `model` for a rollout of `rows` rows and up to `steps` decode steps?"""
        if self.mode == "never":
            return False
        linears = cpu_linears(model)
        if not (linears and PREPACKING.available()):
            return False
        if self.mode == "always":
            return True
        if self.decision is None:
            self.times = (self.measure or time_linears)(linears, rows)
            self.decision, self.rows, self.steps = prepack_pays(self.times, steps), rows, steps
            log.info(
                "rollout.prepack_linears=auto, %d rows, %d steps: linears %.2f ms plain, %.2f ms prepacked, "
                "reorder %.1f ms -> %s for the whole run",
                rows,
                steps,
                1e3 * self.times.plain_s,
                1e3 * self.times.packed_s,
                1e3 * self.times.reorder_s,
                "prepacked" if self.decision else "plain",
            )
        return self.decision

    def state_dict(self) -> dict[str, bool | None]:
        """The run's decision (None: not measured yet, or not auto), for its checkpoints."""
        return {"prepack_linears": self.decision}

    def load_state_dict(self, state: dict[str, bool | None]) -> None:
        """Take a checkpoint's decision: a resumed run runs the kernels the run it continues ran."""
        self.decision = state.get("prepack_linears")
