import math

import pytest
import torch

from common.losses import (
    AGG_MODES,
    POLICY_LOSSES,
    aggregate_loss,
    aggregation_denominator,
    batch_policy_loss,
    cispo_policy_loss,
    entropy_from_logits,
    get_policy_loss_fn,
    gspo_policy_loss,
    policy_loss,
    register_policy_loss,
    value_loss,
)

X = 99.0  # junk under mask 0

# ---------------------------------------------------------------- aggregate_loss


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", 4 / 3),  # (1 + 1 + 2) / 3 tokens
        ("seq-mean-token-mean", 1.5),  # (2/2 + 2/1) / 2 rows
        ("seq-mean-token-sum", 2.0),  # (2 + 2) / 2 rows
        ("seq-mean-token-sum-norm", 0.5),  # (2 + 2) / (2 rows * C), C = 4
        ("token-sum", 4.0),  # 1 + 1 + 2, no normaliser (verl's token-sum)
    ],
)
def test_aggregate_loss_hand_values(mode, expected):
    loss_mat = torch.tensor([[1.0, 1.0, X], [2.0, X, X]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = aggregate_loss(loss_mat, mask, mode, loss_scale_factor=4)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor(expected))


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", 1.0),  # (1 + 1) / 2 tokens
        ("seq-mean-token-mean", 1.0),  # (2/2) / 1 row: the empty row is left out, as in verl's agg_loss
        ("seq-mean-token-sum", 2.0),  # 2 / 1 row
        ("seq-mean-token-sum-norm", 1.0),  # 2 / (1 row * C), C = 2 (the mask's width when not given)
        ("token-sum", 2.0),  # 1 + 1
    ],
)
def test_aggregate_loss_fully_masked_row(mode, expected):
    loss_mat = torch.tensor([[1.0, 1.0], [float("nan"), float("inf")]])
    mask = torch.tensor([[1, 1], [0, 0]])
    torch.testing.assert_close(aggregate_loss(loss_mat, mask, mode), torch.tensor(expected))


