"""Sweeps: the objective a run returns to a Hydra sweeper, Optuna studies (experiment=tune), threads
per run of a parallel local sweep, and the token budget that ends a run."""

from __future__ import annotations

import json
import math

import pytest
from omegaconf import OmegaConf

from scripts.train import sweep_num_threads, worst_objective
from tests.conftest import compose_train
from tests.test_cli import train_cli


@pytest.mark.parametrize(
    "mode, n_jobs, cores, expected",
    [
        ("MULTIRUN", 2, 2, 1),  # two runs on two cores: one thread each
        ("MULTIRUN", 3, 16, 5),  # 16 // 3
        ("MULTIRUN", 4, 2, 1),  # more jobs than cores: still one thread
        ("MULTIRUN", -1, 8, 1),  # joblib's -1: one job per core
        ("MULTIRUN", -2, 8, 1),  # -2: all cores but one -> 7 jobs, 8 // 7 = 1
        ("MULTIRUN", 1, 8, None),  # one job at a time: torch's default
        ("MULTIRUN", None, 8, None),  # the basic launcher has no n_jobs
        ("RUN", 2, 8, None),  # not a sweep
    ],
)
def test_threads_per_run_of_a_parallel_sweep(mode, n_jobs, cores, expected):
    from hydra.types import RunMode

    hydra_cfg = OmegaConf.create({"mode": RunMode[mode], "launcher": {"n_jobs": n_jobs}})
    assert sweep_num_threads(hydra_cfg, cores) == expected


def test_a_run_without_an_objective_returns_the_worst_value_for_the_sweep():
    assert worst_objective(OmegaConf.create({"sweeper": {"direction": "maximize"}})) == -math.inf
    assert worst_objective(OmegaConf.create({"sweeper": {"direction": "minimize"}})) == math.inf
    assert math.isnan(worst_objective(OmegaConf.create({"sweeper": {}})))


def test_tune_preset_searches_the_learning_rate_and_ppo_also_the_critics():
    params = compose_train("experiment=tune", hydra=True).hydra.sweeper.params
    assert params["optim.lr"].startswith("tag(log, interval(") and "critic.lr" not in params
    ppo = compose_train("experiment=tune", "arm=ppo", hydra=True)
    assert ppo.hydra.sweeper.params["critic.lr"].startswith("tag(log") and ppo.algorithm.ppo_epochs == 1
    assert ppo.hydra.sweeper.direction == "maximize" and ppo.objective == "eval/accuracy"


def test_optuna_study_runs_trials_and_a_failing_trial_does_not_end_it(tmp_path, cache_dir):
    # two trials of the tiny comparison, one step each; then a study whose every trial fails at start-up
    sweep = tmp_path / "study"
    args = [
        "-m",
        "experiment=tune",
        "hydra.sweeper.n_trials=2",
        "trainer.max_steps=1",
        "trainer.eval_every=1",
    ]
    result = train_cli(*args, f"hydra.sweep.dir={sweep}", cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert 0 <= best.best_value <= 1 and 1e-3 <= best.best_params["optim.lr"] <= 1e-1
    assert "Best value" in result.stdout + result.stderr
    trials = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(trials) == 2 and all((t / "metrics.jsonl").is_file() for t in trials)
    failing = tmp_path / "failing"
    result = train_cli(*args, "rollout.max_prompt_len=2", f"hydra.sweep.dir={failing}", cache_dir=cache_dir)
    # the study ran both trials, then lists the failed ones and exits 1 (scripts/sweeps.py)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.count("error: task char_share:") == 4  # one line per failed trial, and its summary
    assert result.stderr.strip().endswith("error: 2 job(s) of the sweep failed")
    assert OmegaConf.load(failing / "optimization_results.yaml").best_value == -math.inf


def test_token_budget_ends_the_run_with_its_evaluation(tmp_path, cache_dir):
    # 8 tokens per response x 4 responses x 2 prompts = 64 tokens a step at most: a budget of 100 ends
    # the run after step 2 (at most 128 tokens), though max_steps is 5, and step 2 is evaluated
    result = train_cli(
        "debug=smoke",
        "trainer.max_steps=5",
        "trainer.max_generated_tokens=100",
        "trainer.eval_every=10",
        f"hydra.run.dir={tmp_path}",
        cache_dir=cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["sampling/tokens_total"] >= 100 and rows[-2].get("sampling/tokens_total", 0) < 100
    assert "eval/accuracy" in last and last["step"] < 5
    assert (tmp_path / "checkpoints" / "final").is_dir()
    assert "token budget reached" in result.stdout + result.stderr
