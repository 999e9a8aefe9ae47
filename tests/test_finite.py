"""common/finite.py: the bound that proves an AdamW step finite, the undo of a step that is not,
and the search for a non-finite tensor."""

from __future__ import annotations

import math
import random

import pytest
import torch

import common.finite as finite
from common.finite import (
    adamw_step_is_finite,
    first_non_finite,
    max_abs,
    max_abs_each,
    named_tensors,
    step_or_undo,
)


def adamw(
    seed: int, scale: float, lr: float, weight_decay: float = 0.0, steps: int = 1, grad_scale: float = 1.0
) -> torch.optim.AdamW:
    """AdamW over two weights of magnitude ~`scale`, after `steps` steps, with fresh gradients of
    magnitude ~`grad_scale` (a step torch refuses, its step size beyond float32, raises RuntimeError)."""
    gen = torch.Generator().manual_seed(seed)
    params = [
        torch.nn.Parameter(torch.randn(4, 3, generator=gen) * scale),
        torch.nn.Parameter(torch.zeros(5)),
    ]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * grad_scale
        optimizer.step()
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * grad_scale
    return optimizer


def weights_and_moments(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return [*params, *finite.state_tensors(optimizer)]


def test_max_abs_propagates_nan_and_ignores_empty_and_integer_tensors():
    # |-5| is the largest; an empty tensor has no inf-norm, an integer tensor (an RNG state) no NaN
    assert max_abs([torch.tensor([1.0, -5.0]), torch.zeros(0), torch.tensor([9], dtype=torch.uint8)]) == 5.0
    assert math.isnan(max_abs([torch.tensor([1.0, float("nan")]), torch.tensor([float("inf")])]))
    assert max_abs_each([[torch.tensor([2.0])], [], [torch.tensor([-float("inf")])]]) == [2.0, 0.0, math.inf]


def test_first_non_finite_names_the_tensor_in_a_nested_state():
    state = {
        "model": {"w": torch.ones(2)},
        "optimizer": {"state": {0: {"exp_avg": torch.tensor([0.0, math.inf])}}},
    }
    assert first_non_finite(named_tensors(state)) == "optimizer.state.0.exp_avg"
    assert first_non_finite(named_tensors({"w": torch.ones(3), "steps": [torch.tensor(2.0)]})) is None


def test_the_bound_is_sound_a_step_it_proves_finite_is_finite():
    # weights, gradients, learning rates and weight decays from ordinary to the float32 range's
    # edge (g^2 overflows past 1.8e19); every case the bound calls safe must step to finite values,
    # and both verdicts must occur
    rng = random.Random(0)
    verdicts = set()
    for seed in range(400):
        scale, grad_scale = 10 ** rng.uniform(-2, 38.5), 10 ** rng.uniform(-3, 25)
        lr = 10 ** rng.uniform(-6, 40)
        weight_decay = rng.choice([0.0, 0.01, 10 ** rng.uniform(-3, 3)])
        try:
            optimizer = adamw(seed, scale, lr, weight_decay, rng.randint(0, 2), grad_scale)
        except RuntimeError:
            continue  # an earlier step could not be taken: not the case under test
        if not math.isfinite(max_abs(weights_and_moments(optimizer))):
            continue  # an earlier step already overflowed: not the case under test
        grad_bound = max_abs(p.grad for g in optimizer.param_groups for p in g["params"])
        proved = adamw_step_is_finite(optimizer, grad_bound)
        verdicts.add(proved)
        if proved:  # it must step, and to finite values
            optimizer.step()
            assert math.isfinite(max_abs(weights_and_moments(optimizer))), (seed, scale, lr, weight_decay)
    assert verdicts == {True, False}


def test_the_bound_refuses_a_non_finite_moment_and_a_step_size_beyond_float32():
    optimizer = adamw(3, scale=1.0, lr=1e-3)
    assert adamw_step_is_finite(optimizer, 10.0)
    next(iter(optimizer.state.values()))["exp_avg_sq"][0] = math.inf
    assert not adamw_step_is_finite(optimizer, 10.0)
    # zero gradients and moments bound the update by 0, but torch cannot even form the step size 1e40
    optimizer = adamw(3, scale=1.0, lr=1e39, steps=0, grad_scale=0.0)
    assert not adamw_step_is_finite(optimizer, 0.0)
    assert not step_or_undo([optimizer], [0.0])  # torch refused to step: nothing changed


def test_a_provable_step_takes_no_copy(monkeypatch):
    optimizer = adamw(0, scale=1.0, lr=1e-3)
    before = [p.detach().clone() for p in optimizer.param_groups[0]["params"]]
    monkeypatch.setattr(finite, "_copy_state", lambda o: pytest.fail("copied the state of a provable step"))
    assert step_or_undo([optimizer], [max_abs(p.grad for p in optimizer.param_groups[0]["params"])])
    assert not torch.equal(before[0], optimizer.param_groups[0]["params"][0])


@pytest.mark.parametrize("steps", [0, 2])
def test_a_step_that_overflows_is_undone_exactly(steps):
    # lr 1e38: the step size lr / (1 - beta1) = 1e39 is no float32; the weights would turn inf / NaN
    optimizer = adamw(1, scale=1.0, lr=1e38, steps=0)
    if steps:  # moments from earlier steps at a sane rate, which the undo must keep as they were
        optimizer = adamw(1, scale=1.0, lr=1e-3, steps=steps)
        optimizer.param_groups[0]["lr"] = 1e38
    params = optimizer.param_groups[0]["params"]
    weights = [p.detach().clone() for p in params]
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    assert not adamw_step_is_finite(optimizer, max_abs(p.grad for p in params))
    assert not step_or_undo([optimizer], [max_abs(p.grad for p in params)])
    for p, w in zip(params, weights, strict=True):
        assert torch.equal(p, w)
    assert {id(p) for p in optimizer.state} == set(state)  # a first step's new moments are gone too
    for p, s in optimizer.state.items():
        for key, value in s.items():
            assert torch.equal(value, state[id(p)][key]), key


def test_a_step_the_bound_cannot_prove_is_kept_when_it_is_finite():
    # lr 1e30 fails the bound (lr / (1 - beta1) / eps = 1e39), yet the step moves weights by ~1e31
    optimizer = adamw(2, scale=1.0, lr=1e30)
    params = optimizer.param_groups[0]["params"]
    assert not adamw_step_is_finite(optimizer, max_abs(p.grad for p in params))
    assert step_or_undo([optimizer], [max_abs(p.grad for p in params)])
    assert 1e29 < max_abs(params) < 1e32
