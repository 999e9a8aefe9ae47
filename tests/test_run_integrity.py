"""What a run refuses rather than get silently wrong: keys no schema reads, rewards that are not a
number in the task's range, non-finite logits and unreadable weights, the published results
rewritten by a read, runs of different settings pooled as seeds, and failed jobs of a sweep."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

import common.evaluation as evaluation_module
import scripts.train as train_module
from common.checkpoint import COMPLETE_FILE
from common.config import ConfigError
from common.models import ModelLoadError, load_policy, save_hf
from common.rewards import RewardError, score_responses
from common.rollout.sampler import NonFiniteLogitsError, TokenSampler
from common.state import RunAbortedError
from common.tasks import CharShareTask, Example
from common.tasks.base import checked_score
from scripts import archive, compare, refresh_results
from scripts.build import build_policy, validate
from scripts.comparison.runs import find_runs
from scripts.eval import main as eval_main
from scripts.sweeps import FAILED_FILE
from scripts.train import run
from tests.conftest import ROOT, TINY_RUN, compose_train
from tests.test_cli import cli_env, train_cli
from tests.test_compare import write_run
from tests.test_resume import read_metrics


@pytest.mark.parametrize(
    "override, expected",
    [
        ("+trainer.max_step=3", "trainer.max_step: not a key of trainer (got 3)"),
        ("++trainer.max_step=3", "trainer.max_step: not a key of trainer (got 3)"),
        ("+rollout.temprature=0.1", "rollout.temprature: not a key of rollout (got 0.1)"),
        ("+foo=1", "foo: not a key of the top level (got 1)"),
        ("+foo.bar=2", "foo: not a key of the top level (got {'bar': 2})"),
        ("+algorithm.foo=2", "algorithm.foo: not a key of algorithm (got 2)"),
        ("+task.foo=2", "task.foo: not a key of task (got 2)"),
    ],
)
def test_added_keys_that_no_schema_reads_are_refused(override, expected):
    with pytest.raises(ConfigError) as info:
        validate(compose_train(*TINY_RUN, override))
    assert str(info.value) == expected


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("++trainer.max_steps=3", "trainer.max_steps", 3),  # ++ on a key the schema has sets it
        ("+model.tiny.attention_dropout=0.5", "model.tiny.attention_dropout", 0.5),  # a free mapping
    ],
)
def test_added_keys_a_schema_reads_or_leaves_open_are_kept(override, key, value):
    cfg = compose_train(*TINY_RUN, override)
    validate(cfg)
    assert OmegaConf.select(cfg, key) == value


def test_added_key_on_the_command_line_is_one_line_and_hydra_keys_still_work(tmp_path, cache_dir):
    bad_dir = tmp_path / "bad"
    bad = train_cli(*TINY_RUN, "+rollout.temprature=0.1", f"hydra.run.dir={bad_dir}", cache_dir=cache_dir)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: rollout.temprature: not a key of rollout (got 0.1)"
    assert not (bad_dir / "metrics.jsonl").exists()
    # Hydra's own node takes additions as before
    good = train_cli(
        *TINY_RUN,
        "trainer.max_steps=1",
        "trainer.num_threads=1",
        "+hydra.job.env_set.RL_LAB_PROBE=1",
        f"hydra.run.dir={tmp_path / 'good'}",
        cache_dir=cache_dir,
    )
    assert good.returncode == 0, good.stderr[-2000:]
    assert (tmp_path / "good" / "metrics.jsonl").is_file()


# --- rewards: a finite number in the task's range, or an error -------------------------------------


@pytest.mark.parametrize(
    "score, expected",
    [(1, 1.0), (True, 1.0), (0.25, 0.25), (np.float32(0.5), 0.5), (0, 0.0)],
)
def test_checked_score_takes_real_numbers_in_range(score, expected):
    assert checked_score(score, (0.0, 1.0)) == expected


@pytest.mark.parametrize(
    "score, why",
    [
        ("0.5", "'0.5' of type str, not a number"),  # a string is not parsed into a reward
        (None, "None of type NoneType, not a number"),
        (374.17, "374.17, outside the task's range [0.0, 1.0]"),
        (-0.5, "-0.5, outside the task's range [0.0, 1.0]"),
        (float("nan"), "nan, outside"),
        (float("inf"), "inf, outside"),
    ],
)
def test_checked_score_refuses_anything_else(score, why):
    with pytest.raises(ValueError, match=re.escape(f"verifier returned {why}")):
        checked_score(score, (0.0, 1.0))


class ScoreTask(CharShareTask):
    """char_share whose verifier returns the response text as its score ("0.5" stays a string)."""

    def correctness(self, response, example):
        return {"num": 0.5, "str": "0.5", "big": 374.17}[response]


def test_a_score_out_of_range_or_of_the_wrong_type_is_a_reward_error():
    task, ex = ScoreTask(), Example("p", "a")
    result = score_responses(task, ["num", "str", "big"], [ex] * 3, format_weight=0.0)
    # only "num" counts: 0.5; the others score 0 and are errors
    assert result.correct.tolist() == [0.5, 0.0, 0.0] and result.errors == 2
    assert "ValueError: verifier returned '0.5' of type str" in result.error_messages[0]
    with pytest.raises(RewardError, match=r"sample 2: ValueError: verifier returned 374.17, outside"):
        score_responses(task, ["num", "num", "big"], [ex] * 3, format_weight=0.0, fail_fast=True)


def test_a_run_whose_every_reward_fails_stops_in_one_line(tmp_path, cache_dir, monkeypatch):
    # without fail_on_reward_error: a reward that is never valid is not a run that trains on zeros
    monkeypatch.setattr(CharShareTask, "correctness", lambda self, response, example: 374.17)
    cfg = compose_train(*TINY_RUN, "trainer.max_steps=3", f"paths.cache_dir={cache_dir}")
    message = (
        r"^step 1: reward function failed on every sample of the rollout, the first: sample 0: ValueError: "
        r"verifier returned 374.17, outside the task's range \[0.0, 1.0\] .*the state after step 0 is saved"
    )
    with pytest.raises(RunAbortedError, match=message):
        run(cfg, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists() or read_metrics(tmp_path) == {}


def fails_on_held_out_prompts(monkeypatch) -> None:
    """char_share's verifier raising inside held-out evaluation only (training rewards are fine)."""
    original, original_evaluate = CharShareTask.correctness, evaluation_module.evaluate
    in_eval = {"on": False}

    def evaluate(*args, **kwargs):
        in_eval["on"] = True
        try:
            return original_evaluate(*args, **kwargs)
        finally:
            in_eval["on"] = False

    def correctness(self, response, example):
        if in_eval["on"]:
            raise KeyError("held-out field")
        return original(self, response, example)

    monkeypatch.setattr(evaluation_module, "evaluate", evaluate)  # held_out_metrics calls it
    monkeypatch.setattr(CharShareTask, "correctness", correctness)


