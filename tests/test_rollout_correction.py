"""Truncated importance sampling and the rollout mismatch metrics (common.rollout_correction): hand
values, the weighted policy loss, the config keys, and the update that applies them."""

from __future__ import annotations

import math

import pytest
import torch

from common.losses import policy_loss
from common.rollout import make_engine
from common.rollout_correction import mismatch_metrics, tis_weights
from common.update import accumulate_gradients, add_logprobs_and_values, needs_old_logprob
from scripts.build import ConfigError, build_algorithm, build_policy, build_settings, validate
from tests.conftest import compose_train, micro_batches

LN2 = math.log(2.0)
# pi_old = (0.5, 0.2), pi_rollout = (0.25, 0.4) on two tokens; a third, masked out, holds junk
OLD = torch.tensor([[math.log(0.5), math.log(0.2), 50.0]])
ROLLOUT = torch.tensor([[math.log(0.25), math.log(0.4), -50.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0]])


def test_tis_weights_by_hand():
    # ratios pi_old / pi_rollout = (2, 0.5); C = 1.5 truncates the first: weights (1.5, 0.5), 0 under the mask
    weights, stats = tis_weights(OLD, ROLLOUT, MASK, cap=1.5)
    torch.testing.assert_close(weights, torch.tensor([[1.5, 0.5, 0.0]]))
    assert stats["rollout/tis_weight_mean"] == pytest.approx(1.0)  # (1.5 + 0.5) / 2
    assert stats["rollout/tis_clipfrac"] == pytest.approx(0.5)
    weights, stats = tis_weights(OLD, ROLLOUT, MASK, cap=2.0)  # a ratio at the cap is not truncated
    torch.testing.assert_close(weights, torch.tensor([[2.0, 0.5, 0.0]]))
    assert stats["rollout/tis_clipfrac"] == 0.0


def test_mismatch_metrics_by_hand():
    # |log ratio| = (ln 2, ln 2): mean ln 2; k3 = r - 1 - ln r: (1 - ln 2 + (-0.5 + ln 2)) / 2 = 0.25;
    # k1 = log pi_rollout - log pi_old: (-ln 2 + ln 2) / 2 = 0; the masked junk never enters
    metrics = mismatch_metrics(OLD, ROLLOUT, MASK)
    assert metrics["rollout/logprob_abs_diff"] == pytest.approx(LN2)
    assert metrics["rollout/kl"] == pytest.approx(0.25)
    assert metrics["rollout/kl_k1"] == pytest.approx(0.0, abs=1e-7)
    same = mismatch_metrics(OLD, OLD, MASK)
    assert same == {"rollout/logprob_abs_diff": 0.0, "rollout/kl": 0.0, "rollout/kl_k1": 0.0}


def test_policy_loss_weighs_each_token():
    # on-policy (ratio 1), A = 1, weights (1.5, 0.5): per-token loss -(1.5, 0.5), token-mean -1;
    # d loss / d logprob_t = -w_t A ratio_t / 2 = (-0.75, -0.25): the weight scales the gradient
    logprob = torch.zeros(1, 2, requires_grad=True)
    loss, _ = policy_loss(
        logprob, torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2), token_weights=torch.tensor([[1.5, 0.5]])
    )
    loss.backward()
    assert loss.item() == pytest.approx(-1.0)
    torch.testing.assert_close(logprob.grad, torch.tensor([[-0.75, -0.25]]))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("algorithm.rollout_correction=is", "algorithm.rollout_correction"),
        ("algorithm.tis_imp_ratio_cap=0.5", "algorithm.tis_imp_ratio_cap"),
    ],
)
def test_bad_correction_settings_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        validate(compose_train("model=tiny", override))


@pytest.mark.parametrize(
    ("overrides", "needed"),
    [
        ((), False),  # GRPO's default: one pass, one mini-batch, pi_old = the current policy
        (("algorithm.rollout_correction=tis",), True),
        (("trainer.log_rollout_mismatch=true",), True),
        (("algorithm=dapo",), True),  # DAPO's mini-batches
    ],
)
def test_old_logprobs_are_computed_when_the_correction_or_the_metric_needs_them(overrides, needed):
    cfg = compose_train("model=tiny", *overrides)
    assert needs_old_logprob(build_algorithm(cfg.algorithm), build_settings(cfg)) is needed


def test_the_update_applies_tis_weights_and_logs_the_mismatch(cache_dir):
    """With rollout_correction=tis the log-prob phase records pi_old, the weights min(pi_old / pi_rollout, C)
    and the mismatch; the update's loss is the weighted one: rollout log-probs made lower by ln 2 give
    every token the ratio 2, capped at C = 1.5, so the loss is 1.5 times the uncorrected one."""
    cfg = compose_train(
        "model=tiny",
        "group_size=g4",
        "rollout.max_new_tokens=6",
        "algorithm.rollout_correction=tis",
        "algorithm.tis_imp_ratio_cap=1.5",
        "algorithm.kl_coef=0",
        f"paths.cache_dir={cache_dir}",
    )
    algo, settings = build_algorithm(cfg.algorithm), build_settings(cfg)
    model, tokenizer = build_policy(cfg)
    rollout = make_engine("hf", model, tokenizer, group_size=4, max_new_tokens=6).sample(["q1", "q2"])
    batch = {
        "input_ids": rollout.input_ids,
        "attention_mask": rollout.attention_mask,
        "response_mask": rollout.response_mask,
        "loss_mask": rollout.response_mask,
        "group_index": rollout.group_index,
        "prompt_len": rollout.prompt_len,
        "rollout_logprob": rollout.rollout_logprob - LN2 * rollout.response_mask,
        "advantages": torch.ones(8),
    }
    metrics = add_logprobs_and_values(batch, model, None, None, algo, settings, 1.0, torch.device("cpu"))
    mask = batch["response_mask"].bool()
    assert metrics["rollout/logprob_abs_diff"] == pytest.approx(LN2, abs=1e-3)
    assert metrics["rollout/kl"] == pytest.approx(1 - LN2, abs=1e-3)  # r = 2: r - 1 - ln r
    assert metrics["rollout/tis_clipfrac"] == 1.0 and metrics["rollout/tis_weight_mean"] == pytest.approx(1.5)
    torch.testing.assert_close(batch["rollout_is_weights"][mask], torch.full((int(mask.sum()),), 1.5))
    rows = torch.arange(8)
    corrected, _, _ = accumulate_gradients(model, algo, batch, rows, micro_batches(8), temperature=1.0)
    del batch["rollout_is_weights"]
    model.zero_grad()
    plain, _, _ = accumulate_gradients(model, algo, batch, rows, micro_batches(8), temperature=1.0)
    assert plain == pytest.approx(-1.0, rel=1e-4) and corrected == pytest.approx(-1.5, rel=1e-4)  # ratio 1
