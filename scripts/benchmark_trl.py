"""Benchmark TRL's GRPOTrainer on the workload of scripts/benchmark.py: seconds per full GRPO step.

The workload is ours: SmolLM2-135M-Instruct float32 (the same converted folder, loaded by
common.models.load_policy), the first 8 addition prompts of the train split in our chat format,
G = 4 samples each at temperature 1.0, 64 new tokens, GRPO with kl_coef 0.04 (k3, reference forward
included), one optimizer step per batch on one micro-batch of 32 sequences, AdamW at lr 1e-5 and our
reward (common.rewards.score_responses: correct + format_weight * format). A TrainerCallback reads
the wall clock at on_step_begin and on_step_end, so a step is everything TRL does for one optimizer
step: generate, score, reference log-probs, loss forward + backward, clip, optimizer step. The
first step warms up and is not timed. Settings are matched to ours where TRL has a knob:
loss_type "grpo" (= our seq-mean-token-mean), no activation checkpointing (TRL's default is on),
plain AdamW ("adamw_torch", not the fused default), no KL importance-weight correction (on-policy it
is 1 in value but not in gradient).

TRL and its dependencies (datasets, pandas, pyarrow) stay out of the project's venv: the script runs
from its own venv outside the repo, from the repo root (it imports common/ and scripts/report.py):

    python3 -m venv ../trl-venv
    ../trl-venv/bin/pip install torch==2.13.0 transformers==5.23.0 trl==1.16.0 datasets accelerate
    ../trl-venv/bin/python -m scripts.benchmark_trl --out docs/benchmark_trl.json
    ../trl-venv/bin/python -m scripts.benchmark_trl --steps 1 --prompts 2 --max-new-tokens 8  # a check

Compare with `python -m scripts.benchmark --steps 2` (our venv) run right before or after.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import yaml

from common.logging import peak_rss_mb
from common.models import load_policy
from common.rewards import score_responses
from common.tasks import Example, Task, build_task
from scripts.report import aligned, workload_row

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRL_INSTALL = "pip install torch==2.13.0 transformers==5.23.0 trl==1.16.0 datasets accelerate"
PACKAGES = ("trl", "transformers", "torch", "accelerate", "datasets")


def load_workload_task() -> tuple[Task, float]:
    """The task of configs/task/addition.yaml and reward.format_weight of configs/train.yaml, read
    without Hydra (not installed in the TRL venv); the benchmark overrides neither."""
    task_cfg = yaml.safe_load((CONFIGS / "task" / "addition.yaml").read_text())
    task_cfg.pop("defaults", None)  # the Hydra schema line, not a task argument
    format_weight = yaml.safe_load((CONFIGS / "train.yaml").read_text())["reward"]["format_weight"]
    return build_task(task_cfg.pop("name"), **task_cfg), float(format_weight)


def make_reward(task: Task, format_weight: float) -> Callable[..., list[float]]:
    """A TRL reward function scoring each completion exactly as our trainer does."""

    def correct_plus_format(prompts: list, completions: list, answer: list[str], **_: Any) -> list[float]:
        # conversational dataset: prompts are message lists, completions [{"role": "assistant", ...}]
        responses = [c[0]["content"] for c in completions]
        examples = [Example(prompt=p[-1]["content"], answer=a) for p, a in zip(prompts, answer, strict=True)]
        return score_responses(task, responses, examples, format_weight=format_weight).total.tolist()

    return correct_plus_format


def step_timer() -> Any:
    """A TrainerCallback that keeps the wall-clock seconds of every optimizer step and the metrics
    TRL logs after it."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.start = 0.0
            self.seconds: list[float] = []
            self.logs: list[dict[str, float]] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.start)
            print(f"step {len(self.seconds) - 1}: {self.seconds[-1]:.1f}s", file=sys.stderr)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:  # skip the end-of-training summary
                self.logs.append(dict(logs))

    return StepTimer()


