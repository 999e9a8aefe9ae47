"""Loss aggregation: a (B, T) per-token loss to a scalar, in verl's modes (`agg_loss`), and the
normaliser that makes micro-batch losses add up to the full batch's (gradient accumulation).

Equation numbers follow the DAPO paper (arXiv:2503.14476): Eq. 5 GRPO objective (sample-level
mean), Eq. 12 token-level loss; the constant-normaliser mode is Dr. GRPO's (arXiv:2503.20783).
common.losses re-exports every name here, which is where the policy and value losses use them.
"""

import torch
from torch import Tensor

AGG_MODES = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "token-sum",
)


def _check_mode(mode: str) -> None:
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {', '.join(AGG_MODES)}")


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `values` over the entries where `mask` is 1.

        masked_mean = sum(v * m) / max(sum(m), 1)

    Entries under mask 0 are never read (they may hold any value, inf and NaN included), and an
    all-masked slice gives 0, not NaN.

    Args:
        values: any shape.
        mask: same shape as `values`, 1 (or True) where the entry counts.
        dim: reduce over this dimension only; None reduces over all entries.

    Returns:
        A scalar when dim is None, otherwise `values` with `dim` removed. float32.
    """
    values = torch.as_tensor(values, dtype=torch.float32)
    keep = torch.as_tensor(mask, device=values.device).bool()
    total = torch.where(keep, values, 0.0)
    if dim is None:
        return total.sum() / keep.sum().clamp(min=1)
    return total.sum(dim) / keep.sum(dim).clamp(min=1)


def aggregate_loss(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str,
    denominator: float | None = None,
    loss_scale_factor: float | None = None,
) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar (DAPO Eq. 12 / GRPO Eq. 5 / Dr. GRPO).

        token-mean               sum(L * m) / sum(m)                    DAPO token-level loss, Eq. 12
        seq-mean-token-mean      mean_i( sum_t(L * m) / sum_t(m) )       original GRPO, Eq. 5
        seq-mean-token-sum       mean_i( sum_t(L * m) )                  sum over tokens, mean over rows
        seq-mean-token-sum-norm  mean_i( sum_t(L * m) ) / C              Dr. GRPO (arXiv:2503.20783)
        token-sum                sum(L * m)                             verl's token-sum: no normaliser

    mean_i runs over the rows with at least one token under the mask, as in verl's agg_loss (0.5
    and later): a fully masked row (e.g. a truncated response under overlong filtering) neither adds
    to nor dilutes the loss. Entries under mask 0 are never read; nothing divides by zero.

    C = loss_scale_factor is a constant: the generation budget (verl: actor.loss_scale_factor, whose
    null means the padded response width, i.e. the budget). Every response is divided by the same C,
    so the gradient has no length bias (Dr. GRPO), and at C = max_new_tokens the loss is on the scale
    of token-mean, where seq-mean-token-sum is C times larger. TRL's loss_type="dr_grpo" is this mode
    with C = max_completion_length (TRL also counts fully masked rows); verl's seq-mean-token-sum-norm
    sums its micro-batch's rows instead of averaging them (micro-batch-size times this value).

    Gradient accumulation: `denominator` replaces the whole normaliser, sum(m) for token-mean, the
    number of non-empty rows for seq-mean-token-mean / -sum, that number times C for -norm, by the
    one of the whole update batch (`aggregation_denominator`). The micro-batch losses then add up
    exactly to the loss of the full batch. token-sum has no normaliser: its denominator is 1.

    Example (x = masked; the third row is fully masked):
        L = [[1, 1, x],
             [2, x, x],
             [x, x, x]]
        token-mean               (1 + 1 + 2) / 3          = 4/3
        seq-mean-token-mean      (2/2 + 2/1) / 2          = 1.5
        seq-mean-token-sum       (2 + 2) / 2              = 2.0
        seq-mean-token-sum-norm  (2 + 2) / (2 * C), C = 4 = 0.5
        token-sum                1 + 1 + 2                = 4.0

    Args:
        loss_mat: (B, T) per-token loss.
        mask: (B, T) response mask, 1 on response tokens.
        mode: one of AGG_MODES.
        denominator: optional normaliser of the full batch, see above; it includes C.
        loss_scale_factor: C of the -norm mode when no denominator is given; None = T, the mask's
            width (verl's fallback).

    Returns:
        Scalar float32 loss.
    """
    _check_mode(mode)
    if denominator is not None and denominator <= 0:
        raise ValueError(f"denominator must be positive, got {denominator}")
    loss_mat = torch.as_tensor(loss_mat, dtype=torch.float32)
    keep = torch.as_tensor(mask, device=loss_mat.device).bool()
    if loss_mat.shape != keep.shape or loss_mat.dim() != 2:
        raise ValueError(
            f"loss_mat and mask must both be (B, T), got {tuple(loss_mat.shape)} and {tuple(keep.shape)}"
        )
    if denominator is None:
        scale = loss_scale_factor if loss_scale_factor is not None else keep.shape[1]
        denominator = aggregation_denominator(keep, mode, scale) or 1.0  # empty: the sum below is 0
    masked = torch.where(keep, loss_mat, 0.0)  # (B, T)
    if mode in ("token-mean", "token-sum"):
        return masked.sum() / denominator
    row_loss = masked.sum(dim=1)  # (B,), token sums
    if mode == "seq-mean-token-mean":
        row_loss = row_loss / keep.sum(dim=1).clamp(min=1)  # (B,), an empty row gives 0 / 1
    return row_loss.sum() / denominator


def aggregation_denominator(mask: Tensor, mode: str, loss_scale_factor: float | None = None) -> float:
    """The normaliser `aggregate_loss` uses for a whole update batch: its masked token count for
    token-mean, its number of rows with at least one masked-in token for seq-mean-token-mean /
    -sum, that number times C = loss_scale_factor for seq-mean-token-sum-norm. Passing it as
    `denominator` to every micro-batch makes the accumulated gradient equal the full batch's (DAPO
    Eq. 12 across micro-batches). It is 0 when nothing is left to train on: a caller that sums it
    over data-parallel ranks clamps the sum, not each rank's part. token-sum divides by nothing:
    its part is always 0, which every caller reads as 1 (`or 1.0`), so that the sum over ranks is
    1 too (a part of 1 would divide the loss by the number of ranks).

    Example: mask [[1, 1, 0], [1, 0, 0], [0, 0, 0]] gives 3.0 for token-mean, 2.0 for the
    seq-mean modes, 2 C for seq-mean-token-sum-norm and 0.0 (read as 1) for token-sum.
    """
    _check_mode(mode)
    if mode == "token-sum":
        return 0.0
    if mode == "seq-mean-token-sum-norm" and (loss_scale_factor is None or loss_scale_factor <= 0):
        raise ValueError(f"{mode} needs a positive loss_scale_factor, got {loss_scale_factor}")
    keep = torch.as_tensor(mask).bool()  # (B, T)
    if mode == "token-mean":
        return float(keep.sum())
    rows = float(keep.any(dim=1).sum())
    return rows * loss_scale_factor if mode == "seq-mean-token-sum-norm" else rows
