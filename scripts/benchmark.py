"""Benchmark one GRPO training step on a fixed workload; JSON out plus a readable table.

    python -m scripts.benchmark                     # SmolLM2-135M fp32, 8 prompts x G=4, 64 tokens
    python -m scripts.benchmark --steps 3 --out bench.json rollout.group_size=8 trainer.batch_size=4
    python -m scripts.benchmark model=tiny --naive-prompts 1      # seconds, for a quick check
    python -m scripts.benchmark --compare-engines hf,generate,hf:bfloat16 trainer.num_threads=2
    python -m scripts.benchmark --fixed-length      # every response exactly max_new_tokens (equal work)
    python -m scripts.benchmark --precision         # + float32 against bf16 (scripts/benchmark_precision.py)

Positional arguments are Hydra overrides of configs/train.yaml, so the benchmark runs exactly the
code and settings of a training run. It reports, per step (mean over the timed steps, after one
warm-up step;
--fixed-length sets rollout.min_new_tokens = rollout.max_new_tokens, so every response, the naive
loop's too, has exactly max_new_tokens tokens and the work per step does not depend on what was
sampled, as scripts/benchmark_trl.py --fixed-length does for TRL):
  - seconds split into rollout (generation), reward, log-probs (reference and old policy), update;
  - rollout tokens/s (generated tokens) and update tokens/s (all tokens the update's forward and
    backward passes process, prompt included);
  - the update's model-FLOPs utilisation: 6 x parameters x processed tokens / update seconds,
    against a dense matmul measured in the same process (the machine's attainable FLOP/s);
  - the design notes' naive rollout (one `generate` call per sample) on the same prompts, and the
    speed-up of the batched rollout over it;
  - the rollout's physical bound: per decode step, reading every weight once at the memory
    bandwidth measured in the same process, or the FLOPs of the rows still decoding (2 x parameters
    x rows) at the measured matmul rate, whichever takes longer; plus each distinct prompt's pass
    (their shared prefix once) at the matmul rate. The batched rollout's seconds over that bound
    say how far generation is from the machine's limit;
  - the same rollout's bound from what the machine's linears reach: per decode step, one pass of
    the live rows through the model's own linear layers, timed in the same process at each row
    count (scripts/benchmark_rollout.py), and the GEMV rate they stream the weights at;
  - an engine comparison: rollout tokens/s of the step's prompts through each of --compare-engines
    (the decode engine, transformers' generate, a bf16 rollout: hf,generate,hf:bfloat16), and the
    decode engine over the generate engine;
  - what rollout.prepack_linears=auto measured and chose, and the machine (CPU model, its ISA flags,
    cores, threads, torch: common.provenance.machine_info);
  - peak resident memory, of the whole run and of each phase (the largest over the timed steps of
    the peak within the phase; each includes what the process holds throughout: weights, AdamW
    state, the reference model).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from common.config import TrainerConfig
from common.distributed import unwrap
from common.logging import peak_rss_mb, reset_peak_rss, window_peak_rss_mb
from common.logprobs import pack_responses
from common.models import make_reference
from common.provenance import machine_info
from common.rollout.base import ROLLOUT_DTYPES, weights_in
from common.rollout.decode import shared_prefix_length
from common.rollout.engine import RolloutEngine
from common.sampling import score_samples
from common.timing import best_seconds, clock
from common.trainer import build_batch
from common.update import add_logprobs_and_values, micro_batch, split_micro_batches, update_policy
from scripts.benchmark_precision import precision_comparison
from scripts.benchmark_rollout import (
    RolloutWork,
    engine_comparison,
    gemv_bound_s,
    linear_pass_seconds,
    live_rows,
    rollout_bound_s,
)
from scripts.build import (
    build_algorithm,
    build_optimizer,
    build_policy,
    build_rollout,
    build_settings,
    build_task_from,
    resolve_device,
    store_schemas,
    validate,
)
from scripts.report import aligned, workload_row

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# the fixed workload of the benchmark (any of it can be overridden on the command line)
WORKLOAD = [
    "logger=none",
    "trainer.batch_size=8",
    "rollout.group_size=4",
    "rollout.max_new_tokens=64",
    "trainer.micro_batch_size=32",
]


def matmul_flops(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """Attainable dense float32 FLOP/s on `device`: best of `repeats` n x n x n matmuls."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n**3 / best_seconds(lambda: a @ b, repeats, device)


