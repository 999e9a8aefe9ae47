"""Benchmark data parallel with each trainer.zero_stage: memory held per rank and seconds per step.

    python -m scripts.benchmark_sharding                         # SmolLM2-135M, 2 processes, stages 0-3
    python -m scripts.benchmark_sharding --stages 0 3 model=tiny --steps 2 --out bench.json

Each stage is a real training run, `torchrun --nproc_per_node N -m scripts.train` with the
benchmark workload plus the positional Hydra overrides, so it measures exactly the code of a run;
before them the same workload runs as one plain process, the baseline. From each run's
metrics.jsonl it reports, per stage:
  - train state: bytes of weights, gradients and AdamW state that the busiest rank holds (policy
    and reference; `perf/train_state_mb`), what zero_stage 1-3 shard;
  - peak resident memory of the busiest rank (`perf/peak_rss_mb`: activations, caches, the gathered
    weights of generation and the Python process included);
  - seconds per step (mean after the first step) and the sequences per step.
On one CPU machine the ranks share its cores and the gathers go through shared memory, so the times
say little about a GPU cluster; the memory column is the point.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# the fixed workload (any of it can be overridden on the command line)
WORKLOAD = [
    "logger=none",
    "trainer.batch_size=4",
    "rollout.group_size=4",
    "rollout.max_new_tokens=32",
    "trainer.micro_batch_size=16",
    "trainer.eval_every=0",
    "trainer.log_samples_every=0",
    "trainer.save_every=0",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_stage(
    stage: int | None, processes: int, steps: int, overrides: list[str], run_dir: Path
) -> dict[str, Any]:
    """One training run (stage None: one plain process) and its per-step metrics summarised."""
    train = ["-m", "scripts.train", *WORKLOAD, f"trainer.max_steps={steps}", f"hydra.run.dir={run_dir}"]
    if stage is None:
        command = [sys.executable, *train, *overrides]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
        command = [
            *launcher,
            f"--master_port={_free_port()}",
            *train,
            f"trainer.zero_stage={stage}",
            *overrides,
        ]
    threads = max(1, (os.cpu_count() or 1) // (1 if stage is None else processes))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_run = [r for r in rows if r.get("step", 0) > 0 and "perf/step_s" in r]
    timed = steps_run[1:] or steps_run  # the first step warms up
    return {
        "zero_stage": stage,
        "processes": 1 if stage is None else processes,
        "train_state_mb": max(r["perf/train_state_mb"] for r in steps_run),
        "peak_rss_mb": max(r["perf/peak_rss_mb"] for r in steps_run),
        "step_s": sum(r["perf/step_s"] for r in timed) / len(timed),
        "sequences_per_step": steps_run[-1]["rollout/num_sequences"],
    }


def run_benchmark(stages: list[int], processes: int, steps: int, overrides: list[str]) -> dict[str, Any]:
    """The baseline and every stage, each in its own run directory (deleted after)."""
    with tempfile.TemporaryDirectory(prefix="rl-lab-sharding-") as tmp:
        runs = [run_stage(None, processes, steps, overrides, Path(tmp) / "single")]
        for stage in stages:
            runs.append(run_stage(stage, processes, steps, overrides, Path(tmp) / f"stage{stage}"))
    return {
        "workload": [*WORKLOAD, *overrides],
        "steps": steps,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "runs": runs,
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [
        "| run | train state per rank | peak RSS per rank | s/step | sequences/step |",
        "|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        name = (
            "1 process"
            if r["zero_stage"] is None
            else f"{r['processes']} processes, zero_stage {r['zero_stage']}"
        )
        lines.append(
            f"| {name} | {r['train_state_mb']:.0f} MB | {r['peak_rss_mb']:.0f} MB | {r['step_s']:.1f} "
            f"| {r['sequences_per_step']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of configs/train.yaml")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], help="zero stages to run")
    parser.add_argument("--processes", type=int, default=2, help="processes per data-parallel run")
    parser.add_argument("--steps", type=int, default=3, help="training steps per run (the first warms up)")
    parser.add_argument("--out", default="benchmark_sharding.json", help="where to write the JSON")
    args = parser.parse_args(argv)
    result = run_benchmark(args.stages, args.processes, args.steps, args.overrides)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    return result


if __name__ == "__main__":
    main()