def grpo_config(
    output_dir: str, steps: int, n_prompts: int, group_size: int, max_new_tokens: int, min_new_tokens: int = 0
) -> Any:
    """TRL's GRPOConfig matched to our workload (see the module docstring for each choice); EOS is
    masked for the first `min_new_tokens` through generate's min_new_tokens (generation_kwargs)."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        seed=0,
        max_steps=1 + steps,
        per_device_train_batch_size=n_prompts * group_size,  # one micro-batch of N rows
        gradient_accumulation_steps=1,
        num_generations=group_size,
        max_completion_length=max_new_tokens,
        generation_kwargs={"min_new_tokens": min_new_tokens} if min_new_tokens else None,
        temperature=1.0,
        beta=0.04,
        use_bias_correction_kl=False,
        num_iterations=1,
        epsilon=0.2,
        loss_type="grpo",
        scale_rewards="group",
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        max_grad_norm=1.0,
        activation_checkpointing=False,
        shuffle_dataset=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )


def run_trl(
    steps: int, n_prompts: int, group_size: int, max_new_tokens: int, min_new_tokens: int = 0
) -> dict[str, Any]:
    """Train TRL's GRPOTrainer for 1 + `steps` steps and time each; returns the JSON result."""
    try:
        from datasets import Dataset
        from trl import GRPOTrainer
    except ImportError as err:
        sys.exit(f"TRL is not importable ({err}); install it in its own venv: {TRL_INSTALL}")

    task, format_weight = load_workload_task()
    examples = task.train[:n_prompts]
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": e.prompt}], "answer": e.answer} for e in examples]
    )
    model, tokenizer = load_policy("smollm2-gguf", dtype="float32")
    output_dir = tempfile.mkdtemp(prefix="benchmark_trl-")  # Trainer wants one; nothing is saved
    config = grpo_config(output_dir, steps, n_prompts, group_size, max_new_tokens, min_new_tokens)
    timer = step_timer()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=make_reward(task, format_weight),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    try:
        trainer.train()
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)

    timed = timer.seconds[1:]  # the first step warms up (allocator, kernels) and is not timed
    generated = [log["completions/mean_length"] * n_prompts * group_size for log in timer.logs[1:]]
    return {
        "workload": {
            "model": "smollm2-135m-instruct",
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": "float32",
            "prompts": n_prompts,
            "group_size": group_size,
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": min_new_tokens,
            "fixed_length": min_new_tokens == max_new_tokens,
            "algorithm": "grpo (TRL GRPOTrainer, loss_type grpo)",
            "kl_coef": config.beta,
            "timed_steps": steps,
        },
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "versions": {name: version(name) for name in PACKAGES},
        "warmup_step_s": timer.seconds[0],
        "step_s": timed,
        "mean_step_s": statistics.mean(timed),
        "median_step_s": statistics.median(timed),
        "generated_tokens_per_step": statistics.mean(generated),
        "trl_logs": timer.logs,
        "peak_rss_mb": peak_rss_mb(),
    }


def format_table(result: dict[str, Any]) -> str:
    """The result as aligned "name  value" lines."""
    w, v = result["workload"], result["versions"]
    rows = [
        workload_row(w),
        ("versions", ", ".join(f"{name} {v[name]}" for name in PACKAGES)),
        ("torch threads", str(result["machine"]["torch_threads"])),
        ("warm-up step", f"{result['warmup_step_s']:.2f} s (not timed)"),
        ("seconds / step", ", ".join(f"{s:.2f}" for s in result["step_s"])),
        ("mean / median", f"{result['mean_step_s']:.2f} / {result['median_step_s']:.2f} s"),
        ("generated tokens/step", f"{result['generated_tokens_per_step']:.0f}"),
        ("peak RSS", f"{result['peak_rss_mb']:.0f} MB"),
    ]
    return aligned(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=4, help="samples per prompt, G (at least 2)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="maximum completion length")
    parser.add_argument("--out", default="benchmark_trl.json", help="where to write the JSON")
    parser.add_argument(
        "--fixed-length",
        action="store_true",
        help="every completion exactly --max-new-tokens (generate's min_new_tokens), as in scripts/benchmark",
    )
    args = parser.parse_args(argv)
    min_new = args.max_new_tokens if args.fixed_length else 0
    result = run_trl(args.steps, args.prompts, args.group_size, args.max_new_tokens, min_new)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"written to {args.out}")
    return result


if __name__ == "__main__":
    main()
