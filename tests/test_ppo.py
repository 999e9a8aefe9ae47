"""PPO: token rewards, KL controllers, GAE advantages, the value loss and the critic (CPU, tiny model)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from common.logprobs import sequence_logprobs
from common.losses import masked_mean
from ppo import PPO, AdaptiveKLController, FixedKLController, ValueModel, build_critic, token_level_rewards
from tests.conftest import compose_train


@functools.lru_cache(maxsize=1)
def ppo_yaml() -> dict:
    return OmegaConf.to_container(compose_train("algorithm=ppo").algorithm, resolve=True)


def make_ppo(**overrides) -> PPO:
    return PPO(**{**ppo_yaml(), **overrides})


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).float()


# --- config -----------------------------------------------------------------------------------


def test_preset_builds_and_defaults_to_one_response_per_prompt():
    cfg = compose_train("algorithm=ppo")
    assert cfg.rollout.group_size == 1 and cfg.algorithm.group_size == 1
    assert compose_train("algorithm=ppo", "group_size=g4").rollout.group_size == 4
    algo = make_ppo()  # every YAML key is a field and every field has a YAML key
    assert (algo.name, algo.kl_kind, algo.gamma, algo.lam) == ("ppo", "k1", 1.0, 1.0)
    assert algo.needs_critic and algo.needs_reference and algo.needs_old_logprob
    assert algo.epochs == algo.ppo_epochs
    off = make_ppo(kl_coef=0.0, ppo_epochs=1)
    assert not off.needs_reference and not off.needs_old_logprob
    assert make_ppo(kl_coef=0.0, ppo_epochs=2).needs_old_logprob


def test_unknown_kl_controller_is_rejected():
    with pytest.raises(ValueError, match="kl_ctl"):
        make_ppo(kl_ctl="pid")


# --- token rewards ----------------------------------------------------------------------------


def test_token_level_rewards_hand_values():
    # rows: full, right-padded (junk KL under padding), empty (gets nothing)
    rewards = torch.tensor([1.0, 2.0, 3.0])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    kl = torch.tensor([[0.2, 0.2, 0.2], [0.4, 9.0, float("nan")], [5.0, 5.0, 5.0]])
    out = token_level_rewards(rewards, mask, kl, kl_coef=0.5)
    # -0.5 * 0.2 = -0.1 on each token, + R on the last; row 2: 2 - 0.5 * 0.4 = 1.8
    expected = torch.tensor([[-0.1, -0.1, 0.9], [1.8, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(out, expected)
    # without KL the reward sits alone on the last response token (index length - 1)
    out = token_level_rewards(rewards, mask)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 1.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))


# --- KL controllers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "current_kl, expected",
    [
        (12.0, 0.1 * (1 + 0.2 * 100 / 10_000)),  # error 1.0 clipped to +0.2 -> 0.1002
        (3.0, 0.1 * (1 - 0.2 * 100 / 10_000)),  # error -0.5 clipped to -0.2 -> 0.0998
        (6.6, 0.1 * (1 + 0.1 * 100 / 10_000)),  # error 0.1 inside the clip -> 0.1001
        (6.0, 0.1),  # on target: unchanged
    ],
)
def test_adaptive_kl_controller_update(current_kl, expected):
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl, n_steps=100)
    assert ctl.value == pytest.approx(expected, rel=1e-12)


def test_fixed_kl_controller_is_constant_and_state_round_trips():
    fixed = FixedKLController(0.05)
    for kl in (0.0, 6.0, 100.0):
        fixed.update(kl, n_steps=64)
    assert fixed.value == 0.05
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(12.0, n_steps=10)  # 0.1 * 1.02
    fresh = AdaptiveKLController(0.1, target=6.0, horizon=100)
    fresh.load_state_dict(ctl.state_dict())
    assert fresh.value == pytest.approx(0.102)


# --- advantages -------------------------------------------------------------------------------


def hand_batch() -> dict[str, torch.Tensor]:
    return {
        "rewards": torch.tensor([1.0, 0.0]),
        "response_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
        "loss_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
        "values": torch.tensor([[0.5, 0.25, 0.1], [0.2, 0.3, 9.0]]),
        "lengths": torch.tensor([3, 2]),
    }


def test_compute_advantages_is_reward_to_go_minus_values():
    algo = make_ppo(gamma=1.0, lam=1.0, whiten_advantages=False, kl_coef=0.0)
    batch = hand_batch()
    stats = algo.compute_advantages(batch)
    mask = batch["response_mask"].bool()
    # reward-to-go: row 0 [1, 1, 1], row 1 [0, 0]; A = rtg - V
    expected_adv = torch.tensor([[0.5, 0.75, 0.9], [-0.2, -0.3, 0.0]])
    torch.testing.assert_close(batch["advantages"][mask], expected_adv[mask])
    torch.testing.assert_close(batch["returns"][mask], torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(batch["token_rewards"], torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    assert stats["policy/advantages_mean"] == pytest.approx((0.5 + 0.75 + 0.9 - 0.2 - 0.3) / 5)
    assert stats["critic/returns_mean"] == pytest.approx(3 / 5)
    assert "kl/value" not in stats


def test_compute_advantages_with_kl_in_reward_updates_the_controller():
    algo = make_ppo(
        gamma=1.0,
        lam=1.0,
        whiten_advantages=False,
        kl_coef=0.5,
        kl_kind="k1",
        kl_ctl="adaptive",
        kl_target=0.45,
        kl_horizon=10,
    )
    batch = hand_batch()
    batch["old_logprob"] = torch.full((2, 3), -1.0)
    batch["ref_logprob"] = torch.full((2, 3), -1.2)  # k1 = 0.2 per token
    stats = algo.compute_advantages(batch)
    mask = batch["response_mask"].bool()
    # token rewards row 0 [-0.1, -0.1, 0.9] -> rtg [0.7, 0.8, 0.9]; row 1 [-0.1, -0.1] -> rtg [-0.2, -0.1]
    rtg = torch.tensor([[0.7, 0.8, 0.9], [-0.2, -0.1, 0.0]])
    torch.testing.assert_close(batch["advantages"][mask], (rtg - batch["values"])[mask])
    assert stats["kl/coef"] == 0.5  # the beta used for this step's rewards
    assert stats["kl/value"] == pytest.approx(0.2)  # per token
    assert stats["kl/seq_value"] == pytest.approx((0.6 + 0.4) / 2)  # per sequence, the controller's input
    # error 0.5 / 0.45 - 1 = 1/9 (inside the clip), n_steps = N = 2, horizon 10
    assert algo.kl_controller.value == pytest.approx(0.5 * (1 + (1 / 9) * 2 / 10))


def test_whitening_gives_zero_mean_unit_variance_over_masked_tokens():
    algo = make_ppo(whiten_advantages=True, kl_coef=0.0)
    batch = hand_batch()
    algo.compute_advantages(batch)
    adv, mask = batch["advantages"], batch["response_mask"].bool()
    assert masked_mean(adv, mask).abs().item() < 1e-6
    assert adv[mask].var().item() == pytest.approx(1.0, abs=1e-4)  # unbiased, as masked_whiten
    assert adv[~mask].abs().max().item() == 0.0


# --- loss -------------------------------------------------------------------------------------


def one_token_batch() -> dict[str, torch.Tensor]:
    return {
        "advantages": torch.zeros(1, 1),  # pg loss 0: the total is the value term alone
        "returns": torch.ones(1, 1),
        "values": torch.zeros(1, 1),  # old values
        "loss_mask": torch.ones(1, 1),
        "response_mask": torch.ones(1, 1),
    }


def test_value_clipping_changes_the_loss():
    batch, logprob = one_token_batch(), torch.zeros(1, 1, requires_grad=True)
    new_values = torch.full((1, 1), 0.5, requires_grad=True)  # moved 0.5 > cliprange 0.2
    clipped = make_ppo(cliprange_value=0.2, vf_coef=1.0, entropy_coef=0.0)
    loss, stats = clipped.loss(batch, logprob, denominator=1.0, values=new_values)
    # unclipped (0.5 - 1)^2 = 0.25; clipped value 0.2 -> (0.2 - 1)^2 = 0.64; 0.5 * max = 0.32
    assert loss.item() == pytest.approx(0.32)
    assert stats["critic/value_loss"] == pytest.approx(0.32) and stats["critic/vf_clipfrac"] == 1.0
    plain = make_ppo(cliprange_value=None, vf_coef=1.0, entropy_coef=0.0)
    loss, stats = plain.loss(batch, logprob, denominator=1.0, values=new_values)
    assert loss.item() == pytest.approx(0.125) and stats["critic/vf_clipfrac"] == 0.0
    # vf_coef scales the value term
    scaled = make_ppo(cliprange_value=None, vf_coef=0.1)
    loss, _ = scaled.loss(batch, logprob, denominator=1.0, values=new_values)
    assert loss.item() == pytest.approx(0.0125)


def test_loss_without_values_raises_a_clear_error():
    with pytest.raises(ValueError, match="values="):
        make_ppo().loss(one_token_batch(), torch.zeros(1, 1), denominator=1.0)


def test_explained_variance_of_a_perfect_critic_is_one():
    batch = one_token_batch() | {
        "returns": torch.tensor([[1.0, 2.0, 3.0]]),
        "values": torch.tensor([[1.0, 2.0, 3.0]]),
        "advantages": torch.zeros(1, 3),
        "loss_mask": torch.ones(1, 3),
    }
    algo = make_ppo()
    _, stats = algo.loss(batch, torch.zeros(1, 3), denominator=3.0, values=torch.tensor([[1.0, 2.0, 3.0]]))
    assert stats["critic/explained_variance"] == pytest.approx(1.0)
    _, stats = algo.loss(batch, torch.zeros(1, 3), denominator=3.0, values=torch.full((1, 3), 2.0))
    assert stats["critic/explained_variance"] == pytest.approx(0.0, abs=1e-6)  # constant predictor


# --- critic -----------------------------------------------------------------------------------


def test_value_model_shape_and_alignment():
    policy = tiny_llama()
    critic = build_critic(policy)
    P, T = 3, 4
    input_ids = torch.randint(1, 64, (2, P + T))
    attention_mask = torch.ones_like(input_ids)
    values = critic(input_ids, attention_mask, prompt_len=P)
    assert values.shape == (2, T) and values.dtype == torch.float32
    hidden = critic.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    for t in range(T):  # the state before response token t is column P - 1 + t
        expected = critic.head(hidden[:, P - 1 + t]).squeeze(-1)
        torch.testing.assert_close(values[:, t], expected, atol=1e-5, rtol=0)


def test_value_head_init_zeros_starts_at_zero_and_learns():
    """head_init=zeros: every first value is exactly 0 (the first advantages are the discounted
    rewards), and one step on a value loss moves the head; normal starts away from 0."""
    input_ids = torch.randint(1, 64, (2, 7))
    attention_mask = torch.ones_like(input_ids)
    torch.manual_seed(0)
    zeros = build_critic(tiny_llama(), head_init="zeros")
    values = zeros(input_ids, attention_mask, prompt_len=3)  # (2, 4)
    assert torch.equal(values, torch.zeros(2, 4))
    ((values - 1.0) ** 2).mean().backward()
    assert zeros.head.weight.grad.abs().sum() > 0  # d value / d weight = the hidden state
    torch.optim.SGD(zeros.parameters(), lr=0.1).step()
    assert zeros(input_ids, attention_mask, prompt_len=3).abs().min() > 0
    normal = build_critic(tiny_llama(), head_init="normal")
    assert normal(input_ids, attention_mask, prompt_len=3).abs().max() > 0
    with pytest.raises(ValueError, match="head_init 'xavier'"):
        build_critic(tiny_llama(), head_init="xavier")


def test_value_model_ignores_left_padding_in_the_prompt():
    critic = build_critic(tiny_llama())
    prompt, response = torch.tensor([[5, 6, 7]]), torch.tensor([[8, 9, 10]])
    ids = torch.cat([prompt, response], dim=1)  # (1, 6), no padding
    padded = torch.cat([torch.tensor([[0, 0]]), ids], dim=1)  # (1, 8), two pad columns on the left
    mask_padded = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        plain = critic(ids, torch.ones_like(ids), prompt_len=3)
        shifted = critic(padded, mask_padded, prompt_len=5)
    torch.testing.assert_close(shifted, plain, atol=1e-4, rtol=0)


def test_build_critic_copies_the_body_and_shares_no_parameter(tmp_path):
    policy = tiny_llama()
    critic = build_critic(policy)
    assert isinstance(critic, ValueModel)
    policy_ptrs = {p.data_ptr() for p in policy.parameters()}
    assert not policy_ptrs & {p.data_ptr() for p in critic.parameters()}
    # same starting weights, independent storage
    torch.testing.assert_close(critic.backbone.embed_tokens.weight, policy.model.embed_tokens.weight)
    with torch.no_grad():
        critic.backbone.embed_tokens.weight.add_(1.0)
    assert not torch.equal(critic.backbone.embed_tokens.weight, policy.model.embed_tokens.weight)
    # a separate checkpoint: the body of a saved causal LM
    policy.save_pretrained(tmp_path / "body")
    loaded = build_critic(policy, str(tmp_path / "body"))
    torch.testing.assert_close(loaded.backbone.embed_tokens.weight, policy.model.embed_tokens.weight)
    with pytest.raises(ValueError, match="critic_name_or_path"):
        build_critic(policy, str(tmp_path / "missing"))


def test_one_backward_reaches_policy_and_critic():
    policy = tiny_llama()
    critic = build_critic(policy)
    P, T = 3, 4
    input_ids = torch.randint(1, 64, (2, P + T))
    attention_mask = torch.ones_like(input_ids)
    response_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    algo = make_ppo(kl_coef=0.0)
    with torch.no_grad():
        batch = {
            "rewards": torch.tensor([1.0, -1.0]),
            "response_mask": response_mask,
            "loss_mask": response_mask,
            "values": critic(input_ids, attention_mask, P),
        }
        batch["old_logprob"], _ = sequence_logprobs(policy, input_ids, attention_mask, P)
    algo.compute_advantages(batch)
    logprob, entropy = sequence_logprobs(policy, input_ids, attention_mask, P, return_entropy=True)
    values = critic(input_ids, attention_mask, P)
    denominator = float(response_mask.sum())
    loss, stats = algo.loss(batch, logprob, denominator=denominator, entropy=entropy, values=values)
    loss.backward()
    assert torch.isfinite(loss) and all(isinstance(v, float) for v in stats.values())
    assert critic.head.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())


def test_explained_variance_is_undefined_for_constant_returns():
    from ppo.algorithm import explained_variance

    mask = torch.ones(2, 3)
    # every response failed: returns all 0; the ratio would be -Var(V)/0, so it is reported as NaN
    assert math.isnan(explained_variance(torch.randn(2, 3), torch.zeros(2, 3), mask))
    # values (1, 2, 3) against returns (1, 3, 5): residual var 2/3, returns var 8/3 -> 1 - 1/4 = 0.75
    ev = explained_variance(
        torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 3.0, 5.0]]), torch.ones(1, 3)
    )
    assert ev == pytest.approx(0.75)


def test_preset_horizon_lets_beta_move_within_a_default_run():
    """30 steps of 8 responses (the default PPO run) with the KL far below target: at the preset's
    horizon beta falls to 0.05 * (1 - 0.2 * 8 / 80)^30 = 0.027; at Ziegler's 10000 it stays at 0.0498."""
    cfg = compose_train("algorithm=ppo", "algorithm.kl_ctl=adaptive")
    samples_per_step = cfg.trainer.batch_size * cfg.rollout.group_size
    assert (cfg.trainer.max_steps, samples_per_step) == (30, 8)
    betas = {}
    for horizon in (cfg.algorithm.kl_horizon, 10_000):
        ppo = make_ppo(kl_ctl="adaptive", kl_horizon=horizon)
        for _ in range(cfg.trainer.max_steps):
            ppo.kl_controller.update(0.0, n_steps=samples_per_step)
        betas[horizon] = ppo.kl_controller.value
    assert betas[cfg.algorithm.kl_horizon] == pytest.approx(0.05 * 0.98**30, rel=1e-9)
    assert betas[cfg.algorithm.kl_horizon] < 0.6 * 0.05 and betas[10_000] > 0.99 * 0.05
