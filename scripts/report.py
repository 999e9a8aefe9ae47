"""The readable tables of the benchmark scripts, shared by those that run without Hydra
(scripts/benchmark_trl.py runs in TRL's own venv and imports only common/ and this module)."""

from __future__ import annotations

from typing import Any


def workload_row(w: dict[str, Any]) -> tuple[str, str]:
    """The table row that names a GRPO benchmark workload (model, batch, tokens, KL)."""
    return (
        "workload",
        f"{w['model']} {w['dtype']}, {w['prompts']} prompts x G={w['group_size']}, "
        f"{w['max_new_tokens']} new tokens{' (fixed length)' if w.get('fixed_length') else ''}, "
        f"{w['algorithm']} (kl_coef {w['kl_coef']})",
    )


def aligned(rows: list[tuple[str, str]]) -> str:
    """Rows as "name  value" lines, the values in one column."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def engine_table(results: list[dict[str, Any]]) -> str:
    """One row per benchmark result (scripts/benchmark.py JSON), its rollout engine named, then the
    ratio of each later engine over the first: generated tokens/s of the rollout and of the whole step."""
    lines = [
        "| engine | rollout tokens/s | step tokens/s | s/step (rollout + log-probs + update) | peak GPU MB |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        s = r["seconds_per_step"]
        gpu = r.get("peak_gpu_mb")
        lines.append(
            f"| {r['workload'].get('engine', 'hf')} | {r['rollout_tokens_per_s']:.0f} "
            f"| {r['generated_tokens_per_step'] / s['step_s']:.0f} "
            f"| {s['step_s']:.2f} ({s['rollout_s']:.2f} + {s['logprob_s']:.2f} + {s['update_s']:.2f}) "
            f"| {'-' if gpu is None else f'{gpu:.0f}'} |"
        )
    base = results[0]
    for r in results[1:]:
        rollout = r["rollout_tokens_per_s"] / base["rollout_tokens_per_s"]
        step = base["seconds_per_step"]["step_s"] / r["seconds_per_step"]["step_s"]
        lines.append(
            f"\n{r['workload'].get('engine')} over {base['workload'].get('engine', 'hf')}: "
            f"rollout tokens/s {rollout:.2f}x, step time {step:.2f}x"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m scripts.report a.json [b.json ...]: the engine table
    import json
    import sys
    from pathlib import Path

    print(engine_table([json.loads(Path(p).read_text()) for p in sys.argv[1:]]))
