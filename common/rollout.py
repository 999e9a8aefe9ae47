"""Batched rollouts: G sampled responses per prompt, their token ids, masks and log-probs.

Layout of a batch of N = n_prompts * G rows, grouped contiguously ([q1]*G + [q2]*G + ...):

    input_ids        pad pad p p p p | r r r EOS pad pad      (N, P + T)
    attention_mask    0   0  1 1 1 1 | 1 1 1  1   0   0       (N, P + T)
    response_mask                    | 1 1 1  1   0   0       (N, T)
                     <-- prompt P -->|<------ T ------>

Prompts are left-padded so every response starts at column P; responses are right-padded after
their first EOS (inclusive). A response with no EOS within max_new_tokens is `truncated`.

The log-prob of response token t comes from the logits at column P - 1 + t (next-token
prediction), divided by the sampling temperature, so that `old_logprob` is the log-prob of the
distribution the tokens were drawn from (top-k / top-p truncation aside).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache, TopKLogitsWarper, TopPLogitsWarper
from transformers.cache_utils import Cache, DynamicLayer

from common.distributed import unwrap


@dataclass
class RolloutBatch:
    """One rollout: N rows of prompt + response, grouped contiguously by prompt.

    Example (2 prompts, G = 2, max_new_tokens = 3, EOS = 2, pad = 2):

        input_ids       [[2, 5, 6, 7, 8, 2],     q1: prompt (5, 6), response (7, 8, EOS)
                         [2, 5, 6, 9, 2, 2],     q1: response (9, EOS), then padding
                         [3, 4, 6, 7, 7, 7],     q2: prompt (3, 4, 6), response truncated
                         [3, 4, 6, 2, 2, 2]]     q2: response (EOS)
        prompt_len      3
        response_mask   [[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]]
        lengths         [3, 2, 3, 1]
        truncated       [False, False, True, False]
        group_index     [0, 0, 1, 1]
    """

    input_ids: Tensor  # (N, P+T) long: left-padded prompt + right-padded response
    attention_mask: Tensor  # (N, P+T) long: 1 on real prompt tokens and on response tokens through EOS
    response_mask: Tensor  # (N, T) float: 1 on response tokens through the first EOS
    prompt_len: int  # P: responses start at column P in every row
    prompts_expanded: list[str]  # (N,) the user prompts, [q1]*G + [q2]*G + ...
    responses: list[str]  # (N,) decoded responses, special tokens skipped
    lengths: Tensor  # (N,) long: response length in tokens, EOS included
    truncated: Tensor  # (N,) bool: no EOS within max_new_tokens
    group_index: Tensor  # (N,) long: group id per row; rows with the same id share a prompt
    pad_token_id: int = 0  # fills padding when `concat` widens the prompt or response block

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_ids(self) -> Tensor:
        """(N, T) response token ids (padding after EOS)."""
        return self.input_ids[:, self.prompt_len :]

    def select(self, index: Tensor | Sequence[int] | Sequence[bool]) -> RolloutBatch:
        """Rows by integer index or boolean mask; group ids are kept as they are."""
        index = torch.as_tensor(index, device=self.input_ids.device)
        if index.dtype == torch.bool:
            assert index.numel() == len(self), f"bool mask of {index.numel()} rows for a batch of {len(self)}"
            index = index.nonzero().flatten()
        rows = index.tolist()
        return RolloutBatch(
            input_ids=self.input_ids[index],
            attention_mask=self.attention_mask[index],
            response_mask=self.response_mask[index],
            prompt_len=self.prompt_len,
            prompts_expanded=[self.prompts_expanded[i] for i in rows],
            responses=[self.responses[i] for i in rows],
            lengths=self.lengths[index],
            truncated=self.truncated[index],
            group_index=self.group_index[index],
            pad_token_id=self.pad_token_id,
        )

    @staticmethod
    def concat(batches: list[RolloutBatch], offset_groups: bool = True) -> RolloutBatch:
        """Stack batches row-wise, re-padding to a common prompt width P and response width T.

        Prompts get more left padding, responses more right padding, so responses still start
        at the common column P. With `offset_groups` (the default) the group ids of each batch are
        shifted past those of the batches before it, so groups from different rollouts stay
        distinct; without it the ids are kept, so extra responses can join existing groups.
        """
        assert batches, "concat needs at least one batch"
        P = max(b.prompt_len for b in batches)
        T = max(b.response_mask.shape[1] for b in batches)
        pad = batches[0].pad_token_id
        input_ids, attention_mask, response_mask, group_index = [], [], [], []
        offset = 0
        for b in batches:
            dp, dt = P - b.prompt_len, T - b.response_mask.shape[1]
            # F.pad takes (left, right) for the last dim: prompt padding on the left, response on the right
            input_ids.append(torch.nn.functional.pad(b.input_ids, (dp, dt), value=pad))
            attention_mask.append(torch.nn.functional.pad(b.attention_mask, (dp, dt), value=0))
            response_mask.append(torch.nn.functional.pad(b.response_mask, (0, dt), value=0.0))
            group_index.append(b.group_index + offset)
            if offset_groups and len(b):
                offset += int(b.group_index.max()) + 1
        return RolloutBatch(
            input_ids=torch.cat(input_ids),
            attention_mask=torch.cat(attention_mask),
            response_mask=torch.cat(response_mask),
            prompt_len=P,
            prompts_expanded=[p for b in batches for p in b.prompts_expanded],
            responses=[r for b in batches for r in b.responses],
            lengths=torch.cat([b.lengths for b in batches]),
            truncated=torch.cat([b.truncated for b in batches]),
            group_index=torch.cat(group_index),
            pad_token_id=pad,
        )


def response_mask_from_ids(response_ids: Tensor, eos_token_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Mask of each response through its first EOS (inclusive).

        response_ids [[7, 8, EOS, EOS],  ->  mask [[1, 1, 1, 0],  lengths [3, 4]  truncated [False, True]
                      [7, 7, 7,   7  ]]          [1, 1, 1, 1]]

    Positions after the first EOS are padding whatever their id (pad may equal EOS).

    Returns:
        response_mask: (N, T) float; lengths: (N,) long; truncated: (N,) bool.
    """
    is_eos = response_ids == eos_token_id  # (N, T)
    eos_before = is_eos.long().cumsum(dim=1) - is_eos.long()  # EOS tokens strictly before t
    response_mask = (eos_before == 0).float()  # (N, T)
    return response_mask, response_mask.sum(dim=1).long(), ~is_eos.any(dim=1)


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP and peft (LoRA) wrappers."""
    inner = unwrap(model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the causal LM can compute logits for the last k positions only (`logits_to_keep`);
    a peft wrapper's forward takes **kwargs and hands them to its base model, so that one is asked."""
    return "logits_to_keep" in inspect.signature(_base_model(model).forward).parameters


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose keys and values live in buffers sized once for the whole rollout: a decode
    step writes its column in place. DynamicLayer concatenates instead, copying the whole cache at
    every step (O(T^2) bytes over a response of T tokens; a fifth of a decode step's time measured
    at 32 rows of SmolLM2-135M on CPU).

    `keys` and `values` are views of the first `get_seq_length()` columns, so attention, masks and
    `batch_select_indices` (dropping finished rows) see exactly what a DynamicLayer would hold.
    """

    def __init__(self, keys: Tensor, values: Tensor, capacity: int) -> None:
        super().__init__()
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


def _packed_linear(weight: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@contextlib.contextmanager
def prepacked_linears(model: torch.nn.Module, rows: int) -> Iterator[None]:
    """Inside the block, on CPU, every float32 nn.Linear of `model` runs through oneDNN with its
    weight reordered once into oneDNN's blocked layout for `rows`-row inputs (the weight prepacking
    that torch.compile's inductor applies to CPU linears when it freezes weights). Inference only.

    A decode step multiplies a few rows by every weight matrix: the plain `F.linear` runs such
    small-M products at a fraction of the machine's rate (SmolLM2-135M's LM head on 4 rows: 26 ms,
    prepacked 9 ms; a 576 x 1536 projection: 394 us vs 152 us; measured on 2 CPU threads). The
    products stay float32 (summation order aside), so sampling draws from the same distribution.
    The reordered copies (one more copy of the weights) are freed when the block ends; the weights
    change after each update, so they are made per rollout. A no-op without oneDNN or on a GPU.
    """
    linears = [
        m
        for m in model.modules()
        if type(m) is torch.nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
    ]
    if not (linears and torch.backends.mkldnn.is_available()):
        yield
        return
    try:
        for m in linears:
            packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows)
            bias = m.bias.detach() if m.bias is not None else None
            m.forward = functools.partial(_packed_linear, packed, bias)
        yield
    finally:
        for m in linears:
            m.__dict__.pop("forward", None)


# An extra forward costs about what this many prompt tokens cost (one pass over the weights, on
# CPU): a prefix whose sharing saves fewer tokens, (prompts - 1) x its length, runs with the rest.
MIN_SHARED_PREFIX_SAVING = 32


def shared_prefix_length(prompt_ids: Tensor, prompt_mask: Tensor) -> int:
    """How many tokens every prompt starts with, the same in all: the system message and chat
    template's header, an instruction shared by a task's questions. At most the shortest prompt's
    length - 1: each prompt keeps a token of its own, whose logits the prompt pass returns.

    Args:
        prompt_ids, prompt_mask: (U, P), left-padded.
    """
    lengths = prompt_mask.long().sum(dim=1)  # (U,)
    start = prompt_ids.shape[1] - lengths  # (U,) each prompt's first column
    columns = start[:, None] + torch.arange(int(lengths.min()) - 1, device=prompt_ids.device)  # (U, m)
    aligned = prompt_ids.gather(1, columns)  # (U, m) the first m tokens of each prompt
    differs = (aligned != aligned[:1]).any(dim=0)  # (m,)
    return int(differs.int().argmax()) if differs.any() else aligned.shape[1]


def prefill(
    model: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, rows: Tensor, capacity: int
) -> tuple[Cache, Tensor, Tensor]:
    """Run each distinct prompt once, their shared prefix once, and hand the KV cache and
    next-token logits to the rows.

    The G rows of a group share their prompt, so their prompt keys and values are identical: the
    prompt runs once per distinct prompt (not G times, as `generate` on the expanded batch does) and
    is gathered to the rows. A prefix that all prompts share (`shared_prefix_length`, e.g. the
    system message) runs once in a pass of its own when that saves at least
    MIN_SHARED_PREFIX_SAVING tokens, and full-attention models only; its cache is repeated to the
    prompts, which then run their own tokens. The cache then holds [prefix | padding | own
    tokens] per row, and its mask says so. Full-attention layers move into PreallocatedLayer
    buffers of `capacity` tokens. Positions follow the mask, as `generate` computes them: the same
    positions, and the same keys and values (float rounding aside), as one pass over the prompt.

    Args:
        prompt_ids, prompt_mask: (U, P), left-padded, one row per distinct prompt.
        rows: (N,) the prompt of each row, e.g. [0]*G + [1]*G + ... for the rollout order.
        capacity: prompt plus response tokens the cache must hold, P + max_new_tokens.
    Returns:
        the cache with N rows of P tokens, the logits (N, V) of each row's first response token,
        and the cache's attention mask (N, P) for `decode`.
    """
    cache = DynamicCache(config=_base_model(model).config)
    keep = {"logits_to_keep": 1} if takes_logits_to_keep(model) else {}
    U, P = prompt_ids.shape
    mask = prompt_mask.long()  # (U, P) the cache's mask
    shared = 0
    if U > 1 and all(type(layer) is DynamicLayer for layer in cache.layers):
        shared = shared_prefix_length(prompt_ids, prompt_mask)
        shared = shared if (U - 1) * shared >= MIN_SHARED_PREFIX_SAVING else 0
    if shared:
        first = P - int(mask[0].sum())  # prompt 0's first column
        model(
            input_ids=prompt_ids[:1, first : first + shared],  # (1, C)
            position_ids=torch.arange(shared, device=prompt_ids.device)[None],
            past_key_values=cache,
            use_cache=True,
            **keep,
        )
        cache.batch_repeat_interleave(U)
        own = mask.sum(dim=1, keepdim=True) - shared  # (U, 1) tokens after the prefix
        columns = torch.arange(shared, P, device=prompt_ids.device)  # (P - C,)
        mask = torch.cat([mask.new_ones(U, shared), (columns >= P - own).long()], dim=1)
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, shared:]  # (U, P - C)
    logits = model(
        input_ids=prompt_ids[:, shared:],  # (U, P - C): each prompt's own tokens, left-padded
        attention_mask=mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        **keep,
    ).logits[:, -1]  # (U, V)
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.is_initialized:
            cache.layers[i] = PreallocatedLayer(
                layer.keys.index_select(0, rows), layer.values.index_select(0, rows), capacity
            )
        else:  # other layer kinds (sliding windows) keep their own storage
            layer.batch_select_indices(rows)
    return cache, logits[rows], mask[rows]


def sample_categorical(probs: Tensor, block: int = 512) -> Tensor:
    """One draw per row from the categorical distribution with (unnormalised, >= 0) weights
    `probs` (n, V) -> token ids (n,), by inverse CDF in two levels.

    The vocabulary is cut into blocks of `block` tokens. A uniform u picks the block whose
    cumulative mass (float64) first exceeds u * total; u's position inside that block's mass then
    picks the token by the block's own cumulative sum. P(token i) = mass(block) / total *
    p_i / mass(block) = p_i / total: the categorical that `torch.multinomial` draws from, from one
    random number per row, without a cumulative sum (or a float64 copy) of the whole vocabulary.
    A token of weight 0 is never drawn: no cumulative sum rises at it.
    """
    n, V = probs.shape
    if V % block:
        probs = torch.nn.functional.pad(probs, (0, block - V % block))  # padded weights are 0
    blocks = probs.view(n, -1, block)  # (n, K, block)
    mass = blocks.sum(dim=-1, dtype=torch.float64)  # (n, K)
    cdf = mass.cumsum(dim=-1)  # (n, K)
    u = torch.rand(n, 1, dtype=torch.float64, device=probs.device) * cdf[:, -1:]  # (n, 1), in [0, total)
    k = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[1] - 1)  # (n, 1): cdf[k-1] <= u < cdf[k]
    picked = mass.gather(1, k)  # (n, 1) the chosen block's mass
    within = (u - (cdf.gather(1, k) - picked)) / picked  # (n, 1), in [0, 1)
    inner = blocks[torch.arange(n, device=probs.device), k.squeeze(1)].cumsum(dim=-1, dtype=torch.float64)
    j = torch.searchsorted(inner, within * inner[:, -1:], right=True).clamp(max=block - 1)  # (n, 1)
    return (k * block + j).squeeze(1)


class TokenSampler:
    """Next tokens from logits (n, V) -> (n,): greedy argmax, or a draw from the distribution that
    `generate` samples from: logits / temperature, then top-k, then top-p (transformers' own
    warpers, in generate's order), float32 softmax.

    The draw is `sample_categorical`'s two-level inverse CDF: the same categorical distribution as
    `torch.multinomial` (what generate calls), from one random number per row instead of a pass of
    random numbers over the vocabulary: 1 ms instead of 39 ms for 32 rows of a 49k vocabulary on
    CPU (a float64 cumulative sum of the whole vocabulary took 2-30 ms: 12 MB buffers per step).
    """

    def __init__(self, do_sample: bool, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> None:
        self.do_sample = do_sample
        self.temperature = temperature
        self.warpers = []
        if top_k > 0:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, logits: Tensor) -> Tensor:
        if not self.do_sample:
            return logits.argmax(dim=-1)
        scores = logits.float() / self.temperature  # (n, V)
        for warp in self.warpers:
            scores = warp(None, scores)
        return sample_categorical(torch.softmax(scores, dim=-1))


@torch.inference_mode()
def decode(
    model: torch.nn.Module,
    cache: Cache,
    logits: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    sampler: Callable[[Tensor], Tensor],
) -> Tensor:
    """Sample the responses of all rows in one batched loop, one token per step; a row that samples
    EOS leaves the batch (its cache rows go too; an unfinished row from the end of the batch takes
    its slot, `keep_order`), so every step runs only unfinished rows.

    `generate` keeps finished rows in the batch until the longest response ends: with responses of
    mixed lengths most of its rows compute padding. Here a step costs what its live rows cost.

    Args:
        cache: the prompts' KV cache, N rows of P tokens (`prefill`).
        logits: (N, V) next-token logits after the prompt.
        attention_mask: (N, P) the mask of the cached prompt tokens (`prefill`), padding 0.
        sampler: logits (n, V) -> tokens (n,), e.g. a TokenSampler.
    Returns:
        (N, T) response ids, T = the longest response (<= max_new_tokens); each row is padded with
        pad_token_id after its EOS.
    """
    N = logits.shape[0]
    out = torch.full((N, max_new_tokens), pad_token_id, dtype=torch.long, device=logits.device)  # (N, T)
    live = torch.arange(N, device=logits.device)  # rows still decoding
    mask = attention_mask.long()  # (n, P + t)
    position = mask.sum(dim=1, keepdim=True)  # (n, 1) position of the next token
    width = 0
    for t in range(max_new_tokens):
        token = sampler(logits)  # (n,)
        out[live, t] = token
        width = t + 1
        going = token != eos_token_id  # (n,)
        if t == max_new_tokens - 1 or not going.any():
            break
        if not going.all():
            keep = keep_order(going)  # (n,) the unfinished rows, in their new order
            live, token, mask, position = live[keep], token[keep], mask[keep], position[keep]
            cache.batch_select_indices(keep)
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        logits = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=position,
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1]  # (n, V)
        position = position + 1
    return out[:, :width]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put `model` in eval mode for the block, then restore its previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass
class PackedResponses:
    """A micro-batch packed into one row without padding: each distinct prompt once, then the
    responses of its rows, each through its last masked-in token (EOS).

        tokens     q1 q1 q1 | a a a | b b | q2 q2 | c c c c
        positions   0  1  2 | 3 4 5 | 3 4 |  0  1 | 2 3 4 5
        attends to          its own prompt and its own earlier tokens, nothing else

    Every response token's logits come from the token before it: the first from its prompt's last
    token (shared by the group's rows), the others from the response's own previous token.
    """

    input_ids: Tensor  # (1, L) the packed tokens
    position_ids: Tensor  # (1, L) each token's position in its own prompt + response
    attention_mask: Tensor  # (1, 1, L, L) bool, True where query token i may attend to key token j
    source: Tensor  # (K,) the packed column whose logits predict each response token
    target: Tensor  # (K,) the response token ids
    rows: Tensor  # (K,) each response token's row in the (N, T) batch
    cols: Tensor  # (K,) and its column

    def unpack(self, values: Tensor, n_rows: int, width: int) -> Tensor:
        """Per-token values (K,) back into the batch layout (n_rows, width), 0 elsewhere (autograd
        flows through)."""
        return values.new_zeros(n_rows, width).index_put((self.rows, self.cols), values)


def pack_responses(
    input_ids: Tensor, attention_mask: Tensor, prompt_len: int, response_mask: Tensor, groups: Tensor
) -> PackedResponses:
    """Pack rows (N, P+T) into one padding-free row (see PackedResponses). Rows with the same
    `groups` id share their prompt (it is taken from the group's first row); a row's response runs
    through its last masked-in column, so the tokens left out are padding the loss never sees."""
    P = prompt_len
    lengths = response_mask.sum(dim=1).long().tolist()  # (N,) response tokens through EOS
    prompt_lengths = attention_mask[:, :P].sum(dim=1).long().tolist()  # (N,) unpadded prompt tokens
    members: dict[int, list[int]] = {}
    for row, group in enumerate(groups.tolist()):
        members.setdefault(group, []).append(row)
    ids, positions, owner, branch = [], [], [], []
    source, rows, cols = [], [], []
    start = 0
    for u, group_rows in enumerate(members.values()):
        p = prompt_lengths[group_rows[0]]
        ids.append(input_ids[group_rows[0], P - p : P])
        positions.append(torch.arange(p))
        owner.append(torch.full((p,), u))
        branch.append(torch.zeros(p, dtype=torch.long))
        last_prompt_token = start + p - 1
        start += p
        for row in group_rows:
            n = lengths[row]
            if n == 0:  # nothing of this row is scored
                continue
            ids.append(input_ids[row, P : P + n])
            positions.append(torch.arange(p, p + n))
            owner.append(torch.full((n,), u))
            branch.append(torch.full((n,), row + 1))
            source += [last_prompt_token, *range(start, start + n - 1)]
            rows += [row] * n
            cols += range(n)
            start += n
    owner_, branch_ = torch.cat(owner), torch.cat(branch)  # (L,), (L,)
    causal = torch.ones(start, start, dtype=torch.bool).tril()  # (L, L)
    same_prompt = owner_[:, None] == owner_[None, :]
    own_branch = (branch_[None, :] == 0) | (branch_[:, None] == branch_[None, :])
    device = input_ids.device
    packed_ids = torch.cat(ids)[None]  # (1, L)
    source_, rows_, cols_ = (torch.tensor(x, dtype=torch.long, device=device) for x in (source, rows, cols))
    return PackedResponses(
        input_ids=packed_ids,
        position_ids=torch.cat(positions)[None].to(device),
        attention_mask=(causal & same_prompt & own_branch)[None, None].to(device),
        source=source_,
        target=input_ids[rows_, P + cols_],
        rows=rows_,
        cols=cols_,
    )


# attention implementations that take a custom 4D mask (flash attention does not): the packed pass
PACKED_ATTENTION = ("sdpa", "eager")


def attention_implementation(model: torch.nn.Module) -> str | None:
    """The model's attention implementation (config._attn_implementation), e.g. "sdpa"."""
    return getattr(_base_model(model).config, "_attn_implementation", None)


def packed_attention_mask(model: torch.nn.Module, allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """`allowed` (1, 1, L, L) in the form the model's attention takes a custom 4D mask: bool for
    sdpa, additive float (0 / dtype min) for eager (one of PACKED_ATTENTION)."""
    if attention_implementation(model) == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


class ChunkedTokenLogprobs(torch.autograd.Function):
    """logprob and entropy of softmax(logits / tau) per row, in chunks of rows, saving only the
    logits for backward (see token_logprobs)."""

    @staticmethod
    def forward(
        ctx, logits: Tensor, targets: Tensor, temperature: float, chunk: int
    ) -> tuple[Tensor, Tensor]:
        dtype = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 (gradcheck)
        logprob = logits.new_empty(logits.shape[0], dtype=dtype)  # (K,)
        entropy = torch.empty_like(logprob)  # (K,)
        for start in range(0, logits.shape[0], chunk):
            part = slice(start, start + chunk)
            lsm = torch.log_softmax(logits[part].to(dtype) / temperature, dim=-1)  # (k, V)
            logprob[part] = lsm.gather(-1, targets[part, None]).squeeze(-1)
            entropy[part] = -(lsm.exp() * lsm).sum(dim=-1)
        ctx.save_for_backward(logits, targets, entropy)
        ctx.temperature, ctx.chunk = temperature, chunk
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob: Tensor, grad_entropy: Tensor) -> tuple[Tensor, None, None, None]:
        """With x = logits / tau, p = softmax(x), H = -sum_v p_v log p_v:
        d logprob / d x_j = [j = y] - p_j          d H / d x_j = -p_j (log p_j + H)
        """
        logits, targets, entropy = ctx.saved_tensors
        grad = torch.empty_like(logits)  # (K, V)
        for start in range(0, logits.shape[0], ctx.chunk):
            part = slice(start, start + ctx.chunk)
            lsm = torch.log_softmax(logits[part].to(entropy.dtype) / ctx.temperature, dim=-1)  # (k, V)
            p = lsm.exp()
            g_lp, g_h = grad_logprob[part, None], grad_entropy[part, None]  # (k, 1)
            g = -p * (g_lp + g_h * (lsm + entropy[part, None]))
            g.scatter_add_(-1, targets[part, None], g_lp)
            grad[part] = g / ctx.temperature
        return grad, None, None, None


def token_logprobs(
    logits: Tensor, targets: Tensor, temperature: float, return_entropy: bool
) -> tuple[Tensor, Tensor | None]:
    """log softmax(logits / tau)[target] and the entropy of softmax(logits / tau), over the last dim:

        logprob  = log p_y,   entropy = -sum_v p_v log p_v,   p = softmax(logits / tau)

    Computed in chunks of rows (~32 MB of float32 each) by one autograd function that keeps only
    the logits for backward and recomputes the softmax there, instead of autograd saving the
    scaled logits, their softmax and its product with the logits, each as large as the logits
    (tokens x 49k vocabulary for SmolLM2), and the same again for their gradients.

    Args:
        logits: (..., V); targets: (...) token ids.
    Returns:
        logprob (...) float32; entropy (...) float32, or None unless return_entropy.
    """
    V = logits.shape[-1]
    chunk = max(1, 2**23 // V)  # rows per chunk: 8M float32 values
    logprob, entropy = ChunkedTokenLogprobs.apply(
        logits.reshape(-1, V), targets.reshape(-1), temperature, chunk
    )
    return logprob.view(targets.shape), entropy.view(targets.shape) if return_entropy else None


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    prompt_len: int,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    response_mask: Tensor | None = None,
    prompt_groups: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs (and entropies) of the response block under `model`, in ONE forward pass.

        logits_t   = model(input_ids)[:, P - 1 + t] / temperature       t = 0 .. T-1
        logprob_t  = logits_t[y_t] - logsumexp(logits_t)
        entropy_t  = logsumexp(logits_t) - sum_v softmax(logits_t)_v * logits_t[v]

    Padded (no `response_mask`): the (N, P+T) batch runs as it is; only the T response positions
    go through the LM head (`logits_to_keep`). Position ids follow the attention mask (as
    `generate` does), so left padding does not change a row's values. Positions after EOS are
    computed like any other; the caller masks them.

    Packed (`response_mask` given, the training passes; attention in PACKED_ATTENTION, otherwise the
    padded pass runs): the batch runs as one row without padding (`pack_responses`): each
    distinct prompt once (rows with equal `prompt_groups` ids share it, e.g. a GRPO group; None =
    every row its own prompt), followed by the responses through their last masked-in token, each
    attending only to its prompt and its own earlier tokens (a 4D mask). Causal attention makes
    every token's value equal the padded pass's (to float rounding); the forward runs prompt tokens
    once per group instead of once per row (the shared-prefix forward of Prefix Grouper, Liu et al.
    2025, arXiv:2506.05433) and no padding at all (what verl's remove-padding and TRL's
    padding_free do), and only response tokens reach the LM head.
    Gradients flow through the shared prompt. Positions outside response_mask get 0.

    Args:
        input_ids, attention_mask: (N, P+T), as in RolloutBatch.
        prompt_len: P.
        response_mask: (N, T) response tokens through EOS, or None for the padded pass.
        prompt_groups: (N,) prompt ids (RolloutBatch.group_index), packed pass only.

    Returns:
        logprob: (N, T) float32; entropy: (N, T) float32, or None unless return_entropy.
    """
    N, T = input_ids.shape[0], input_ids.shape[1] - prompt_len
    assert prompt_len >= 1 and T >= 1, f"{prompt_len=} and response width {T=} must both be >= 1"
    keep_some = takes_logits_to_keep(model)
    if response_mask is not None and attention_implementation(model) in PACKED_ATTENTION:
        groups = prompt_groups if prompt_groups is not None else torch.arange(N, device=input_ids.device)
        packed = pack_responses(input_ids, attention_mask, prompt_len, response_mask, groups)
        logits = model(
            input_ids=packed.input_ids,
            attention_mask=packed_attention_mask(
                model, packed.attention_mask, next(model.parameters()).dtype
            ),
            position_ids=packed.position_ids,
            use_cache=False,
            **({"logits_to_keep": packed.source} if keep_some else {}),
        ).logits[0]  # (K, V): the logits that predict each response token
        if not keep_some:
            logits = logits[packed.source]
        logprob, entropy = token_logprobs(logits, packed.target, temperature, return_entropy)  # (K,)
        return packed.unpack(logprob, N, T), packed.unpack(entropy, N, T) if return_entropy else None
    position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (N, P+T)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        **({"logits_to_keep": T + 1} if keep_some else {}),  # logits of columns P-1 .. P+T-1
    ).logits[:, -(T + 1) : -1]  # (N, T, V): column P-1+t predicts P+t
    return token_logprobs(logits, input_ids[:, prompt_len:], temperature, return_entropy)


class PromptTooLongError(ValueError):
    """A prompt over the length limit: "prompt <index> <detail>"; `index` is its position in the
    list checked, `detail` says its length and the limit (for a message that names it otherwise)."""

    def __init__(self, index: int, detail: str) -> None:
        super().__init__(f"prompt {index} {detail}")
        self.index, self.detail = index, detail


class HFRollout:
    """Samples G responses per prompt from a Hugging Face causal LM in one batched decode loop
    (`prefill` + `decode`: the sampling distribution of `generate`, without its padding work).

    Args:
        model, tokenizer: from `common.models.load_policy` (left padding, pad token set).
        group_size: G, responses per prompt.
        max_new_tokens: response budget in tokens, EOS included.
        temperature, top_p, top_k: sampling; top_p = 1.0 and top_k = 0 switch those filters off.
        system_prompt: system message; None keeps the chat template's default.
        max_prompt_len: longest prompt in tokens after the chat template; None = context - max_new_tokens.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        group_size: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        system_prompt: str | None = None,
        max_prompt_len: int | None = None,
    ):
        if group_size < 1 or max_new_tokens < 1:
            raise ValueError(f"group_size ({group_size}) and max_new_tokens ({max_new_tokens}) must be >= 1")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling (got {temperature}); use do_sample=False")
        if tokenizer.padding_side != "left":
            raise ValueError("the tokenizer must pad on the left (load it with common.models.load_policy)")
        self.model = model
        self.tokenizer = tokenizer
        self.group_size = group_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.system_prompt = system_prompt
        self.max_prompt_len = max_prompt_len
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        )
        self.last_batch: RolloutBatch | None = None

    def format_prompts(self, prompts: list[str]) -> list[str]:
        """Chat-template each user prompt, ending with the assistant header (add_generation_prompt)."""
        if getattr(self.tokenizer, "chat_template", None) is None:  # base model: plain text
            return [f"{self.system_prompt}\n\n{p}" if self.system_prompt else p for p in prompts]
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [
            self.tokenizer.apply_chat_template(
                system + [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]

    def check_prompts(self, prompts: list[str]) -> None:
        """Raise PromptTooLongError (a ValueError) for the first prompt that would not fit (checked
        once at start-up); its `index` is the prompt's position in `prompts`."""
        enc = self.tokenizer(self.format_prompts(prompts), add_special_tokens=False)
        self._check_prompt_lengths([len(ids) for ids in enc["input_ids"]], self.max_new_tokens)

    def _check_prompt_lengths(self, prompt_lengths: list[int], max_new_tokens: int) -> None:
        context = getattr(self.model.config, "max_position_embeddings", None)
        limits = []
        if self.max_prompt_len is not None:
            limits.append((self.max_prompt_len, f"max_prompt_len {self.max_prompt_len}"))
        if context is not None:
            limits.append((context - max_new_tokens, f"context {context} - max_new_tokens {max_new_tokens}"))
        for i, length in enumerate(prompt_lengths):
            for limit, what in limits:
                if length > limit:
                    raise PromptTooLongError(
                        i, f"is {length} tokens long, over the limit of {limit} ({what})"
                    )

    def sample(
        self,
        prompts: list[str],
        group_size: int | None = None,
        *,
        do_sample: bool = True,
        max_new_tokens: int | None = None,
    ) -> RolloutBatch:
        """G responses for each prompt, all n_prompts * G rows in ONE batched decode: each distinct
        prompt runs once (`prefill`), then one loop samples every row's tokens (`decode`).

        do_sample=False decodes greedily (evaluation); then the G rows of a group are identical.
        The model is put in eval mode for generation and restored to its previous mode after.
        """
        G = group_size or self.group_size
        max_new_tokens = max_new_tokens or self.max_new_tokens
        n_prompts = len(prompts)
        assert n_prompts > 0, "sample needs at least one prompt"
        device = next(self.model.parameters()).device

        enc = self.encode_prompts(prompts, max_new_tokens)
        input_ids = enc["input_ids"].repeat_interleave(G, dim=0).to(device)  # (n_prompts, P) -> (N, P)
        attention_mask = enc["attention_mask"].repeat_interleave(G, dim=0).to(device)  # (N, P)
        P = input_ids.shape[1]

        sampler = TokenSampler(do_sample, self.temperature, self.top_k, self.top_p)
        model = unwrap(self.model)
        with eval_mode(self.model), torch.inference_mode(), prepacked_linears(model, len(input_ids)):
            rows = torch.arange(n_prompts, device=device).repeat_interleave(G)  # [0]*G + [1]*G + ...
            cache, logits, cache_mask = prefill(
                model, enc["input_ids"].to(device), enc["attention_mask"].to(device), rows, P + max_new_tokens
            )
            response_ids = decode(
                model,
                cache,
                logits,
                cache_mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id,
                sampler=sampler,
            )  # (N, T), T <= max_new_tokens: the longest response
        # Leave inference mode: inference tensors cannot be saved for backward by the loss pass.
        response_ids = response_ids.clone()

        return self.assemble(prompts, G, input_ids, attention_mask, response_ids)

    def encode_prompts(self, prompts: list[str], max_new_tokens: int) -> dict[str, Tensor]:
        """Chat-templated prompts tokenised once each, left-padded to (n_prompts, P); raises
        ValueError for a prompt that does not fit. The template already holds the special tokens."""
        enc = self.tokenizer(
            self.format_prompts(prompts), return_tensors="pt", padding=True, add_special_tokens=False
        )
        self._check_prompt_lengths(enc["attention_mask"].sum(dim=1).tolist(), max_new_tokens)
        return enc

    def assemble(
        self,
        prompts: list[str],
        group_size: int,
        input_ids: Tensor,
        attention_mask: Tensor,
        response_ids: Tensor,
    ) -> RolloutBatch:
        """The RolloutBatch of generated responses: prompt block (N, P) and its mask as sampled,
        response ids (N, T) masked through each row's first EOS and padded after it, decoded text."""
        response_mask, lengths, truncated = response_mask_from_ids(response_ids, self.eos_token_id)
        response_ids = response_ids.masked_fill(response_mask == 0, self.pad_token_id)
        texts = self.tokenizer.batch_decode(
            [row[:n].tolist() for row, n in zip(response_ids, lengths.tolist(), strict=True)],
            skip_special_tokens=True,
        )
        return RolloutBatch(
            input_ids=torch.cat([input_ids, response_ids], dim=1),  # (N, P + T)
            attention_mask=torch.cat([attention_mask, response_mask.long()], dim=1),
            response_mask=response_mask,
            prompt_len=input_ids.shape[1],
            prompts_expanded=[p for p in prompts for _ in range(group_size)],
            responses=texts,
            lengths=lengths,
            truncated=truncated,
            group_index=torch.arange(len(prompts), device=input_ids.device).repeat_interleave(group_size),
            pad_token_id=self.pad_token_id,
        )

    # whether `sync_weights` has work to do after an update (an engine with its own copy of the weights)
    syncs_weights = False

    def sync_weights(self, model: torch.nn.Module) -> None:
        """After an update: nothing to do, this engine samples from the policy module itself."""

    def generate_responses(self, prompts: list[str]) -> tuple[list[str], Tensor, list[str]]:
        """Sample G responses per prompt and score them (the seed's contract).

        Returns:
            responses: (N,) decoded texts, N = len(prompts) * G.
            log_probs: (N, T) float32 log-probs at the sampling temperature, 0 where response_mask is 0.
            prompts_expanded: (N,) [q1]*G + [q2]*G + ...; reward response i against prompts_expanded[i].
        The full batch (ids, masks, lengths) is kept in `self.last_batch`.
        """
        batch = self.sample(prompts)
        with eval_mode(self.model), torch.no_grad():
            logprob, _ = sequence_logprobs(
                self.model,
                batch.input_ids,
                batch.attention_mask,
                batch.prompt_len,
                temperature=self.temperature,
            )
        self.last_batch = batch
        return batch.responses, logprob * batch.response_mask, batch.prompts_expanded
