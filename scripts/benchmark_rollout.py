"""The rollout's part of scripts/benchmark.py: its bounds and the comparison of engines.

Two lower bounds on the seconds of a batched rollout that computes only what it must (attention
over the KV cache and the sampling left out, so both are optimistic):

  - `rollout_bound_s`, from a copy: per decode step, every weight read once at the copy bandwidth,
    or the FLOPs of the live rows at the dense matmul rate, whichever is longer;
  - `gemv_bound_s`, from what the machine's linears actually reach: per decode step, one pass of
    the live rows through the model's own linear layers, one after another as a decode step runs
    them, timed in the same process at that row count (`linear_pass_seconds`: the faster of plain
    and prepacked products). On a CPU whose small-row products stream the weights well below the
    copy bandwidth (8.5 of 21 GB/s on one Xeon), this bound is the honest one.

Both add the prompt pass (each distinct prompt's tokens once, their shared prefix once) at the
matmul rate. `engine_comparison` times the same prompts through several engines (and dtypes).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from common.rollout.engine import RolloutEngine
from common.rollout.prepack import PREPACKING, packed_linear, reorder_weight
from common.timing import best_seconds
from scripts.build import build_rollout


@dataclass(frozen=True)
class RolloutWork:
    """What a rollout had to compute: its distinct prompts' tokens (the prefix they all share counted
    once) and every row's response length."""

    prompt_tokens: int
    lengths: tuple[int, ...]


def live_rows(lengths: tuple[int, ...]) -> list[int]:
    """Rows still decoding at each decode step t = 0 .. T-1 (a row of length n decodes n steps).

    Example: lengths (5, 2) -> [2, 2, 1, 1, 1].
    """
    return [sum(n > t for n in lengths) for t in range(max(lengths, default=0))]


def rollout_bound_s(
    n_params: int, weight_bytes: int, work: RolloutWork, bandwidth: float, flops: float
) -> float:
    """Lower bound on a rollout's seconds from the copy bandwidth and the matmul rate:

        prompt pass       2 x params x (each distinct prompt's tokens once, the prefix all share
                          once) FLOPs at the matmul rate
        decode step t     max(weights read once at the bandwidth,
                              2 x params x (rows still decoding at t) FLOPs at the matmul rate)

    over t = 0 .. T-1, T = the longest response: a step reads every weight once however few rows it runs.
    """
    decode = sum(max(weight_bytes / bandwidth, 2 * n_params * n / flops) for n in live_rows(work.lengths))
    return 2 * n_params * work.prompt_tokens / flops + decode


def gemv_bound_s(n_params: int, work: RolloutWork, linear_s: Mapping[int, float], flops: float) -> float:
    """Lower bound on a rollout's seconds from the machine's own linear layers:

        prompt pass       2 x params x prompt tokens FLOPs at the matmul rate (as rollout_bound_s)
        decode step t     linear_s[n_t], one pass of n_t rows (the rows still decoding at t) through
                          every linear layer of the model, as timed in this process

    Args:
        linear_s: seconds of a pass per row count, for every count in live_rows(work.lengths).
    """
    return 2 * n_params * work.prompt_tokens / flops + sum(linear_s[n] for n in live_rows(work.lengths))


def linear_pass_seconds(model: torch.nn.Module, rows: int, repeats: int = 3) -> float:
    """Seconds of one pass of a (rows, in) input through every nn.Linear of `model` in turn, as a
    decode step at `rows` live rows runs them: each weight read once per pass, so where the
    weights outgrow the caches (SmolLM2-135M float32: 0.54 GB) they stream from memory as in the
    rollout, where timing one layer of each shape over and over served them from cache (on a Xeon
    with a large L3, 37-40 GB/s against a 28 GB/s copy). Best of `repeats` passes, at the faster of
    plain F.linear and, for float32 on a CPU where it works, the prepacked product (the reorders
    not counted)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        return 0.0
    weights = [(m.weight.detach(), m.bias.detach() if m.bias is not None else None) for m in linears]
    inputs = {  # in_features -> (rows, in) input
        w.shape[1]: torch.ones(rows, w.shape[1], dtype=w.dtype, device=w.device) for w, _ in weights
    }

    def plain() -> None:
        for w, b in weights:
            torch.nn.functional.linear(inputs[w.shape[1]], w, b)

    with torch.inference_mode():
        best = best_seconds(plain, repeats, linears[0].weight.device)
        packable = all(w.device.type == "cpu" and w.dtype == torch.float32 for w, _ in weights)
        if packable and PREPACKING.available():
            packed = [(reorder_weight(w, rows), b, inputs[w.shape[1]]) for w, b in weights]
            best = min(best, best_seconds(lambda: [packed_linear(p, b, x) for p, b, x in packed], repeats))
    return best


def timed_rollouts(engine: RolloutEngine, prompts: list[str], repeats: int, seed: int) -> tuple[float, int]:
    """Seconds and generated tokens of `repeats` rollouts of `prompts` (one untimed warm-up first),
    each from the same seed."""
    engine.sample(prompts)
    seconds, tokens = 0.0, 0
    for _ in range(repeats):
        torch.manual_seed(seed)
        t = time.perf_counter()
        batch = engine.sample(prompts)
        seconds += time.perf_counter() - t
        tokens += int(batch.lengths.sum())
    return seconds, tokens


def engine_comparison(
    cfg: DictConfig,
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    variants: list[str],
    repeats: int,
) -> dict[str, Any]:
    """Rollout tokens/s of the same prompts through each engine variant, "<rollout.engine>[:<rollout.dtype>]"
    (e.g. hf, generate, hf:bfloat16), built from cfg with only those keys changed; and the decode
    engine's speed-up over the generate engine when both are measured (the goal: >= 2 on CPU)."""
    engines: dict[str, dict[str, float]] = {}
    for variant in variants:
        name, _, dtype = variant.partition(":")
        variant_cfg = copy.deepcopy(cfg)
        variant_cfg.rollout.engine = name
        variant_cfg.rollout.dtype = dtype or cfg.rollout.dtype
        engine = build_rollout(variant_cfg, model, tokenizer)
        seconds, tokens = timed_rollouts(engine, prompts, repeats, cfg.seed)
        engines[variant] = {
            "rollout_s": seconds / repeats,
            "tokens": tokens / repeats,
            "tokens_per_s": tokens / seconds,
        }
    result: dict[str, Any] = {"prompts": len(prompts), "repeats": repeats, "engines": engines}
    if "hf" in engines and "generate" in engines:
        result["decode_over_generate"] = engines["hf"]["tokens_per_s"] / engines["generate"]["tokens_per_s"]
    return result
