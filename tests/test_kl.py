import math

import pytest
import torch

from common.kl import kl_penalty


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
