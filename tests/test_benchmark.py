"""The benchmark runs end to end on the tiny model and writes every JSON key (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.benchmark import format_table, main

KEYS = {
    "workload",
    "machine",
    "seconds_per_step",
    "rollout_tokens_per_s",
    "update_tokens_per_s",
    "update_mfu",
    "computed_tokens_per_step",
    "update_hardware_utilization",
    "matmul_flops_per_s",
    "update_flops_per_s",
    "naive_rollout_tokens_per_s",
    "batched_over_naive",
    "peak_rss_mb",
}


def test_benchmark_writes_json_on_tiny_model(tmp_path, cache_dir):
    out = tmp_path / "bench.json"
    result = main(
        [
            "model=tiny",
            "rollout.max_new_tokens=8",
            "trainer.batch_size=2",
            f"paths.cache_dir={cache_dir}",
            "--steps",
            "1",
            "--naive-prompts",
            "1",
            "--out",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert saved.keys() >= KEYS and saved["workload"]["group_size"] == 4
    phases = saved["seconds_per_step"]
    assert {"rollout_s", "reward_s", "logprob_s", "update_s", "step_s"} <= phases.keys()
    assert abs(phases["step_s"] - sum(v for k, v in phases.items() if k != "step_s")) < 1e-9
    assert saved["generated_tokens_per_step"] > 0 and saved["update_mfu"] > 0
    assert "update MFU" in format_table(result)


def test_trl_benchmark_without_trl_says_how_to_install_it():
    """scripts/benchmark_trl.py runs from its own venv; in ours it stops with the install line."""
    if importlib.util.find_spec("trl") is not None:
        pytest.skip("TRL is installed here")
    out = subprocess.run(
        [sys.executable, "-m", "scripts.benchmark_trl", "--steps", "1"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "pip install" in out.stderr and "trl" in out.stderr
    assert "Traceback" not in out.stderr


def test_sharding_benchmark_shows_the_sharded_state(tmp_path, cache_dir):
    """scripts/benchmark_sharding.py on the tiny model: one process, then 2 processes with FSDP
    (zero_stage 3), which hold half of the weights, gradients and AdamW state per rank."""
    from scripts.benchmark_sharding import format_table as sharding_table
    from scripts.benchmark_sharding import main as sharding_main

    out = tmp_path / "sharding.json"
    result = sharding_main(
        ["model=tiny", "task=char_share", f"paths.cache_dir={cache_dir}", "--stages", "3", "--steps", "1"]
        + ["--out", str(out)]
    )
    single, sharded = json.loads(out.read_text())["runs"]
    assert (single["zero_stage"], single["processes"], sharded["zero_stage"], sharded["processes"]) == (
        None,
        1,
        3,
        2,
    )
    assert sharded["sequences_per_step"] == single["sequences_per_step"] == 16  # the same global batch
    assert 0.45 < sharded["train_state_mb"] / single["train_state_mb"] < 0.55
    assert "zero_stage 3" in sharding_table(result)