def test_reward_errors_in_evaluation_are_counted(tmp_path, cache_dir, monkeypatch):
    fails_on_held_out_prompts(monkeypatch)
    eval_every = ("trainer.eval_every=2", "trainer.eval_num_prompts=3")
    run(
        compose_train(*TINY_RUN, *eval_every, "trainer.max_steps=2", f"paths.cache_dir={cache_dir}"), tmp_path
    )
    rows = read_metrics(tmp_path)
    # steps 0 and 2 evaluate 3 prompts each, every one an error (scored 0: accuracy 0)
    assert [rows[s]["eval/reward_errors"] for s in (0, 2)] == [3, 3]
    assert rows[2]["eval/accuracy"] == 0.0 and "eval/reward_errors" not in rows[1]


def test_reward_errors_in_evaluation_under_fail_on_reward_error_stop_with_a_checkpoint(
    tmp_path, cache_dir, monkeypatch
):
    fails_on_held_out_prompts(monkeypatch)
    overrides = ("trainer.eval_every=2", "trainer.eval_num_prompts=3", "trainer.fail_on_reward_error=true")
    cfg = compose_train(*TINY_RUN, *overrides, "trainer.max_steps=4", f"paths.cache_dir={cache_dir}")
    message = r"^step 0: held-out evaluation: the reward function failed on 3 prompt\(s\) .*step_0$"
    with pytest.raises(RunAbortedError, match=message) as info:
        run(cfg, tmp_path)
    assert info.value.path == tmp_path / "checkpoints" / "step_0"
    assert (info.value.path / COMPLETE_FILE).is_file()


# --- non-finite logits and unreadable weights -------------------------------------------------------


def test_sampler_refuses_non_finite_logits_before_drawing():
    logits = torch.zeros(3, 100)
    logits[1, 96] = float("nan")
    for do_sample in (True, False):
        with pytest.raises(NonFiniteLogitsError, match="NaN or an infinity in 1 of 3 rows"):
            TokenSampler(do_sample)(logits)
    masked = torch.zeros(2, 5)
    masked[:, 0] = float("-inf")  # a masked token beside finite ones is a distribution
    assert TokenSampler(True)(masked)[0].ne(0).all()