@pytest.mark.parametrize("mode", AGG_MODES)
def test_fully_masked_rows_change_neither_loss_nor_gradient(mode):
    # the same two rows with and without three fully masked rows (overlong filtering): equal loss
    # and gradient; the old rule (empty rows count as rows) gave 2/5 of both in the seq-mean modes
    g = torch.Generator().manual_seed(0)
    loss_mat = torch.randn(2, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    leaf = loss_mat.clone().requires_grad_(True)
    loss = aggregate_loss(leaf, mask, mode, loss_scale_factor=4)
    loss.backward()
    padded = torch.cat([leaf, torch.randn(3, 4, generator=g)])
    padded_mask = torch.cat([mask, torch.zeros(3, 4, dtype=mask.dtype)])
    leaf_grad = leaf.grad.clone()
    leaf.grad = None
    loss_padded = aggregate_loss(padded, padded_mask, mode, loss_scale_factor=4)
    loss_padded.backward()
    torch.testing.assert_close(loss_padded, loss)
    torch.testing.assert_close(leaf.grad, leaf_grad)


def test_dr_grpo_norm_is_trl_dr_grpo_and_a_constant_times_token_sum():
    # TRL loss_type="dr_grpo": sum(L * m) / (B * max_completion_length); here C = max_new_tokens = 8
    loss_mat = torch.tensor([[1.0, 2.0, 3.0, X], [4.0, X, X, X], [0.5, 0.5, X, X]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])
    norm = aggregate_loss(loss_mat, mask, "seq-mean-token-sum-norm", loss_scale_factor=8)
    torch.testing.assert_close(norm, torch.tensor((6.0 + 4.0 + 1.0) / (3 * 8)))
    token_sum = aggregate_loss(loss_mat, mask, "seq-mean-token-sum")
    torch.testing.assert_close(norm * 8, token_sum)  # seq-mean-token-sum is C times larger


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_loss_all_masked_is_zero(mode):
    out = aggregate_loss(torch.full((2, 3), 5.0), torch.zeros(2, 3), mode)
    assert out.item() == 0.0


@pytest.mark.parametrize(
    "mode, denominator, expected",
    [
        ("token-mean", 8.0, 0.5),  # (1 + 1 + 2) / 8
        ("seq-mean-token-mean", 4.0, 0.75),  # (1 + 2) / 4
        ("seq-mean-token-sum", 4.0, 1.0),  # (2 + 2) / 4
        ("seq-mean-token-sum-norm", 16.0, 0.25),  # (2 + 2) / 16: the denominator includes C
    ],
)
def test_aggregate_loss_denominator_replaces_normaliser(mode, denominator, expected):
    loss_mat = torch.tensor([[1.0, 1.0, X], [2.0, X, X]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(aggregate_loss(loss_mat, mask, mode, denominator), torch.tensor(expected))


def test_aggregate_loss_rejects_unknown_mode_and_bad_denominator():
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-tok"):
        aggregate_loss(torch.ones(1, 1), torch.ones(1, 1), "mean")
    with pytest.raises(ValueError, match="denominator"):
        aggregate_loss(torch.ones(1, 1), torch.ones(1, 1), "token-mean", denominator=0.0)


def ragged_batch(seed):
    """8 rows of unequal length (one of them empty), right-padded, random values under the padding."""
    B, T = 8, 6
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[3] = 0
    mask = torch.arange(T) < lengths[:, None]  # (B, T)
    logprob = -torch.rand(B, T, generator=g)
    old_logprob = logprob + 0.3 * torch.randn(B, T, generator=g)
    advantages = torch.randn(B, generator=g)
    return logprob, old_logprob, advantages, mask


def full_batch_denominator(mask, mode):
    # by hand: tokens, or rows holding a token (times C = T for the -norm mode, its fallback)
    if mode == "token-mean":
        return float(mask.sum())
    if mode == "token-sum":
        return 1.0
    rows = float(mask.any(dim=1).sum())
    return rows * mask.shape[1] if mode == "seq-mean-token-sum-norm" else rows


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_loss_micro_batches_sum_to_full_batch(mode):
    _, _, _, mask = ragged_batch(0)
    g = torch.Generator().manual_seed(1)
    loss_mat = torch.randn(*mask.shape, generator=g)
    full = aggregate_loss(loss_mat, mask, mode)
    denom = full_batch_denominator(mask, mode)
    micro = sum(
        aggregate_loss(lm, m, mode, denom) for lm, m in zip(loss_mat.chunk(4), mask.chunk(4), strict=True)
    )
    torch.testing.assert_close(micro, full)
    # without the shared denominator the micro-batch means do not add up to the full loss (sums do)
    naive = sum(aggregate_loss(lm, m, mode) for lm, m in zip(loss_mat.chunk(4), mask.chunk(4), strict=True))
    assert torch.allclose(naive, full) == (mode == "token-sum")


@pytest.mark.parametrize("mode", AGG_MODES)
def test_policy_loss_micro_batches_match_full_batch_loss_and_gradient(mode):
    logprob, old_logprob, advantages, mask = ragged_batch(2)
    leaf = logprob.clone().requires_grad_(True)
    full, _ = policy_loss(leaf, old_logprob, advantages, mask, clip_high=0.28, agg=mode, dual_clip=3.0)
    full.backward()
    full_grad = leaf.grad.clone()

    leaf.grad = None
    denom = full_batch_denominator(mask, mode)
    total = torch.tensor(0.0)
    for idx in torch.arange(mask.shape[0]).chunk(4):
        loss, _ = policy_loss(
            leaf[idx], old_logprob[idx], advantages[idx], mask[idx], clip_high=0.28, agg=mode, dual_clip=3.0,
            denominator=denom,
        )  # fmt: skip
        loss.backward()  # gradient accumulation into leaf.grad
        total = total + loss.detach()
    torch.testing.assert_close(total, full.detach())
    torch.testing.assert_close(leaf.grad, full_grad)
    assert full_grad.abs().sum() > 0


# ---------------------------------------------------------------- policy_loss


@pytest.mark.parametrize(
    "ratio, adv, clip_high, dual_clip, expected",
    [
        (1.5, 1.0, 0.2, None, -1.2),  # clipped at 1 + 0.2
        (1.5, 1.0, 0.28, None, -1.28),  # Clip-Higher leaves more room (DAPO Eq. 10)
        (0.5, -1.0, 0.2, None, 0.8),  # clipped at 1 - 0.2
        (5.0, -1.0, 0.2, None, 5.0),  # plain PPO: negative advantage is unbounded
        (5.0, -1.0, 0.2, 3.0, 3.0),  # dual clip bounds it at -c * A = 3
    ],
)
def test_policy_loss_single_token(ratio, adv, clip_high, dual_clip, expected):
    loss, _ = policy_loss(
        torch.tensor([[math.log(ratio)]]),
        torch.zeros(1, 1),
        torch.tensor([adv]),
        torch.ones(1, 1),
        clip_low=0.2,
        clip_high=clip_high,
        dual_clip=dual_clip,
    )
    torch.testing.assert_close(loss, torch.tensor(expected))


def test_policy_loss_clip_is_asymmetric():
    # clip_low 0.2, clip_high 0.28: ratio 1.25 with A = 1 is inside [0.8, 1.28] -> -1.25 (unclipped),
    # ratio 0.75 with A = -1 is below 0.8 -> -min(-0.75, -0.8) = 0.8 (clipped)
    logprob = torch.log(torch.tensor([[1.25, 0.75]]))
    loss, stats = policy_loss(
        logprob, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), 0.2, 0.28
    )
    torch.testing.assert_close(loss, torch.tensor((-1.25 + 0.8) / 2))
    assert (stats["clipfrac_high"], stats["clipfrac_low"]) == (0.0, 0.5)
    # symmetric 0.2 clips both: (-1.2 + 0.8) / 2
    loss_sym, stats_sym = policy_loss(
        logprob, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    )
    torch.testing.assert_close(loss_sym, torch.tensor(-0.2))
    assert (stats_sym["clipfrac_high"], stats_sym["clipfrac_low"]) == (0.5, 0.5)


def stats_batch():
    # ratios (1.5, 0.5, 1.0, 2.0), A (1, -1, 1, -1), plus a 5th token under mask 0
    # token 0: ratio 1.5 > 1.2, A > 0 -> clipped high, L = -1.2
    # token 1: ratio 0.5 < 0.8, A < 0 -> clipped low,  L = 0.8
    # token 2: ratio 1,                                 L = -1
    # token 3: ratio 2, A < 0: -min(-2, -1.2) = 2, unclipped; dual clip 1.5 caps it at 1.5
    logprob = torch.log(torch.tensor([[1.5, 0.5, 1.0, 2.0, 1.0]]))
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    return logprob, torch.zeros(1, 5), advantages, mask


def test_policy_loss_stats_hand_values():
    logprob, old_logprob, advantages, mask = stats_batch()
    loss, stats = policy_loss(logprob, old_logprob, advantages, mask)
    torch.testing.assert_close(loss, torch.tensor(0.15))  # (-1.2 + 0.8 - 1 + 2) / 4
    assert all(isinstance(v, float) for v in stats.values())
    assert stats["clipfrac"] == pytest.approx(0.5)
    assert stats["clipfrac_low"] == pytest.approx(0.25)
    assert stats["clipfrac_high"] == pytest.approx(0.25)
    assert stats["dual_clipfrac"] == 0.0
    # approx_kl = mean(old - new) = -(log 1.5 + log 0.5 + 0 + log 2) / 4 = -log(1.5) / 4
    assert stats["approx_kl"] == pytest.approx(-math.log(1.5) / 4, abs=1e-6)
    assert stats["ratio_mean"] == pytest.approx(1.25)  # (1.5 + 0.5 + 1 + 2) / 4
    assert stats["ratio_max"] == pytest.approx(2.0)

    loss_dual, stats_dual = policy_loss(logprob, old_logprob, advantages, mask, dual_clip=1.5)
    torch.testing.assert_close(loss_dual, torch.tensor(0.025))  # (-1.2 + 0.8 - 1 + 1.5) / 4
    assert stats_dual["dual_clipfrac"] == pytest.approx(0.25)


def test_policy_loss_ignores_junk_under_mask():
    logprob, old_logprob, advantages, mask = stats_batch()
    leaf = logprob.clone().requires_grad_(True)
    loss, stats = policy_loss(leaf, old_logprob, advantages, mask, dual_clip=3.0)
    loss.backward()
    grad = leaf.grad.clone()

    keep = mask.bool()
    junk_logprob = torch.where(keep, logprob, torch.tensor(80.0)).requires_grad_(True)
    junk_old = torch.where(keep, old_logprob, torch.tensor(-70.0))
    junk_adv = torch.where(keep, advantages, torch.tensor(-1e4))
    loss_junk, stats_junk = policy_loss(junk_logprob, junk_old, junk_adv, mask, dual_clip=3.0)
    loss_junk.backward()
    torch.testing.assert_close(loss_junk, loss)
    assert stats_junk == pytest.approx(stats)
    torch.testing.assert_close(junk_logprob.grad, grad)
    assert junk_logprob.grad[0, 4] == 0


def test_policy_loss_row_advantages_broadcast_over_tokens():
    g = torch.Generator().manual_seed(0)
    logprob, old_logprob = -torch.rand(3, 4, generator=g), -torch.rand(3, 4, generator=g)
    advantages = torch.tensor([1.0, -2.0, 0.5])
    mask = torch.ones(3, 4)
    loss_row, _ = policy_loss(logprob, old_logprob, advantages, mask)
    loss_tok, _ = policy_loss(logprob, old_logprob, advantages[:, None].expand(3, 4), mask)
    torch.testing.assert_close(loss_row, loss_tok)
    # at ratio 1 (no clipping) the token-mean loss is -mean(A) over tokens
    loss_on_policy, stats = policy_loss(logprob, logprob, advantages, mask)
    torch.testing.assert_close(loss_on_policy, -advantages.mean())
    assert stats["clipfrac"] == 0.0 and stats["approx_kl"] == 0.0


def test_policy_loss_rejects_dual_clip_at_most_one():
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1), dual_clip=1.0)


