"""What a run refuses rather than get silently wrong: keys no schema reads, rewards that are not a
number in the task's range, non-finite logits and unreadable weights, the published results
rewritten by a read, runs of different settings pooled as seeds, and failed jobs of a sweep."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from common.config import ConfigError
from scripts.build import validate
from tests.conftest import TINY_RUN, compose_train
from tests.test_cli import train_cli


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
