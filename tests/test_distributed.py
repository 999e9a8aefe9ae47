"""Data parallel: 2 processes (gloo, CPU) give the same gradient and update as 1 process on the same
global batch, also when the ranks hold unequal shares; and `torchrun -m scripts.train` runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from common.distributed import (
    DistContext,
    DistributedError,
    keyed_by_name,
    launched_world_size,
    load_optimizer_state_dict,
    reduce_metrics,
    unwrap,
)
from common.evaluation import evaluate
from common.models import load_policy
from common.rollout import HFRollout
from common.sampling import generate_and_score
from common.tasks import build_task
from common.trainer import build_batch
from common.update import accumulate_gradients, update_policy
from scripts.build import build_algorithm, build_settings
from tests.conftest import ROOT, compose_train
from tests.test_resume import assert_resumed

OVERRIDES = (
    "model=tiny",
    "task=char_share",
    "logger=none",
    "group_size=g4",
    "trainer.batch_size=4",
    "trainer.micro_batch_size=4",
    "rollout.max_new_tokens=10",
    "algorithm.loss_agg=token-mean",
    # no clipping: a gradient off by a factor would otherwise be rescaled to the same norm
    "optim.max_grad_norm=1e9",
)
# rows of the 16-row global batch (4 groups of 4) per rank: even, and uneven (3 groups vs 1), which
# also makes rank 1 run zero-weight micro-batches to match rank 0's three backward passes
SPLITS = {
    "even": [list(range(0, 8)), list(range(8, 16))],
    "uneven": [list(range(0, 12)), list(range(12, 16))],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(cache_dir: str):
    cfg = compose_train(*OVERRIDES)
    model, tokenizer = load_policy("tiny", cache_dir=cache_dir, tiny=dict(cfg.model.tiny), seed=0)
    return tokenizer, model, build_algorithm(cfg.algorithm), build_settings(cfg)


def _global_batch(cache_dir: str) -> dict:
    """16 scored rows (4 prompts x G=4) with unequal response lengths, advantages and reference
    log-probs filled in: the same batch for the 1-process and the 2-process update."""
    tokenizer, model, algo, settings = _setup(cache_dir)
    engine = HFRollout(model, tokenizer, group_size=4, max_new_tokens=10)
    task = build_task("char_share")
    torch.manual_seed(1)
    samples = generate_and_score(engine, task, task.train[:4], algo, settings)
    batch = build_batch(samples, algo, torch.device("cpu"))
    lengths = torch.tensor([10, 3, 7, 10, 1, 9, 5, 8, 2, 10, 4, 6, 10, 7, 1, 3])
    keep = (torch.arange(10)[None, :] < lengths[:, None]).float()  # (16, 10)
    batch["response_mask"] = batch["response_mask"] * keep
    batch["loss_mask"] = batch["loss_mask"] * keep
    batch["rewards"] = torch.tensor([1.0, 0, 0, 1, 0.5, 0, 1, 0, 1, 1, 0, 0, 0.2, 0.9, 0.1, 0])
    batch["ref_logprob"] = -torch.rand(16, 10, generator=torch.Generator().manual_seed(2)) * 3
    algo.compute_advantages(batch)
    return batch


def _rows(batch: dict, rows: list[int]) -> dict:
    index = torch.tensor(rows)
    return {k: v[index] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP shard (a collective), or a copy of a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def _update(model, algo, settings, batch: dict, dist: DistContext) -> tuple[list, list, dict]:
    """(gradients of the global loss, parameters after one SGD step, metrics); dist.zero_stage 1
    shards the optimizer over the ranks, 2-3 the gradients and weights too (FSDP)."""
    n = batch["input_ids"].shape[0]
    accumulate_gradients(model, algo, batch, torch.arange(n), settings.trainer, 1.0, dist=dist)
    grads = [_full(p.grad) for p in model.parameters()]
    if dist.zero_stage == 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=0.5)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    metrics = update_policy(
        model, optimizer, scheduler, algo, batch, settings, 1.0, torch.Generator().manual_seed(0), dist=dist
    )
    return grads, [_full(p) for p in model.parameters()], metrics


def _worker(
    rank: int, port: int, cache_dir: str, batch_path: str, split: str, zero_stage: int, out_dir: str
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    from common.distributed import init_distributed, shutdown, wrap_model

    dist = init_distributed("gloo", zero_stage)
    _, model, algo, settings = _setup(cache_dir)
    batch = _rows(torch.load(batch_path), SPLITS[split][rank])
    grads, params, metrics = _update(wrap_model(model, dist), algo, settings, batch, dist)
    torch.save(
        {"grads": grads, "params": params, "metrics": reduce_metrics(metrics, dist)}, f"{out_dir}/{rank}.pt"
    )
    shutdown(dist)


@pytest.mark.parametrize(
    "split, zero_stage",
    [("even", 0), ("uneven", 0), ("uneven", 1), ("uneven", 2), ("even", 3), ("uneven", 3)],
)
def test_two_processes_update_like_one(tmp_path, cache_dir, split, zero_stage):
    """DDP (stage 0), sharded AdamW state (1), FSDP with sharded gradients (2) and weights (3)."""
    batch = _global_batch(cache_dir)
    torch.save(batch, tmp_path / "batch.pt")
    _, model, algo, settings = _setup(cache_dir)
    grads_1, params_1, metrics_1 = _update(model, algo, settings, batch, DistContext())

    mp.spawn(
        _worker,
        args=(_free_port(), cache_dir, str(tmp_path / "batch.pt"), split, zero_stage, str(tmp_path)),
        nprocs=2,
    )
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    initial = list(_setup(cache_dir)[1].parameters())
    step_1 = [a - p for a, p in zip(params_1, initial, strict=True)]
    assert sum(s.norm() for s in step_1) > 1e-3  # the update moved the weights
    for rank in ranks:
        # the same gradient (global token-mean normaliser, summed over ranks) ...
        for a, b in zip(grads_1, rank["grads"], strict=True):
            assert (a - b).norm() <= 1e-5 * a.norm() + 1e-7
        # ... and the same step of the parameters, on both ranks
        for s1, b, p in zip(step_1, rank["params"], initial, strict=True):
            assert (s1 - (b - p)).norm() <= 1e-4 * s1.norm() + 1e-6
    # the loss is the global batch's: the ranks' shares add up to the 1-process loss
    assert ranks[0]["metrics"]["policy/loss"] == pytest.approx(metrics_1["policy/loss"], rel=1e-4, abs=1e-6)


def _evaluation(cache_dir: str, dist: DistContext) -> dict:
    tokenizer, model, _, settings = _setup(cache_dir)
    engine = HFRollout(model, tokenizer, group_size=1, max_new_tokens=10)
    task = build_task("char_share")
    return evaluate(engine, task, task.test[:11], settings.reward.format_weight, chunk=4, dist=dist)


def _eval_worker(rank: int, port: int, cache_dir: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    from common.distributed import init_distributed, shutdown

    dist = init_distributed("gloo")
    torch.save(_evaluation(cache_dir, dist), f"{out_dir}/eval{rank}.pt")
    shutdown(dist)


def test_evaluation_split_over_ranks_equals_one_process(tmp_path, cache_dir):
    """11 held-out prompts: rank 0 decodes 6, rank 1 decodes 5; both report the means over all 11."""
    single = _evaluation(cache_dir, DistContext())
    mp.spawn(_eval_worker, args=(_free_port(), cache_dir, str(tmp_path)), nprocs=2)
    for rank in range(2):
        split = torch.load(tmp_path / f"eval{rank}.pt")
        assert split.keys() == single.keys()
        for key, value in single.items():
            assert split[key] == pytest.approx(value, abs=1e-6), key
    assert 0 < single["eval/accuracy"] < 1  # a mean over the prompts, not one prompt's 0 or 1


def _ppo_batch() -> dict:
    """16 rows of PPO inputs with unequal response lengths: rewards, critic values, log-probs."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([10, 3, 7, 10, 1, 9, 5, 8, 2, 10, 4, 6, 10, 7, 1, 3])
    return {
        "rewards": torch.rand(16, generator=g),
        "response_mask": (torch.arange(10)[None, :] < lengths[:, None]).float(),
        "values": torch.randn(16, 10, generator=g),
        "old_logprob": -torch.rand(16, 10, generator=g) * 3,
        "ref_logprob": -torch.rand(16, 10, generator=g) * 3,
    }