def memory_bandwidth(device: torch.device, mb: int = 256, repeats: int = 5) -> float:
    """Attainable memory bandwidth on `device`, bytes/s: best of `repeats` copies of an `mb` MB
    float32 tensor, counting the bytes read and the bytes written (the warm-up touches the pages)."""
    a = torch.ones(mb * 2**18, device=device)  # mb MB of float32
    b = torch.empty_like(a)
    return 2 * a.nbytes / best_seconds(lambda: b.copy_(a), repeats, device)


def naive_rollout(
    engine: RolloutEngine, prompts: list[str], group_size: int, max_new_tokens: int
) -> tuple[float, int]:
    """The design notes' loop: one `generate` call per sample (G calls per prompt). Returns (s, tokens)."""
    tokenizer, model = engine.tokenizer, engine.model
    tokens, t = 0, time.perf_counter()
    with torch.inference_mode():
        for text in engine.format_prompts(prompts):
            enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
            for _ in range(group_size):
                out = model.generate(
                    **enc,
                    do_sample=True,
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=engine.min_new_tokens,
                    temperature=engine.temperature,
                    top_p=engine.top_p,
                    top_k=engine.top_k,
                    pad_token_id=engine.pad_token_id,
                )
                response = out[0, enc["input_ids"].shape[1] :]
                eos = (response == engine.eos_token_id).nonzero()
                tokens += int(eos[0, 0]) + 1 if len(eos) else response.numel()
    return time.perf_counter() - t, tokens


