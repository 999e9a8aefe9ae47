"""What a run leaves on disk: step checkpoints go once the final one is written (unless kept), a
weights-only final checkpoint (trainer.save_only_model) serves scripts/eval.py but not a resume,
and an interrupted run still has a checkpoint it resumes from."""

from __future__ import annotations

import logging
import re
import signal
from pathlib import Path

import pytest
import torch

import common.trainer as trainer_module
from common.checkpoint import MODEL_ONLY, STATE_FILE, remove_step_checkpoints
from common.state import RunInterruptedError
from scripts.eval import main as eval_main
from scripts.train import run
from tests.conftest import TINY_RUN, compose_train
from tests.test_cli import train_cli


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def read_state(folder: Path) -> dict:
    return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("keep, left", [(False, ["final"]), (True, ["final", "step_1", "step_2"])])
def test_finished_run_removes_the_step_checkpoints_unless_kept(tmp_path, cache_dir, caplog, keep, left):
    cfg = compose_train(
        *TINY_RUN,
        "trainer.max_steps=3",
        "trainer.save_every=1",
        "trainer.keep_last_checkpoints=0",  # every step checkpoint stays while the run goes on
        f"trainer.keep_step_checkpoints={str(keep).lower()}",
        f"paths.cache_dir={cache_dir}",
    )
    with caplog.at_level(logging.INFO, logger="rl_lab"):
        run(cfg, tmp_path)
    assert checkpoint_names(tmp_path) == left
    assert "optimizer" in read_state(tmp_path / "checkpoints" / "final")  # resumable by default
    # the closing line reports the run folder's size, as the files under it add up
    reported = re.search(r"takes ([\d.]+) MB on disk", caplog.text)
    assert reported is not None, caplog.text
    on_disk = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file() and p.name != "train.log")
    assert float(reported.group(1)) == pytest.approx(on_disk / 1e6, abs=0.06)


def test_remove_step_checkpoints_keeps_those_after_the_final_step(tmp_path):
    for step in (2, 10, 30):
        (tmp_path / "checkpoints" / f"step_{step}").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_x").mkdir()  # not a step checkpoint: left alone
    remove_step_checkpoints(tmp_path, up_to=10)
    assert checkpoint_names(tmp_path) == ["step_30", "step_x"]


def test_save_only_model_final_serves_eval_but_not_resume(tmp_path, cache_dir):
    overrides = (*TINY_RUN, "trainer.max_steps=2", "trainer.save_every=1", "trainer.save_only_model=true")
    run(compose_train(*overrides, f"paths.cache_dir={cache_dir}"), tmp_path)
    final = tmp_path / "checkpoints" / "final"
    assert checkpoint_names(tmp_path) == ["final"]
    assert read_state(final) == {"step": 2, MODEL_ONLY: True}  # no optimizer, scheduler or RNG state
    # scripts/eval.py finds it in the run directory and loads the trained weights from it
    result = eval_main([str(tmp_path), "--num-prompts", "2", "--k", "1", "--max-new-tokens", "4"])
    assert result["model"] == str(final) and result["metrics"]["errors"] == 0
    # resume from it stops with one line that says why
    result = train_cli(*overrides, f"hydra.run.dir={tmp_path}", "resume=auto", cache_dir=cache_dir)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "weights only" in errors[0] and "save_only_model" in errors[0]
    assert "Traceback" not in result.stderr


def test_interrupted_save_only_model_run_resumes_from_its_step_checkpoint(tmp_path, cache_dir, monkeypatch):
    original = trainer_module.train_step

    def sigterm_at_step_2(ctx, step, *args):
        out = original(ctx, step, *args)
        if step == 2:
            signal.raise_signal(signal.SIGTERM)  # as SLURM before its time limit: finish, checkpoint, stop
        return out

    monkeypatch.setattr(trainer_module, "train_step", sigterm_at_step_2)
    overrides = (
        *TINY_RUN,
        "trainer.max_steps=4",
        "trainer.save_every=0",
        "trainer.save_only_model=true",
        f"paths.cache_dir={cache_dir}",
    )
    with pytest.raises(RunInterruptedError):
        run(compose_train(*overrides), tmp_path)
    assert checkpoint_names(tmp_path) == ["step_2"]
    assert "optimizer" in read_state(tmp_path / "checkpoints" / "step_2")  # the full state, to resume
    monkeypatch.undo()
    run(compose_train(*overrides, "resume=auto"), tmp_path)
    assert checkpoint_names(tmp_path) == ["final"]
    assert read_state(tmp_path / "checkpoints" / "final") == {"step": 4, MODEL_ONLY: True}
