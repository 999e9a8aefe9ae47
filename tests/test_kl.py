import math

import pytest
import torch

from common.kl import KL_KINDS, kl_penalty
from common.losses import aggregate_loss


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("k1", 0.693147),  # log 2 - 0
        ("k2", 0.240227),  # 0.5 * (log 2)^2 = 0.5 * 0.480453
        ("k3", 0.193147),  # log r = -log 2: exp(-log 2) + log 2 - 1 = 0.5 + 0.693147 - 1
    ],
)
def test_kl_estimators_at_log_ratio_log2(kind, expected):
    logprob = torch.tensor([math.log(2.0)])
    out = kl_penalty(logprob, torch.zeros(1), kind)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([expected]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_zero_when_policies_equal(kind):
    logprob = torch.tensor([[-0.3, -2.0, -7.5]])
    assert (kl_penalty(logprob, logprob.clone(), kind) == 0).all()


def test_k3_formula_both_directions_and_nonnegative():
    # logp = 0, ref = log 3: log r = log 3 -> k3 = 3 - log 3 - 1 = 0.901388
    # logp = log 3, ref = 0: log r = -log 3 -> k3 = 1/3 + log 3 - 1 = 0.431946
    logprob = torch.tensor([0.0, math.log(3.0)])
    ref = torch.tensor([math.log(3.0), 0.0])
    torch.testing.assert_close(
        kl_penalty(logprob, ref, "k3"), torch.tensor([0.901388, 0.431946]), atol=1e-6, rtol=0
    )
    # k1 is signed, k2 and k3 never negative
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(100, generator=g), torch.randn(100, generator=g)
    assert (kl_penalty(a, b, "k1") < 0).any()
    assert (kl_penalty(a, b, "k2") >= 0).all() and (kl_penalty(a, b, "k3") >= 0).all()


def test_k3_is_not_clamped():
    # log r = 20: exp(20) - 20 - 1; a clamp at 10 would give exp(10) - 11
    out = kl_penalty(torch.tensor([0.0]), torch.tensor([20.0]), "k3")
    torch.testing.assert_close(out, torch.tensor([math.exp(20.0) - 21.0]))


def test_kl_accepts_lists_and_keeps_gradient():
    logprob = torch.tensor([0.5, -0.5], requires_grad=True)
    kl_penalty(logprob, [0.0, 0.0], "k2").sum().backward()
    torch.testing.assert_close(logprob.grad, torch.tensor([0.5, -0.5]))  # d/dx 0.5 x^2 = x


def test_kl_unknown_kind_lists_options():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "mse")


@pytest.mark.parametrize("kind", KL_KINDS)
def test_junk_under_the_mask_gives_zero_and_a_finite_gradient(kind):
    # padded positions hold junk log-probs (+-1e4): at [1, 1] log r = 2e4, so exp would be inf
    logprob = torch.tensor([[-1.0, -2.0, 1e4], [-0.5, -1e4, 3.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -1e4], [-0.25, 1e4, -3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    kl = kl_penalty(logprob, ref, kind, mask=mask)
    aggregate_loss(kl, mask, "token-mean").backward()
    assert torch.isfinite(logprob.grad).all()
    assert (logprob.grad[mask == 0] == 0).all() and (logprob.grad[mask == 1] != 0).all()
    assert (kl[mask == 0] == 0).all()
    keep = mask.bool()
    torch.testing.assert_close(kl[keep], kl_penalty(logprob[keep], ref[keep], kind))


def test_k3_masked_afterwards_is_too_late():
    # the reason for the mask argument: exp(inf) in the forward, 0 * inf = NaN in the backward
    logprob = torch.tensor([[-1.0, -1e4]], requires_grad=True)
    ref = torch.tensor([[-1.5, 1e4]])  # log r = ref - logp = 2e4 at the padded position
    mask = torch.tensor([[1, 0]])
    aggregate_loss(kl_penalty(logprob, ref, "k3"), mask, "token-mean").backward()
    assert torch.isnan(logprob.grad).any()


def test_grpo_kl_term_is_finite_with_junk_reference_log_probs():
    from scripts.build import build_algorithm
    from tests.conftest import compose_train

    algo = build_algorithm(compose_train("algorithm=grpo", "algorithm.kl_kind=k3").algorithm)
    logprob = torch.tensor([[-1.0, -2.0, -1e4], [-0.5, -1e4, -1e4]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    batch = {
        "advantages": torch.tensor([1.0, -1.0]),
        "loss_mask": mask,
        "ref_logprob": torch.tensor([[-1.5, -1.0, 1e4], [-0.25, 1e4, 1e4]]),
    }
    loss, metrics = algo.loss(batch, logprob, denominator=2.0)
    loss.backward()
    assert torch.isfinite(loss) and math.isfinite(metrics["kl/value"])
    assert torch.isfinite(logprob.grad).all() and (logprob.grad[mask == 0] == 0).all()
