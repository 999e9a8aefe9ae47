"""The rollout correction (common.rollout_correction): token and sequence TIS, IcePop's masked weights,
their batch normalisation, rejection by k1 / k2 / k3 per token or per response, and the mismatch
metrics, by hand values; the weighted policy loss; the config keys (and the old single switch's
pointer); the update that applies them; a bf16 rollout trained end to end with them."""

from __future__ import annotations

import math

import pytest
import torch

from common.losses import policy_loss
from common.rollout import make_engine
from common.rollout_correction import (
    icepop_weights,
    mismatch_metrics,
    normalize_is_weights,
    rejection_mask,
    sequence_tis_weights,
    tis_weights,
)
from common.update import accumulate_gradients, add_logprobs_and_values, correct_rollout, needs_old_logprob
from scripts.build import ConfigError, build_algorithm, build_policy, build_settings, validate
from tests.conftest import TEST_SEED, compose_train, micro_batches
from tests.test_cli import metrics as run_metrics
from tests.test_cli import train_cli

LN2 = math.log(2.0)
# pi_old = (0.5, 0.2), pi_rollout = (0.25, 0.4) on two tokens; a third, masked out, holds junk
OLD = torch.tensor([[math.log(0.5), math.log(0.2), 50.0]])
ROLLOUT = torch.tensor([[math.log(0.25), math.log(0.4), -50.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0]])


def test_tis_weights_by_hand():
    # ratios pi_old / pi_rollout = (2, 0.5); C = 1.5 truncates the first: weights (1.5, 0.5), 0 under the mask
    weights, stats = tis_weights(OLD, ROLLOUT, MASK, cap=1.5)
    torch.testing.assert_close(weights, torch.tensor([[1.5, 0.5, 0.0]]))
    assert stats["rollout/is_weight_mean"] == pytest.approx(1.0)  # (1.5 + 0.5) / 2
    assert stats["rollout/is_clipfrac"] == pytest.approx(0.5)
    weights, stats = tis_weights(OLD, ROLLOUT, MASK, cap=2.0)  # a ratio at the cap is not truncated
    torch.testing.assert_close(weights, torch.tensor([[2.0, 0.5, 0.0]]))
    assert stats["rollout/is_clipfrac"] == 0.0


# three rows of log-ratios d = old - rollout: (ln 2, ln 2), (ln 2, -ln 2), and a fully masked row of junk
SEQ_OLD = torch.tensor([[LN2, LN2], [LN2, -LN2], [50.0, -50.0]])
SEQ_ROLLOUT = torch.zeros(3, 2)
SEQ_MASK = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])


def test_sequence_tis_weights_by_hand():
    # row ratios exp(sum d): 4 and 1; C = 3 truncates the first: weight 3 on both its tokens, 1 on row 2;
    # the fully masked row gets 0, its junk never read; stats over the 2 non-empty rows: mean (3 + 1) / 2,
    # clipped 1 of 2
    weights, stats = sequence_tis_weights(SEQ_OLD, SEQ_ROLLOUT, SEQ_MASK, cap=3.0)
    torch.testing.assert_close(weights, torch.tensor([[3.0, 3.0], [1.0, 1.0], [0.0, 0.0]]))
    assert stats == {"rollout/is_weight_mean": pytest.approx(2.0), "rollout/is_clipfrac": 0.5}
    weights, _ = sequence_tis_weights(
        SEQ_OLD, SEQ_ROLLOUT, SEQ_MASK, cap=5.0
    )  # under the cap: the ratio itself
    torch.testing.assert_close(weights[0], torch.tensor([4.0, 4.0]))


def test_sequence_tis_weights_of_a_long_response_do_not_overflow():
    # sum d = 1000 * 1 -> exp(1000) = inf in float32; the weight is the cap, not inf or NaN
    weights, _ = sequence_tis_weights(torch.ones(1, 1000), torch.zeros(1, 1000), torch.ones(1, 1000), cap=2.0)
    assert torch.equal(weights, torch.full((1, 1000), 2.0))


