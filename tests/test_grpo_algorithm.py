"""GRPO's loss by hand: the clipped surrogate plus kl_coef times the k3 KL to a reference that
differs from the policy, so the KL's direction, sign and gradient are pinned (GRPO Eq. 5)."""

from __future__ import annotations

import math

import torch

from scripts.build import build_algorithm
from tests.conftest import compose_train


def test_grpo_loss_with_kl_to_a_different_reference_by_hand():
    algo = build_algorithm(compose_train("algorithm=grpo", "algorithm.kl_coef=0.1").algorithm)
    assert (algo.kl_kind, algo.loss_agg) == ("k3", "seq-mean-token-mean")
    # one response of two tokens, advantage 1; the policy gives both tokens 1/2, the reference 1/4 and 1/8
    logprob = torch.tensor([[math.log(0.5), math.log(0.5)]], requires_grad=True)
    batch = {
        "advantages": torch.tensor([1.0]),
        "loss_mask": torch.ones(1, 2),
        "ref_logprob": torch.tensor([[math.log(0.25), math.log(0.125)]]),
    }
    loss, stats = algo.loss(batch, logprob, denominator=1.0)
    # surrogate: ratio 1 (on-policy), -min(1 * A, clip(1) * A) = -1 per token, token mean -1
    # k3 = e^x - x - 1 with x = ref - logp = ln(1/2), ln(1/4): 0.193147, 0.636294; token mean 0.414721
    # (the arguments swapped, x = ln 2, ln 4, give 0.306853, 1.613706: mean 0.960279)
    # loss = -1 + 0.1 * 0.414721
    torch.testing.assert_close(loss, torch.tensor(-1 + 0.1 * 0.4147205), atol=1e-6, rtol=0)
    assert abs(stats["kl/value"] - 0.4147205) < 1e-6
    # d loss / d logp_t = -A / T + kl_coef / T * (1 - e^x_t) = -1/2 + 0.05 * (1/2, 3/4)
    loss.backward()
    torch.testing.assert_close(logprob.grad, torch.tensor([[-0.475, -0.4625]]), atol=1e-6, rtol=0)
