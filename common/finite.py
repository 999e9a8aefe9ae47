"""Non-finite values kept out of a run's state: an optimizer step that would leave a NaN or an
infinity in a weight or a moment is undone, and a checkpoint is only written when finite.

The step. A NaN or infinite loss or gradient is caught before stepping (common.update.clip_and_step
skips the update), which covers what goes wrong in practice. What remains is overflow inside the
AdamW step itself (a huge learning rate, weights or moments near the float's range). Undoing a step
exactly needs the weights and moments from before it; a copy of them every step would double the
training state (about 1.6 GB for SmolLM2-135M: 0.5 GB of weights, 1.1 GB of moments). Instead
`adamw_step_is_finite` proves, from one fused max-|x| reduction over the weights and moments, that
the coming step cannot overflow; only when it cannot prove it (never at the shipped settings) does
`step_or_undo` copy the state, step, check every weight and moment, and restore the copy if any
is not finite (or if torch refused to step: a step size beyond the dtype's range raises). So a
normal run pays three reads of the training state per optimizer step (about 20 ms for
SmolLM2-135M on the benchmark machine) and no memory.

The bound, for torch's AdamW (Loshchilov & Hutter 2019; the same arithmetic in its single-tensor,
foreach and fused forms), with G >= max|g| (the clipped gradient), M = max(max|m|, G),
V = max|v|, P = max|p| and F the dtype's largest finite value:
    m' = beta1 m + (1 - beta1) g                  |m'| <= M                   finite if M^2 < F / 2
    v' = beta2 v + (1 - beta2) g^2                v' <= max(V, G^2)           finite if G^2, V < F / 2
    p' = p (1 - lr wd) - lr_t m' / (sqrt(v')/c + eps),  lr_t = lr / (1 - beta1^t) <= lr / (1 - beta1)
       |p'| <= P |1 - lr wd| + lr / (1 - beta1) * M / eps                   finite if below F / 2
    and the step size lr / (1 - beta1) and the factor |1 - lr wd| below F / 2 as well: torch converts
    them to the dtype, and refuses to step when they do not fit.
Finite operands give a NaN only through an overflow (the denominator is at least eps > 0), so
these bounds rule out both.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from common.distributed import SINGLE, DistContext


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the local shard of an FSDP DTensor, else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def max_abs_each(groups: list[Iterable[torch.Tensor]]) -> list[float]:
    """max |x| over the floating-point tensors of each group (this rank's shards), NaN for a group
    with a NaN, 0.0 for a group with no element: one fused reduction for all groups
    (torch._foreach_norm with ord=inf, which propagates NaN) and one device sync."""
    parts, owner = [], []
    for i, group in enumerate(groups):
        for tensor in group:
            t = local(tensor).detach()
            if t.is_floating_point() and t.numel():  # the inf-norm of an empty tensor is undefined
                parts.append(t)
                owner.append(i)
    norms = [n.float() for n in torch._foreach_norm(parts, ord=math.inf)] if parts else []
    values = torch.stack(norms).tolist() if norms else []
    out = []
    for i in range(len(groups)):
        mine = [v for v, o in zip(values, owner, strict=True) if o == i]
        out.append(math.nan if any(math.isnan(v) for v in mine) else max(mine, default=0.0))
    return out


def max_abs(tensors: Iterable[torch.Tensor]) -> float:
    """max |x| over every element of the floating-point `tensors` (see `max_abs_each`)."""
    return max_abs_each([tensors])[0]


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """No NaN and no infinity in any of `tensors`."""
    return math.isfinite(max_abs(tensors))


def named_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted name, tensor) of every tensor in nested dicts, lists and tuples (a state dict)."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from named_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from named_tensors(value, f"{prefix}.{i}" if prefix else str(i))


def first_non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor holding a NaN or an infinity, or None: one fused check of all
    of them, and a search by tensor only when it fails."""
    named = list(named)
    if all_finite(t for _, t in named):
        return None
    return next(name for name, t in named if not all_finite([t]))


def state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors of an optimizer's state this rank holds (moments, step counts); a
    ZeroRedundancyOptimizer's are its local optimizer's."""
    local_optimizer = getattr(optimizer, "optim", optimizer)
    return [v for state in local_optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


def adamw_step_is_finite(optimizer: torch.optim.Optimizer, grad_bound: float) -> bool:
    """True when the next step of `optimizer` (torch's Adam / AdamW) provably leaves every weight and
    moment finite (the bound of the module docstring); `grad_bound` >= max|g| (e.g. the clipped
    global gradient norm). False when the bound fails or the optimizer is not Adam-like (no betas
    and eps): the step may still be finite, `step_or_undo` then checks it after the fact."""
    local_optimizer = getattr(optimizer, "optim", optimizer)
    for group in local_optimizer.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        if "betas" not in group or "eps" not in group:
            return False
        states = [local_optimizer.state.get(p, {}) for p in params]
        P, m, V = max_abs_each(
            [
                params,
                [s["exp_avg"] for s in states if "exp_avg" in s],
                [s[k] for s in states for k in ("exp_avg_sq", "max_exp_avg_sq") if k in s],
            ]
        )
        M = max(grad_bound, m) if not math.isnan(m) else m
        F = min(torch.finfo(p.dtype).max for p in params)
        lr, wd, eps, beta1 = float(group["lr"]), float(group["weight_decay"]), group["eps"], group["betas"][0]
        if eps <= 0 or not (M * M < F / 2 and V < F / 2):  # also False for a NaN
            return False
        step_size, decay = lr / (1 - beta1), abs(1 - lr * wd)  # torch refuses either beyond F
        if not (step_size < F / 2 and decay < F / 2 and P * decay + step_size * M / eps < F / 2):
            return False
    return True


def _copy_state(optimizer: torch.optim.Optimizer) -> tuple[list[torch.Tensor], dict[Any, Any]]:
    """A copy of the weights an optimizer steps (all of them, also under ZeRO, whose step
    broadcasts every rank's shard) and of its state (this rank's part)."""
    weights = [local(p).detach().clone() for group in optimizer.param_groups for p in group["params"]]
    local_optimizer = getattr(optimizer, "optim", optimizer)
    state = {p: copy.deepcopy(s) for p, s in local_optimizer.state.items()}
    return weights, state


def _restore_state(
    optimizer: torch.optim.Optimizer, saved: tuple[list[torch.Tensor], dict[Any, Any]]
) -> None:
    weights, state = saved
    params = [p for group in optimizer.param_groups for p in group["params"]]
    with torch.no_grad():
        for p, w in zip(params, weights, strict=True):
            local(p).copy_(w)
    local_optimizer = getattr(optimizer, "optim", optimizer)
    local_optimizer.state.clear()  # a first step creates the moments: they go too
    local_optimizer.state.update(state)


def step_or_undo(
    optimizers: list[torch.optim.Optimizer], grad_bounds: list[float], dist: DistContext = SINGLE
) -> bool:
    """Step every optimizer (AdamW) and return True, or leave every weight and moment as it was and
    return False when the step left a NaN or an infinity in one of them.

    The state is copied only when `adamw_step_is_finite` cannot prove the step finite (`grad_bounds`:
    max|g| bounds, one per optimizer); data parallel, the ranks decide together (ZeRO and FSDP ranks
    hold different shards).
    """
    provable = all(adamw_step_is_finite(o, g) for o, g in zip(optimizers, grad_bounds, strict=True))
    if not dist.any(not provable):
        for optimizer in optimizers:
            optimizer.step()
        return True
    saved = [_copy_state(o) for o in optimizers]
    try:
        for optimizer in optimizers:
            optimizer.step()
        params = [p for o in optimizers for g in o.param_groups for p in g["params"]]
        failed = not all_finite([*params, *(t for o in optimizers for t in state_tensors(o))])
    except RuntimeError as err:  # a step size or decay factor beyond the dtype's range, which torch refuses
        if "overflow" not in str(err):
            raise
        failed = True
    if not dist.any(failed):
        return True
    for optimizer, state in zip(optimizers, saved, strict=True):
        _restore_state(optimizer, state)
    return False
