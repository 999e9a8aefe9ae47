"""Exact token budgets: the step that reaches trainer.max_generated_tokens samples only what the budget
has left (in chunks of groups, dynamic sampling included), so a run ends past its budget by less than
one group's G x rollout.max_new_tokens tokens; `realised_budgets` reads what runs actually generated."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from common.rollout import RolloutBatch
from common.sampling import PromptStream, collect, sample_within_budget
from common.tasks import build_task
from scripts.build import build_algorithm, build_settings
from scripts.comparison.runs import TOKENS, UPDATES, config_get, find_runs
from scripts.train import run
from tests.conftest import ROOT, TINY_RUN, compose_train
from tests.test_resume import assert_same_run, read_metrics

ARCHIVE = ROOT / "docs" / "results" / "compare_tokens"


@dataclass(frozen=True)
class RunBudget:
    """What one run generated against its token budget, and the policy updates it made."""

    name: str
    arm: str
    seed: int | None
    tokens: int  # sampling/tokens_total after the last step
    budget: int | None  # trainer.max_generated_tokens
    updates: int  # policy/optimizer_steps_total after the last step
    steps: int
    exact: (
        bool  # recorded with exact budgets (its config has trainer.eval_every_tokens, which came with them)
    )

    @property
    def overshoot(self) -> float:
        """tokens / budget - 1: 0.016 is 1.6% past the budget."""
        return self.tokens / self.budget - 1 if self.budget else float("nan")


def realised_budgets(folder: str | Path) -> list[RunBudget]:
    """Each run under `folder` (an archive folder such as docs/results/<experiment>, or run folders
    with .hydra/config.yaml): its realised tokens beside its budget, and its policy updates."""
    budgets = []
    for r in find_runs([folder]):
        last = r.rows[-1]
        budgets.append(
            RunBudget(
                name=Path(r.path).name,
                arm=r.arm,
                seed=r.seed,
                tokens=int(last.get(TOKENS, 0)),
                budget=config_get(r.config, "trainer.max_generated_tokens"),
                updates=int(last.get(UPDATES, 0)),
                steps=r.last_step,
                exact="eval_every_tokens" in (r.config.get("trainer") or {}),
            )
        )
    return budgets


class LengthScriptedEngine:
    """A rollout engine stub: responses of scripted token lengths, handed out in call order; `calls`
    records the prompts of each call."""

    def __init__(self, lengths: list[int], group_size: int = 4, max_new_tokens: int = 48) -> None:
        self.lengths, self.group_size, self.max_new_tokens = list(lengths), group_size, max_new_tokens
        self.calls: list[int] = []

    def sample(self, prompts, group_size=None, *, do_sample=True, max_new_tokens=None) -> RolloutBatch:
        G, T = group_size or self.group_size, self.max_new_tokens
        n = len(prompts) * G
        lengths = torch.tensor([self.lengths.pop(0) for _ in range(n)])  # (n,)
        response_mask = (torch.arange(T) < lengths[:, None]).float()  # (n, T)
        self.calls.append(len(prompts))
        return RolloutBatch(
            input_ids=torch.zeros(n, 2 + T, dtype=torch.long),
            attention_mask=torch.cat([torch.ones(n, 2), response_mask], dim=1).long(),
            response_mask=response_mask,
            prompt_len=2,
            prompts_expanded=[p for p in prompts for _ in range(G)],
            responses=["x"] * n,
            lengths=lengths,
            truncated=lengths == T,
            group_index=torch.arange(len(prompts)).repeat_interleave(G),
        )


def budget_setup(*overrides: str):
    cfg = compose_train("model=tiny", "task=char_share", "logger=none", "group_size=g4", *overrides)
    return build_task("char_share"), build_algorithm(cfg.algorithm), build_settings(cfg)


def test_a_rollout_that_cannot_pass_the_budget_is_one_batched_call():
    task, algo, settings = budget_setup()
    examples = task.train[:4]
    engine = LengthScriptedEngine([10] * 16)
    samples = sample_within_budget(engine, task, examples, algo, settings, 4 * 4 * 48)  # the worst case fits
    assert engine.calls == [4] and len(samples.rollout) == 16
    engine = LengthScriptedEngine([10] * 16)
    sample_within_budget(engine, task, examples, algo, settings, None)  # no budget
    assert engine.calls == [4]


def test_near_the_budget_groups_come_in_chunks_that_cannot_pass_it():
    # G = 4, max_new_tokens = 48: at most 192 tokens a group; 500 tokens left, 4 examples:
    # 500 // 192 = 2 groups (130 tokens), 370 // 192 = 1 group (60), 310 // 192 = 1 group (70)
    task, algo, settings = budget_setup()
    lengths = [20, 20, 15, 15, 15, 15, 15, 15] + [15] * 4 + [20, 20, 15, 15]
    engine = LengthScriptedEngine(lengths)
    samples = sample_within_budget(engine, task, task.train[:4], algo, settings, 500)
    assert engine.calls == [2, 1, 1]
    assert int(samples.rollout.lengths.sum()) == 130 + 60 + 70
    assert samples.rollout.group_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4


def test_the_rollout_stops_at_the_first_group_that_reaches_the_budget():
    # 100 tokens left: one group at a time, 50 (50 < 100), 45 (95 < 100), 40 (135 >= 100): stop, the
    # fourth example is not sampled; 35 tokens past the budget, less than one group's 192
    task, algo, settings = budget_setup()
    engine = LengthScriptedEngine([10, 10, 15, 15] + [10, 10, 10, 15] + [10] * 4 + [10] * 4)
    samples = sample_within_budget(engine, task, task.train[:4], algo, settings, 100)
    assert engine.calls == [1, 1, 1]
    assert len(samples.rollout) == 12 and int(samples.rollout.lengths.sum()) == 135


def first_group_only(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    keep = torch.zeros(rewards.numel() // group_size, dtype=torch.bool)
    keep[0] = True
    return keep


def test_dynamic_sampling_starts_no_round_past_the_budget_and_trains_on_what_it_kept():
    # rounds of 3 prompts, 40 tokens a group, 70 tokens left: the first round samples 2 groups (40,
    # 80 >= 70) and stops; the filter keeps 1; no second round, although max_num_gen_batches allows
    # 5 and on_exhausted=error would stop a run that ran out of rounds
    task, algo, settings = budget_setup(
        "algorithm=dapo",
        "trainer.batch_size=3",
        "trainer.mini_batch_size=1",
        "dynamic_sampling.max_num_gen_batches=5",
        "dynamic_sampling.on_exhausted=error",
    )
    engine = LengthScriptedEngine([10] * 48)
    stream = PromptStream(task.train, 0)
    samples, stats = collect(engine, task, stream, algo, settings, first_group_only, tokens_left=70)
    assert engine.calls == [1, 1] and stream.position == 3
    assert stats["sampling/gen_batches"] == 1 and stats["sampling/tokens"] == 80
    assert stats["sampling/groups_kept"] == 1 and len(samples.rollout) == 4
    # without a budget the same filter fills the batch in 3 full rounds, 360 tokens
    engine = LengthScriptedEngine([10] * 36)
    samples, stats = collect(engine, task, PromptStream(task.train, 0), algo, settings, first_group_only)
    assert engine.calls == [3, 3, 3] and stats["sampling/tokens"] == 360 and len(samples.rollout) == 12


# the tiny model: G = 4 x max_new_tokens = 8, so one group generates at most 32 tokens; a budget of
# 1630 tokens puts that bound at 1.96%, and is no multiple of a full step's 8 x 32 = 256 (7 steps)
BUDGET = 1630
BUDGET_RUN = (
    *TINY_RUN,
    "trainer.batch_size=8",
    "optim.lr=1e-2",
    "trainer.save_every=0",
    "trainer.max_steps=1000",
    f"trainer.max_generated_tokens={BUDGET}",
)


@pytest.mark.parametrize(
    "variant",
    [
        ("algorithm=grpo",),
        ("algorithm=dapo", "dynamic_sampling.max_num_gen_batches=3", "dynamic_sampling.on_exhausted=partial"),
    ],
    ids=["grpo", "dapo"],
)
def test_a_tiny_run_ends_within_2_percent_of_its_token_budget(tmp_path, cache_dir, variant):
    cfg = compose_train(*BUDGET_RUN, *variant, f"paths.cache_dir={cache_dir}")
    run(cfg, tmp_path / "run")
    (tmp_path / "run" / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / "run" / ".hydra" / "config.yaml")  # as scripts.train leaves a run
    (budget,) = realised_budgets(tmp_path)
    assert budget.budget == BUDGET and budget.exact
    assert BUDGET <= budget.tokens < BUDGET + 4 * 8, budget
    assert budget.overshoot <= 0.02
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-2]["sampling/tokens_total"] < BUDGET  # the last step is the one that reached it
    if variant[0] == "algorithm=grpo":  # one optimizer step a step (mini_batch_size null), the last one too
        assert budget.updates == budget.steps


def test_a_resumed_budgeted_run_matches_the_uninterrupted_one(tmp_path, cache_dir):
    # evaluations at token points, mean@k beside greedy, and a last step cut by the budget: nothing
    # of it is state a checkpoint must carry, and a run stopped after step 2 ends as the straight one
    common = (
        *TINY_RUN,
        "optim.lr=1e-2",
        "trainer.max_generated_tokens=300",
        "trainer.eval_every=2",  # the interrupted run evaluates at its last step, 2: so does the straight one
        "trainer.eval_every_tokens=100",
        "trainer.eval_num_prompts=4",
        "trainer.eval_num_samples=2",
        f"paths.cache_dir={cache_dir}",
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(compose_train(*common, "trainer.max_steps=100"), straight)
    run(compose_train(*common, "trainer.max_steps=2"), resumed)
    run(compose_train(*common, "trainer.max_steps=100", "resume=auto"), resumed)
    steps = sorted(read_metrics(straight))
    assert steps == sorted(read_metrics(resumed)) and len(steps) > 3
    assert_same_run(straight, resumed, steps)
    evaluated = {s: r["eval/tokens"] for s, r in read_metrics(straight).items() if "eval/tokens" in r}
    assert evaluated[0] == 0 and "eval/mean_at_k" in read_metrics(straight)[0]
    assert len(evaluated) >= 4  # step 0, after 100, after 200, and the last at >= 300 tokens


def test_realised_budgets_reads_an_archive():
    runs = realised_budgets(ARCHIVE)
    assert runs and all(r.budget and r.tokens > 0 and r.updates > 0 for r in runs)
    preset = OmegaConf.load(ROOT / "configs" / "experiment" / "compare_tokens.yaml")
    assert {r.arm for r in runs} <= set(preset.hydra.sweeper.params.arm.split(","))  # the preset's arms


def test_every_archived_compare_tokens_run_ends_within_2_percent_of_its_budget():
    runs = realised_budgets(ARCHIVE)
    exact = [r for r in runs if r.exact]
    over = [f"{r.name}: {r.tokens} of {r.budget} ({r.overshoot:+.1%})" for r in exact if r.overshoot > 0.02]
    under = [f"{r.name}: {r.tokens} of {r.budget}" for r in exact if r.tokens < r.budget]
    assert not over and not under, over + under
    old = [f"{r.name} {r.overshoot:+.1%}" for r in runs if not r.exact]
    if old:
        pytest.skip(
            f"{len(old)} of {len(runs)} archived runs predate exact budgets (each step sampled in full, "
            f"the last one past the budget: {', '.join(old)}); re-run experiment=compare_tokens and "
            "replace them"
        )
