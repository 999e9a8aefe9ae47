"""The one training loop on the tiny model: it learns, parameters change, losses stay finite,
gradient accumulation is exact, and dynamic sampling fills or degrades gracefully."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from common.losses import AGG_MODES
from common.models import make_reference
from common.sampling import PromptStream, collect, generate_and_score
from common.tasks import Example, Task, build_task
from common.trainer import build_batch
from common.update import accumulate_gradients, split_micro_batches
from scripts.build import build_algorithm, build_settings
from scripts.train import run
from tests.conftest import TEST_SEED, compose_train, micro_batches

TINY_CHAR_SHARE = (
    "model=tiny",
    "task=char_share",
    "logger=none",
    "trainer.eval_num_prompts=8",
    "rollout.max_new_tokens=8",
)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


LEARNING_RUNS = {
    "grpo": ("algorithm=grpo", "trainer.max_steps=24", "trainer.batch_size=4", "group_size=g8"),
    # the preset's 2 optimizer steps per rollout batch here: half the learning rate (at 3e-2 the
    # policy collapses to all-equal groups by step 20 and dynamic sampling skips the last steps)
    "dapo": (
        "algorithm=dapo",
        "trainer.max_steps=24",
        "trainer.batch_size=4",
        "group_size=g8",
        "optim.lr=1.5e-2",
    ),
    # one response per prompt and a critic that starts from scratch: more steps, a smaller margin
    "ppo": (
        "algorithm=ppo",
        "trainer.max_steps=40",
        "trainer.batch_size=32",
        "critic.lr=3e-2",
        "critic.warmup_steps=2",
    ),
}


@pytest.mark.parametrize("algorithm, margin", [("grpo", 0.06), ("dapo", 0.04), ("ppo", 0.04)])
def test_learns_on_tiny_model(tmp_path, cache_dir, algorithm, margin):
    """char_share pays the share of vowels; the random tiny policy earns ~0.35 and training raises it.

    The mean task reward of the last 5 trained steps must clearly beat the first 5 steps'. A policy
    that does not learn stays within ~0.02: one response's reward has a std of ~0.04, so a mean over
    5 x 32 responses has ~0.003. The margins hold for any seed and thread count, not only one: over
    seeds 0-7 with 1 or 2 threads the gains were 0.13-0.31 (GRPO), 0.07-0.25 (DAPO) and 0.20-0.24
    (PPO, seeds 1-3).
    """
    cfg = compose_train(
        *TINY_CHAR_SHARE,
        "optim.lr=3e-2",
        *LEARNING_RUNS[algorithm],
        f"seed={TEST_SEED}",
        "trainer.eval_every=0",
        "optim.warmup_steps=0",
        "algorithm.kl_coef=0",
        f"paths.cache_dir={cache_dir}",
    )
    run(cfg, tmp_path)
    rewards = [m["reward/correct"] for m in read_metrics(tmp_path) if "reward/correct" in m]
    # DAPO's filter skips the update of a step whose every group is all-equal (the policy has become
    # deterministic on those prompts), so it may train on fewer steps; the others train on every one
    assert len(rewards) == cfg.trainer.max_steps or (algorithm == "dapo" and len(rewards) >= 12)
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + margin, f"no learning: first 5 steps {first:.3f}, last 5 steps {last:.3f}"


def run_and_check_parameters_change(cfg, run_dir, monkeypatch) -> None:
    """Run `cfg` into `run_dir` and assert that the policy's parameters changed between the first
    update's start and the last update's end (TRL's end-to-end check)."""
    import common.trainer as trainer_module

    snapshots = {}
    original = trainer_module.update_policy

    def spy(model, *args, **kwargs):
        snapshots.setdefault("before", [p.detach().clone() for p in model.parameters()])
        out = original(model, *args, **kwargs)
        snapshots["after"] = [p.detach().clone() for p in model.parameters()]
        return out

    monkeypatch.setattr(trainer_module, "update_policy", spy)
    run(cfg, run_dir)
    changed = sum(not torch.equal(a, b) for a, b in zip(snapshots["before"], snapshots["after"], strict=True))
    assert changed > 0


@pytest.mark.parametrize("algorithm", ["grpo", "dapo"])
def test_two_steps_change_parameters_and_log_finite_losses(tmp_path, cache_dir, algorithm, monkeypatch):
    cfg = compose_train(
        *TINY_CHAR_SHARE,
        f"algorithm={algorithm}",
        f"seed={TEST_SEED}",
        "trainer.max_steps=2",
        "trainer.batch_size=2",
        "group_size=g4",
        "trainer.eval_every=1",
        "trainer.log_samples_every=1",
        "optim.lr=1e-3",
        f"paths.cache_dir={cache_dir}",
    )
    run_and_check_parameters_change(cfg, tmp_path, monkeypatch)
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert "eval/accuracy" in metrics[0] and "eval/accuracy" in metrics[-1]
    for m in metrics[1:]:
        assert torch.isfinite(torch.tensor(m["policy/loss"])), m
        assert m["policy/skipped_updates"] == 0
    samples = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 * cfg.trainer.num_samples_logged
    assert (tmp_path / "checkpoints" / "final" / "config.json").is_file()
    assert (tmp_path / "checkpoints" / "final" / "trainer_state.pt").is_file()


@pytest.fixture(scope="module")
def tiny_setup(cache_dir):
    """A tiny policy, its rollout engine and a sampled, scored batch of 3 prompts x 4 responses."""
    from common.models import load_policy
    from common.rollout import HFRollout

    cfg = compose_train(*TINY_CHAR_SHARE, "group_size=g4", "rollout.max_new_tokens=12")
    model, tokenizer = load_policy("tiny", cache_dir=cache_dir, tiny=dict(cfg.model.tiny), seed=0)
    engine = HFRollout(model, tokenizer, group_size=4, max_new_tokens=12)
    task = build_task("char_share")
    return cfg, model, engine, task


@pytest.mark.parametrize("loss_agg", AGG_MODES)
def test_gradient_is_the_same_with_one_and_four_micro_batches(tiny_setup, loss_agg):
    """DAPO Eq. 12 across micro-batches: the normaliser is the whole update batch's, whether the
    micro-batches are cut by rows (2 of 8) or by tokens (at most 20 packed tokens)."""
    cfg, model, engine, task = tiny_setup
    cfg = compose_train(
        *TINY_CHAR_SHARE, "group_size=g4", f"algorithm.loss_agg={loss_agg}", "algorithm.kl_coef=0"
    )
    algo = build_algorithm(cfg.algorithm)
    settings = build_settings(cfg)
    torch.manual_seed(0)
    samples = generate_and_score(engine, task, task.train[:2], algo, settings)  # 8 rows
    batch = build_batch(samples, algo, torch.device("cpu"))
    # responses of unequal length, as if EOS had come early (the random tiny model rarely emits EOS)
    lengths = torch.tensor([12, 3, 7, 12, 1, 9, 5, 11])
    keep = (torch.arange(12)[None, :] < lengths[:, None]).float()  # (8, 12)
    batch["response_mask"] = batch["response_mask"] * keep
    batch["loss_mask"] = batch["loss_mask"] * keep
    batch["loss_mask"][5] = 0  # a fully masked row (overlong filtering) leaves the seq-mean denominators
    algo.compute_advantages(batch)
    rows = torch.arange(8)
    assert len(split_micro_batches(batch, rows, 8, max_tokens=20)) > 2
    grads = []
    for micro, max_tokens in ((8, None), (2, None), (8, 20)):
        model.zero_grad(set_to_none=True)
        loss, _, _ = accumulate_gradients(
            model, algo, batch, rows, micro_batches(micro, max_tokens), temperature=1.0
        )
        grads.append(([p.grad.clone() for p in model.parameters()], loss))
    g_full, loss_full = grads[0]
    for g_micro, loss_micro in grads[1:]:
        assert loss_full == pytest.approx(loss_micro, abs=1e-5)
        # equal up to float32 summation order; a wrong normaliser would be off by a factor of ~1.5-4
        for a, b in zip(g_full, g_micro, strict=True):
            assert (a - b).norm() <= 1e-4 * a.norm() + 1e-8


def _always(keep: bool):
    def group_filter(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
        return torch.full((rewards.numel() // group_size,), keep)

    return group_filter


def test_dynamic_sampling_fills_the_batch(tiny_setup):
    cfg, _, engine, task = tiny_setup
    cfg = compose_train(
        *TINY_CHAR_SHARE,
        "group_size=g4",
        "algorithm=dapo",
        "trainer.batch_size=3",
        "trainer.mini_batch_size=1",
    )
    algo, settings = build_algorithm(cfg.algorithm), build_settings(cfg)
    calls = []

    def every_other_group(rewards, group_size):  # keeps groups 0 and 2 of every generation batch
        calls.append(1)
        return torch.tensor([i % 2 == 0 for i in range(rewards.numel() // group_size)])

    samples, stats = collect(engine, task, PromptStream(task.train, 0), algo, settings, every_other_group)
    assert len(calls) == 2 and stats["sampling/gen_batches"] == 2
    assert stats["sampling/groups_kept"] == 3 and stats["sampling/samples"] == 24
    assert len(samples.rollout.responses) == 12
    # kept groups stay whole and contiguous: 3 distinct group ids, 4 rows each
    assert samples.rollout.group_index.unique(return_counts=True)[1].tolist() == [4, 4, 4]


def test_dynamic_sampling_at_the_bound_trains_on_what_was_kept(tiny_setup, caplog):
    cfg, _, engine, task = tiny_setup
    cfg = compose_train(
        *TINY_CHAR_SHARE,
        "group_size=g4",
        "algorithm=dapo",
        "trainer.batch_size=2",
        "dynamic_sampling.max_num_gen_batches=2",
    )
    algo, settings = build_algorithm(cfg.algorithm), build_settings(cfg)
    samples, stats = collect(engine, task, PromptStream(task.train, 0), algo, settings, _always(False))
    assert samples is None and stats["sampling/gen_batches"] == 2 and stats["sampling/groups_kept"] == 0
    assert "skipping this update" in caplog.text


class ScriptedTask(Task):
    """Rewards come from a script in call order, so sampling paths can be driven exactly."""

    name = "scripted"

    def __init__(self, rewards: list[float], default: float = 1.0) -> None:
        self._set_splits([Example(f"q{i}", "x") for i in range(4)], [Example("t", "x")])
        self.rewards, self.default = list(rewards), default

    def correctness(self, response: str, example: Example) -> float:
        return self.rewards.pop(0) if self.rewards else self.default


def test_resample_grows_flat_groups_until_they_differ(tiny_setup):
    from dapo import groups_to_resample

    _, _, engine, _ = tiny_setup
    cfg = compose_train(
        *TINY_CHAR_SHARE,
        "group_size=g2",
        "trainer.batch_size=2",
        "algorithm.kl_coef=0",
        "dynamic_sampling=resample",
        "dynamic_sampling.max_samples=4",
    )
    algo, settings = build_algorithm(cfg.algorithm), build_settings(cfg)
    engine.group_size = 2
    # q_a: [1, 1] is flat -> one more response scores 0 -> [1, 1, 0]; q_b: [0, 1] differs already
    task = ScriptedTask([1, 1, 0, 1, 0])
    try:
        samples, stats = collect(
            engine, task, PromptStream(task.train, 0), algo, settings, None, groups_to_resample
        )
    finally:
        engine.group_size = 4
    assert stats["sampling/extra_samples"] == 1 and stats["sampling/resample_rounds"] == 1
    assert stats["sampling/flat_groups_left"] == 0 and stats["sampling/samples"] == 5
    assert samples.rollout.group_index.tolist() == [0, 0, 1, 1, 0]
    assert samples.examples[4] == samples.examples[0]  # the extra response answers its group's prompt
    batch = build_batch(samples, algo, torch.device("cpu"))
    algo.compute_advantages(batch)
    # group 0 = [1, 1, 0]: mean 2/3, unbiased std sqrt(1/3) = 0.5774 -> (0.5774, 0.5774, -1.1547)
    # group 1 = [0, 1]: mean 0.5, std 0.7071 -> (-0.7071, 0.7071)
    expected = torch.tensor([0.5774, 0.5774, -0.7071, 0.7071, -1.1547])
    torch.testing.assert_close(batch["advantages"], expected, atol=1e-4, rtol=0)


def test_resample_stops_at_max_samples(tiny_setup):
    from dapo import groups_to_resample

    _, _, engine, _ = tiny_setup
    cfg = compose_train(
        *TINY_CHAR_SHARE,
        "group_size=g4",
        "trainer.batch_size=2",
        "algorithm.kl_coef=0",
        "dynamic_sampling=resample",
        "dynamic_sampling.max_samples=6",
    )
    algo, settings = build_algorithm(cfg.algorithm), build_settings(cfg)
    task = ScriptedTask([], default=1.0)  # every response correct: no group ever differs
    samples, stats = collect(
        engine, task, PromptStream(task.train, 0), algo, settings, None, groups_to_resample
    )
    assert samples.rollout.group_index.bincount().tolist() == [6, 6]
    assert stats["sampling/extra_samples"] == 4 and stats["sampling/flat_groups_left"] == 2
    batch = build_batch(samples, algo, torch.device("cpu"))
    algo.compute_advantages(batch)
    assert torch.equal(batch["advantages"], torch.zeros(12))  # flat groups: zero advantage, no NaN


def test_dynamic_sampling_at_the_bound_keeps_partial_batch(tiny_setup, caplog):
    cfg, _, engine, task = tiny_setup
    cfg = compose_train(
        *TINY_CHAR_SHARE,
        "group_size=g4",
        "algorithm=dapo",
        "trainer.batch_size=3",
        "trainer.mini_batch_size=1",
        "dynamic_sampling.max_num_gen_batches=2",
    )
    algo, settings = build_algorithm(cfg.algorithm), build_settings(cfg)

    def first_group_only(rewards, group_size):
        keep = torch.zeros(rewards.numel() // group_size, dtype=torch.bool)
        keep[0] = True
        return keep

    samples, stats = collect(engine, task, PromptStream(task.train, 0), algo, settings, first_group_only)
    assert stats["sampling/groups_kept"] == 2 and stats["sampling/gen_batches"] == 2
    assert len(samples.rollout) == 8
    assert "2 of 3 groups kept" in caplog.text


@pytest.mark.slow
def test_one_step_on_the_real_model(tmp_path, cache_dir, monkeypatch):
    """SmolLM2-135M-Instruct from the packaged GGUF: one GRPO step with KL gives a gradient.

    Whatever the 2 x 4 responses are, the gradient must be non-zero: the reference is made to
    differ from the policy (as it does after the first update), so the KL term pulls on every
    sampled token even when every group's rewards are equal and every advantage is 0.
    """
    import scripts.train

    def sharper_reference(model):
        # the final norm's weight scales the logits: the reference is the policy at temperature 0.8
        reference = make_reference(model)
        with torch.no_grad():
            reference.model.norm.weight.mul_(1.25)
        return reference

    monkeypatch.setattr(scripts.train, "make_reference", sharper_reference)
    cfg = compose_train(
        f"seed={TEST_SEED}",
        "logger=none",
        "trainer.max_steps=1",
        "trainer.batch_size=2",
        "group_size=g4",
        "rollout.max_new_tokens=16",
        "trainer.eval_num_prompts=4",
        "trainer.micro_batch_size=8",
        f"paths.cache_dir={cache_dir}",
    )
    assert cfg.model.source == "smollm2-gguf"
    metrics = run(cfg, tmp_path)
    assert metrics["policy/skipped_updates"] == 0 and torch.isfinite(torch.tensor(metrics["policy/loss"]))
    assert metrics["kl/value"] > 0 and metrics["policy/grad_norm"] > 0
    rows = read_metrics(tmp_path)
    assert rows[0]["step"] == 0 and 0 <= rows[0]["eval/accuracy"] <= 1
    assert (tmp_path / "checkpoints" / "final" / "model.safetensors").is_file()


def test_weighted_means_skip_undefined_stats():
    from common.update import WeightedMeans

    means = WeightedMeans()
    means.add({"a": 1.0, "b": float("nan")}, 3.0)
    means.add({"a": 3.0, "b": 2.0}, 1.0)
    # a: (1*3 + 3*1) / 4 = 1.5; b: only the finite value counts
    assert means.means() == {"a": 1.5, "b": 2.0}


def test_gradient_checkpointing_gives_the_same_gradient(tiny_setup, cache_dir):
    """model.gradient_checkpointing recomputes activations; the gradient must not change."""
    from scripts.build import build_policy

    cfg = compose_train(
        *TINY_CHAR_SHARE, "group_size=g4", "algorithm.kl_coef=0", f"paths.cache_dir={cache_dir}"
    )
    grads = []
    for checkpointing in (False, True):
        model, _ = build_policy(
            compose_train(
                *TINY_CHAR_SHARE,
                f"model.gradient_checkpointing={checkpointing}",
                f"paths.cache_dir={cache_dir}",
            )
        )
        assert model.is_activation_checkpointing == checkpointing
        _, _, engine, task = tiny_setup
        torch.manual_seed(0)
        algo, settings = build_algorithm(cfg.algorithm), build_settings(cfg)
        if not grads:  # one batch, sampled once, for both models (they have the same weights)
            samples = generate_and_score(engine, task, task.train[:2], algo, settings)
        batch = build_batch(samples, algo, torch.device("cpu"))
        algo.compute_advantages(batch)
        model.train()
        accumulate_gradients(model, algo, batch, torch.arange(8), micro_batches(8), temperature=1.0)
        grads.append([p.grad.clone() for p in model.parameters()])
    # float rounding only: without checkpointing the shared prompts run once per group
    # (sequence_logprobs), with it every row runs its whole sequence
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_bf16_autocast_trains(tmp_path, cache_dir, algorithm):
    """trainer.bf16: forward passes under bfloat16 autocast; losses finite, weights stay float32."""
    cfg = compose_train(
        *TINY_CHAR_SHARE,
        f"algorithm={algorithm}",
        "trainer.bf16=true",
        "trainer.max_steps=2",
        "trainer.batch_size=2",
        "group_size=g4",
        "trainer.eval_every=0",
        f"paths.cache_dir={cache_dir}",
    )
    metrics = run(cfg, tmp_path)
    assert metrics["policy/skipped_updates"] == 0 and math.isfinite(metrics["policy/loss"])
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "checkpoints" / "final" / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())
