"""The decode loop's KV cache: buffers sized once for the whole rollout (`PreallocatedLayer`), from
which finished rows leave in place (`keep_order`).

Both rest on transformers internals: a subclass of cache_utils.DynamicLayer and the per-layer list
DynamicCache.layers. `PREALLOCATED_CACHE` checks once per process that they are there and that the
subclass still holds what a DynamicLayer holds; if not, the decode loop keeps transformers' own
DynamicCache (which concatenates every step and copies the kept rows when rows finish), with one
warning. rollout.preallocated_cache and rollout.inplace_row_removal switch the tricks off.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache

from common.fences import Fence

try:
    from transformers.cache_utils import DynamicLayer
except ImportError:  # a transformers without per-layer caches: PREALLOCATED_CACHE's probe says so
    DynamicLayer = None


class PreallocatedLayer(DynamicLayer if DynamicLayer is not None else object):
    """A DynamicLayer whose keys and values live in buffers sized once for the whole rollout: a decode
    step writes its column in place. DynamicLayer concatenates instead, copying the whole cache at
    every step (O(T^2) bytes over a response of T tokens; a fifth of a decode step's time measured
    at 32 rows of SmolLM2-135M on CPU).

    `keys` and `values` are views of the first `get_seq_length()` columns, so attention, masks and
    `batch_select_indices` (dropping finished rows) see exactly what a DynamicLayer would hold.
    `in_place` (rollout.inplace_row_removal): finished rows leave in place (see batch_select_indices);
    off, the kept rows are copied into new buffers, as DynamicLayer does.
    """

    def __init__(self, keys: Tensor, values: Tensor, capacity: int, in_place: bool = True) -> None:
        super().__init__()
        self.in_place = in_place
        B, H, L, _ = keys.shape  # (rows, kv heads, cached tokens, head dim)
        assert capacity >= L, f"capacity {capacity} below the {L} tokens already cached"
        self._keys = keys.new_empty(B, H, capacity, keys.shape[-1])  # (B, H, capacity, D)
        self._values = values.new_empty(B, H, capacity, values.shape[-1])
        self._keys[:, :, :L], self._values[:, :, :L] = keys, values
        self.length = L
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Write the new columns (B, H, t, D) after the cached ones; return all cached keys and values."""
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[2]:
            raise RuntimeError(f"KV cache full: {end} tokens for a capacity of {self._keys.shape[2]}")
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep the rows `indices` (n,) in that order, in place: row i becomes row indices[i] and the
        buffers are narrowed to their first n rows. Only the rows that change slot are copied, and
        only their cached columns: for `keep_order`'s orders, one row per finished row. (Copying
        the kept rows into new buffers at each finish cost 5% of a rollout: 171 MB of fresh
        memory at the first one, for SmolLM2-135M at 32 rows.)"""
        if not self.in_place:
            self._keys, self._values = (
                self._keys.index_select(0, indices),
                self._values.index_select(0, indices),
            )
            self._views()
            return
        n = len(indices)
        dst = (indices != torch.arange(n, device=indices.device)).nonzero().flatten()  # slots that change
        if len(dst):
            src = indices[dst]
            for buffer in (self._keys, self._values):
                filled = buffer[:, :, : self.length]  # (B, H, L, D)
                filled.index_copy_(0, dst, filled.index_select(0, src))  # through a copy: src may be a dst
        self._keys, self._values = self._keys[:n], self._values[:n]
        self._views()


def keep_order(going: Tensor) -> Tensor:
    """The order of the rows still decoding after a step, for `batch_select_indices`: each slot
    below n = going.sum() whose row finished takes one of the unfinished rows at or above n, so
    that only as many rows move as finished. going (B,) bool -> order (n,) of row indices.

    E.g. going = [T, F, T, T]: n = 3, slot 1 is free, row 3 moves there: order [0, 3, 2].
    """
    n = int(going.sum())
    order = torch.arange(n, device=going.device)  # (n,)
    holes = (~going[:n]).nonzero().flatten()  # slots below n whose row finished
    order[holes] = going[n:].nonzero().flatten() + n  # as many unfinished rows from n on
    return order


def preallocate(cache: DynamicCache, rows: Tensor, capacity: int, in_place: bool = True) -> None:
    """Give the cache's prompt rows to the batch rows `rows` (N,) (row i holds prompt rows[i]): its
    full-attention layers move into PreallocatedLayer buffers of `capacity` tokens; other layer kinds
    (sliding windows) keep their own storage."""
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.is_initialized:
            keys, values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
            cache.layers[i] = PreallocatedLayer(keys, values, capacity, in_place)
        else:
            layer.batch_select_indices(rows)


def probe_preallocated_cache() -> str | None:
    """None when DynamicCache keeps a list of layers and PreallocatedLayer holds what a DynamicLayer
    holds through an update and a row selection, else why not."""
    if DynamicLayer is None:
        return "transformers.cache_utils.DynamicLayer is missing"
    try:
        if not isinstance(getattr(DynamicCache(), "layers", None), list):
            return "DynamicCache keeps no list of layers (cache.layers)"
        keys = torch.arange(24.0).view(2, 1, 3, 4)  # (B, H, L, D)
        step = torch.full((2, 1, 1, 4), -1.0)
        plain, ours = DynamicLayer(), PreallocatedLayer(keys, keys + 1, capacity=5)
        plain.update(keys, keys + 1)
        for layer in (plain, ours):
            layer.update(step, step)
            layer.batch_select_indices(torch.tensor([1]))
        same = torch.equal(plain.keys, ours.keys) and torch.equal(plain.values, ours.values)
        same = same and plain.get_seq_length() == ours.get_seq_length() == 4
    except (AttributeError, TypeError, RuntimeError, ValueError, IndexError) as err:
        return f"the DynamicLayer subclass fails ({type(err).__name__}: {err})"
    return None if same else "a DynamicLayer subclass no longer holds what DynamicLayer holds"


PREALLOCATED_CACHE = Fence(
    "rollout.preallocated_cache",
    probe_preallocated_cache,
    "transformers' DynamicCache (concatenating) is used",
)
