"""Fault injection: a run that checkpoints every step is killed with SIGKILL at random (seeded)
moments, during checkpoint writes and between them, and continued with resume=auto each time; it
must end with every step logged exactly once and the metrics and weights of a run never killed
(same machine, same threads, same process path: bit for bit)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import ROOT, TEST_SEED, TINY_RUN
from tests.test_cli import cli_env
from tests.test_resume import comparable, read_metrics

STEPS = 8
TRIALS = 8
ARGS = (
    *TINY_RUN,
    f"trainer.max_steps={STEPS}",
    "trainer.save_every=1",
    "trainer.keep_last_checkpoints=1",  # every save also deletes the previous checkpoint
    "trainer.num_threads=1",
    f"seed={TEST_SEED}",
)


def start(run_dir: Path, cache_dir: str, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "scripts.train", *ARGS, *extra, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=cli_env(cache_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def saving(run_dir: Path) -> bool:
    """A checkpoint write or deletion is under way: a hidden temporary folder exists."""
    try:
        return any(name.startswith(".") for name in os.listdir(run_dir / "checkpoints"))
    except FileNotFoundError:
        return False


def logged_lines(run_dir: Path) -> int:
    try:
        return (run_dir / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def kill_at_random(proc: subprocess.Popen, run_dir: Path, rng: random.Random, during_save: bool) -> str:
    """SIGKILL `proc` at a random moment: a moment into a checkpoint write (`during_save`), or a
    moment after a step was logged (between two writes). Returns what happened: "during a save" (a
    temporary folder was there when the signal went), "between saves", or "finished" when the run
    ended first."""
    lines = logged_lines(run_dir)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if (during_save and saving(run_dir)) or (not during_save and logged_lines(run_dir) > lines):
            time.sleep(rng.uniform(0, 0.15) if during_save else rng.uniform(0, 0.6))
            break
        time.sleep(0.002)
    if proc.poll() is not None:
        return "finished"
    was_saving = saving(run_dir)
    proc.kill()
    proc.wait()
    return "during a save" if was_saving else "between saves"


@pytest.mark.slow
def test_kill_9_at_random_moments_and_resume_auto_end_in_the_uninterrupted_run(tmp_path, cache_dir):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert start(straight, cache_dir).wait(timeout=600) == 0
    rng = random.Random(1000 + TEST_SEED)
    outcomes = []
    for trial in range(TRIALS):
        outcome = kill_at_random(
            start(killed, cache_dir, "resume=auto"), killed, rng, during_save=trial % 2 == 0
        )
        outcomes.append(outcome)
        if outcome == "finished":
            break
    log_before = (killed / "train.log").stat().st_size
    last = start(killed, cache_dir, "resume=auto")
    _, stderr = last.communicate(timeout=600)
    assert last.returncode == 0, stderr[-3000:]
    assert "during a save" in outcomes and "between saves" in outcomes, outcomes
    if outcomes[-1] != "finished":  # the last run went on from a checkpoint, and said so
        log = (killed / "train.log").read_text()[log_before:]
        assert "resuming from" in log and "starting fresh" not in log, log[-3000:]
    a, b = read_metrics(straight), read_metrics(killed)  # read_metrics: every step exactly once
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert comparable(b[step]) == comparable(a[step]), step
    wa = load_file(straight / "checkpoints" / "final" / "model.safetensors")
    wb = load_file(killed / "checkpoints" / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    assert sorted(os.listdir(killed / "checkpoints")) == ["final"]  # nothing left behind