# ---------------------------------------------------------------- value_loss


def test_value_loss_hand_values():
    # token 0: v 1.5, old 1.0, R 2.0: v_clipped = 1.2; 0.5 * max(0.5^2, 0.8^2) = 0.32   (clipped term wins)
    # token 1: v 1.1, old 1.0, R 2.0: v_clipped = 1.1; 0.5 * 0.9^2 = 0.405               (not clipped)
    # token 2: masked junk
    values = torch.tensor([[1.5, 1.1, X]])
    old_values = torch.tensor([[1.0, 1.0, -X]])
    returns = torch.tensor([[2.0, 2.0, 3 * X]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    torch.testing.assert_close(loss, torch.tensor((0.32 + 0.405) / 2))
    assert stats["vf_clipfrac"] == pytest.approx(0.5)
    assert stats["vpred_mean"] == pytest.approx(1.3)  # (1.5 + 1.1) / 2
    # no clipping: 0.5 * (0.25 + 0.81) / 2
    loss_plain, stats_plain = value_loss(values, old_values, returns, mask, cliprange_value=None)
    torch.testing.assert_close(loss_plain, torch.tensor(0.265))
    assert stats_plain["vf_clipfrac"] == 0.0


def test_value_loss_gradient_stops_when_clipped():
    # v moved 0.5 from old (clip 0.2) away from R: clipped term is larger and constant in v -> grad 0
    values = torch.tensor([[1.5]], requires_grad=True)
    loss, _ = value_loss(values, torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.ones(1, 1))
    loss.backward()
    # 0.5 * max(1.5^2, 1.2^2) = 1.125 from the unclipped term -> grad = v - R = 1.5
    torch.testing.assert_close(loss.detach(), torch.tensor(1.125))
    torch.testing.assert_close(values.grad, torch.tensor([[1.5]]))


# ---------------------------------------------------------------- entropy


def test_entropy_uniform_and_peaked():
    # uniform over 8 tokens -> log 8; one logit far above the rest -> 0
    torch.testing.assert_close(entropy_from_logits(torch.zeros(2, 3, 8)), torch.full((2, 3), math.log(8)))
    peaked = entropy_from_logits(torch.tensor([[1000.0, 0.0, -1000.0]]))
    assert torch.isfinite(peaked).all() and peaked.item() == pytest.approx(0.0, abs=1e-6)


def test_entropy_matches_definition():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 11, generator=g) * 3
    p = torch.softmax(logits.double(), dim=-1)
    expected = -(p * p.log()).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits), expected.float(), atol=1e-5, rtol=1e-5)


