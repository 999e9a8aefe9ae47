"""The training log-prob pass: per-token log-probs (and entropies) of responses under a model, in one
forward pass over a micro-batch, as the reference, old-policy and update passes run it.

Two speed tricks, each with a switch (trainer.packed_forward and trainer.chunked_logprobs):
  - packing (`pack_responses`): each distinct prompt once, every response through EOS, no padding,
    a 4D mask per token. It needs the attention kernel to take a custom mask and every layer to
    attend to all earlier tokens; otherwise (flash attention, sliding-window or chunked layers, or
    the private config attribute gone) the padded pass runs, with one warning (common.fences);
  - chunked log-probs (`ChunkedTokenLogprobs`): log-prob and entropy in chunks of rows, saving only
    the logits for backward. Public torch API only; off = autograd through log_softmax.

The log-prob of response token t comes from the logits at column P - 1 + t (next-token
prediction), divided by the sampling temperature, so that `old_logprob` is the log-prob of the
distribution the tokens were drawn from (top-k / top-p truncation aside).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from common.fences import attention_implementation, full_attention_only, takes_logits_to_keep, warn_once


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


def packing_unsupported(model: torch.nn.Module) -> str | None:
    """Why the packed pass cannot run `model` exactly, or None when it can: its dense 4D mask needs an
    attention kernel that takes one (PACKED_ATTENTION; read from the private
    config._attn_implementation) and layers that all attend to every earlier token (a sliding window
    or attention chunks would be ignored once a sequence is longer than them)."""
    kernel = attention_implementation(model)
    if kernel not in PACKED_ATTENTION:
        return f"attention implementation {kernel!r} takes no custom 4D mask (sdpa and eager do)"
    if not full_attention_only(model):
        return "the model has sliding-window or chunked attention layers, which a dense 4D mask would ignore"
    return None


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
    logits: Tensor, targets: Tensor, temperature: float, return_entropy: bool, chunked: bool = True
) -> tuple[Tensor, Tensor | None]:
    """log softmax(logits / tau)[target] and the entropy of softmax(logits / tau), over the last dim:

        logprob  = log p_y,   entropy = -sum_v p_v log p_v,   p = softmax(logits / tau)

    `chunked` (trainer.chunked_logprobs): in chunks of rows (~32 MB of float32 each) by one autograd
    function that keeps only the logits for backward and recomputes the softmax there, instead of
    autograd saving the scaled logits, their softmax and its product with the logits, each as large
    as the logits (tokens x 49k vocabulary for SmolLM2), and the same again for their gradients.
    Otherwise plain autograd through log_softmax (the same values and gradients, more memory).

    Args:
        logits: (..., V); targets: (...) token ids.
    Returns:
        logprob (...) float32; entropy (...) float32, or None unless return_entropy.
    """
    V = logits.shape[-1]
    flat_logits, flat_targets = logits.reshape(-1, V), targets.reshape(-1)  # (K, V), (K,)
    if chunked:
        chunk = max(1, 2**23 // V)  # rows per chunk: 8M float32 values
        logprob, entropy = ChunkedTokenLogprobs.apply(flat_logits, flat_targets, temperature, chunk)
    else:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        lsm = torch.log_softmax(flat_logits.to(dtype) / temperature, dim=-1)  # (K, V)
        logprob = lsm.gather(-1, flat_targets[:, None]).squeeze(-1)
        entropy = -(lsm.exp() * lsm).sum(dim=-1) if return_entropy else None
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
    packed: bool = True,
    chunked: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs (and entropies) of the response block under `model`, in ONE forward pass.

        logits_t   = model(input_ids)[:, P - 1 + t] / temperature       t = 0 .. T-1
        logprob_t  = logits_t[y_t] - logsumexp(logits_t)
        entropy_t  = logsumexp(logits_t) - sum_v softmax(logits_t)_v * logits_t[v]

    Padded (no `response_mask`, or `packed` off): the (N, P+T) batch runs as it is; only the T
    response positions go through the LM head (`logits_to_keep`). Position ids follow the attention
    mask (as `generate` does), so left padding does not change a row's values. Positions after EOS
    are computed like any other; the caller masks them.

    Packed (`response_mask` given and `packed`, the training passes; the padded pass runs instead,
    with one warning, for a model `packing_unsupported` names): the batch runs as one row without
    padding (`pack_responses`): each distinct prompt once (rows with equal `prompt_groups` ids share
    it, e.g. a GRPO group; None = every row its own prompt), followed by the responses through their
    last masked-in token, each attending only to its prompt and its own earlier tokens (a 4D mask).
    Causal attention makes every token's value equal the padded pass's (to float rounding); the
    forward runs prompt tokens once per group instead of once per row (the shared-prefix forward of
    Prefix Grouper, Liu et al. 2025, arXiv:2506.05433) and no padding at all (what verl's
    remove-padding and TRL's padding_free do), and only response tokens reach the LM head.
    Gradients flow through the shared prompt. Positions outside response_mask get 0.

    Args:
        input_ids, attention_mask: (N, P+T), as in RolloutBatch.
        prompt_len: P.
        response_mask: (N, T) response tokens through EOS, or None for the padded pass.
        prompt_groups: (N,) prompt ids (RolloutBatch.group_index), packed pass only.
        packed, chunked: the switches trainer.packed_forward and trainer.chunked_logprobs.

    Returns:
        logprob: (N, T) float32; entropy: (N, T) float32, or None unless return_entropy.
    """
    N, T = input_ids.shape[0], input_ids.shape[1] - prompt_len
    assert prompt_len >= 1 and T >= 1, f"{prompt_len=} and response width {T=} must both be >= 1"
    if response_mask is not None and packed:
        if (reason := packing_unsupported(model)) is None:
            groups = prompt_groups if prompt_groups is not None else torch.arange(N, device=input_ids.device)
            pack = pack_responses(input_ids, attention_mask, prompt_len, response_mask, groups)
            logits = packed_logits(model, pack)  # (K, V)
            logprob, entropy = token_logprobs(logits, pack.target, temperature, return_entropy, chunked)
            return pack.unpack(logprob, N, T), pack.unpack(entropy, N, T) if return_entropy else None
        warn_once(f"trainer.packed_forward: {reason}; the training passes run padded")
    keep_some = takes_logits_to_keep(model)
    position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (N, P+T)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        **({"logits_to_keep": T + 1} if keep_some else {}),  # logits of columns P-1 .. P+T-1
    ).logits[:, -(T + 1) : -1]  # (N, T, V): column P-1+t predicts P+t
    return token_logprobs(logits, input_ids[:, prompt_len:], temperature, return_entropy, chunked)


def packed_logits(model: torch.nn.Module, pack: PackedResponses) -> Tensor:
    """The logits (K, V) that predict each response token of the packed row, in one forward."""
    keep_some = takes_logits_to_keep(model)
    logits = model(
        input_ids=pack.input_ids,
        attention_mask=packed_attention_mask(model, pack.attention_mask, next(model.parameters()).dtype),
        position_ids=pack.position_ids,
        use_cache=False,
        **({"logits_to_keep": pack.source} if keep_some else {}),
    ).logits[0]  # (K, V), or (L, V) without logits_to_keep
    return logits if keep_some else logits[pack.source]
