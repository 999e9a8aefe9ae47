"""Faults a long run survives: a raising reward, non-finite losses and updates, W&B failing, a
checkpoint write that fails, an unwritable run folder; and bad input answered with one clear line."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

import common.trainer as trainer_module
from common.checkpoint import COMPLETE_FILE, STATE_FILE, NonFiniteCheckpointError, save_checkpoint
from common.logging import RunLogger, WandbInit
from common.state import CheckpointWriteError, RunAbortedError
from grpo import GRPO
from scripts.train import run
from tests.conftest import ROOT, TINY_RUN, compose_train
from tests.test_checkpoints import checkpoint_names
from tests.test_cli import cli_env, train_cli
from tests.test_resume import assert_same_run, read_metrics


def test_raising_reward_scores_zero_and_the_run_goes_on(tmp_path, cache_dir, monkeypatch):
    from common.tasks.char_share import CharShareTask

    original = CharShareTask.correctness
    calls = {"n": 0}

    def flaky(self, response, example):
        calls["n"] += 1
        if calls["n"] % 5 == 0:
            raise RuntimeError("verifier crashed")
        return original(self, response, example)

    monkeypatch.setattr(CharShareTask, "correctness", flaky)
    run(compose_train(*TINY_RUN, "trainer.max_steps=2", f"paths.cache_dir={cache_dir}"), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert sum(r["reward/errors"] for r in rows) >= 2  # 16 scored samples, every 5th raises


@pytest.mark.parametrize("algorithm", ["grpo", "dapo"])  # dapo: the dynamic-sampling filter's rounds
def test_raising_reward_under_fail_on_reward_error_checkpoints_the_last_step_and_resumes_exactly(
    tmp_path, cache_dir, monkeypatch, algorithm
):
    from common.tasks.char_share import CharShareTask

    original, original_step = CharShareTask.correctness, trainer_module.train_step
    broken = {"on": False}

    def breaks_in_step_2(ctx, step, *args):
        broken["on"] = step == 2
        return original_step(ctx, step, *args)

    def correctness(self, response, example):
        if broken["on"]:
            raise RuntimeError("verifier crashed")
        return original(self, response, example)

    monkeypatch.setattr(trainer_module, "train_step", breaks_in_step_2)
    monkeypatch.setattr(CharShareTask, "correctness", correctness)
    common = (
        *TINY_RUN,
        f"algorithm={algorithm}",
        "trainer.max_steps=3",
        "trainer.fail_on_reward_error=true",
        f"paths.cache_dir={cache_dir}",
    )
    failed, straight = tmp_path / "failed", tmp_path / "straight"
    message = (
        r"^step 2: reward function raised on sample 0: RuntimeError: verifier crashed "
        r"\(prompt '.+', response '.*'\); the state after step 1 is saved in .*step_1$"
    )
    with pytest.raises(RunAbortedError, match=message) as info:
        run(compose_train(*common), failed)
    assert info.value.path == failed / "checkpoints" / "step_1"
    monkeypatch.undo()  # the reward function fixed, the run goes on from step 1 as if nothing happened
    run(compose_train(*common, "resume=auto"), failed)
    run(compose_train(*common), straight)
    assert sorted(read_metrics(failed)) == [1, 2, 3]
    assert_same_run(straight, failed, [1, 2, 3])


def test_fail_on_reward_error_is_one_line_with_the_resume_command(tmp_path, cache_dir):
    # the entry point as a user runs it, with a reward function that always raises
    script = (
        "from common.tasks.char_share import CharShareTask\n"
        "def broken(self, response, example): raise KeyError('no such field')\n"
        "CharShareTask.correctness = broken\n"
        "import runpy\n"
        "runpy.run_module('scripts.train', run_name='__main__', alter_sys=True)\n"
    )
    args = [*TINY_RUN, "trainer.fail_on_reward_error=true", f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env=cli_env(cache_dir),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    error = lines[errors[0]]
    assert "step 1: reward function raised on sample 0: KeyError: 'no such field' (prompt '" in error
    assert error.endswith(f"the state after step 0 is saved in {tmp_path / 'checkpoints' / 'step_0'}")
    assert (
        lines[errors[0] + 1].startswith("resume with: python -m scripts.train") and "resume=auto" in lines[-1]
    )
    assert (tmp_path / "checkpoints" / "step_0" / COMPLETE_FILE).is_file()


def test_non_finite_losses_skip_updates_then_abort_with_last_good_state(
    tmp_path, cache_dir, monkeypatch, caplog
):
    def nan_loss(self, batch, logprob, **kwargs):
        return logprob.sum() * float("nan"), {}

    monkeypatch.setattr(GRPO, "loss", nan_loss)
    cfg = compose_train(
        *TINY_RUN, "trainer.max_steps=10", "trainer.max_bad_steps=3", f"paths.cache_dir={cache_dir}"
    )
    with (
        caplog.at_level(logging.WARNING, logger="rl_lab"),
        pytest.raises(RunAbortedError, match="3 steps in a row"),
    ):
        run(cfg, tmp_path)
    assert caplog.text.count("update skipped") == 3
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["policy/skipped_updates"] for r in rows] == [1, 1, 1]
    # the saved state is the untouched initial policy: no NaN reached the weights
    state = torch.load(tmp_path / "checkpoints" / "step_3" / STATE_FILE, weights_only=False)
    assert state["step"] == 3
    weights = load_file(tmp_path / "checkpoints" / "step_3" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, cache_dir, monkeypatch):
    from common.models import load_policy

    model, tokenizer = load_policy(
        "tiny", cache_dir=cache_dir, tiny={"hidden_size": 16, "intermediate_size": 32}
    )
    path = tmp_path / "checkpoints" / "step_1"
    save_checkpoint(path, model=model, tokenizer=tokenizer, state={"step": 1})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, model=model, tokenizer=tokenizer, state={"step": 2})
    monkeypatch.undo()
    assert torch.load(path / STATE_FILE, weights_only=False)["step"] == 1
    assert (path / "model.safetensors").is_file()
    assert [p.name for p in path.parent.iterdir()] == ["step_1"]  # no temporary folder left behind


def test_a_checkpoint_that_cannot_be_written_stops_the_run_with_the_previous_one_intact(
    tmp_path, cache_dir, monkeypatch
):
    # a run folder gone read-only: the tokenizer's save raises a bare Exception (the tokenizers
    # library's error), which is no OSError
    from transformers import PreTrainedTokenizerBase

    original = PreTrainedTokenizerBase.save_pretrained

    def read_only_after_step_1(self, folder, *args, **kwargs):
        if (tmp_path / "checkpoints" / "step_1").exists():
            raise Exception("Operation not permitted (os error 1)")
        return original(self, folder, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", read_only_after_step_1)
    common = (*TINY_RUN, "trainer.max_steps=4", "trainer.save_every=1", f"paths.cache_dir={cache_dir}")
    folder = tmp_path / "checkpoints"
    message = (
        f"checkpoint step_2 not written to {folder}: Exception: Operation not permitted (os error 1); "
        f"the last checkpoint is {folder / 'step_1'}"
    )
    with pytest.raises(CheckpointWriteError) as info:
        run(compose_train(*common), tmp_path)
    assert str(info.value) == message and info.value.path == folder / "step_1"
    assert checkpoint_names(tmp_path) == ["step_1"]  # intact, and no temporary folder left
    assert sorted(read_metrics(tmp_path)) == [1, 2]
    monkeypatch.undo()
    run(compose_train(*common, "resume=auto"), tmp_path)
    assert sorted(read_metrics(tmp_path)) == [1, 2, 3, 4]


def test_a_checkpoint_with_a_non_finite_tensor_is_never_written(tmp_path, cache_dir):
    from common.models import load_policy

    model, tokenizer = load_policy(
        "tiny", cache_dir=cache_dir, tiny={"hidden_size": 16, "intermediate_size": 32}
    )
    folder = tmp_path / "checkpoints"
    save_checkpoint(folder / "step_1", model=model, tokenizer=tokenizer, state={"step": 1})
    state = {"step": 2, "optimizer": {"state": {3: {"exp_avg": torch.tensor([0.0, math.inf])}}}}
    with pytest.raises(
        NonFiniteCheckpointError, match=r"^optimizer.state.3.exp_avg holds a NaN or an infinity"
    ):
        save_checkpoint(folder / "step_2", model=model, tokenizer=tokenizer, state=state)
    with torch.no_grad():
        model.model.norm.weight[0] = math.nan
    with pytest.raises(NonFiniteCheckpointError, match=r"^model.model.norm.weight holds a NaN"):
        save_checkpoint(folder / "step_2", model=model, tokenizer=tokenizer, state={"step": 2})
    assert checkpoint_names(tmp_path) == ["step_1"]


def test_an_update_that_overflows_is_undone_counted_and_ends_the_run_with_a_finite_checkpoint(
    tmp_path, cache_dir, caplog
):
    # lr 1e38: AdamW's first step size lr / (1 - beta1) is beyond float32; before, step 1 was logged as
    # a normal update and every weight of the checkpoint was NaN
    overrides = (
        *TINY_RUN,
        "optim.lr=1e38",
        "optim.warmup_steps=0",
        "trainer.max_steps=5",
        "trainer.max_bad_steps=2",
    )
    cfg = compose_train(*overrides, f"paths.cache_dir={cache_dir}")
    with (
        caplog.at_level(logging.WARNING, logger="rl_lab"),
        pytest.raises(RunAbortedError, match="update in 2 steps in a row .* saved in .*step_2$"),
    ):
        run(cfg, tmp_path)
    assert caplog.text.count("update undone") == 2
    rows = read_metrics(tmp_path)
    assert [r["policy/skipped_updates"] for r in rows.values()] == [1, 1]
    assert [r["policy/optimizer_steps"] for r in rows.values()] == [0, 0]
    # the checkpoint holds the initial weights, bit for bit: both steps were undone exactly
    from common.models import load_policy

    initial, _ = load_policy("tiny", cache_dir=cache_dir, tiny=OmegaConf.to_container(cfg.model.tiny), seed=0)
    saved = load_file(tmp_path / "checkpoints" / "step_2" / "model.safetensors")
    for name, weight in initial.state_dict().items():
        if name in saved:
            assert torch.equal(saved[name], weight), name


def test_an_unwritable_run_folder_is_one_line_before_training(tmp_path, cache_dir):
    (tmp_path / "file").write_text("not a folder")
    for key in ("hydra.run.dir", "hydra.sweep.dir"):
        sweep = ["-m"] if key == "hydra.sweep.dir" else []
        result = train_cli(*sweep, "debug=smoke", f"{key}={tmp_path / 'file' / 'run'}", cache_dir=cache_dir)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert result.stderr.strip() == (
            f"error: {key}: cannot create or write the run folder ([Errno 20] Not a directory: "
            f"'{tmp_path / 'file' / 'run'}') (got {tmp_path / 'file' / 'run'})"
        )


def test_a_log_file_that_cannot_be_written_is_one_line(tmp_path, cache_dir):
    # /dev/full fails every write with ENOSPC, as a full disk does
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    result = train_cli(*TINY_RUN, "trainer.max_steps=2", f"hydra.run.dir={tmp_path}", cache_dir=cache_dir)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    metrics = tmp_path / "metrics.jsonl"
    expected = f"error: cannot write {metrics}: No space left on device; the last checkpoint is none"
    assert errors == [expected], result.stderr[-2000:]


def test_wandb_that_cannot_start_falls_back_to_local_files(tmp_path, monkeypatch, caplog):
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(wandb, "init", broken_init)
    logger = RunLogger(
        tmp_path, backend="wandb", mode="online", wandb_init=WandbInit(project="rl-lab", entity=None)
    )
    assert logger.wandb_run is None and "W&B could not start" in caplog.text
    logger.log(1, {"reward/total": 0.5})
    logger.finish()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["reward/total"] == 0.5


def test_wandb_that_fails_to_log_falls_back_to_local_files(tmp_path, caplog):
    class BrokenRun:
        id = "x"

        def log(self, *args, **kwargs):
            raise ConnectionError("lost connection")

    logger = RunLogger(tmp_path, backend="none")
    logger.wandb_run = BrokenRun()
    logger.log(1, {"reward/total": 0.5})
    logger.log(2, {"reward/total": 0.7})
    logger.finish()
    assert "W&B logging failed" in caplog.text and logger.wandb_run is None
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/total"] for r in rows] == [0.5, 0.7]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (("task=jsonl", "task.path=/nonexistent/prompts.jsonl"), "task file not found"),
        (("task=jsonl", "task.path={bad_jsonl}"), ":2: not valid JSON"),
        (("task=jsonl", "task.path={empty_jsonl}"), "no examples"),
        (("task=jsonl", "task.path={latin1_jsonl}"), "latin1.jsonl:2: not valid UTF-8"),
        (("rollout.max_prompt_len=5",), "over the limit"),
        # the prompt named by its file and line, not by its index in train + test
        (
            ("task=jsonl", "task.path={long_jsonl}", "rollout.max_prompt_len=100"),
            "long.jsonl:3: the prompt is",
        ),
        (("trainer.micro_batch_size=3",), "trainer.micro_batch_size"),
        (("algorithm=grpo", "task=nosuchtask"), "task"),
    ],
)
def test_bad_input_is_one_line(tmp_path, cache_dir, overrides, expected):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2", "answer": \n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"prompt": "1+1", "answer": "2"}\n{"prompt": "caf\xe9", "answer": "c"}\n')
    long = tmp_path / "long.jsonl"
    prompts = [f"{i}+{i}" for i in range(5)]
    prompts[2] = "1+1 " * 200  # line 3
    long.write_text("".join(json.dumps({"prompt": p, "answer": "2"}) + "\n" for p in prompts))
    files = dict(bad_jsonl=bad, empty_jsonl=empty, latin1_jsonl=latin1, long_jsonl=long)
    args = [o.format(**files) for o in overrides]
    result = train_cli("debug=smoke", *args, f"hydra.run.dir={tmp_path / 'run'}", cache_dir=cache_dir)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    if "nosuchtask" in args[-1]:  # Hydra's own message lists the available options
        assert "Could not find 'task/nosuchtask'" in result.stderr
        return
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