class PhaseMeter:
    """Seconds and peak resident memory of each phase of a step: `start()`, run the phase,
    `stop(name)`. The memory window opens at `start` (common.logging.reset_peak_rss)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: dict[str, float] = {}  # "<phase>_s" -> seconds
        self.rss_mb: dict[str, float] = {}  # "<phase>" -> peak MB within the phase
        self._t = 0.0

    def start(self) -> None:
        reset_peak_rss()
        self._t = clock(self.device)

    def stop(self, name: str) -> None:
        self.times[f"{name}_s"] = clock(self.device) - self._t
        self.rss_mb[name] = window_peak_rss_mb()


@dataclass(frozen=True)
class StepMeasure:
    """What one benchmarked step measured."""

    times: dict[str, float]  # "<phase>_s" -> seconds, and "step_s", their sum
    rss_mb: dict[str, float]  # "<phase>" -> peak resident MB within the phase
    generated: int  # response tokens sampled
    processed: int  # prompt + response tokens of the update's passes, padding left out
    computed: int  # tokens the update's passes actually run (see computed_tokens)
    rollout_work: RolloutWork
    mismatch: dict[str, float]  # rollout/ mismatch (and TIS) metrics, when pi_old was computed


def time_step(model, reference, engine, algo, task, optimizer, scheduler, settings, generator, examples):
    """One GRPO step with each phase timed and its peak memory read separately (the trainer's
    train_step, taken apart)."""
    device = next(model.parameters()).device
    meter = PhaseMeter(device)
    meter.start()
    rollout = engine.sample([e.prompt for e in examples])
    meter.stop("rollout")
    meter.start()
    samples = score_samples(task, rollout, examples, algo, settings)
    batch = build_batch(samples, algo, device)
    meter.stop("reward")
    meter.start()
    mismatch = add_logprobs_and_values(
        batch, model, reference, None, algo, settings, engine.temperature, device
    )
    meter.stop("logprob")
    algo.compute_advantages(batch)
    meter.start()
    update_policy(model, optimizer, scheduler, algo, batch, settings, engine.temperature, generator)
    if engine.syncs_weights:  # a separate generation engine (vLLM) gets the new weights, as in training
        engine.sync_weights(model)
    meter.stop("update")
    times = {**meter.times, "step_s": sum(meter.times.values())}
    generated = int(rollout.lengths.sum())
    # the workload's tokens: prompt + response of every row, padding left out
    processed = int(rollout.attention_mask.sum()) * algo.epochs
    computed = computed_tokens(batch, settings.trainer) * algo.epochs
    groups = rollout.group_index.tolist()
    first_rows = [groups.index(g) for g in dict.fromkeys(groups)]  # one row per distinct prompt
    prompt_ids = rollout.input_ids[first_rows, : rollout.prompt_len]  # (U, P)
    prompt_mask = rollout.attention_mask[first_rows, : rollout.prompt_len]
    shared = shared_prefix_length(prompt_ids, prompt_mask)  # tokens all prompts start with
    prompt_tokens = int(prompt_mask.sum()) - (len(first_rows) - 1) * shared
    work = RolloutWork(prompt_tokens, tuple(rollout.lengths.tolist()))
    return StepMeasure(times, meter.rss_mb, generated, processed, computed, work, mismatch)


def computed_tokens(batch: dict[str, Any], trainer: TrainerConfig) -> int:
    """Tokens the update's forward passes actually run: per micro-batch, each distinct prompt once
    plus every row's response through EOS (the packed pass of sequence_logprobs, no padding)."""
    total = 0
    rows = torch.arange(batch["input_ids"].shape[0])
    for micro in split_micro_batches(
        batch, rows, trainer.micro_batch_size, trainer.max_tokens_per_micro_batch
    ):
        mb = micro_batch(batch, micro)
        packed = pack_responses(
            mb["input_ids"], mb["attention_mask"], mb["prompt_len"], mb["response_mask"], mb["group_index"]
        )
        total += packed.input_ids.shape[1]
    return total


def timed_steps(steps: int, step: Callable[[], StepMeasure]) -> list[StepMeasure]:
    """Run `step` (time_step) 1 + `steps` times; the measures of all but the first, which warms up
    (allocator, kernels) and is not counted."""
    runs = []
    for i in range(steps + 1):
        measured = step()
        if i > 0:
            runs.append(measured)
        print(f"step {i}{' (warm-up)' if i == 0 else ''}: {measured.times['step_s']:.1f}s", file=sys.stderr)
    return runs


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def workload_and_machine(
    cfg: DictConfig, n_params: int, steps: int, device: torch.device
) -> dict[str, dict[str, Any]]:
    """The "workload" and "machine" blocks of the result: what was measured, and where."""
    return {
        "workload": {
            "model": cfg.model.name,
            "parameters": n_params,
            "dtype": cfg.model.dtype,
            "prompts": cfg.trainer.batch_size,
            "group_size": cfg.rollout.group_size,
            "max_new_tokens": cfg.rollout.max_new_tokens,
            "min_new_tokens": cfg.rollout.min_new_tokens,
            "fixed_length": cfg.rollout.min_new_tokens == cfg.rollout.max_new_tokens,
            "algorithm": cfg.algorithm.name,
            "kl_coef": cfg.algorithm.kl_coef,
            "engine": cfg.rollout.engine,
            "rollout_dtype": cfg.rollout.dtype,
            "prepack_linears": cfg.rollout.prepack_linears,
            "bf16": cfg.trainer.bf16,
            "timed_steps": steps,
        },
        # CPU model and its vector ISA (AVX-512, bf16, AMX decide the kernels), cores, threads, GPU, torch
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            **machine_info(),
        },
    }