def test_icepop_token_weights_drop_out_of_band_ratios():
    # ratios (2, 0.5, 6) and a masked junk token; band [0.5, 5]: 2 and 0.5 (the bound, inclusive) kept as they
    # are, 6 dropped (TIS would keep it at 5); mean over 3 mask tokens (2 + 0.5 + 0) / 3, 1 of 3 out of band
    old = torch.tensor([[math.log(2.0), math.log(0.5), math.log(6.0), 50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    weights, stats = icepop_weights(old, torch.zeros(1, 4), mask, low=0.5, high=5.0, level="token")
    torch.testing.assert_close(weights, torch.tensor([[2.0, 0.5, 0.0, 0.0]]))
    assert stats["rollout/is_weight_mean"] == pytest.approx(2.5 / 3)
    assert stats["rollout/is_maskfrac"] == pytest.approx(1 / 3)


def test_icepop_sequence_weights_drop_whole_responses():
    # row ratios 4 (inside [0.5, 5]: weight 4 on both tokens) and 1; band [0.5, 3]: row 1 dropped whole;
    # the fully masked row is 0 either way and not counted in the stats (2 non-empty rows)
    weights, stats = icepop_weights(SEQ_OLD, SEQ_ROLLOUT, SEQ_MASK, low=0.5, high=5.0, level="sequence")
    torch.testing.assert_close(weights, torch.tensor([[4.0, 4.0], [1.0, 1.0], [0.0, 0.0]]))
    assert stats == {"rollout/is_weight_mean": pytest.approx(2.5), "rollout/is_maskfrac": 0.0}
    weights, stats = icepop_weights(SEQ_OLD, SEQ_ROLLOUT, SEQ_MASK, low=0.5, high=3.0, level="sequence")
    torch.testing.assert_close(weights, torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))
    assert stats == {"rollout/is_weight_mean": pytest.approx(0.5), "rollout/is_maskfrac": 0.5}


@pytest.mark.parametrize(
    ("level", "expected", "factor"),
    [
        # token: mean of the 3 mask tokens (2 + 2 + 1) / 3 = 5/3 -> (1.2, 1.2), (0.6, 0)
        ("token", [[1.2, 1.2], [0.6, 0.0]], 5 / 3),
        # sequence: row means (2, 1), mean 1.5: each response counts once -> (4/3, 4/3), (2/3, 0)
        ("sequence", [[4 / 3, 4 / 3], [2 / 3, 0.0]], 1.5),
    ],
)
def test_normalize_is_weights_by_hand(level, expected, factor):
    weights = torch.tensor([[2.0, 2.0], [1.0, 9.0]])  # the 9 is under mask 0
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    normalized, stats = normalize_is_weights(weights, mask, level)
    torch.testing.assert_close(normalized, torch.tensor(expected))
    assert stats["rollout/is_batch_norm_factor"] == pytest.approx(factor)


def test_normalize_is_weights_leaves_all_zero_weights_alone():
    normalized, stats = normalize_is_weights(torch.zeros(2, 2), torch.ones(2, 2), "sequence")
    assert torch.equal(normalized, torch.zeros(2, 2)) and stats["rollout/is_batch_norm_factor"] == 1.0


# rows of d = old - rollout: (ln 2, -ln 2), (0, 0), and a fully masked row of junk
RS_OLD = torch.tensor([[LN2, -LN2], [0.0, 0.0], [50.0, -50.0]])
RS_ROLLOUT = torch.zeros(3, 2)
RS_MASK = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])


