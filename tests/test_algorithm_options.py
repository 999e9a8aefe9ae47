"""Each policy loss and advantage estimator trains end to end: 2 steps on the tiny model with 2 optimizer
steps per rollout batch (so the behaviour log-probs are recorded and the ratio leaves 1), the
parameters change and every logged loss is finite."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import TEST_SEED, compose_train
from tests.test_trainer import run_and_check_parameters_change


@pytest.mark.parametrize(
    "option",
    [
        ("algorithm.policy_loss=gspo",),
        ("algorithm.policy_loss=cispo", "algorithm.clip_low=1.0"),
        ("algorithm.adv_estimator=rloo",),
        ("algorithm.adv_estimator=reinforce_plus_plus",),
        ("algorithm.scale_rewards=batch",),
    ],
    ids=lambda option: option[0].split(".")[1],
)
def test_option_trains_two_steps(tmp_path, cache_dir, monkeypatch, option):
    cfg = compose_train(
        "model=tiny",
        "task=char_share",
        "logger=none",
        "rollout.max_new_tokens=8",
        *option,
        f"seed={TEST_SEED}",
        "trainer.max_steps=2",
        "trainer.batch_size=2",
        "trainer.mini_batch_size=1",
        "group_size=g4",
        "trainer.eval_every=0",
        "optim.lr=1e-3",
        "optim.warmup_steps=0",
        "trainer.num_threads=1",
        f"paths.cache_dir={cache_dir}",
    )
    run_and_check_parameters_change(cfg, tmp_path, monkeypatch)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in metrics if "policy/loss" in m]
    assert len(trained) == 2
    for m in trained:
        assert math.isfinite(m["policy/loss"]) and math.isfinite(m["policy/clipfrac"]), m
        assert m["policy/skipped_updates"] == 0