def run_benchmark(
    cfg: DictConfig,
    steps: int,
    naive_prompts: int,
    compare: list[str],
    compare_repeats: int,
    precision: bool = False,
) -> dict[str, Any]:
    validate(cfg)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    torch.manual_seed(cfg.seed)
    algo = build_algorithm(cfg.algorithm)
    settings = build_settings(cfg)
    task = build_task_from(cfg)
    device = resolve_device(cfg.trainer.device)
    model, tokenizer = build_policy(cfg)
    model.to(device)
    reference = make_reference(model) if algo.needs_reference else None
    engine = build_rollout(cfg, model, tokenizer)
    optimizer, scheduler = build_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    examples = task.train[: cfg.trainer.batch_size]
    n_params = sum(p.numel() for p in model.parameters())

    runs = timed_steps(
        steps,
        lambda: time_step(
            model, reference, engine, algo, task, optimizer, scheduler, settings, generator, examples
        ),
    )
    result = {**workload_and_machine(cfg, n_params, steps, device), **step_results(runs, n_params, device)}
    naive_s, naive_tokens = naive_rollout(
        engine,
        [e.prompt for e in examples[:naive_prompts]],
        cfg.rollout.group_size,
        cfg.rollout.max_new_tokens,
    )
    result["naive_rollout_tokens_per_s"] = naive_tokens / naive_s
    result["naive_rollout_prompts"] = naive_prompts
    result["batched_over_naive"] = result["rollout_tokens_per_s"] / result["naive_rollout_tokens_per_s"]
    # the high-water mark restarts with each phase: the run's peak is the largest of the phases'
    # and of what came after the last reset (the naive loop)
    result["peak_rss_mb"] = max(peak_rss_mb(), *(mb for r in runs for mb in r.rss_mb.values()))
    result["peak_rss_mb_per_phase"] = {k: max(r.rss_mb[k] for r in runs) for k in runs[0].rss_mb}
    result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    result["prepack_decisions"] = prepack_decisions(engine)
    # how far the rollout's log-probs are from the training forward's (rollout.dtype=bfloat16, vLLM):
    # logged when pi_old is computed (algorithm.rollout_correction, trainer.log_rollout_mismatch=true)
    result["rollout_mismatch"] = {k: mean([r.mismatch[k] for r in runs]) for k in runs[0].mismatch}
    rollout_s, flops = result["seconds_per_step"]["rollout_s"], result["matmul_flops_per_s"]
    result.update(rollout_bounds(cfg, model, [r.rollout_work for r in runs], rollout_s, flops, device))
    prompts = [e.prompt for e in examples]
    result["engine_comparison"] = engine_comparison(cfg, model, tokenizer, prompts, compare, compare_repeats)
    if precision:  # float32 against bf16 for the update, log-prob and rollout work, interleaved
        result["precision"] = precision_comparison(model, decode_rows=len(prompts) * cfg.rollout.group_size)
    return result


def step_results(runs: list[StepMeasure], n_params: int, device: torch.device) -> dict[str, Any]:
    """The timed steps' means: seconds per phase, rollout and update tokens/s, the update's FLOP/s
    against a dense matmul timed now (MFU on the workload's tokens, hardware use on those it runs)."""
    seconds = {k: mean([r.times[k] for r in runs]) for k in runs[0].times}
    generated, processed, computed = (
        mean([getattr(r, k) for r in runs]) for k in ("generated", "processed", "computed")
    )
    peak = matmul_flops(device)
    update_flops = 6 * n_params * processed / seconds["update_s"]
    return {
        "seconds_per_step": seconds,
        "rollout_tokens_per_s": generated / seconds["rollout_s"],
        "generated_tokens_per_step": generated,
        "update_tokens_per_s": processed / seconds["update_s"],
        "processed_tokens_per_step": processed,
        "update_flops_per_s": update_flops,
        "matmul_flops_per_s": peak,
        "update_mfu": update_flops / peak,
        "computed_tokens_per_step": computed,
        "update_hardware_utilization": 6 * n_params * computed / seconds["update_s"] / peak,
    }


