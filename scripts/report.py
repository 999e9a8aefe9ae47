"""The readable tables of the benchmark scripts, shared by those that run without Hydra
(scripts/benchmark_trl.py runs in TRL's own venv and imports only common/ and this module)."""

from __future__ import annotations

from typing import Any


def workload_row(w: dict[str, Any]) -> tuple[str, str]:
    """The table row that names a GRPO benchmark workload (model, batch, tokens, KL)."""
    return (
        "workload",
        f"{w['model']} {w['dtype']}, {w['prompts']} prompts x G={w['group_size']}, "
        f"{w['max_new_tokens']} new tokens, {w['algorithm']} (kl_coef {w['kl_coef']})",
    )


def aligned(rows: list[tuple[str, str]]) -> str:
    """Rows as "name  value" lines, the values in one column."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