def test_non_finite_logits_stop_the_run_naming_the_step(tmp_path, cache_dir, monkeypatch):
    def nan_policy(cfg):
        model, tokenizer = build_policy(cfg)
        with torch.no_grad():
            model.lm_head.weight[5, 0] = float("nan")  # after loading, which refuses such weights
        return model, tokenizer

    monkeypatch.setattr(train_module, "build_policy", nan_policy)
    cfg = compose_train(*TINY_RUN, "trainer.max_steps=2", f"paths.cache_dir={cache_dir}")
    message = r"^step 1: the policy's next-token logits hold a NaN or an infinity in \d+ of 8 rows$"
    with pytest.raises(RunAbortedError, match=message) as info:
        run(cfg, tmp_path)
    assert info.value.path is None  # nothing to resume from: no checkpoint of such a policy


@pytest.fixture(scope="module")
def hub_folder(cache_dir, tmp_path_factory):
    model, tokenizer = load_policy("tiny", cache_dir=cache_dir)
    return save_hf(model, tokenizer, tmp_path_factory.mktemp("hub") / "model")


def copy_with(folder: Path, target: Path, change) -> Path:
    shutil.copytree(folder, target)
    change(target / "model.safetensors")
    return target


def truncate(weights: Path) -> None:
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def nan_weight(weights: Path) -> None:
    tensors = load_file(weights)
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})


def test_hub_model_with_a_truncated_or_non_finite_weights_file_is_one_line(hub_folder, tmp_path):
    truncated = copy_with(hub_folder, tmp_path / "truncated", truncate)
    with pytest.raises(ModelLoadError, match=r"^cannot load .*truncated' as a local directory: Error while"):
        load_policy("hub", name_or_path=str(truncated))
    nan = copy_with(hub_folder, tmp_path / "nan", nan_weight)
    message = r"nan: the weight model.layers.0.mlp.up_proj.weight holds a NaN or an infinity; use an earlier"
    with pytest.raises(ModelLoadError, match=message):
        load_policy("hub", name_or_path=str(nan))


def test_train_and_eval_on_a_truncated_weights_file_are_one_line(hub_folder, tmp_path, cache_dir):
    truncated = copy_with(hub_folder, tmp_path / "truncated", truncate)
    with pytest.raises(SystemExit, match=r"^error: cannot load .*truncated' as a local directory"):
        eval_main([str(truncated), "--num-prompts", "2", "--k", "1", "--max-new-tokens", "4"])
    args = ("model=hub", f"model.name_or_path={truncated}", "task=char_share", "logger=none")
    result = train_cli(*args, f"hydra.run.dir={tmp_path / 'run'}", cache_dir=cache_dir)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot load ")


# --- tools that write: the results archive and scripts.compare --------------------------------------

EXPERIMENTS = sorted(p.name for p in (ROOT / "docs" / "results").iterdir() if p.is_dir())


