"""Does bf16 pay on this machine? The step's three kinds of work, float32 against bfloat16, timed
interleaved (fp32, bf16, fp32, bf16, ...) in one process so that a busy machine slows both alike:

  - update: forward + backward of a micro-batch under bfloat16 autocast (trainer.bf16=true) or not;
  - log-probs: the no-grad forward of the same micro-batch, autocast or not;
  - rollout: one decode step's linears at `decode_rows` rows (scripts/benchmark_rollout.py
    linear_pass_seconds), with the float32 weights or their bf16 copy (rollout.dtype=bfloat16).

    python -m scripts.benchmark_precision                 # SmolLM2-135M, 8 rows x 64 tokens, JSON out
    python -m scripts.benchmark_precision model=tiny --repeats 2

scripts/benchmark.py adds the same block ("precision") to its JSON. Each entry: best seconds of
float32 and of bf16 over the repeats, and float32 / bf16 (> 1: bf16 is faster).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

from common.distributed import unwrap
from common.provenance import machine_info
from common.rollout.base import weights_in
from common.timing import best_seconds
from scripts.benchmark_rollout import linear_pass_seconds
from scripts.build import build_policy, resolve_device, store_schemas

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def interleaved(runs: dict[str, Any], repeats: int) -> dict[str, float]:
    """Best seconds of each of `runs` (name -> callable returning its seconds), called in turn
    `repeats` times: A, B, A, B, ..."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            best[name] = min(best[name], run())
    return best


def precision_comparison(
    model: torch.nn.Module, rows: int = 8, tokens: int = 64, decode_rows: int = 32, repeats: int = 3
) -> dict[str, dict[str, float]]:
    """float32 against bf16 for the update's forward + backward and the log-prob forward of a
    (rows, tokens) micro-batch, and a decode step's linears at `decode_rows` rows (see the module
    docstring). The model's gradients are cleared after; its weights are not changed."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (rows, tokens), generator=torch.Generator().manual_seed(0)).to(device)

    def forward(bf16: bool, grad: bool) -> float:
        def run() -> None:
            with torch.set_grad_enabled(grad), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                logits = model(input_ids=ids).logits
                loss = torch.log_softmax(logits.float(), dim=-1).mean()
            if grad:
                loss.backward()

        return best_seconds(run, 1, device)

    def decode_step(dtype: torch.dtype) -> float:
        with weights_in(unwrap(model), dtype) as weights:
            return linear_pass_seconds(weights, decode_rows, repeats=1)

    kinds = {
        "update": lambda bf16: forward(bf16, grad=True),
        "logprob": lambda bf16: forward(bf16, grad=False),
        "rollout": lambda bf16: decode_step(torch.bfloat16 if bf16 else torch.float32),
    }
    result = {}
    for kind, run in kinds.items():
        best = interleaved({"float32_s": lambda r=run: r(False), "bf16_s": lambda r=run: r(True)}, repeats)
        result[kind] = {**best, "float32_over_bf16": best["float32_s"] / best["bf16_s"]}
    model.zero_grad(set_to_none=True)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of configs/train.yaml (model, threads)")
    parser.add_argument("--rows", type=int, default=8, help="rows of the update and log-prob micro-batch")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per row")
    parser.add_argument("--decode-rows", type=int, default=32, help="live rows of the decode step")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timings of each")
    parser.add_argument("--out", default="benchmark_precision.json", help="where to write the JSON")
    args = parser.parse_args(argv)
    store_schemas()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["logger=none", *args.overrides])
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    model, _ = build_policy(cfg)
    model.to(resolve_device(cfg.trainer.device))
    result = {
        "workload": {"model": cfg.model.name, **{k: v for k, v in vars(args).items() if k != "overrides"}},
        "machine": machine_info(),
        "precision": precision_comparison(model, args.rows, args.tokens, args.decode_rows, args.repeats),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for kind, r in result["precision"].items():
        fp32, bf16, ratio = r["float32_s"], r["bf16_s"], r["float32_over_bf16"]
        print(f"{kind:8s} float32 {fp32:.3f} s, bf16 {bf16:.3f} s: float32 / bf16 {ratio:.2f}")
    print(f"written to {args.out}")
    return result


if __name__ == "__main__":
    main()
