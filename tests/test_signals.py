"""Signals a cluster sends: each of trainer.checkpoint_signals finishes the step, checkpoints and
stops with the resume command (quoted); a signal during a checkpoint write lets it finish; under the
submitit launchers the warning signal is handed on to submitit, whose requeued job resumes."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import common.run_checkpoints as run_checkpoints_module
import common.trainer as trainer_module
from common.state import RunInterruptedError, StopRequest
from hydra_plugins.rl_lab_launchers import resumed_overrides
from scripts.train import hand_on_signal, run
from tests.conftest import ROOT, TINY_RUN, compose_train


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_stop_request_defers_a_second_signal_during_a_write():
    with StopRequest(["SIGUSR1"]) as stop:
        signal.raise_signal(signal.SIGUSR1)
        assert stop.requested and stop.signum == signal.SIGUSR1
        with stop.writing():
            signal.raise_signal(signal.SIGUSR1)  # a second one while a checkpoint is written: no stop
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGUSR1)  # a second one otherwise: stop at once
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # restored


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2])
def test_each_checkpoint_signal_checkpoints_and_stops(tmp_path, cache_dir, monkeypatch, sig):
    original = trainer_module.train_step

    def signal_at_step_2(ctx, step, *args):
        out = original(ctx, step, *args)
        if step == 2:
            signal.raise_signal(sig)
        return out

    monkeypatch.setattr(trainer_module, "train_step", signal_at_step_2)
    overrides = (*TINY_RUN, "trainer.max_steps=4", "trainer.save_every=0", f"paths.cache_dir={cache_dir}")
    with pytest.raises(RunInterruptedError) as err:
        run(compose_train(*overrides), tmp_path)
    assert err.value.step == 2 and err.value.signum == sig
    assert (tmp_path / "checkpoints" / "step_2" / "complete.json").is_file()


def test_a_signal_not_listed_is_left_alone():
    with StopRequest(["SIGTERM"]):
        assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL


def test_signals_during_the_final_write_let_it_finish(tmp_path, cache_dir, monkeypatch):
    """save_every=0: the final checkpoint is the run's only one; two SIGTERMs while it is written
    (the second would otherwise stop at once) leave it whole and the run ends normally."""
    original = run_checkpoints_module.save_checkpoint

    def signalled_save(path, **kwargs):
        if Path(path).name == "final":
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
        return original(path, **kwargs)

    monkeypatch.setattr(run_checkpoints_module, "save_checkpoint", signalled_save)
    overrides = (*TINY_RUN, "trainer.max_steps=2", "trainer.save_every=0", f"paths.cache_dir={cache_dir}")
    run(compose_train(*overrides), tmp_path)
    assert (tmp_path / "checkpoints" / "final" / "complete.json").is_file()


def test_hand_on_signal_calls_the_previous_handler_only():
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        hand_on_signal(signal.SIGUSR2)  # submitit's handler would requeue the job here
        hand_on_signal(None)  # Ctrl-C from the stop request's own count: nothing
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert calls == [signal.SIGUSR2]
    hand_on_signal(signal.SIGUSR1)  # the default handler (would kill the process) is not called


def test_requeued_job_resumes():
    assert resumed_overrides(["seed=1", "resume=null"]) == ["seed=1", "resume=auto"]
    assert resumed_overrides(["+resume=x", "seed=2"]) == ["seed=2", "resume=auto"]
    assert resumed_overrides([]) == ["resume=auto"]


def test_sigusr1_prints_a_quoted_resume_command_that_works(tmp_path, cache_dir):
    run_dir = tmp_path / "a run folder"  # a space: the printed command must quote it
    args = [*TINY_RUN, "trainer.save_every=0", "trainer.num_threads=1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "scripts.train", *args, "trainer.max_steps=200", f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env={**os.environ, "RL_LAB_CACHE": cache_dir},
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stderr[-2000:]
    command = next(line for line in stderr.splitlines() if line.startswith("resume with: "))
    words = shlex.split(command.removeprefix("resume with: "))
    assert f"hydra.run.dir={run_dir}" in words and words[-1] == "resume=auto"
    done = max(steps_logged(run_dir))
    words = [f"trainer.max_steps={done + 1}" if w.startswith("trainer.max_steps=") else w for w in words]
    assert words[:3] == ["python", "-m", "scripts.train"]
    resumed = subprocess.run(
        [sys.executable, *words[1:]],
        cwd=ROOT,
        env={**os.environ, "RL_LAB_CACHE": cache_dir},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert steps_logged(run_dir) == list(range(1, done + 2))


@pytest.mark.slow
def test_submitit_local_job_checkpoints_on_usr2_and_resumes_when_requeued(tmp_path, cache_dir):
    """hydra-submitit-launcher on submitit's local executor, which sends USR2 signal_delay_s (30 s)
    before its 1-minute limit and requeues as SLURM does (3 times at most): each attempt checkpoints
    on the warning, the next resumes in the same folder, and the run ends with every step logged once."""
    sweep = tmp_path / "sweep"
    launcher = "hydra.launcher._target_=hydra_plugins.rl_lab_launchers.ResumingLocalLauncher"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.train",
            "-m",
            *TINY_RUN,
            "trainer.num_threads=1",
            "trainer.save_every=0",
            "trainer.max_steps=30",
            "hydra/launcher=submitit_local",
            launcher,
            "hydra.launcher.timeout_min=1",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=ROOT,
        env={**os.environ, "RL_LAB_CACHE": cache_dir},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (job,) = [p for p in sweep.iterdir() if (p / "metrics.jsonl").is_file()]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.err"))
    assert "interrupted after step" in logs and "Caught signal SIGUSR2" in logs, logs[-3000:]
    assert "resume=auto" in (job / ".hydra" / "overrides.yaml").read_text()
    assert steps_logged(job) == list(range(1, 31))
    assert (job / "checkpoints" / "final" / "complete.json").is_file()
