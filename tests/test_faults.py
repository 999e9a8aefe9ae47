"""Faults a long run survives: a raising reward, non-finite losses, W&B failing, a failed checkpoint
write; and bad input answered with one clear line."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import common.trainer as trainer_module
from common.checkpoint import STATE_FILE, save_checkpoint
from common.logging import RunLogger
from common.rewards import RewardError
from common.state import RunAbortedError
from grpo import GRPO
from scripts.train import run
from tests.conftest import TINY_RUN, compose_train
from tests.test_cli import train_cli


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


def test_raising_reward_fails_fast_when_asked(tmp_path, cache_dir, monkeypatch):
    from common.tasks.char_share import CharShareTask

    def broken(self, response, example):
        raise RuntimeError("verifier crashed")

    monkeypatch.setattr(CharShareTask, "correctness", broken)
    cfg = compose_train(
        *TINY_RUN, "trainer.max_steps=2", "trainer.fail_on_reward_error=true", f"paths.cache_dir={cache_dir}"
    )
    with pytest.raises(RewardError):
        run(cfg, tmp_path)


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
    from safetensors.torch import load_file

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


def test_periodic_checkpoint_failure_does_not_stop_training(tmp_path, cache_dir, monkeypatch, caplog):
    original = trainer_module.save_checkpoint

    def failing_for_steps(path, **kwargs):
        if path.name.startswith("step_"):
            raise OSError(28, "No space left on device")
        return original(path, **kwargs)

    monkeypatch.setattr(trainer_module, "save_checkpoint", failing_for_steps)
    cfg = compose_train(
        *TINY_RUN, "trainer.max_steps=3", "trainer.save_every=1", f"paths.cache_dir={cache_dir}"
    )
    run(cfg, tmp_path)
    assert "checkpoint at step 1 failed" in caplog.text
    assert (tmp_path / "checkpoints" / "final" / STATE_FILE).is_file()


def test_wandb_that_cannot_start_falls_back_to_local_files(tmp_path, monkeypatch, caplog):
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(wandb, "init", broken_init)
    logger = RunLogger(tmp_path, backend="wandb", mode="online")
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