def rollout_bounds(
    cfg: DictConfig, model: torch.nn.Module, works: list[RolloutWork], rollout_s: float, flops: float, device
) -> dict[str, Any]:
    """The rollout's two bounds (scripts/benchmark_rollout.py), each a mean over the timed steps'
    workloads, and the rollout's seconds over them. The linears are timed in the rollout's dtype,
    at every live-row count the workloads went through; the GEMV rate is the linear weights' bytes
    over a pass at the fewest rows."""
    bandwidth = memory_bandwidth(device)
    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    counts = sorted({n for work in works for n in live_rows(work.lengths)})
    with weights_in(unwrap(model), ROLLOUT_DTYPES[cfg.rollout.dtype]) as rollout_model:
        linear_s = {n: linear_pass_seconds(rollout_model, n) for n in counts}
        linear_bytes = sum(
            m.weight.numel() * m.weight.element_size()
            for m in rollout_model.modules()
            if isinstance(m, torch.nn.Linear)
        )
    bound = mean([rollout_bound_s(n_params, weight_bytes, work, bandwidth, flops) for work in works])
    gemv = mean([gemv_bound_s(n_params, work, linear_s, flops) for work in works])
    return {
        "memory_bandwidth_bytes_per_s": bandwidth,
        "rollout_bound_s": bound,
        "rollout_over_bound": rollout_s / bound,
        "linear_pass_s": {str(n): s for n, s in linear_s.items()},  # live rows -> seconds of the linears
        "gemv_rows": counts[0],
        "gemv_bytes_per_s": linear_bytes / linear_s[counts[0]],
        "rollout_gemv_bound_s": gemv,
        "rollout_over_gemv_bound": rollout_s / gemv,
    }


def prepack_decisions(engine: RolloutEngine) -> list[dict[str, Any]]:
    """What rollout.prepack_linears=auto measured and chose (the decode engine's PrepackPolicy)."""
    policy = getattr(engine, "prepack", None)
    if policy is None or policy.times is None:
        return []
    threads = torch.get_num_threads()
    return [
        {
            "rows": policy.rows,
            "steps": policy.steps,
            "threads": threads,
            **asdict(policy.times),
            "prepacked": policy.decision,
        }
    ]


def format_table(result: dict[str, Any]) -> str:
    w, s = result["workload"], result["seconds_per_step"]
    rows = [
        workload_row(w),
        (
            "seconds / step",
            f"{s['step_s']:.2f} = rollout {s['rollout_s']:.2f} + reward {s['reward_s']:.3f} "
            f"+ log-probs {s['logprob_s']:.2f} + update {s['update_s']:.2f}",
        ),
        ("rollout tokens/s", f"{result['rollout_tokens_per_s']:.1f} (batched: one decode of all rows)"),
        (
            "naive rollout tokens/s",
            f"{result['naive_rollout_tokens_per_s']:.1f} (one generate call per sample)",
        ),
        ("batched / naive", f"{result['batched_over_naive']:.1f}x"),
        (
            "rollout bound",
            f"{result['rollout_bound_s']:.2f} s: the rollout takes {result['rollout_over_bound']:.1f}x it "
            f"(weights at {result['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, FLOPs at the matmul rate)",
        ),
        (
            "rollout GEMV bound",
            f"{result['rollout_gemv_bound_s']:.2f} s: the rollout takes "
            f"{result['rollout_over_gemv_bound']:.1f}x it (the model's linears timed at each live-row "
            f"count; at {result['gemv_rows']} rows they stream the weights at "
            f"{result['gemv_bytes_per_s'] / 1e9:.1f} GB/s)",
        ),
        *engine_rows(result["engine_comparison"]),
        ("update tokens/s", f"{result['update_tokens_per_s']:.1f} (prompt + response tokens, fwd + bwd)"),
        ("update GFLOP/s", f"{result['update_flops_per_s'] / 1e9:.1f} (6 x params x tokens / s)"),
        ("matmul GFLOP/s", f"{result['matmul_flops_per_s'] / 1e9:.1f} (2048^3 fp32, same process)"),
        ("update MFU", f"{100 * result['update_mfu']:.1f}% (of the workload's tokens)"),
        (
            "update hardware use",
            f"{100 * result['update_hardware_utilization']:.1f}% ({result['computed_tokens_per_step']:.0f} "
            "tokens run: each prompt once per group, no padding)",
        ),
        ("peak RSS", f"{result['peak_rss_mb']:.0f} MB"),
        (
            "peak RSS by phase",
            ", ".join(f"{name} {mb:.0f}" for name, mb in result["peak_rss_mb_per_phase"].items()) + " MB",
        ),
    ]
    if result.get("peak_gpu_mb") is not None:
        rows.append(("peak GPU memory", f"{result['peak_gpu_mb']:.0f} MB (torch allocator)"))
    return aligned(rows + machine_rows(result))


