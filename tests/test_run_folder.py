"""A run folder holds one run: a resume under other defining settings is refused in one line, a
changed learning rate is applied, a second start into a folder in use or holding a run is refused,
and a killed run's lock is not stale (common/run_folder.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from common.config_checks import ConfigError
from common.run_folder import (
    LOCK_FILE,
    check_identity,
    flatten,
    identity_changes,
    read_identity,
    run_folder_lock,
    run_identity,
)
from common.state import RunAbortedError
from scripts.train import run
from tests.conftest import ROOT, TINY_RUN, compose_train
from tests.test_cli import train_cli

TINY = (*TINY_RUN, "trainer.max_steps=1")


def test_flatten_and_identity_keep_defining_keys_only():
    config = {
        "seed": 3,
        "trainer": {"max_steps": 10, "batch_size": 4},
        "optim": {"lr": 1e-5, "betas": [0.9, 0.99]},
    }
    assert flatten(config) == {
        "seed": 3,
        "trainer.max_steps": 10,
        "trainer.batch_size": 4,
        "optim.lr": 1e-5,
        "optim.betas": [0.9, 0.99],
    }
    # max_steps and lr may change on resume; seed, batch size and betas define the run
    assert run_identity(config) == {"seed": 3, "trainer.batch_size": 4, "optim.betas": [0.9, 0.99]}


def test_identity_changes_names_old_and_new():
    old = {"seed": 0, "algorithm.name": "grpo", "gone": 1}
    new = {"seed": 5, "algorithm.name": "grpo", "added_later": 2}
    # seed changed, a recorded key vanished; a key only the new code has is no change of the run
    assert identity_changes(old, new) == ["seed 0 -> 5", "gone 1 -> '(unset)'"]


def test_check_identity_records_then_refuses_a_change(tmp_path):
    check_identity(None, tmp_path, {"seed": 0, "model.name": "tiny"})
    assert read_identity(tmp_path) == {"seed": 0, "model.name": "tiny"}
    check_identity("auto", tmp_path, {"seed": 0, "model.name": "tiny"})  # the same run: accepted
    with pytest.raises(ConfigError, match=r"model.name 'tiny' -> 'smollm2-135m'.*another hydra.run.dir"):
        check_identity("auto", tmp_path, {"seed": 0, "model.name": "smollm2-135m"})
    with pytest.raises(ConfigError, match="holds a run already; continue it with resume=auto"):
        check_identity(None, tmp_path, {"seed": 0, "model.name": "tiny"})


def test_resume_path_checks_the_checkpoints_own_run(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    check_identity(None, first, {"seed": 0})
    checkpoint = first / "checkpoints" / "step_2"
    with pytest.raises(ConfigError, match="seed 0 -> 1"):
        check_identity(str(checkpoint), second, {"seed": 1})
    check_identity(str(checkpoint), second, {"seed": 0})
    assert read_identity(second) == {"seed": 0}


@pytest.mark.parametrize(
    "change, named",
    [
        (("algorithm=dapo",), "algorithm.name 'grpo' -> 'dapo'"),
        (("algorithm=ppo",), "algorithm.name 'grpo' -> 'ppo'"),
        (("group_size=g2",), "rollout.group_size 4 -> 2"),
        (("seed=5",), "seed 0 -> 5"),
        (("task=addition",), "task.name 'char_share' -> 'addition'"),
        (("model.tiny.hidden_size=32",), "model.tiny.hidden_size"),
    ],
)
def test_resume_under_changed_settings_is_refused(tmp_path, cache_dir, change, named):
    common = (*TINY, f"paths.cache_dir={cache_dir}")
    run(compose_train(*common), tmp_path)
    refused = "resume=auto: the run in .* was started with other settings"
    with pytest.raises(ConfigError, match=refused) as err:
        run(compose_train(*common, "trainer.max_steps=2", "resume=auto", *change), tmp_path)
    assert named in str(err.value)
    assert "\n" not in str(err.value)
    assert "start afresh" not in str(err.value)


def test_resume_runs_at_the_new_learning_rate(tmp_path, cache_dir):
    """After an optim.lr=1e30 run stopped on non-finite updates, resume=auto optim.lr=1e-4 runs at
    1e-4 (no warm-up: policy/lr = 1e-4 x 1). The weights 1e30 left may keep the updates non-finite:
    trainer.max_bad_steps (a resumable key) lets the resumed steps run."""
    common = (*TINY, f"paths.cache_dir={cache_dir}", "optim.warmup_steps=0")
    with pytest.raises(RunAbortedError, match="non-finite"):
        run(
            compose_train(*common, "optim.lr=1e30", "trainer.max_steps=3", "trainer.max_bad_steps=1"),
            tmp_path,
        )
    stopped = len((tmp_path / "metrics.jsonl").read_text().splitlines())  # the steps run at 1e30
    resumed = ("optim.lr=1e-4", "trainer.max_steps=5", "trainer.max_bad_steps=5", "resume=auto")
    run(compose_train(*common, *resumed), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["policy/lr"] for r in rows[:stopped]] == [1e30] * stopped
    assert [r["step"] for r in rows[stopped:]] == list(range(stopped + 1, 6))
    assert [r["policy/lr"] for r in rows[stopped:]] == [pytest.approx(1e-4, rel=1e-12)] * (5 - stopped)


def test_resume_follows_a_lowered_learning_rate(tmp_path, cache_dir):
    """optim.lr=1e-2 for 1 step, then resume=auto optim.lr=1e-3: the warm-up goes on from the new
    base rate (4 optimizer steps: lambda(s) = min(1, (s + 1) / 4))."""
    common = (*TINY, f"paths.cache_dir={cache_dir}", "optim.warmup_steps=4")
    run(compose_train(*common, "optim.lr=1e-2"), tmp_path)
    run(compose_train(*common, "optim.lr=1e-3", "trainer.max_steps=2", "resume=auto"), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # policy/lr is read after the scheduler's step: 1e-2 x (1 + 1) / 4 = 5e-3, then 1e-3 x (2 + 1) / 4
    assert [r["policy/lr"] for r in rows] == [pytest.approx(5e-3), pytest.approx(7.5e-4)]


def test_fresh_run_into_a_run_folder_is_refused(tmp_path, cache_dir):
    common = (*TINY, f"paths.cache_dir={cache_dir}")
    run(compose_train(*common), tmp_path)
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="holds a run already; continue it with resume=auto"):
        run(compose_train(*common, "seed=1"), tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_second_start_into_a_folder_in_use_is_refused(tmp_path, cache_dir):
    common = (*TINY, f"paths.cache_dir={cache_dir}")
    in_use = rf"is in use by another run \(pid {os.getpid()}\)"
    with run_folder_lock(tmp_path), pytest.raises(ConfigError, match=in_use):  # as a running run holds it
        run(compose_train(*common, "resume=auto"), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_lock_of_a_killed_run_is_not_stale(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from common.run_folder import run_folder_lock\n"
            f"with run_folder_lock({str(tmp_path)!r}):\n    print('locked', flush=True); time.sleep(60)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"pid {holder.pid}"), run_folder_lock(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert (tmp_path / LOCK_FILE).read_text().strip() == str(holder.pid)  # the dead pid is still written
    with run_folder_lock(tmp_path):  # ... but the kernel dropped the lock with the process
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())


def test_cli_refuses_before_hydra_rewrites_the_runs_config(tmp_path, cache_dir):
    """From the command line the refusal comes before Hydra writes .hydra/ (the callback
    scripts.build.RunFolderCheck): the run's recorded config stays the run's (scripts.compare reads it)."""
    common = (*TINY, f"hydra.run.dir={tmp_path}")
    done = train_cli(*common, cache_dir=cache_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    config = (tmp_path / ".hydra" / "config.yaml").read_text()
    for extra in (("resume=auto", "algorithm=dapo"), ()):
        refused = train_cli(*common, *extra, cache_dir=cache_dir)
        assert refused.returncode == 2, refused.stderr[-2000:]
        errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in refused.stderr
        assert (tmp_path / ".hydra" / "config.yaml").read_text() == config