def git_status(path: Path) -> str:
    return subprocess.run(
        ["git", "status", "--porcelain", "--", str(path)], cwd=ROOT, capture_output=True, text=True
    ).stdout


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_compare_on_an_archive_reproduces_its_published_table_and_writes_nothing_tracked(experiment):
    folder = ROOT / "docs" / "results" / experiment
    before = git_status(folder)
    command = [sys.executable, "-m", "scripts.compare", f"docs/results/{experiment}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert git_status(folder) == before  # the published comparison.md / .png untouched
    written = ROOT / "outputs" / "compare" / experiment / "comparison.md"
    assert f"wrote {written.relative_to(ROOT)}" in result.stdout
    # at the archive's recorded threshold, the table is the published one
    assert written.read_text(encoding="utf-8") == (folder / "comparison.md").read_text(encoding="utf-8")


def test_each_archive_records_the_options_its_quoted_tables_use():
    quoted = refresh_results.quoted_experiments()
    assert sorted(quoted) == [f"docs/results/{e}" for e in EXPERIMENTS]
    for folder, args in quoted.items():
        marker, recorded = compare.parse_args(shlex.split(args)), compare.parse_args([str(ROOT / folder)])
        assert (marker.threshold, marker.bootstrap_reps, marker.seed) == (
            recorded.threshold,
            recorded.bootstrap_reps,
            recorded.seed,
        ), folder


def finished_run(root: Path, seed: int, **config: object) -> Path:
    """A finished grpo run under `root` as scripts.train leaves it, with `config` keys changed."""
    run_dir = write_run(root, "grpo", seed, steps=2, accuracy={0: 0.2, 2: 0.4}, tokens_per_step=10,
                        step_s=1, kl_per_step=None)  # fmt: skip
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    for key, value in config.items():
        OmegaConf.update(saved, key, value)
    OmegaConf.save(saved, run_dir / ".hydra" / "config.yaml")
    (run_dir / ".hydra" / "overrides.yaml").write_text(f"- seed={seed}\n")
    return run_dir


def test_archive_records_the_threshold_that_compare_then_uses(tmp_path):
    to = tmp_path / "results" / "exp"
    archive.archive([finished_run(tmp_path / "a", 0)], to, threshold=0.35)
    assert json.loads((to / "compare.json").read_text()) == {
        "threshold": 0.35,
        "bootstrap_reps": 10_000,
        "seed": 0,
    }
    archive.archive([finished_run(tmp_path / "b", 1)], to)  # a later seed keeps the recorded threshold
    assert compare.parse_args([str(to)]).threshold == 0.35
    assert compare.parse_args([str(to), "--threshold", "0.9"]).threshold == 0.9  # a flag wins
    assert compare.parse_args([str(tmp_path / "a")]).threshold == 0.6  # run folders: the default
    assert compare.default_out([str(to)], None) == Path("outputs") / "compare" / "exp"
    assert compare.default_out([str(tmp_path / "a")], None) == tmp_path / "a"


@pytest.mark.parametrize("replace", [False, True])
def test_archive_refuses_two_runs_of_one_arm_and_seed_in_one_call(tmp_path, replace):
    first, second = finished_run(tmp_path / "a", 3), finished_run(tmp_path / "b", 3)
    with pytest.raises(SystemExit, match=r"^archive: .* and .* are both grpo-s3 \(arm grpo, seed 3\)"):
        archive.archive([tmp_path / "a", tmp_path / "b"], tmp_path / "to", replace=replace)
    assert not (tmp_path / "to" / "grpo-s3").exists() and first != second


@pytest.mark.parametrize(
    "key, value",
    [
        ("experiment_name", "other"),
        ("optim.lr", 0.01),
        ("model.name", "smollm2-135m"),
        ("trainer.max_steps", 9),
    ],
)
def test_compare_refuses_to_pool_runs_of_different_settings_as_seeds(tmp_path, key, value):
    finished_run(tmp_path / "runs", 0, **{"optim.lr": 1e-5, "trainer.max_steps": 2})
    finished_run(tmp_path / "runs", 1, **{"optim.lr": 1e-5, "trainer.max_steps": 2, key: value})
    with pytest.raises(SystemExit, match=rf"^compare: arm grpo mixes runs of different settings: {key} is "):
        find_runs([tmp_path / "runs"])


# --- entry points: the trainer as a file, and a sweep with failed jobs ------------------------------


def test_train_py_run_as_a_file_works(tmp_path, cache_dir):
    # a config error is reported after every import of the entry point (it read "No module named 'common'")
    command = [
        sys.executable,
        "scripts/train.py",
        *TINY_RUN,
        "trainer.max_step=3",
        f"hydra.run.dir={tmp_path}",
    ]
    result = subprocess.run(command, cwd=ROOT, env=cli_env(cache_dir), capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == "error: trainer.max_step: not a key of trainer (got 3)"


def test_a_sweep_with_failed_jobs_lists_them_and_exits_non_zero(tmp_path, cache_dir):
    sweep = ("-m", *TINY_RUN, "trainer.max_steps=1", "trainer.num_threads=1", "optim.lr=1e-5,-1")
    result = train_cli(*sweep, f"hydra.sweep.dir={tmp_path}", cache_dir=cache_dir)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == "error: 1 job(s) of the sweep failed"
    job = tmp_path / "grpo-char_share-s0-1"  # the second job's folder
    assert lines[-2] == f"failed: {job}: error: optim.lr: must be > 0 (got -1.0)"
    assert len(list(tmp_path.rglob("metrics.jsonl"))) == 1  # the other job ran to its end
    # the same sweep without a failure exits 0 and leaves no failure record
    ok = train_cli(*sweep[:-1], "optim.lr=1e-5", f"hydra.sweep.dir={tmp_path / 'ok'}", cache_dir=cache_dir)
    assert ok.returncode == 0 and not list((tmp_path / "ok").rglob(FAILED_FILE)), ok.stderr[-3000:]
