"""Dynamic sampling as verl's DAPO recipe runs it: an oversampling factor per generation round, a
setting for what happens at max_num_gen_batches, and honest normalisers on a partial batch."""

from __future__ import annotations

import pytest
import torch

from common.models import load_policy
from common.rollout import HFRollout
from common.sampling import DynamicSamplingError, PromptStream, collect
from common.tasks import build_task
from common.trainer import build_batch
from common.update import accumulate_gradients
from scripts.build import build_algorithm, build_settings
from tests.conftest import compose_train, micro_batches

TINY = ("model=tiny", "task=char_share", "logger=none", "group_size=g4", "rollout.max_new_tokens=6")


@pytest.fixture(scope="module")
def engine(cache_dir):
    cfg = compose_train(*TINY)
    model, tokenizer = load_policy("tiny", cache_dir=cache_dir, tiny=dict(cfg.model.tiny), seed=0)
    return HFRollout(model, tokenizer, group_size=4, max_new_tokens=6)


def dapo(*overrides: str):
    # one mini-batch of 1 prompt per optimizer step: the DAPO preset's 2 does not divide 3
    cfg = compose_train(
        *TINY, "algorithm=dapo", "trainer.batch_size=3", "trainer.mini_batch_size=1", *overrides
    )
    return build_algorithm(cfg.algorithm), build_settings(cfg)


def every_other_group(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Keeps groups 0, 2, 4, ... of every round, whatever the rewards."""
    return torch.arange(rewards.numel() // group_size) % 2 == 0


def first_group_only(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    keep = torch.zeros(rewards.numel() // group_size, dtype=torch.bool)
    keep[0] = True
    return keep


def test_oversampling_factor_fills_the_batch_in_fewer_rounds(engine):
    task = build_task("char_share")
    # factor 1: rounds of 3 prompts keep groups 0 and 2, then 0 -> 2 rounds, 6 prompts drawn
    algo, settings = dapo()
    stream = PromptStream(task.train, 0)
    samples, stats = collect(engine, task, stream, algo, settings, every_other_group)
    assert stats["sampling/gen_batches"] == 2 and stream.position == 6 and len(samples.rollout) == 12
    # factor 2: one round of ceil(2 x 3) = 6 prompts keeps groups 0, 2 and 4 -> full after 1 round
    algo, settings = dapo("dynamic_sampling.gen_batch_size_factor=2")
    assert settings.dynamic_sampling.prompts_per_round(settings.trainer.batch_size) == 6
    stream = PromptStream(task.train, 0)
    samples, stats = collect(engine, task, stream, algo, settings, every_other_group)
    assert stats["sampling/gen_batches"] == 1 and stream.position == 6
    assert stats["sampling/samples"] == 24 and stats["sampling/groups_kept"] == 3
    assert stats["sampling/groups_dropped"] == 3
    assert samples.rollout.group_index.unique(return_counts=True)[1].tolist() == [4, 4, 4]


def test_surplus_groups_of_a_round_are_discarded(engine):
    # factor 2 with a filter that keeps everything: 6 groups pass, the batch takes the first 3
    task = build_task("char_share")
    algo, settings = dapo("dynamic_sampling.gen_batch_size_factor=2")
    keep_all = lambda rewards, g: torch.ones(rewards.numel() // g, dtype=torch.bool)  # noqa: E731
    samples, stats = collect(engine, task, PromptStream(task.train, 0), algo, settings, keep_all)
    assert stats["sampling/groups_kept"] == 3 and stats["sampling/groups_dropped"] == 3
    first_three = PromptStream(task.train, 0).take(3)
    assert [e.prompt for e in samples.examples[::4]] == [e.prompt for e in first_three]
    assert len(samples.rollout) == 12


@pytest.mark.parametrize(
    "on_exhausted, kept_rows, message",
    [("partial", 8, "training on the kept groups"), ("skip", None, "skipping this update")],
)
def test_at_the_bound_partial_trains_and_skip_skips(engine, caplog, on_exhausted, kept_rows, message):
    task = build_task("char_share")
    algo, settings = dapo(
        "dynamic_sampling.max_num_gen_batches=2", f"dynamic_sampling.on_exhausted={on_exhausted}"
    )
    samples, stats = collect(engine, task, PromptStream(task.train, 0), algo, settings, first_group_only)
    assert stats["sampling/gen_batches"] == 2 and stats["sampling/groups_kept"] == 2
    assert (None if samples is None else len(samples.rollout)) == kept_rows
    assert "2 of 3 groups kept after 2 generation batches" in caplog.text and message in caplog.text


def test_at_the_bound_error_stops_with_one_line_naming_the_keys(engine):
    task = build_task("char_share")
    algo, settings = dapo("dynamic_sampling.max_num_gen_batches=2", "dynamic_sampling.on_exhausted=error")
    with pytest.raises(DynamicSamplingError) as err:
        collect(engine, task, PromptStream(task.train, 0), algo, settings, first_group_only)
    text = str(err.value)
    assert "\n" not in text and "2 of 3 groups kept" in text
    assert "dynamic_sampling.max_num_gen_batches" in text and "dynamic_sampling.on_exhausted" in text


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_partial_batch_is_normalised_by_what_it_holds(engine, loss_agg):
    """2 of 3 groups kept: with A = +1 on every token and ratio 1 the loss is -1 exactly under
    token-mean and seq-mean-token-mean (-lengths / C under -norm); a normaliser counting the nominal
    3 groups would give 2/3 of it."""
    task = build_task("char_share")
    algo, settings = dapo("dynamic_sampling.max_num_gen_batches=2", f"algorithm.loss_agg={loss_agg}")
    samples, _ = collect(engine, task, PromptStream(task.train, 0), algo, settings, first_group_only)
    batch = build_batch(samples, algo, torch.device("cpu"))
    batch["advantages"] = torch.ones(len(samples.rollout))
    rows = torch.arange(len(samples.rollout))
    total, _, n_tokens = accumulate_gradients(
        engine.model, algo, batch, rows, micro_batches(4), temperature=1.0
    )
    lengths = batch["loss_mask"].sum(1)
    expected = {
        "token-mean": -1.0,
        "seq-mean-token-mean": -1.0,
        "seq-mean-token-sum-norm": -float(lengths.mean()) / algo.loss_scale_factor,
    }[loss_agg]
    assert total == pytest.approx(expected, abs=1e-5)
    assert n_tokens == float(lengths.sum()) and len(samples.rollout) == 8  # 2 groups x 4 rows