def machine_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """Table rows of the machine and of the prepacking decisions of rollout.prepack_linears=auto."""
    m = result["machine"]
    isa = ", ".join(m["isa"]) or "no AVX2"
    rows = [
        (
            "machine",
            f"{m['cpu']} ({isa}), {m['cores']} cores, {m['torch_threads']} threads, torch {m['torch']}",
        )
    ]
    for d in result["prepack_decisions"]:
        chosen = "prepacked" if d["prepacked"] else "plain"
        rows.append(
            (
                "prepacking (auto)",
                f"{d['rows']} rows: linears {1e3 * d['plain_s']:.1f} ms plain, {1e3 * d['packed_s']:.1f} ms "
                f"prepacked, reorder {1e3 * d['reorder_s']:.1f} ms -> {chosen}",
            )
        )
    return rows


def engine_rows(comparison: dict[str, Any]) -> list[tuple[str, str]]:
    """Table rows of the engine comparison: each variant's rollout tokens/s, and decode / generate."""
    rows = [
        (f"rollout tokens/s, {name}", f"{e['tokens_per_s']:.1f} ({e['rollout_s']:.2f} s per rollout)")
        for name, e in comparison["engines"].items()
    ]
    if "decode_over_generate" in comparison:
        rows.append(("decode / generate", f"{comparison['decode_over_generate']:.2f}x (rollout tokens/s)"))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of configs/train.yaml")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--naive-prompts", type=int, default=2, help="prompts for the per-sample loop")
    parser.add_argument("--out", default="benchmark.json", help="where to write the JSON")
    parser.add_argument(
        "--compare-engines",
        default="hf,generate",
        help="engine variants whose rollout tokens/s to compare on the step's prompts, <rollout.engine>"
        "[:<rollout.dtype>], comma-separated (e.g. hf,generate,hf:bfloat16); empty = none",
    )
    parser.add_argument("--compare-repeats", type=int, default=3, help="timed rollouts per engine variant")
    parser.add_argument(
        "--fixed-length",
        action="store_true",
        help="every response exactly rollout.max_new_tokens (rollout.min_new_tokens = max_new_tokens)",
    )
    parser.add_argument("--precision", action="store_true", help="add float32 against bf16 timings")
    args = parser.parse_args(argv)
    store_schemas()
    fixed = ["rollout.min_new_tokens=${rollout.max_new_tokens}"] if args.fixed_length else []
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[*WORKLOAD, *fixed, *args.overrides])
    compare = [v for v in args.compare_engines.split(",") if v]
    result = run_benchmark(cfg, args.steps, args.naive_prompts, compare, args.compare_repeats, args.precision)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"written to {args.out}")
    return result


if __name__ == "__main__":
    main()
