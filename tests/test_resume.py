"""Exact resume: a run stopped after step 2 and resumed matches an uninterrupted run, for every
algorithm; Ctrl-C finishes the step, checkpoints and says how to resume."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scripts.train import run
from tests.conftest import ROOT, TINY_RUN, compose_train

TINY = (*TINY_RUN, "optim.lr=1e-2")
ALGORITHMS = {
    "grpo": ("algorithm=grpo",),
    # dynamic sampling draws a data-dependent number of batches: the data position must be restored
    "dapo": ("algorithm=dapo", "dynamic_sampling.max_num_gen_batches=3"),
    # the critic, its optimizer and the KL controller are part of the state
    "ppo": ("algorithm=ppo", "algorithm.kl_ctl=adaptive", "algorithm.kl_target=0.01"),
}


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl's rows by step; fails if a step was logged more than once (the file is appended
    to: a resume that dropped none of the rows it writes again would log them twice)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step logged more than once in {run_dir}: {steps}"
    return {r["step"]: r for r in rows}


def assert_resumed(log_text: str, checkpoint: Path, step: int) -> None:
    """The run said it went on from `checkpoint` at `step`: a resume that silently started over with
    the same seed would log the same rows and pass every other check."""
    assert f"resuming from {checkpoint} (step {step})" in log_text, log_text[-3000:]


def comparable(row: dict) -> dict:
    """Everything but wall-clock timings."""
    return {k: v for k, v in row.items() if not k.startswith("perf/")}


def assert_same_run(a: Path, b: Path, steps: list[int]) -> None:
    ma, mb = read_metrics(a), read_metrics(b)
    for step in steps:
        ra, rb = comparable(ma[step]), comparable(mb[step])
        assert ra.keys() == rb.keys()
        for key in ra:
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (step, key)
    wa = load_file(a / "checkpoints" / "final" / "model.safetensors")
    wb = load_file(b / "checkpoints" / "final" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_resumed_run_matches_uninterrupted(tmp_path, cache_dir, caplog, algorithm):
    common = (*TINY, *ALGORITHMS[algorithm], f"paths.cache_dir={cache_dir}")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(compose_train(*common, "trainer.max_steps=4"), straight)
    run(compose_train(*common, "trainer.max_steps=2"), resumed)
    with caplog.at_level(logging.INFO, logger="rl_lab"):
        run(compose_train(*common, "trainer.max_steps=4", "resume=auto"), resumed)
    assert_resumed(caplog.text, resumed / "checkpoints" / "final", 2)
    assert sorted(read_metrics(resumed)) == [1, 2, 3, 4]  # steps 3-4 written once
    assert_same_run(straight, resumed, [1, 2, 3, 4])


def test_ctrl_c_checkpoints_the_finished_step_and_resume_matches(tmp_path, cache_dir, caplog):
    run_dir = tmp_path / "interrupted"
    # the same thread count in the subprocess and here: float sums must run in the same order
    args = [*TINY, "trainer.save_every=0", f"trainer.num_threads={torch.get_num_threads()}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "scripts.train", *args, "trainer.max_steps=200", f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env={**os.environ, "RL_LAB_CACHE": cache_dir},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stderr[-2000:]
    assert "resume with: python -m scripts.train" in stderr and "resume=auto" in stderr
    done = max(read_metrics(run_dir))
    assert 1 <= done < 200
    assert (run_dir / "checkpoints" / f"step_{done}" / "trainer_state.pt").is_file()
    # resume for two more steps and compare with a run that was never stopped
    common = (*args, f"paths.cache_dir={cache_dir}")
    with caplog.at_level(logging.INFO, logger="rl_lab"):
        run(compose_train(*common, f"trainer.max_steps={done + 2}", "resume=auto"), run_dir)
    assert_resumed(caplog.text, run_dir / "checkpoints" / f"step_{done}", done)
    straight = tmp_path / "straight"
    run(compose_train(*common, f"trainer.max_steps={done + 2}"), straight)
    assert_same_run(straight, run_dir, list(range(1, done + 3)))


class SyncRecorder:
    """A rollout engine that keeps its own copy of the weights, as vLLM does: records each weight sync
    (the first weight's name and sum) and each sampling call; the rest is the real engine's."""

    syncs_weights = True

    def __init__(self, engine, events: list) -> None:
        self._engine, self._events = engine, events

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def sync_weights(self, model: torch.nn.Module) -> None:
        name, weight = next(iter(model.named_parameters()))
        self._events.append(("sync", name, weight.detach().sum().item()))

    def sample(self, *args, **kwargs):
        self._events.append(("sample",))
        return self._engine.sample(*args, **kwargs)


def test_an_engine_with_its_own_weights_gets_the_checkpoints_before_it_samples(
    tmp_path, cache_dir, monkeypatch
):
    """rollout.engine=vllm builds its copy of the weights from the start weights: on resume the
    checkpoint's weights must reach it before the first rollout (vLLM is not installed here: a fake
    engine records the order of calls)."""
    import scripts.train as train_module

    events: list = []
    build = train_module.build_rollout
    monkeypatch.setattr(train_module, "build_rollout", lambda *a, **k: SyncRecorder(build(*a, **k), events))
    common = (*TINY, "trainer.save_every=1", f"paths.cache_dir={cache_dir}")
    run(compose_train(*common, "trainer.max_steps=1"), tmp_path)
    saved = load_file(tmp_path / "checkpoints" / "final" / "model.safetensors")
    events.clear()
    run(compose_train(*common, "trainer.max_steps=2", "resume=auto"), tmp_path)
    kind, name, total = events[0]
    assert kind == "sync" and total == pytest.approx(saved[name].sum().item()), events[:3]
    assert events[1] == ("sample",)


@pytest.mark.parametrize("pays", [True, False])
def test_auto_prepacking_decides_once_and_a_resume_keeps_the_decision(tmp_path, cache_dir, monkeypatch, pays):
    """rollout.prepack_linears=auto with a fake timer that forces the decision: two identical runs match
    bit for bit, and a run resumed where the timer now says the opposite keeps the checkpoint's choice
    (and matches too)."""
    from common.rollout import prepack
    from common.rollout.prepack import LinearTimes

    if not prepack.PREPACKING.available():
        pytest.skip("oneDNN prepacking is not usable in this torch build")
    measured = []

    def fake_timer(linears, rows):  # prepacked 10 ms faster per decode step, reorder 1 ms: pays, or not
        measured.append(rows)
        fast, slow = LinearTimes(0.020, 0.010, 0.001), LinearTimes(0.010, 0.020, 0.001)
        return fast if pays == (len(measured) == 1) else slow

    monkeypatch.setattr(prepack, "time_linears", fake_timer)
    common = (*TINY, "rollout.prepack_linears=auto", f"paths.cache_dir={cache_dir}")
    first, second, resumed = tmp_path / "first", tmp_path / "second", tmp_path / "resumed"
    run(compose_train(*common, "trainer.max_steps=3"), first)
    state = torch.load(first / "checkpoints" / "final" / "trainer_state.pt", weights_only=False)
    assert state["rollout"] == {"prepack_linears": pays} and len(measured) == 1
    measured.clear()
    run(compose_train(*common, "trainer.max_steps=3"), second)  # the same first measurement
    measured.clear()
    run(compose_train(*common, "trainer.max_steps=1"), resumed)
    run(compose_train(*common, "trainer.max_steps=3", "resume=auto"), resumed)  # would measure the opposite
    assert len(measured) == 1  # the resume measured nothing: it took the checkpoint's decision
    for other in (second, resumed):
        ma, mb = read_metrics(first), read_metrics(other)
        assert [comparable(ma[s]) for s in (1, 2, 3)] == [comparable(mb[s]) for s in (1, 2, 3)]  # bit for bit
