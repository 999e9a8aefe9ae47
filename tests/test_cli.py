"""The Hydra entry point as a user runs it: `python -m scripts.train ...` in a subprocess."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TEST_SEED


def cli_env(cache_dir: str) -> dict[str, str]:
    env = {**os.environ, "RL_LAB_CACHE": cache_dir, "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)  # never reach a W&B server from the tests
    return env


def train_cli(*args: str, cache_dir: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scripts.train", *args],
        cwd=ROOT,
        env=cli_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "algorithm",
    [
        "grpo",
        "dapo",
        "ppo",
        "grpo dynamic_sampling=filter",
        "grpo dynamic_sampling=resample",
        "grpo rollout.engine=generate",  # the plain engine trains end to end
    ],
)
def test_smoke_run_per_algorithm(tmp_path, cache_dir, algorithm):
    # char_share: the tiny model earns reward, so DAPO's filter keeps groups and every algorithm updates
    # (no reward value takes over ~8% of the samples: a group of 4 is all-equal with a chance ~1e-4)
    name, *extra = algorithm.split()
    result = train_cli(
        "debug=smoke",
        f"algorithm={name}",
        *extra,
        "task=char_share",
        f"seed={TEST_SEED}",
        f"hydra.run.dir={tmp_path}",
        cache_dir=cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["policy/skipped_updates"] == 0 for r in rows[1:])
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    assert (tmp_path / "train.log").is_file()
    assert {"sampling/samples_total", "sampling/tokens_total", "sampling/gen_batches"} <= rows[-1].keys()
    if name == "ppo":
        critic = {"critic/value_loss", "critic/explained_variance", "critic/values_mean", "kl/coef"}
        assert critic <= rows[-1].keys()
    if name == "dapo":
        assert {"sampling/groups_kept", "sampling/groups_dropped", "reward/overlong"} <= rows[-1].keys()
    if "dynamic_sampling=filter" in extra:
        assert {"sampling/groups_kept", "sampling/kept_group_frac"} <= rows[-1].keys()
    if "dynamic_sampling=resample" in extra:
        assert {"sampling/extra_samples", "sampling/flat_groups_left"} <= rows[-1].keys()


def test_bf16_rollout_with_truncated_importance_sampling_trains_and_logs_the_mismatch(tmp_path, cache_dir):
    """rollout.dtype=bfloat16 with token TIS (algorithm.rollout_correction.rollout_is=token): the old
    log-probs are computed every step, the mismatch of the bf16 rollout against them is logged, finite
    and non-zero."""
    result = train_cli(
        "debug=smoke",
        "task=char_share",
        "rollout.dtype=bfloat16",
        "algorithm.rollout_correction.rollout_is=token",
        f"seed={TEST_SEED}",
        f"hydra.run.dir={tmp_path}",
        cache_dir=cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for row in metrics(tmp_path)[1:]:
        assert 0 < row["rollout/logprob_abs_diff"] < 1 and 0 <= row["rollout/kl"] < 1
        assert 0 < row["rollout/is_weight_mean"] < 2 and row["policy/skipped_updates"] == 0


def test_issue_command_line_writes_metrics(tmp_path, cache_dir):
    result = train_cli(
        "model=tiny",
        "logger=none",
        "trainer.max_steps=2",
        "trainer.batch_size=2",
        "rollout.group_size=4",
        "rollout.max_new_tokens=8",
        "trainer.eval_num_prompts=4",
        f"hydra.run.dir={tmp_path}",
        cache_dir=cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in metrics(tmp_path)] == [0, 1, 2]


def test_multirun_launches_one_job_per_value(tmp_path, cache_dir):
    result = train_cli(
        "-m",
        "debug=smoke",
        "rollout.group_size=2,4",
        "trainer.max_steps=1",
        f"hydra.sweep.dir={tmp_path}",
        cache_dir=cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.parent for p in tmp_path.rglob("metrics.jsonl"))
    assert len(runs) == 2
    sizes = sorted(metrics(run)[-1]["rollout/group_size"] for run in runs)
    assert sizes == [2.0, 4.0]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("rollout.group_size=1", "rollout.group_size"),
        ("optim.lr=-1", "optim.lr"),
        ("model=hub", "model path"),
    ],
)
def test_bad_input_gives_one_line(tmp_path, cache_dir, override, expected):
    extra = ["model.name_or_path=/nonexistent/model"] if override == "model=hub" else []
    result = train_cli("debug=smoke", override, *extra, f"hydra.run.dir={tmp_path}", cache_dir=cache_dir)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


# a value of the wrong type -> the key its one-line error must name
WRONG_TYPES = {
    "optim.lr=abc": "optim.lr",
    "trainer.batch_size=abc": "trainer.batch_size",
    "seed=foo": "seed",
    "rollout.max_new_tokens=1.5": "rollout.max_new_tokens",
    "algorithm.dual_clip=high": "algorithm.dual_clip",
    "trainer.bf16=yes": "trainer.bf16",
    "rollout.group_size=x": "rollout.group_size",
    "trainer.max_steps=2.5": "trainer.max_steps",
    "algorithm.clip_low=high": "algorithm.clip_low",
}


# runs `python -m scripts.train ARGS` once per argument list in one interpreter (runpy is what
# `python -m` uses), so the nine commands below pay for one import of torch, not nine
MAIN_PER_ARGS = """
import contextlib, io, json, runpy, sys

