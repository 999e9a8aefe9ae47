"""Next-token sampling: the distribution `generate` samples from, drawn by a two-level inverse CDF."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import TopKLogitsWarper, TopPLogitsWarper


class NonFiniteLogitsError(RuntimeError):
    """The policy's next-token logits hold a NaN or +inf (or a row is all -inf): there is no
    distribution to sample from. Raised before drawing, where it would otherwise surface as an
    index past the vocabulary; the trainer adds the step."""


def check_finite_logits(logits: Tensor) -> None:
    """Raise NonFiniteLogitsError unless every row of logits (n, V) has a finite maximum: one
    reduction catches a NaN (max propagates it), a +inf, and a row with no finite entry; a token
    masked at -inf beside finite ones is allowed."""
    row_max = logits.amax(dim=-1)  # (n,)
    if not bool(torch.isfinite(row_max).all()):
        bad = int((~torch.isfinite(row_max)).sum())
        raise NonFiniteLogitsError(
            f"the policy's next-token logits hold a NaN or an infinity in {bad} of {len(row_max)} rows"
        )


def below(x: Tensor, top: Tensor) -> Tensor:
    """`x` clamped into [0, top): into [0, the largest float64 below top]. An inverse-CDF target in
    that range lands, under searchsorted(cdf, x, right=True), on the first entry whose cumulative
    sum rises above x: an entry of weight > 0, inside the array (cdf[-1] = top > x)."""
    return torch.minimum(x.clamp(min=0.0), torch.nextafter(top, torch.zeros_like(top)))


def sample_categorical(probs: Tensor, block: int = 512, uniform: Tensor | None = None) -> Tensor:
    """One draw per row from the categorical distribution with (unnormalised, >= 0) weights
    `probs` (n, V) -> token ids (n,), by inverse CDF in two levels.

    The vocabulary is cut into blocks of `block` tokens. A uniform u picks the block whose
    cumulative mass (float64) first exceeds u * total; u's position inside that block's mass then
    picks the token by the block's own cumulative sum. P(token i) = mass(block) / total *
    p_i / mass(block) = p_i / total: the categorical that `torch.multinomial` draws from, from one
    random number per row, without a cumulative sum (or a float64 copy) of the whole vocabulary.

    A token of weight 0 is never drawn, and the index is always inside the vocabulary: float64
    rounding can put u * total at the total, or the position inside the block (`within`) at 1.0 or
    just below 0 (about 1e-16 per draw), which past the last block's last token would pick a
    padding weight or an index past V; both targets are clamped into [0, their total) (`below`).

    Args:
        probs: (n, V) weights >= 0, each row with a positive sum.
        uniform: (n,) the uniforms in [0, 1] to draw with; None = torch.rand (tests force edges).
    """
    n, V = probs.shape
    if V % block:
        probs = torch.nn.functional.pad(probs, (0, block - V % block))  # padded weights are 0
    blocks = probs.view(n, -1, block)  # (n, K, block)
    mass = blocks.sum(dim=-1, dtype=torch.float64)  # (n, K)
    cdf = mass.cumsum(dim=-1)  # (n, K)
    if uniform is None:
        uniform = torch.rand(n, dtype=torch.float64, device=probs.device)
    total = cdf[:, -1:]  # (n, 1)
    u = below(uniform.to(torch.float64)[:, None] * total, total)  # (n, 1), in [0, total)
    k = torch.searchsorted(cdf, u, right=True)  # (n, 1): cdf[k-1] <= u < cdf[k], so mass[k] > 0
    picked = mass.gather(1, k)  # (n, 1) the chosen block's mass
    within = (u - (cdf.gather(1, k) - picked)) / picked  # (n, 1), in [0, 1) up to rounding
    inner = blocks[torch.arange(n, device=probs.device), k.squeeze(1)].cumsum(dim=-1, dtype=torch.float64)
    target = below(within * inner[:, -1:], inner[:, -1:])  # (n, 1), in [0, the block's mass)
    j = torch.searchsorted(inner, target, right=True)  # (n, 1): a token of weight > 0 in the block
    return (k * block + j).squeeze(1)


class TokenSampler:
    """Next tokens from logits (n, V) -> (n,), with their log-probs: greedy argmax, or a draw from
    the distribution that `generate` samples from: logits / temperature, then top-k, then top-p
    (transformers' own warpers, in generate's order), float32 softmax.

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

    def __call__(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens (n,) and their log-probs (n,) float32 under the distribution they were drawn from:
        log softmax of the warped scores (a top-k / top-p truncated distribution is renormalised
        over the kept tokens); 0 when greedy, which draws from a point mass. Non-finite logits
        raise NonFiniteLogitsError (`check_finite_logits`)."""
        check_finite_logits(logits)
        if not self.do_sample:
            return logits.argmax(dim=-1), logits.new_zeros(logits.shape[0], dtype=torch.float32)
        scores = logits.float() / self.temperature  # (n, V)
        for warp in self.warpers:
            scores = warp(None, scores)
        logp = torch.log_softmax(scores, dim=-1)  # (n, V), -inf where a warper removed the token
        tokens = sample_categorical(logp.exp())  # (n,)
        return tokens, logp.gather(1, tokens[:, None]).squeeze(1)
