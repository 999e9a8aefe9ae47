"""The benchmark runs end to end on the tiny model and writes every JSON key (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts.benchmark import format_table, main
from scripts.benchmark_rollout import (
    RolloutWork,
    gemv_bound_s,
    linear_pass_seconds,
    live_rows,
    rollout_bound_s,
)
from scripts.report import engine_table
from tests.conftest import ROOT

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
    "peak_rss_mb_per_phase",
    "memory_bandwidth_bytes_per_s",
    "rollout_bound_s",
    "rollout_over_bound",
    "linear_pass_s",
    "gemv_rows",
    "gemv_bytes_per_s",
    "rollout_gemv_bound_s",
    "rollout_over_gemv_bound",
    "engine_comparison",
    "prepack_decisions",
    "rollout_mismatch",
}


def test_benchmark_writes_json_on_tiny_model(tmp_path, cache_dir):
    out = tmp_path / "bench.json"
    result = main(
        [
            "model=tiny",
            "rollout.max_new_tokens=8",
            "trainer.batch_size=2",
            "trainer.log_rollout_mismatch=true",
            f"paths.cache_dir={cache_dir}",
            "--steps",
            "1",
            "--naive-prompts",
            "1",
            "--compare-engines",
            "hf,generate,hf:bfloat16",
            "--compare-repeats",
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
    # each phase's peak lies within the run's peak (the same high-water mark, over a shorter window)
    phase_rss = saved["peak_rss_mb_per_phase"]
    assert phase_rss.keys() == {"rollout", "reward", "logprob", "update"}
    assert all(0 < mb <= saved["peak_rss_mb"] + 1 for mb in phase_rss.values()), (
        phase_rss,
        saved["peak_rss_mb"],
    )
    assert "peak RSS by phase" in format_table(result)
    assert saved["rollout_bound_s"] > 0 and saved["memory_bandwidth_bytes_per_s"] > 0
    assert saved["rollout_over_bound"] == pytest.approx(phases["rollout_s"] / saved["rollout_bound_s"])
    # the machine block names the CPU and its ISA; the GEMV bound timed the linears at each live-row count
    assert {"cpu", "isa", "cores", "torch_threads", "torch", "device"} <= saved["machine"].keys()
    assert saved["gemv_rows"] == min(int(n) for n in saved["linear_pass_s"]) and saved["gemv_bytes_per_s"] > 0
    assert saved["rollout_over_gemv_bound"] == pytest.approx(
        phases["rollout_s"] / saved["rollout_gemv_bound_s"]
    )
    # the engine comparison: the decode and the generate engine on the step's prompts
    engines = saved["engine_comparison"]["engines"]
    assert engines.keys() == {"hf", "generate", "hf:bfloat16"} and all(
        e["tokens_per_s"] > 0 for e in engines.values()
    )
    ratio = engines["hf"]["tokens_per_s"] / engines["generate"]["tokens_per_s"]
    assert saved["engine_comparison"]["decode_over_generate"] == pytest.approx(ratio)
    assert saved["workload"]["prepack_linears"] == "auto" and "decode / generate" in format_table(result)
    # log_rollout_mismatch: the float32 decode engine against the training forward, rounding only
    assert 0 <= saved["rollout_mismatch"]["rollout/logprob_abs_diff"] < 1e-3


def test_rollout_bound_by_hand():
    # 10 parameters in 40 bytes, 6 prompt tokens, responses of 5 and 2 tokens: 5 decode steps with
    # 2, 2, 1, 1, 1 rows still decoding
    work = RolloutWork(prompt_tokens=6, lengths=(5, 2))
    # bandwidth 10 B/s, 20 FLOP/s: prompt 2*10*6/20 = 6 s; each step weight-bound, max(40/10, n) = 4 s
    assert rollout_bound_s(10, 40, work, bandwidth=10.0, flops=20.0) == pytest.approx(6 + 5 * 4)
    # 2 FLOP/s makes decoding compute-bound: prompt 120/2 = 60 s; steps max(4, 10 n) = 20, 20, 10, 10, 10 s
    assert rollout_bound_s(10, 40, work, bandwidth=10.0, flops=2.0) == pytest.approx(60 + 70)


def test_live_rows_by_hand():
    assert live_rows((5, 2)) == [2, 2, 1, 1, 1] and live_rows((3, 3, 1)) == [3, 2, 2] and live_rows(()) == []


def test_gemv_bound_by_hand():
    # 10 parameters, 6 prompt tokens at 20 FLOP/s: 2 * 10 * 6 / 20 = 6 s; responses of 5 and 2 tokens
    # decode with 2, 2, 1, 1, 1 rows; the linears' pass takes 3 s at 2 rows and 2 s at 1: 3 + 3 + 2 + 2 + 2
    work = RolloutWork(prompt_tokens=6, lengths=(5, 2))
    assert gemv_bound_s(10, work, {1: 2.0, 2: 3.0}, flops=20.0) == pytest.approx(6 + 12)
    # the copy bound of the same work at 10 B/s for 40 bytes of weights: 4 s per step, whatever the rows
    assert rollout_bound_s(10, 40, work, bandwidth=10.0, flops=20.0) == pytest.approx(6 + 20)
    with pytest.raises(KeyError):  # a live-row count the linears were not timed at
        gemv_bound_s(10, work, {2: 3.0}, flops=20.0)


def test_linear_pass_runs_every_linear_on_its_own_weight(monkeypatch):
    """A pass streams each layer's weights, as a decode step does: three layers of one shape are three
    weights read, not one layer timed three times (which a cache would serve)."""
    model = torch.nn.Sequential(*(torch.nn.Linear(8, 8) for _ in range(3)), torch.nn.Linear(8, 4))
    seen: list[tuple[int, tuple[int, ...]]] = []
    linear = torch.nn.functional.linear

    def recording(x, weight, bias=None):
        seen.append((weight.data_ptr(), tuple(x.shape)))
        return linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", recording)
    assert linear_pass_seconds(model, rows=2, repeats=2) > 0
    ptrs = {m.weight.data_ptr() for m in model}
    ours = [(p, shape) for p, shape in seen if p in ptrs]  # not the prepacking probe's own product
    # one warm-up pass and two timed passes of the plain product, each over all four weights at 2 rows
    assert [p for p, _ in ours] == [m.weight.data_ptr() for m in model] * 3 and len(ptrs) == 4
    assert {shape for _, shape in ours} == {(2, 8)}
    assert linear_pass_seconds(torch.nn.Sequential(torch.nn.ReLU()), rows=2) == 0.0


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


def _result(engine: str, rollout_s: float, step_s: float, tokens: float) -> dict:
    """A benchmark result with just the fields the engine table reads."""
    phases = {
        "rollout_s": rollout_s,
        "logprob_s": 1.0,
        "update_s": step_s - rollout_s - 1.0,
        "step_s": step_s,
    }
    return {
        "workload": {"engine": engine},
        "seconds_per_step": phases,
        "rollout_tokens_per_s": tokens / rollout_s,
        "generated_tokens_per_step": tokens,
        "peak_gpu_mb": 2048.0,
    }


def test_engine_table_compares_vllm_with_hf():
    # 1000 tokens: HF rolls out in 4 s of a 10 s step, vLLM in 1 s of a 7 s step
    table = engine_table([_result("hf", 4.0, 10.0, 1000), _result("vllm", 1.0, 7.0, 1000)])
    assert "| hf | 250 | 100 | 10.00 (4.00 + 1.00 + 5.00) | 2048 |" in table
    assert "| vllm | 1000 | 143 | 7.00 (1.00 + 1.00 + 5.00) | 2048 |" in table
    assert "vllm over hf: rollout tokens/s 4.00x, step time 1.43x" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_gpu_check_without_a_gpu_stops_with_one_line():
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip().startswith("gpu_check: no CUDA device") and len(result.stderr.splitlines()) == 1
    )
    assert result.stdout == ""


def test_trl_benchmark_reads_the_workload_task_and_reward():
    """The TRL benchmark builds the task of configs/task/addition.yaml without Hydra (not in its
    venv) and scores a completion the way our trainer does: correct + format_weight x format."""
    from scripts.benchmark_trl import load_workload_task, make_reward

    task, format_weight = load_workload_task()
    assert task.name == "addition" and format_weight == 0.1 and len(task.train) > 0
    example = task.train[0]
    reward = make_reward(task, format_weight)
    scores = reward(
        prompts=[[{"role": "user", "content": example.prompt}]] * 2,
        completions=[[{"content": f"<answer>{example.answer}</answer>"}], [{"content": "no idea"}]],
        answer=[example.answer] * 2,
    )
    assert scores == pytest.approx([1.1, 0.0])


def test_fixed_length_benchmark_generates_exactly_max_new_tokens_per_response(tmp_path, cache_dir):
    """--fixed-length: 2 prompts x G=4 x 6 tokens = 48 generated tokens in every timed step and in each
    engine of the comparison, and the JSON and table say it was that workload (the random tiny model
    rarely samples EOS anyway: that the engines mask it is tests/test_rollout_min_new_tokens.py's)."""
    out = tmp_path / "bench.json"
    result = main(
        [
            "model=tiny",
            "rollout.max_new_tokens=6",
            "trainer.batch_size=2",
            f"paths.cache_dir={cache_dir}",
            "--fixed-length",
            "--precision",
            *("--steps", "1", "--naive-prompts", "1", "--compare-engines", "hf,generate"),
            *("--compare-repeats", "1", "--out", str(out)),
        ]
    )
    assert result["workload"]["fixed_length"] and result["workload"]["min_new_tokens"] == 6
    assert result["generated_tokens_per_step"] == 2 * 4 * 6
    assert all(e["tokens"] == 2 * 4 * 6 for e in result["engine_comparison"]["engines"].values())
    assert "(fixed length)" in format_table(result)
    assert result["precision"].keys() == {"update", "logprob", "rollout"}  # --precision's block


def test_precision_benchmark_times_float32_and_bf16_of_each_kind_of_work(tmp_path, cache_dir):
    """scripts/benchmark_precision.py on the tiny model: update, log-prob and rollout each timed in
    float32 and bf16, the ratio their quotient, and the machine's numerics recorded (no timing asserts)."""
    from scripts.benchmark_precision import main as precision_main

    out = tmp_path / "precision.json"
    result = precision_main(
        ["model=tiny", f"paths.cache_dir={cache_dir}", "--rows", "2", "--tokens", "8", "--repeats", "1"]
        + ["--out", str(out)]
    )
    saved = json.loads(out.read_text())
    assert saved["precision"].keys() == {"update", "logprob", "rollout"}
    for r in saved["precision"].values():
        assert r["float32_s"] > 0 and r["bf16_s"] > 0
        assert r["float32_over_bf16"] == pytest.approx(r["float32_s"] / r["bf16_s"])
    assert "digest" in saved["machine"]["numerics"] and result["workload"]["rows"] == 2