commands, results_file, results = json.loads(sys.argv[1]), sys.argv[2], []
for args in commands:
    sys.argv, stderr, code = ["scripts.train", *args], io.StringIO(), 0
    with contextlib.redirect_stderr(stderr):
        try:
            runpy.run_module("scripts.train", run_name="__main__", alter_sys=True)
        except SystemExit as exit:
            code = exit.code
    results.append({"code": code, "stderr": stderr.getvalue()})
with open(results_file, "w") as f:
    json.dump(results, f)
"""


def test_wrong_types_stop_before_any_model_loads(tmp_path, cache_dir):
    """Each value is refused by its schema's type (a boolean also by the command line's true / false)
    with one line naming the key, exit status 2 and no traceback, and no model is loaded: the run
    never logs the policy's size."""
    commands = [
        ["model=tiny", "logger=none", "trainer.max_steps=0", override, f"hydra.run.dir={tmp_path / str(i)}"]
        for i, override in enumerate(WRONG_TYPES)
    ]
    results_file = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-c", MAIN_PER_ARGS, json.dumps(commands), str(results_file)],
        cwd=ROOT,
        env=cli_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "parameters on" not in proc.stdout + proc.stderr  # "policy <name>: <n>M parameters on <device>"
    for override, result in zip(WRONG_TYPES, json.loads(results_file.read_text()), strict=True):
        stderr = result["stderr"]
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert result["code"] == 2, (override, stderr[-2000:])
        assert len(errors) == 1 and errors[0].startswith(f"error: {WRONG_TYPES[override]}: "), stderr
        assert "(got " in errors[0] and "Traceback" not in stderr


def wandb_records(run_file: Path):
    """Records of an offline W&B run file (LevelDB-style log blocks of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, buf, block = run_file.read_bytes(), 7, b"", 32768
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        buf = data if kind in (1, 2) else buf + data
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            yield record


def test_wandb_offline_run_has_group_tags_config_metrics_and_table(tmp_path, cache_dir):
    result = train_cli(
        "debug=smoke", "logger=wandb", "logger.mode=offline", f"hydra.run.dir={tmp_path}", cache_dir=cache_dir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = list(wandb_records(run_file))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_group == "smoke" and run.display_name == "grpo-addition-s0"
    assert {"grpo", "addition", "tiny-llama", "G4", "seed0"} <= set(run.tags)
    assert {"algorithm", "rollout", "trainer", "model", "task"} <= {item.key for item in run.config.update}
    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    keys = {item.key or "/".join(item.nested_key) for h in history for item in h.item}
    assert len(history) == 3 and {"reward/total", "eval/accuracy", "policy/loss"} <= keys
    # the compute axes travel with every training row, so W&B can plot any metric against them
    assert {"train/step", "sampling/samples_total", "sampling/tokens_total", "perf/wall_s"} <= keys
    tables = list(run_file.parent.glob("files/media/table/samples/completions_*.table.json"))
    assert len(tables) == 2
    table = json.loads(tables[0].read_text())
    assert table["columns"][:3] == ["step", "prompt", "response"] and len(table["data"]) == 2
