"""model.lora: LoRA adapters via peft on the tiny model. Only the adapters train; the reference is
the frozen base; checkpoints resume exactly and stay plain Hugging Face folders for scripts/eval."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from common.checkpoint import ADAPTER_DIR, CheckpointError, load_checkpoint, save_checkpoint
from common.logprobs import sequence_logprobs
from common.models import is_lora, load_policy, make_reference
from ppo import build_critic
from scripts.build import ConfigError, build_optimizer, build_policy, validate
from scripts.train import run
from tests.conftest import TEST_SEED, TINY_RUN, compose_train
from tests.test_resume import assert_resumed, assert_same_run, read_metrics

LORA = ("model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8")
# 2 layers x 7 projections (q, k, v, o, gate, up, down) x (A, B)
N_ADAPTER_TENSORS = 2 * 7 * 2


def lora_cfg(cache_dir: str, *overrides: str):
    return compose_train(*TINY_RUN, *LORA, f"paths.cache_dir={cache_dir}", *overrides)


def batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Two left-padded rows; the last 4 columns play the response (prompt_len = width - 4)."""
    enc = tokenizer(["What is 2 + 3? The answer is 5", "Say hi. hi there"], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"], enc["input_ids"].shape[1] - 4


def logprobs(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return sequence_logprobs(model, *batch(tokenizer))[0]  # (2, 4)


def optimizer_step(model, tokenizer, optimizer: torch.optim.Optimizer) -> None:
    """One step of `optimizer` on -mean log-prob."""
    optimizer.zero_grad()
    model.train()
    logprob, _ = sequence_logprobs(model, *batch(tokenizer))
    (-logprob.mean()).backward()
    optimizer.step()


def test_only_the_adapters_train_and_change(cache_dir):
    cfg = lora_cfg(cache_dir, "optim.lr=1e-2", "optim.warmup_steps=0")
    model, tokenizer = build_policy(cfg)
    assert is_lora(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == N_ADAPTER_TENSORS and all(".lora_" in n for n in trainable)
    optimizer, _ = build_optimizer(model, cfg)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == N_ADAPTER_TENSORS
    # r * (d_in + d_out) per layer: 4 * (64 + 64) for q_proj, a few thousand in all against 3.2M weights
    assert sum(p.numel() for p in trainable.values()) < 0.01 * sum(p.numel() for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # B starts at zero (Hu et al. 2021, Sec. 4.1): the adapter adds nothing yet
    assert all(torch.count_nonzero(p) == 0 for n, p in before.items() if ".lora_B." in n)

    # step 1: h = W0 x + s B A x gives dL/dA = s B^T (dL/dh) x^T = 0 while B = 0, so only B moves
    optimizer_step(model, tokenizer, optimizer)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (".lora_B." in name), name
    # step 2: B != 0 now, so A moves too; the base weights never do
    optimizer_step(model, tokenizer, optimizer)
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name} did not change"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"


def test_reference_is_the_frozen_base_and_only_the_policy_moves(cache_dir):
    cfg = lora_cfg(cache_dir, "optim.lr=1e-2", "optim.warmup_steps=0")
    model, tokenizer = build_policy(cfg)
    plain, _ = build_policy(lora_cfg(cache_dir, "model.lora.enabled=false"))  # same seed, same weights
    reference = make_reference(model)
    assert type(reference) is LlamaForCausalLM and not reference.training
    assert not any(p.requires_grad for p in reference.parameters())
    policy_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not policy_ptrs & {p.data_ptr() for p in reference.parameters()}

    at_init, reference_at_init = logprobs(model, tokenizer), logprobs(reference, tokenizer)
    # B = 0: the wrapped model computes what the base computes, but through peft's LoRA layers, not
    # the plain Linear modules, so the float32 sums may run in another order: log-probs of up to
    # ~31 nats agree to a few ulps (1 ulp = 1.9e-6 at 31), not bit for bit
    torch.testing.assert_close(reference_at_init, at_init, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logprobs(plain, tokenizer), at_init, rtol=1e-5, atol=1e-5)

    reference_weights = [p.detach().clone() for p in reference.parameters()]
    optimizer_step(model, tokenizer, build_optimizer(model, cfg)[0])
    assert (logprobs(model, tokenizer) - at_init).abs().max() > 1e-2  # the policy moved (~5 nats here)
    # the reference did not: its weights are untouched, and the same module on the same input gives
    # exactly the same log-probs (one code path, so bit equality is the property)
    assert all(torch.equal(p, w) for p, w in zip(reference.parameters(), reference_weights, strict=True))
    torch.testing.assert_close(logprobs(reference, tokenizer), reference_at_init, rtol=0, atol=0)


def test_gradient_checkpointing_with_lora_gives_the_same_gradient(cache_dir):
    grads = []
    for checkpointing in (False, True):
        model, tokenizer = build_policy(lora_cfg(cache_dir, f"model.gradient_checkpointing={checkpointing}"))
        assert model.is_activation_checkpointing == checkpointing
        model.train()
        logprob, _ = sequence_logprobs(model, *batch(tokenizer))
        (-logprob.mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert len(grads[1]) == N_ADAPTER_TENSORS
    assert any(g.abs().sum() > 0 for g in grads[1].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5)


def test_logits_to_keep_reaches_the_wrapped_model(cache_dir):
    """peft's forward takes **kwargs: the LM head must still run on the response columns only."""
    model, tokenizer = build_policy(lora_cfg(cache_dir))
    seen = {}
    hook = model.get_base_model().register_forward_pre_hook(
        lambda _module, _args, kwargs: seen.update(kwargs), with_kwargs=True
    )
    logprobs(model, tokenizer)
    hook.remove()
    assert seen.get("logits_to_keep") == 5  # T + 1 with T = 4 response columns


def test_checkpoint_round_trip_and_plain_folder(cache_dir, tmp_path):
    cfg = lora_cfg(cache_dir, "optim.lr=1e-2", "optim.warmup_steps=0")
    model, tokenizer = build_policy(cfg)
    # B != 0 after a step: the checkpoint holds a trained adapter
    optimizer_step(model, tokenizer, build_optimizer(model, cfg)[0])
    path = save_checkpoint(tmp_path / "step_1", model=model, tokenizer=tokenizer, state={"step": 1})
    adapter_config = json.loads((path / ADAPTER_DIR / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (4, 8)

    fresh, _ = build_policy(cfg)
    assert load_checkpoint(path, fresh) == {"step": 1}
    trained = model.state_dict()
    loaded = fresh.state_dict()
    assert loaded.keys() == trained.keys()
    for name, weight in trained.items():
        assert torch.equal(loaded[name], weight), name

    # the folder itself is a plain model (what scripts/eval reads): the merged policy, no peft needed
    merged, _ = load_policy("hub", name_or_path=str(path))
    assert not is_lora(merged)
    torch.testing.assert_close(logprobs(merged, tokenizer), logprobs(model, tokenizer), rtol=1e-5, atol=1e-5)


def test_checkpoint_mismatches_fail_naming_the_problem(cache_dir, tmp_path):
    cfg = lora_cfg(cache_dir)
    model, tokenizer = build_policy(cfg)
    path = save_checkpoint(tmp_path / "ckpt", model=model, tokenizer=tokenizer, state={"step": 1})
    plain, _ = build_policy(lora_cfg(cache_dir, "model.lora.enabled=false"))
    with pytest.raises(CheckpointError, match="LoRA run; resume with model.lora.enabled=true"):
        load_checkpoint(path, plain)
    other_rank, _ = build_policy(lora_cfg(cache_dir, "model.lora.r=8"))
    with pytest.raises(CheckpointError, match="'r': 4"):
        load_checkpoint(path, other_rank)
    other_base, _ = build_policy(lora_cfg(cache_dir, "seed=1"))  # the tiny model's weights follow the seed
    with pytest.raises(CheckpointError, match="base weights differ"):
        load_checkpoint(path, other_base)

    full_path = save_checkpoint(tmp_path / "full", model=plain, tokenizer=tokenizer, state={"step": 1})
    with pytest.raises(CheckpointError, match="full fine-tuning run; resume with model.lora.enabled=false"):
        load_checkpoint(full_path, model)


def test_critic_of_a_lora_policy_is_a_plain_trainable_copy(cache_dir):
    model, _ = build_policy(lora_cfg(cache_dir))
    critic = build_critic(model)
    assert not is_lora(critic.backbone)
    assert all(p.requires_grad for p in critic.parameters())
    policy_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not policy_ptrs & {p.data_ptr() for p in critic.parameters()}


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.lora.r=0", "model.lora.r"),
        ("model.lora.r=2.5", "model.lora.r"),
        ("model.lora.alpha=0", "model.lora.alpha"),
        ("model.lora.dropout=1.0", "model.lora.dropout"),
        ("model.lora.target_modules=[]", "model.lora.target_modules"),
        ("model.lora.target_modules=q_proj", "model.lora.target_modules"),
    ],
)
def test_bad_lora_settings_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        validate(compose_train(*LORA, override))
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


def test_lora_settings_are_not_checked_when_disabled():
    validate(compose_train("model.lora.r=0"))


def test_unknown_target_module_fails_naming_the_key(cache_dir):
    with pytest.raises(ConfigError, match=r"^model.lora.target_modules: \['q_prj'\] match no layer"):
        build_policy(lora_cfg(cache_dir, "model.lora.target_modules=[q_prj,v_proj]"))


@pytest.mark.parametrize(
    "algorithm",
    # PPO: no critic warm-up, so the policy steps in both steps; its critic is a plain full copy
    [("algorithm=grpo",), ("algorithm=ppo", "critic.warmup_steps=0")],
    ids=["grpo", "ppo"],
)
def test_smoke_run_with_lora_trains_the_adapters(tmp_path, cache_dir, algorithm):
    # char_share gives partial credit, so the random tiny model gets mixed rewards (addition gives all 0):
    # no reward value takes over ~8% of its samples, so a group of 4 is all-equal with a chance ~1e-4
    cfg = compose_train(
        "debug=smoke",
        "task=char_share",
        f"seed={TEST_SEED}",
        *algorithm,
        *LORA,
        "optim.lr=1e-2",
        f"paths.cache_dir={cache_dir}",
    )
    metrics = run(cfg, tmp_path)
    rows = read_metrics(tmp_path)
    assert sorted(rows) == [0, 1, 2] and "eval/accuracy" in rows[2]
    for step in (1, 2):
        assert rows[step]["policy/skipped_updates"] == 0
        assert torch.isfinite(torch.tensor(rows[step]["policy/loss"])) and rows[step]["policy/grad_norm"] > 0
    assert metrics["policy/grad_norm"] > 0
    if "algorithm=ppo" in algorithm:
        assert metrics["critic/grad_norm"] > 0
    final = tmp_path / "checkpoints" / "final"
    assert (final / "model.safetensors").is_file()
    adapter = load_file(final / ADAPTER_DIR / "adapter_model.safetensors")
    lora_b = [w for name, w in adapter.items() if ".lora_B." in name]
    assert len(lora_b) == N_ADAPTER_TENSORS // 2
    assert all(torch.count_nonzero(w) > 0 for w in lora_b)  # every B left its zero init
    # the final folder evaluates like any checkpoint
    from scripts.eval import main

    result = main([str(tmp_path), "--num-prompts", "2", "--k", "1"])
    assert result["model"] == str(final) and 0 <= result["metrics"]["greedy/accuracy"] <= 1


def test_lora_run_resumes_exactly(tmp_path, cache_dir, caplog):
    common = (*TINY_RUN, *LORA, "optim.lr=1e-2", f"paths.cache_dir={cache_dir}")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(compose_train(*common, "trainer.max_steps=3"), straight)
    run(compose_train(*common, "trainer.max_steps=1"), resumed)
    with caplog.at_level(logging.INFO, logger="rl_lab"):
        run(compose_train(*common, "trainer.max_steps=3", "resume=auto"), resumed)
    assert_resumed(caplog.text, resumed / "checkpoints" / "final", 1)
    assert sorted(read_metrics(resumed)) == [1, 2, 3]
    assert_same_run(straight, resumed, [1, 2, 3])
