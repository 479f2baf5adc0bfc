"""Sampling on the device, per row, with no host sync: greedy, temperature, top-k, top-p
and seeds, each a per-row tensor so rows with different settings share one step.

Randomness is counter-based: row r's draw for its c-th token is a hash of (seed_r, c,
token id), turned into Gumbel noise, and the token is argmax(logits / T + noise) (the
Gumbel-max trick: exactly a draw from softmax(logits / T)). So a seeded row gives the same
tokens whatever else is in the batch and whichever slot it sits in, and a step needs no
generator state (a CUDA graph replays it as is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loopedlm.common.validation import is_int, is_number

_MASK32 = 0xFFFFFFFF
FLOAT32_MAX = float(torch.finfo(torch.float32).max)



@dataclass(frozen=True)
class SamplingParams:
    """How one row samples. temperature 0 = greedy; top_k None = all tokens; top_p in
    (0, 1] (1 = no nucleus cut); seed None = a fresh random seed."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        # stored per row as float32: a larger value would overflow it (issue 22, D1)
        if not is_number(t) or not math.isfinite(t) or not 0 <= t <= FLOAT32_MAX:
            raise ValueError(f"temperature={t!r} is not allowed: a number in [0, {FLOAT32_MAX:.4g}] "
                             f"(0 = greedy)")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k={self.top_k!r} is not allowed: an integer >= 1 (or None)")
        p = self.top_p
        if not is_number(p) or not 0 < p <= 1:
            raise ValueError(f"top_p={p!r} is not allowed: a number in (0, 1]")
        if self.seed is not None and (not is_int(self.seed)
                                      or not -(2**63) <= self.seed < 2**63):
            raise ValueError(f"seed={self.seed!r} is not allowed: a 64-bit integer (or None)")


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values in
    [0, 2^32); the multipliers are < 2^31, so no product overflows int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x68E31DA5) & _MASK32
    return x ^ (x >> 16)


# independent random streams of one row (`uniform_noise(stream=)`): speculative decoding
# draws its drafts, its acceptance tests and its corrections from three more
DRAFT, ACCEPT, CORRECT = 1, 2, 3


def uniform_noise(seed: torch.Tensor, counter: torch.Tensor, vocab: int, stream: int = 0
                  ) -> torch.Tensor:
    """(B, vocab) floats in (0, 1), a pure function of (seed[b], counter[b], token id) and
    `stream` (0: the token draws of plain sampling)."""
    row = _mix32((seed & _MASK32) ^ _mix32((seed >> 32) & _MASK32))
    if stream:
        row = _mix32(row ^ _mix32(torch.full_like(row, stream)))
    row = _mix32((row + counter) & _MASK32)
    ids = torch.arange(vocab, device=seed.device)
    bits = _mix32((row[:, None] + _mix32(ids)[None, :]) & _MASK32)
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))


def filtered_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                    top_p: torch.Tensor, *, filtered: bool = True) -> torch.Tensor:
    """Logits (B, V) / temperature (1 where it is 0) with the tokens outside each row's top-k
    and top-p nucleus at -inf: what a row samples from, softmax(result). `filtered=False`
    skips the sort when no row uses top-k or top-p."""
    logits = logits.float()
    scaled = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]
    if not filtered:
        return scaled
    vocab = scaled.size(-1)
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    kth = sorted_logits.gather(1, (top_k.clamp(1, vocab) - 1)[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # drop a token once the tokens before it reach top_p (the first always stays)
    drop = (probs.cumsum(dim=-1) - probs >= top_p[:, None]) & (top_p < 1.0)[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)


def gumbel_argmax(log_weights: torch.Tensor, seed: torch.Tensor, counter: torch.Tensor,
                  stream: int = 0) -> torch.Tensor:
    """One draw per row from softmax(log_weights) (B, V): argmax(log_weights + Gumbel noise),
    the noise `uniform_noise(seed, counter, V, stream)`."""
    gumbel = -torch.log(-torch.log(uniform_noise(seed, counter, log_weights.size(-1), stream)))
    return (log_weights + gumbel).argmax(dim=-1)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor, seed: torch.Tensor, counter: torch.Tensor, *,
                filtered: bool = True, stream: int = 0) -> torch.Tensor:
    """One token per row of logits (B, V), every setting a (B,) tensor: temperature (0 =
    greedy), top_k (V = off), top_p (1 = off), seed and counter (the row's token index).

    `filtered=False` skips the top-k/top-p sort when no row uses them (a static choice, so
    one captured step serves one value of it)."""
    greedy = logits.argmax(dim=-1)
    scaled = filtered_logits(logits, temperature, top_k, top_p, filtered=filtered)
    return torch.where(temperature > 0, gumbel_argmax(scaled, seed, counter, stream), greedy)


def row_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
              top_p: torch.Tensor, *, filtered: bool = True) -> torch.Tensor:
    """The distribution (B, V) each row samples from (`sample_rows`): softmax of the
    filtered logits, or one-hot at the argmax where temperature is 0."""
    probs = filtered_logits(logits, temperature, top_k, top_p, filtered=filtered).softmax(-1)
    one_hot = F.one_hot(logits.argmax(-1), logits.size(-1)).to(probs.dtype)
    return torch.where((temperature > 0)[:, None], probs, one_hot)


def speculative_accept(draft_probs: torch.Tensor, drafts: torch.Tensor,
                       target_probs: torch.Tensor, seed: torch.Tensor, counter: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): which drafted tokens
    the target model keeps, and the token it adds; the tokens out are distributed exactly as
    the target model's own samples.

    drafts (B, G): the drafted tokens, draft i drawn from draft_probs[:, i] (B, G, V);
    target_probs (B, G + 1, V): the target's distributions at the same positions and one
    after. Draft i is kept with probability min(1, p(d) / q(d)) while every draft before it
    was; at the first rejection the row draws from max(0, p - q) (renormalised), and when
    all are kept from the target's last distribution. Returns (tokens (B, G + 1), emitted
    (B,)): row b emits tokens[b, :emitted[b]]. Token i of a row uses the counter
    counter[b] + i of the ACCEPT and CORRECT streams, so a seeded row gives the same tokens
    in any batch. For greedy rows (one-hot distributions) this keeps the drafts equal to the
    target's argmax and adds the argmax at the first difference.
    """
    batch, n_drafts = drafts.shape
    picked = drafts[..., None]
    p = target_probs[:, :n_drafts].gather(2, picked)[..., 0]
    q = draft_probs.gather(2, picked)[..., 0]
    u = torch.stack([uniform_noise(seed, counter + i, 1, ACCEPT)[:, 0] for i in range(n_drafts)],
                    1)
    kept = (u * q < p).long().cumprod(1).sum(1)  # drafts kept before the first rejection
    rows = torch.arange(batch, device=drafts.device)
    q_next = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], 1)[rows, kept]
    p_next = target_probs[rows, kept]
    residual = (p_next - q_next).clamp_min(0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)
    extra = gumbel_argmax(residual.log(), seed, counter + kept, CORRECT)
    tokens = torch.cat([drafts, drafts[:, :1]], 1).scatter(1, kept[:, None], extra[:, None])
    return tokens, kept + 1


__all__ = ["SamplingParams", "sample_rows", "uniform_noise", "filtered_logits", "gumbel_argmax",
           "row_probs", "speculative_accept", "DRAFT", "ACCEPT", "CORRECT"]
