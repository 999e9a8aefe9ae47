"""Reward shaping terms. Equation numbers follow the DAPO paper (arXiv:2503.14476)."""

import torch
from torch import Tensor


def overlong_penalty(lengths: Tensor, max_len: int, buffer_len: int, factor: float = 1.0) -> Tensor:
    """Soft overlong punishment, added to the task reward (DAPO Eq. 13).

        R_length(L) = 0                                        if L <= max_len - buffer_len
                    = ((max_len - buffer_len) - L) / buffer_len * factor   if inside the buffer
                    = -factor                                  if L > max_len

    max_len is L_max and buffer_len is L_cache in the paper; factor scales the penalty (1 in the
    paper). The penalty falls linearly from 0 to -factor across the last buffer_len tokens and stays
    at -factor past max_len. A response cut off by the generation limit gets the full penalty
    only if max_len is below that limit.

    Example (max_len 20, buffer_len 4, so the buffer starts after 16 tokens):
        lengths = [10, 16, 18,              20,             25]
        penalty = [ 0,  0, (16 - 18) / 4, (16 - 20) / 4,    -1] = [0, 0, -0.5, -1, -1]

    Args:
        lengths: (N,) response lengths in tokens.
        max_len: L_max.
        buffer_len: L_cache, 0 < buffer_len <= max_len.
        factor: penalty scale.

    Returns:
        (N,) float32 penalty, <= 0.
    """
    if buffer_len <= 0 or buffer_len > max_len:
        raise ValueError(f"need 0 < buffer_len <= max_len, got buffer_len={buffer_len}, max_len={max_len}")
    lengths = torch.as_tensor(lengths, dtype=torch.float32)
    expected_len = max_len - buffer_len
    in_buffer = (expected_len - lengths) / buffer_len * factor
    penalty = torch.where(lengths <= expected_len, torch.zeros_like(lengths), in_buffer)
    return torch.where(lengths > max_len, torch.full_like(lengths, -factor), penalty)
