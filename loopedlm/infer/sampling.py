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


def uniform_noise(seed: torch.Tensor, counter: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, vocab) floats in (0, 1), a pure function of (seed[b], counter[b], token id)."""
    row = _mix32((seed & _MASK32) ^ _mix32((seed >> 32) & _MASK32))
    row = _mix32((row + counter) & _MASK32)
    ids = torch.arange(vocab, device=seed.device)
    bits = _mix32((row[:, None] + _mix32(ids)[None, :]) & _MASK32)
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor, seed: torch.Tensor, counter: torch.Tensor, *,
                filtered: bool = True) -> torch.Tensor:
    """One token per row of logits (B, V), every setting a (B,) tensor: temperature (0 =
    greedy), top_k (V = off), top_p (1 = off), seed and counter (the row's token index).

    `filtered=False` skips the top-k/top-p sort when no row uses them (a static choice, so
    one captured step serves one value of it)."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    scaled = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]
    if filtered:
        vocab = scaled.size(-1)
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        kth = sorted_logits.gather(1, (top_k.clamp(1, vocab) - 1)[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the tokens before it reach top_p (the first always stays)
        drop = (probs.cumsum(dim=-1) - probs >= top_p[:, None]) & (top_p < 1.0)[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)
    gumbel = -torch.log(-torch.log(uniform_noise(seed, counter, scaled.size(-1))))
    sampled = (scaled + gumbel).argmax(dim=-1)
    return torch.where(temperature > 0, sampled, greedy)


__all__ = ["SamplingParams", "sample_rows", "uniform_noise"]