@pytest.mark.parametrize(
    ("option", "threshold", "row1"),
    [
        # k1 = -d = (-ln 2, ln 2), exp(k1) = pi_rollout / pi_old = (0.5, 2)
        ("token_k1", 1.5, [0, 0]),  # u = 1.5 -> [2/3, 1.5]: both outside
        ("token_k1", [0.4, 2.5], [1, 1]),  # a pair: both inside
        ("token_k1", [0.6, 2.5], [0, 1]),  # 0.5 < 0.6: the first token (pi_old / pi_rollout = 2) goes
        ("seq_sum_k1", 1.5, [1, 1]),  # sum 0 -> exp 1: kept
        ("seq_mean_k1", [0.9, 1.1], [1, 1]),  # mean 0 -> exp 1: kept
        # k2 = d^2 / 2 = 0.240 on both tokens
        ("token_k2", 0.2, [0, 0]),
        ("token_k2", 0.3, [1, 1]),
        ("seq_sum_k2", 0.4, [0, 0]),  # sum 0.480 > 0.4: the row goes
        ("seq_mean_k2", 0.4, [1, 1]),  # mean 0.240 <= 0.4
        ("seq_max_k2", 0.2, [0, 0]),
        # k3 = e^d - 1 - d = (1 - ln 2, -0.5 + ln 2) = (0.307, 0.193)
        ("token_k3", 0.25, [0, 1]),
        ("seq_sum_k3", 0.45, [0, 0]),  # sum 0.5
        ("seq_sum_k3", 0.55, [1, 1]),
        ("seq_mean_k3", 0.24, [0, 0]),  # mean 0.25
        ("seq_mean_k3", 0.26, [1, 1]),
        ("seq_max_k3", 0.3, [0, 0]),  # max 0.307: one bad token rejects the response
        ("seq_max_k3", 0.31, [1, 1]),
    ],
)
def test_rejection_mask_by_hand(option, threshold, row1):
    # row 2 (d = 0, every estimator 0) is always kept; the fully masked row stays 0
    new_mask, stats = rejection_mask(RS_OLD, RS_ROLLOUT, RS_MASK, option, threshold)
    torch.testing.assert_close(new_mask, torch.tensor([row1, [1.0, 1.0], [0.0, 0.0]]))
    assert new_mask.dtype == RS_MASK.dtype
    rejected = 2 - sum(row1)
    assert stats["rollout/rs_rejected_frac"] == pytest.approx(rejected / 4)  # of 4 mask tokens
    assert stats["rollout/rs_rejected_seq_frac"] == pytest.approx(0.5 if rejected else 0.0)  # of 2 rows


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("token_k2", LN2**2 / 2 * 2 / 4),  # over the 4 mask tokens: (0.240 + 0.240 + 0 + 0) / 4
        ("seq_sum_k2", LN2**2 / 2),  # over the 2 non-empty rows: (0.480 + 0) / 2
        ("seq_max_k3", (1 - LN2) / 2),  # (0.307 + 0) / 2
    ],
)
def test_rejection_statistic_mean_by_hand(option, expected):
    _, stats = rejection_mask(RS_OLD, RS_ROLLOUT, RS_MASK, option, 10.0)
    assert stats["rollout/rs_stat_mean"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("option", "threshold"), [("token_k4", 1.0), ("token_k2", [0.5, 2.0]), ("seq_max_k1", 2.0)]
)
def test_rejection_mask_refuses_what_it_cannot_mean(option, threshold):
    with pytest.raises(ValueError, match=option):
        rejection_mask(RS_OLD, RS_ROLLOUT, RS_MASK, option, threshold)


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


RC = "algorithm.rollout_correction"


@pytest.mark.parametrize(
    ("override", "pointer"),
    [
        # the single switch of before (archived runs hold it) and its cap: one line naming the new keys
        (f"{RC}=tis", f"{RC}: renamed to {RC}.rollout_is (tis is now token, none null) (got tis)"),
        (f"{RC}=none", f"{RC}: renamed to {RC}.rollout_is (tis is now token, none null) (got none)"),
        (
            "algorithm.tis_imp_ratio_cap=1.5",
            f"algorithm.tis_imp_ratio_cap: renamed to {RC}.rollout_is_threshold",
        ),
    ],
)
def test_the_old_switch_is_refused_with_a_pointer_to_the_new_keys(override, pointer):
    with pytest.raises(ConfigError) as err:
        compose_train("model=tiny", override)
    assert str(err.value).startswith(pointer) and "\n" not in str(err.value)