def _ppo(adaptive: bool = True):
    overrides = ["algorithm=ppo", "algorithm.kl_ctl=adaptive", "algorithm.kl_target=0.5"] if adaptive else []
    return build_algorithm(compose_train(*OVERRIDES, *overrides).algorithm)


def _ppo_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    from common.distributed import init_distributed, shutdown

    dist = init_distributed("gloo")
    algo, batch = _ppo(), _rows(_ppo_batch(), SPLITS["uneven"][rank])
    algo.compute_advantages(batch, reduce=dist.sum)
    torch.save(
        {"advantages": batch["advantages"], "beta": algo.kl_controller.value}, f"{out_dir}/ppo{rank}.pt"
    )
    shutdown(dist)


def test_ppo_whitening_and_kl_controller_are_global_over_ranks(tmp_path):
    """PPO's advantage whitening and adaptive KL controller see the global batch under data
    parallel (uneven shares: 12 rows and 4), so advantages and beta equal the one-process ones."""
    algo, batch = _ppo(), _ppo_batch()
    algo.compute_advantages(batch)
    mp.spawn(_ppo_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        out = torch.load(tmp_path / f"ppo{rank}.pt")
        torch.testing.assert_close(out["advantages"], batch["advantages"][SPLITS["uneven"][rank]])
        assert out["beta"] == pytest.approx(algo.kl_controller.value, rel=1e-9)
    assert algo.kl_controller.value != _ppo().kl_controller.value  # the controller moved


def _gathered_worker(rank: int, port: int, cache_dir: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    from common.distributed import gathered, init_distributed, shutdown, wrap_model

    dist = init_distributed("gloo", zero_stage=3, timeout_minutes=1)  # a hang fails, not stalls
    model = wrap_model(_setup(cache_dir)[1], dist)
    ids = torch.tensor([[5, 6, 7, 8]])
    with gathered([model], dist), torch.no_grad():
        inside = {n: p.detach().clone() for n, p in model.named_parameters()}
        for _ in range(1 + 2 * rank):  # unequal forward counts: no collective inside
            logits = model(input_ids=ids).logits
    outside = {n: p.to_local().shape for n, p in model.named_parameters()}
    dist.all_reduce(1.0)  # both ranks reach the next collective
    torch.save({"inside": inside, "outside": outside, "logits": logits}, f"{out_dir}/gathered{rank}.pt")
    shutdown(dist)


def test_gathered_weights_are_whole_and_need_no_collective(tmp_path, cache_dir):
    """zero_stage 3: inside `gathered` every parameter is the whole tensor (what generation, evaluation
    and a vLLM weight sync read) and ranks run different numbers of forwards; outside, 1/2 each."""
    full = dict(_setup(cache_dir)[1].named_parameters())
    mp.spawn(_gathered_worker, args=(_free_port(), cache_dir, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"gathered{r}.pt") for r in range(2)]
    for out in ranks:
        assert out["inside"].keys() == full.keys()
        for name, weight in full.items():
            torch.testing.assert_close(out["inside"][name], weight.detach())
        assert (
            out["outside"]["model.embed_tokens.weight"][0] == full["model.embed_tokens.weight"].shape[0] // 2
        )
    torch.testing.assert_close(ranks[0]["logits"], ranks[1]["logits"])


def test_reduce_metrics_is_the_identity_in_one_process():
    metrics = {"reward/total": 0.5, "sampling/samples": 8.0}
    assert reduce_metrics(metrics, DistContext()) == metrics
    assert unwrap(torch.nn.Linear(2, 2)).in_features == 2


def test_shard_splits_a_global_batch_into_contiguous_shares():
    items = list(range(8))
    assert DistContext(rank=0, world_size=2).shard(items) == [0, 1, 2, 3]
    assert DistContext(rank=1, world_size=2).shard(items) == [4, 5, 6, 7]
    with pytest.raises(RuntimeError, match="do not split"):
        DistContext(rank=0, world_size=3).shard(items)


def _failure(result: subprocess.CompletedProcess) -> str:
    """The error lines of a failed launcher run (the root cause is often far above its summary)."""
    errors = [line for line in result.stderr.splitlines() if "Error" in line or "error:" in line]
    return "\n".join(errors[-20:]) + "\n---\n" + result.stderr[-2000:]


# the tiny training run every launcher test starts
TRAIN = ["scripts.train", "model=tiny", "task=char_share", "logger=none", "group_size=g4"]
TRAIN += ["trainer.batch_size=4", "rollout.max_new_tokens=8"]


def _launch(launcher: list[str], run_dir, cache_dir: str, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m <launcher...> -m scripts.train` on the tiny model in run_dir; asserts it succeeded."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RL_LAB_CACHE": cache_dir}
    command = [sys.executable, "-m", *launcher, "-m", *TRAIN, f"hydra.run.dir={run_dir}", *overrides]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, _failure(result)
    return result


def _torchrun_train(run_dir, cache_dir: str, *overrides: str) -> list[dict]:
    """`torchrun --nproc_per_node 2 -m scripts.train` on the tiny model; returns metrics.jsonl."""
    torchrun = ["torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    _launch(torchrun, run_dir, cache_dir, *overrides)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("zero_stage", [0, 1, 3])
def test_torchrun_two_processes_train(tmp_path, cache_dir, zero_stage):
    """The launcher path end to end: 2 ranks x 2 prompts x G=4 per step, rank 0 logs and saves
    (with zero_stage 1 / 3 the sharded AdamW state and, for 3, the sharded weights are gathered
    into the checkpoint: a plain Hugging Face folder)."""
    run_dir = tmp_path / "run"
    metrics = _torchrun_train(
        run_dir,
        cache_dir,
        "trainer.max_steps=2",
        "trainer.eval_every=2",
        "trainer.eval_num_prompts=4",
        f"trainer.zero_stage={zero_stage}",
    )
    steps = [m for m in metrics if m["step"] > 0 and "policy/loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    # the sequence count is the global batch's: 4 prompts x 4 responses, summed over the 2 ranks
    assert all(m["rollout/num_sequences"] == 16 for m in steps)
    assert (run_dir / "checkpoints" / "final" / "trainer_state.pt").is_file()
    state = torch.load(run_dir / "checkpoints" / "final" / "trainer_state.pt", weights_only=False)
    assert len(state["rank_rng"]) == 2
    assert state["optimizer"]["state"], "the AdamW state of every parameter is in the checkpoint"
    # the two ranks sampled with different RNG streams
    assert not torch.equal(state["rank_rng"][0]["torch"], state["rank_rng"][1]["torch"])
    saved = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "final")
    initial = _setup(cache_dir)[1]
    assert saved.config.architectures == ["LlamaForCausalLM"]
    assert saved.lm_head.weight is saved.model.embed_tokens.weight  # still tied
    moved = [(a - b).norm() for a, b in zip(saved.parameters(), initial.parameters(), strict=True)]
    assert all(torch.isfinite(m) for m in moved) and max(moved) > 0  # every weight saved, trained


def test_torchrun_fsdp_resume_continues_exactly(tmp_path, cache_dir):
    """PPO with every model sharded (policy, reference, critic; zero_stage 3): 2 steps straight
    equal 1 step, then a resume from its checkpoint for the second: the gathered weights and AdamW
    state (keyed by parameter name) round-trip through the checkpoint."""
    common = (
        "algorithm=ppo",
        "critic.warmup_steps=0",
        "trainer.zero_stage=3",
        "trainer.max_steps=2",
    )
    straight = tmp_path / "straight"
    _torchrun_train(
        straight,
        cache_dir,
        *common,
        "trainer.save_every=1",
        "trainer.keep_last_checkpoints=0",
        "trainer.keep_step_checkpoints=true",  # step_1 is read below, after the run has ended
        "trainer.eval_every=0",
    )
    resumed = tmp_path / "resumed"
    rows = _torchrun_train(
        resumed, cache_dir, *common, "trainer.eval_every=0", f"resume={straight / 'checkpoints' / 'step_1'}"
    )
    assert [r["step"] for r in rows] == [2]  # step 2 logged once, step 1 not again
    assert_resumed((resumed / "train.log").read_text(), straight / "checkpoints" / "step_1", 1)
    a, b = (
        torch.load(d / "checkpoints" / "final" / "trainer_state.pt", weights_only=False)
        for d in (straight, resumed)
    )
    assert keyed_by_name(a["optimizer"]) and a["optimizer"]["state"]
    weights = [
        AutoModelForCausalLM.from_pretrained(d / "checkpoints" / "final").state_dict()
        for d in (straight, resumed)
    ]
    step_1 = AutoModelForCausalLM.from_pretrained(straight / "checkpoints" / "step_1").state_dict()
    assert any(not torch.equal(step_1[k], weights[0][k]) for k in step_1)  # step 2 changed the policy
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-5, atol=1e-6)
    for key in a["critic"]:
        torch.testing.assert_close(b["critic"][key], a["critic"][key], rtol=1e-5, atol=1e-6)
    exp_avg = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(
        b["optimizer"]["state"][exp_avg]["exp_avg"], a["optimizer"]["state"][exp_avg]["exp_avg"]
    )


def test_resume_refuses_an_optimizer_state_of_the_other_layout(tmp_path, cache_dir):
    """A zero_stage 0-1 checkpoint (AdamW state keyed by index) cannot resume under FSDP, and back."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    by_index = optimizer.state_dict()
    assert not keyed_by_name(by_index)
    by_name = {"state": {"weight": {}}, "param_groups": [{"params": ["weight", "bias"]}]}
    with pytest.raises(DistributedError, match="zero_stage"):
        load_optimizer_state_dict(model, optimizer, by_name)


def test_torchrun_dapo_dynamic_sampling_keeps_the_ranks_in_step(tmp_path, cache_dir):
    """DAPO's filter refills per rank; every rank advances the prompt stream by the same global
    batches, so the checkpointed stream position is 4 prompts per generation round."""
    run_dir = tmp_path / "run"
    metrics = _torchrun_train(
        run_dir,
        cache_dir,
        "algorithm=dapo",
        "dynamic_sampling.max_num_gen_batches=3",
        "trainer.max_steps=3",
        "trainer.eval_every=0",
    )
    steps = [m for m in metrics if m["step"] > 0]
    assert [m["step"] for m in steps] == [1, 2, 3]
    rounds = sum(m["sampling/gen_batches"] for m in steps)
    state = torch.load(run_dir / "checkpoints" / "final" / "trainer_state.pt", weights_only=False)
    assert state["data"] == {"epoch": 0, "position": 4 * rounds}


def test_batch_size_must_split_over_the_processes(monkeypatch):
    from scripts.build import ConfigError, validate

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="trainer.batch_size"):
        validate(compose_train(*OVERRIDES))


def test_world_size_comes_from_the_launcher_or_slurm(monkeypatch):
    for key in ("WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    assert launched_world_size() == 1
    monkeypatch.setenv("SLURM_NTASKS", "4")  # an allocation's shell, not an srun task: one process
    assert launched_world_size() == 1
    monkeypatch.setenv("SLURM_PROCID", "2")
    assert launched_world_size() == 4
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun inside the allocation wins
    assert launched_world_size() == 2


FSDP2_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "ACCELERATE_MIXED_PRECISION": "no"}
FSDP1_ENV = {"ACCELERATE_USE_FSDP": "true"}
ZERO = "trainer.zero_stage"


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, {}),
        ({**FSDP2_ENV, "FSDP_RESHARD_AFTER_FORWARD": "true"}, {"trainer.zero_stage": 3}),
        ({**FSDP2_ENV, "FSDP_RESHARD_AFTER_FORWARD": "false"}, {"trainer.zero_stage": 2}),
        (
            {"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"},
            {"trainer.zero_stage": 2},
        ),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "NO_SHARD"}, {"trainer.zero_stage": 0}),
        (
            {**FSDP2_ENV, "FSDP_ACTIVATION_CHECKPOINTING": "true", "ACCELERATE_MIXED_PRECISION": "bf16"},
            {"trainer.zero_stage": 3, "model.gradient_checkpointing": True, "trainer.bf16": True},
        ),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"},
            {"trainer.zero_stage": 1},
        ),
    ],
)
def test_accelerate_config_maps_onto_trainer_keys(env, expected):
    from scripts.build import apply_launcher_settings, launcher_settings

    assert launcher_settings(env) == expected
    cfg = compose_train(*OVERRIDES)
    apply_launcher_settings(cfg, env)
    for key, value in expected.items():
        assert OmegaConf.select(cfg, key) == value


@pytest.mark.parametrize(
    "env, message",
    [
        ({"ACCELERATE_MIXED_PRECISION": "fp16"}, "mixed_precision fp16"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "HYBRID_SHARD"}, "HYBRID_SHARD"),
        ({**FSDP2_ENV, "FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params"),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu"}, "offload"),
    ],
)
def test_accelerate_config_the_loop_cannot_follow_is_an_error(env, message):
    from scripts.build import ConfigError, launcher_settings

    with pytest.raises(ConfigError, match=message):
        launcher_settings(env)


def test_command_line_contradicting_the_accelerate_config_is_an_error():
    from scripts.build import ConfigError, apply_launcher_settings

    cfg = compose_train(*OVERRIDES, "trainer.zero_stage=1")
    with pytest.raises(ConfigError, match="trainer.zero_stage=1 contradicts the accelerate config"):
        apply_launcher_settings(cfg, {**FSDP2_ENV, "FSDP_RESHARD_AFTER_FORWARD": "true"})
    cfg = compose_train(*OVERRIDES, "trainer.zero_stage=3")  # agreeing is fine
    apply_launcher_settings(cfg, {**FSDP2_ENV, "FSDP_RESHARD_AFTER_FORWARD": "true"})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("trainer.zero_stage=4",), "options: 0"),
        (("trainer.zero_stage=3", "model.lora.enabled=true"), "not supported with LoRA"),
    ],
)
def test_unsupported_sharding_is_a_config_error(overrides, message):
    from scripts.build import ConfigError, validate

    with pytest.raises(ConfigError, match=message):
        validate(compose_train(*OVERRIDES, *overrides))


def test_accelerate_launch_with_the_fsdp_config(tmp_path, cache_dir):
    """`accelerate launch --config_file scripts/accelerate/fsdp.yaml` (2 processes on CPU here):
    its fsdp_config becomes trainer.zero_stage=3 and the run trains and saves."""
    run_dir = tmp_path / "run"
    accelerate = ["accelerate.commands.launch", "--config_file", "scripts/accelerate/fsdp.yaml"]
    accelerate += ["--mixed_precision", "no", f"--main_process_port={_free_port()}"]
    result = _launch(accelerate, run_dir, cache_dir, "trainer.max_steps=1", "trainer.eval_every=0")
    assert "from the accelerate config: trainer.zero_stage=3" in result.stdout + result.stderr
    assert "FSDP, zero_stage 3" in result.stdout + result.stderr
    assert (run_dir / "checkpoints" / "final" / "model.safetensors").is_file()