def test_aggregation_denominator_counts_tokens_or_rows():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # 3 masked-in tokens; 2 rows that hold a token (the empty third row does not count)
    assert aggregation_denominator(mask, "token-mean") == 3.0
    assert aggregation_denominator(mask, "seq-mean-token-mean") == 2.0
    assert aggregation_denominator(mask, "seq-mean-token-sum") == 2.0
    assert aggregation_denominator(mask, "seq-mean-token-sum-norm", loss_scale_factor=48) == 96.0
    # a sum has no normaliser: 0, which callers read as 1 (also once summed over ranks)
    assert aggregation_denominator(mask, "token-sum") == 0.0
    # an all-masked batch counts 0 (the trainer clamps the sum over ranks); aggregate_loss gives 0
    assert aggregation_denominator(torch.zeros(2, 3), "token-mean") == 0.0
    with pytest.raises(ValueError, match="loss_scale_factor"):
        aggregation_denominator(mask, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="token-mean"):
        aggregation_denominator(mask, "mean")


# ---------------------------------------------------------------- registry, GSPO, CISPO


def test_policy_losses_are_registered_by_name():
    assert list(POLICY_LOSSES) == ["vanilla", "gspo", "cispo"]
    assert get_policy_loss_fn("gspo") is gspo_policy_loss and get_policy_loss_fn("vanilla") is policy_loss
    with pytest.raises(ValueError, match="unknown policy loss 'ppo'; expected one of vanilla, gspo, cispo"):
        get_policy_loss_fn("ppo")
    with pytest.raises(ValueError, match="registered twice"):
        register_policy_loss("cispo")(cispo_policy_loss)