@pytest.mark.parametrize("algorithm", ["grpo", "dapo", "ppo"])
def test_the_new_keys_compose_and_reach_the_algorithm(algorithm):
    cfg = compose_train(
        "model=tiny",
        f"algorithm={algorithm}",
        f"{RC}.rollout_is=token",
        f"{RC}.rollout_is_threshold=1.5",
        f"{RC}.rollout_rs=seq_mean_k1",
        f"{RC}.rollout_rs_threshold=[0.5,2.0]",
    )
    validate(cfg)
    correction = build_algorithm(cfg.algorithm).rollout_correction
    assert (correction.rollout_is, correction.rollout_is_threshold) == ("token", 1.5)
    assert (correction.rollout_rs, correction.rollout_rs_threshold) == ("seq_mean_k1", [0.5, 2.0])
    assert (
        correction.enabled
        and not build_algorithm(compose_train("model=tiny").algorithm).rollout_correction.enabled
    )


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ((f"{RC}.rollout_is=tis",), f"{RC}.rollout_is: not one of the options"),
        ((f"{RC}.rollout_is_threshold=0.5",), f"{RC}.rollout_is_threshold: must be >= 1"),
        ((f"{RC}.rollout_is_threshold=abc",), f"{RC}.rollout_is_threshold: must be a number"),
        (
            (f"{RC}.rollout_is=token", f"{RC}.rollout_is_threshold_lower=0.5"),
            f"{RC}.rollout_is_threshold_lower: is read",
        ),
        (
            (f"{RC}.rollout_is=token_mask", f"{RC}.rollout_is_threshold_lower=2"),
            f"{RC}.rollout_is_threshold_lower: must",
        ),
        ((f"{RC}.rollout_rs=token_k4",), f"{RC}.rollout_rs: not one of the options"),
        ((f"{RC}.rollout_rs=token_k2",), f"{RC}.rollout_rs_threshold: token_k2 takes one upper bound"),
        (
            (f"{RC}.rollout_rs=token_k2", f"{RC}.rollout_rs_threshold=[0.5,2]"),
            f"{RC}.rollout_rs_threshold: token_k2",
        ),
        (
            (f"{RC}.rollout_rs=token_k1", f"{RC}.rollout_rs_threshold=0.5"),
            f"{RC}.rollout_rs_threshold: k1 bounds",
        ),
        (
            (f"{RC}.rollout_rs=seq_sum_k1", f"{RC}.rollout_rs_threshold=[1.5,2]"),
            f"{RC}.rollout_rs_threshold: k1 bounds",
        ),
        (
            (f"{RC}.rollout_rs=token_k1", f"{RC}.rollout_rs_threshold=abc"),
            f"{RC}.rollout_rs_threshold: k1 takes",
        ),
    ],
)
def test_bad_correction_settings_fail_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        validate(compose_train("model=tiny", *overrides))
    assert str(err.value).startswith(key)


@pytest.mark.parametrize(
    ("overrides", "needed"),
    [
        ((), False),  # GRPO's default: one pass, one mini-batch, pi_old = the current policy
        ((f"{RC}.rollout_is=sequence",), True),
        ((f"{RC}.rollout_rs=token_k3", f"{RC}.rollout_rs_threshold=0.1"), True),
        (("trainer.log_rollout_mismatch=true",), True),
        (("algorithm=dapo",), True),  # DAPO's mini-batches
    ],
)
def test_old_logprobs_are_computed_when_the_correction_or_the_metric_needs_them(overrides, needed):
    cfg = compose_train("model=tiny", *overrides)
    assert needs_old_logprob(build_algorithm(cfg.algorithm), build_settings(cfg)) is needed


