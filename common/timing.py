"""Wall-clock timing of a piece of work: the benchmark's measurements and the rollout's in-process
choice of prepacked linears (common.rollout.prepack)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def clock(device: torch.device) -> float:
    """time.perf_counter() after the device's queued work has finished (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def best_seconds(run: Callable[[], object], repeats: int, device: torch.device | None = None) -> float:
    """The shortest of `repeats` timed calls of `run`, after one untimed warm-up call."""
    device = device or torch.device("cpu")
    run()
    best = float("inf")
    for _ in range(repeats):
        t = clock(device)
        run()
        best = min(best, clock(device) - t)
    return best