def gspo_batch():
    """3 responses, old log-probs -1; log-ratios per row (x = masked junk):
    row 0  A = 2   [0.1, -0.1, x]     s = exp(0)   = 1          inside the clip range
    row 1  A = -1  [0.3, 0.3, 0.3]    s = exp(0.3) = 1.349859   above it, but A < 0: not clipped
    row 2  A = 1   [0.3, 0.3, x]      s = exp(0.3) = 1.349859   above it with A > 0: clipped
    """
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0]])
    log_ratio = torch.tensor([[0.1, -0.1, X], [0.3, 0.3, 0.3], [0.3, 0.3, X]])
    old_logprob = torch.full((3, 3), -1.0)
    return (old_logprob + log_ratio).requires_grad_(True), old_logprob, torch.tensor([2.0, -1.0, 1.0]), mask


def test_gspo_hand_values_and_gradient():
    logprob, old_logprob, advantages, mask = gspo_batch()
    loss, stats = gspo_policy_loss(logprob, old_logprob, advantages, mask, clip_low=0.2, clip_high=0.2)
    # row losses: -A s = -2; max(1.349859, 1.2) = 1.349859; max(-1.349859, -1.2) = -1.2
    # seq-mean-token-mean: (-2 + 1.349859 - 1.2) / 3 = -0.616714
    torch.testing.assert_close(loss, torch.tensor((-2 + math.exp(0.3) - 1.2) / 3))
    loss.backward()
    # d loss / d logprob_t = -A * s_i / |y_i| / 3 rows when unclipped, 0 when clipped:
    # row 0: -2 * 1 / 2 / 3 = -1/3; row 1: 1.349859 / 3 / 3 = 0.149984; row 2: 0
    expected = torch.tensor([[-1 / 3, -1 / 3, 0.0], [math.exp(0.3) / 9] * 3, [0.0, 0.0, 0.0]])
    torch.testing.assert_close(logprob.grad, expected)
    # row 2's 2 tokens of 7 are clipped (high); approx_kl = -(0 + 0.9 + 0.6) / 7
    assert stats["clipfrac"] == pytest.approx(2 / 7) and stats["clipfrac_high"] == pytest.approx(2 / 7)
    assert stats["clipfrac_low"] == 0.0
    assert stats["approx_kl"] == pytest.approx(-1.5 / 7)
    assert stats["ratio_max"] == pytest.approx(math.exp(0.3))


def test_gspo_token_form_is_the_sequence_objective():
    # GSPO's objective on s_i(theta) = exp(mean_t (logprob - old)), differentiated by autograd, has the
    # same value and gradient as the token form with one advantage per response (the paper's GSPO-token)
    logprob, old_logprob, advantages, mask = ragged_batch(3)
    leaf = logprob.clone().requires_grad_(True)
    loss, _ = gspo_policy_loss(leaf, old_logprob, advantages, mask, clip_low=0.1, clip_high=0.15)
    loss.backward()
    seq = leaf.detach().clone().requires_grad_(True)
    lengths = mask.sum(1)
    rows = lengths > 0
    s = torch.exp(torch.where(mask, seq - old_logprob, 0.0).sum(1)[rows] / lengths[rows])
    A = advantages[rows]
    expected = torch.maximum(-A * s, -A * s.clamp(0.9, 1.15)).mean()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(leaf.grad, seq.grad)
    assert leaf.grad.abs().sum() > 0


def cispo_token():
    # one response of 3 tokens, A = 2: logprob - old = (0.5, -1, 0) -> r = (1.648721, 0.367879, 1)
    logprob = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    return logprob, torch.tensor([[-1.5, -1.0, -0.5]]), torch.tensor([2.0]), torch.ones(1, 3)