def test_the_update_applies_tis_weights_and_logs_the_mismatch(cache_dir):
    """With rollout_is=token the log-prob phase records pi_old, the weights min(pi_old / pi_rollout, C)
    and the mismatch; the update's loss is the weighted one: rollout log-probs made lower by ln 2 give
    every token the ratio 2, capped at C = 1.5, so the loss is 1.5 times the uncorrected one."""
    cfg = compose_train(
        "model=tiny",
        "group_size=g4",
        "rollout.max_new_tokens=6",
        f"{RC}.rollout_is=token",
        f"{RC}.rollout_is_threshold=1.5",
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
    assert metrics["rollout/is_clipfrac"] == 1.0 and metrics["rollout/is_weight_mean"] == pytest.approx(1.5)
    torch.testing.assert_close(batch["rollout_is_weights"][mask], torch.full((int(mask.sum()),), 1.5))
    rows = torch.arange(8)
    corrected, _, _ = accumulate_gradients(model, algo, batch, rows, micro_batches(8), temperature=1.0)
    del batch["rollout_is_weights"]
    model.zero_grad()
    plain, _, _ = accumulate_gradients(model, algo, batch, rows, micro_batches(8), temperature=1.0)
    assert plain == pytest.approx(-1.0, rel=1e-4) and corrected == pytest.approx(-1.5, rel=1e-4)  # ratio 1


def correction_batch() -> dict[str, torch.Tensor]:
    """pi_old / pi_rollout per token: (2, 2), (2, 0.5) and a fully masked row; the second row's last
    token already out of the loss (as DAPO's overlong filter would leave it)."""
    return {
        "old_logprob": SEQ_OLD.clone(),
        "rollout_logprob": SEQ_ROLLOUT.clone(),
        "response_mask": SEQ_MASK.clone(),
        "loss_mask": torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]),
    }


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # token TIS, C = 1.5: every ratio 2 truncated
        (("rollout_is=token", "rollout_is_threshold=1.5"), [[1.5, 1.5], [1.5, 0.5]]),
        # sequence TIS, C = 1.5: row ratios 4 -> 1.5 and 1
        (("rollout_is=sequence", "rollout_is_threshold=1.5"), [[1.5, 1.5], [1.0, 1.0]]),
        # IcePop per token in [1/1.5, 1.5] (the lower bound null): 2, 2, 2 and 0.5 are all out of it
        (("rollout_is=token_mask", "rollout_is_threshold=1.5"), [[0.0, 0.0], [0.0, 0.0]]),
        # IcePop per response in [0.5, 5]: 4 and 1 inside, kept as they are
        (
            ("rollout_is=sequence_mask", "rollout_is_threshold=5", "rollout_is_threshold_lower=0.5"),
            [[4.0, 4.0], [1.0, 1.0]],
        ),
        # token TIS, C = 2, normalised: mean over the 4 mask tokens (2 + 2 + 2 + 0.5) / 4 = 1.625
        (
            ("rollout_is=token", "rollout_is_threshold=2", "rollout_is_batch_normalize=true"),
            [[2 / 1.625, 2 / 1.625], [2 / 1.625, 0.5 / 1.625]],
        ),
    ],
)
def test_correct_rollout_puts_each_rollout_is_level_in_the_batch(overrides, expected):
    algo = build_algorithm(compose_train("model=tiny", *(f"{RC}.{o}" for o in overrides)).algorithm)
    batch = correction_batch()
    metrics = correct_rollout(batch, algo)
    torch.testing.assert_close(batch["rollout_is_weights"], torch.tensor([*expected, [0.0, 0.0]]))
    assert "rollout/is_weight_mean" in metrics and "rollout/kl" in metrics
    assert torch.equal(batch["loss_mask"], correction_batch()["loss_mask"])  # no rejection asked for


def test_correct_rollout_rejects_from_the_loss_mask():
    # seq_max_k2 0.2: row 1's k2 = (ln 2)^2 / 2 = 0.240 on both tokens -> the row goes; row 2's first token
    # has the same k2 -> row 2 goes too; with 0.3 both stay, and the token already out stays out
    algo = build_algorithm(
        compose_train("model=tiny", f"{RC}.rollout_rs=seq_max_k2", f"{RC}.rollout_rs_threshold=0.2").algorithm
    )
    batch = correction_batch()
    metrics = correct_rollout(batch, algo)
    assert torch.equal(batch["loss_mask"], torch.zeros(3, 2)) and "rollout_is_weights" not in batch
    assert metrics["rollout/rs_rejected_frac"] == 1.0 and metrics["rollout/rs_rejected_seq_frac"] == 1.0
    algo = build_algorithm(
        compose_train("model=tiny", f"{RC}.rollout_rs=seq_max_k2", f"{RC}.rollout_rs_threshold=0.3").algorithm
    )
    batch = correction_batch()
    correct_rollout(batch, algo)
    assert torch.equal(batch["loss_mask"], correction_batch()["loss_mask"])


def test_bf16_rollout_with_sequence_is_and_rejection_trains_and_logs(tmp_path, cache_dir):
    """rollout.dtype=bfloat16 with sequence-level TIS and seq_mean_k3 rejection on the tiny model: 2 steps
    train, with pi_old computed every step and the weights' and the rejection's stats logged."""
    result = train_cli(
        "debug=smoke",
        "task=char_share",
        "trainer.num_threads=1",
        "rollout.dtype=bfloat16",
        f"{RC}.rollout_is=sequence",
        f"{RC}.rollout_rs=seq_mean_k3",
        f"{RC}.rollout_rs_threshold=0.01",
        f"seed={TEST_SEED}",
        f"hydra.run.dir={tmp_path}",
        cache_dir=cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = run_metrics(tmp_path)[1:]  # the first line is the evaluation before step 1
    assert len(rows) == 2
    for row in rows:
        assert 0 < row["rollout/logprob_abs_diff"] < 1 and 0 < row["rollout/is_weight_mean"] <= 2.0
        assert 0 <= row["rollout/rs_rejected_frac"] <= 1 and row["rollout/rs_stat_mean"] >= 0
        assert math.isfinite(row["policy/loss"]) and row["policy/skipped_updates"] == 0