def test_cispo_hand_values_and_gradient_also_where_clipped():
    logprob, old_logprob, advantages, mask = cispo_token()
    loss, stats = cispo_policy_loss(logprob, old_logprob, advantages, mask, clip_low=0.2, clip_high=0.2)
    # weights clip(r, 0.8, 1.2) = (1.2, 0.8, 1); L = -w * A * logprob = (2.4, 3.2, 1.0); token-mean 6.6 / 3
    torch.testing.assert_close(loss, torch.tensor(2.2))
    loss.backward()
    # d L / d logprob = -w * A / 3 tokens: nonzero on the two clipped tokens too (PPO's would be 0 there)
    torch.testing.assert_close(logprob.grad, torch.tensor([[-0.8, -1.6 / 3, -2 / 3]]))
    assert stats["clipfrac"] == pytest.approx(2 / 3)
    assert stats["clipfrac_low"] == pytest.approx(1 / 3) and stats["clipfrac_high"] == pytest.approx(1 / 3)


def test_cispo_with_clip_low_one_bounds_only_the_top_as_the_paper():
    logprob, old_logprob, advantages, mask = cispo_token()
    loss, stats = cispo_policy_loss(logprob, old_logprob, advantages, mask, clip_low=1.0, clip_high=0.2)
    loss.backward()
    # weights (1.2, 0.367879, 1): the low ratio is kept as it is; gradient -w * 2 / 3
    torch.testing.assert_close(logprob.grad, torch.tensor([[-0.8, -2 * math.exp(-1.0) / 3, -2 / 3]]))
    assert stats["clipfrac_low"] == 0.0 and stats["clipfrac"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("name", ["gspo", "cispo"])
def test_new_losses_ignore_junk_under_mask_and_take_token_weights(name):
    logprob, old_logprob, advantages, mask = ragged_batch(4)
    fn = get_policy_loss_fn(name)
    leaf = logprob.clone().requires_grad_(True)
    loss, stats = fn(leaf, old_logprob, advantages, mask, clip_low=0.2, clip_high=0.28)
    loss.backward()
    junk = torch.where(mask, logprob, float("inf")).requires_grad_(True)
    loss_junk, stats_junk = fn(
        junk, torch.where(mask, old_logprob, -float("inf")), advantages, mask, 0.2, 0.28
    )
    loss_junk.backward()
    torch.testing.assert_close(loss_junk, loss)
    torch.testing.assert_close(junk.grad, leaf.grad)
    assert stats_junk == stats
    # constant weights 2 on every token double the loss
    doubled, _ = fn(
        logprob, old_logprob, advantages, mask, 0.2, 0.28, token_weights=torch.full(mask.shape, 2.0)
    )
    torch.testing.assert_close(doubled, 2 * loss.detach())


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("name", ["gspo", "cispo"])
def test_new_losses_micro_batches_match_full_batch(name, mode):
    logprob, old_logprob, advantages, mask = ragged_batch(5)
    fn = get_policy_loss_fn(name)
    leaf = logprob.clone().requires_grad_(True)
    full, _ = fn(leaf, old_logprob, advantages, mask, clip_low=0.2, clip_high=0.28, agg=mode)
    full.backward()
    full_grad, leaf.grad = leaf.grad.clone(), None
    denom = full_batch_denominator(mask, mode)
    total = torch.tensor(0.0)
    for idx in torch.arange(mask.shape[0]).chunk(4):
        loss, _ = fn(
            leaf[idx], old_logprob[idx], advantages[idx], mask[idx], 0.2, 0.28, mode, denominator=denom
        )
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, full.detach())
    torch.testing.assert_close(leaf.grad, full_grad)


def test_batch_policy_loss_picks_the_loss_by_name():
    logprob, old_logprob, advantages, mask = cispo_token()
    batch = {"advantages": advantages, "loss_mask": mask, "old_logprob": old_logprob}
    common = dict(clip_low=0.2, clip_high=0.2, agg="token-mean", dual_clip=None, denominator=None)
    loss, _ = batch_policy_loss(batch, logprob, policy_loss="cispo", **common)
    torch.testing.assert_close(loss, torch.tensor(2.2))
    vanilla, _ = batch_policy_loss(batch, logprob, policy_loss="vanilla", **common)
    # -min(r A, clip(r) A) per token: (-2.4, -0.735759, -2); token-mean -1.711920
    torch.testing.assert_close(vanilla, torch.tensor((-2.4 - 2 * math.exp(-1.0) - 2) / 3))
