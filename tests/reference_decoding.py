"""A plain reference decoder, the oracle that the decode engine (loopedlm.infer.engine) is
checked against where the full forward cannot be one (adaptive loops change the cache).

It runs the model's per-loop API (`prepare`, `loop`, `logits`) over the simplest cache there
is: per (loop, layer), the keys and values of every token so far, grown by concatenation;
masks and RoPE are written out here, not taken from the engine. Rows hold the same number
of tokens (no padding). A helper module, not a test file.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from loopedlm.infer.engine import AdaptiveLoops
from loopedlm.model.attention import AttentionPlan
from loopedlm.model.gpt import LoopedGPT


class ReferenceCache:
    """Keys and values per (loop, layer), each (B, H, T, D), and the tokens held (T)."""

    def __init__(self) -> None:
        self.k: dict[tuple[int, int], torch.Tensor] = {}
        self.v: dict[tuple[int, int], torch.Tensor] = {}
        self.length = 0


class _Writes:
    """A CacheWriter for one pass: rows `rows` append their new keys after the cached ones.
    The pass's new keys are kept apart until `commit` (adaptive rows that stopped early
    have their skipped loops filled first)."""

    def __init__(self, cache: ReferenceCache, batch: int):
        self.cache, self.batch, self.rows = cache, batch, torch.arange(batch)
        self.new_k: dict[tuple[int, int], torch.Tensor] = {}
        self.new_v: dict[tuple[int, int], torch.Tensor] = {}

    def insert(self, loop: int, layer: int, k: torch.Tensor, v: torch.Tensor):
        key = (loop, layer)
        if key not in self.new_k:
            shape = (self.batch, *k.shape[1:])
            self.new_k[key], self.new_v[key] = k.new_zeros(shape), v.new_zeros(shape)
        self.new_k[key][self.rows] = k
        self.new_v[key][self.rows] = v
        if key not in self.cache.k:
            return k, v
        return (torch.cat([self.cache.k[key][self.rows], k], 2),
                torch.cat([self.cache.v[key][self.rows], v], 2))

    def fill(self, last_loop: int, rows: torch.Tensor, n_loops: int, depth: int) -> None:
        """Rows that stopped after `last_loop` get its keys in every later loop."""
        for loop in range(last_loop + 1, n_loops):
            for layer in range(depth):
                for new in (self.new_k, self.new_v):
                    if (loop, layer) not in new:
                        new[(loop, layer)] = torch.zeros_like(new[(last_loop, layer)])
                    new[(loop, layer)][rows] = new[(last_loop, layer)][rows]

    def commit(self, n_new: int) -> None:
        for key in self.new_k:
            for store, new in ((self.cache.k, self.new_k), (self.cache.v, self.new_v)):
                store[key] = new[key] if key not in store else torch.cat([store[key], new[key]], 2)
        self.cache.length += n_new


def _plan(model: LoopedGPT, start: int, end: int, writes: _Writes) -> AttentionPlan:
    """Queries at positions start .. end-1 over keys 0 .. end-1: causal, and sliding windows."""
    q = torch.arange(start, end)[:, None]
    k = torch.arange(end)[None, :]
    masks = {}
    for window in set(model.config.window_sizes()):
        mask = k <= q
        if window is not None:
            mask = mask & (q - k < window)
        masks[window] = (mask, False)
    # the rotation tables at full head width: (cos, cos) and (sin, -sin)
    cos = model.cos[start:end][None, :, None, :]
    sin = model.sin[start:end][None, :, None, :]
    return AttentionPlan(torch.cat([cos, cos], -1), torch.cat([sin, -sin], -1), masks, writes)


@torch.no_grad()
def prefill(model: LoopedGPT, idx: torch.Tensor, cache: ReferenceCache, n_loops: int
            ) -> torch.Tensor:
    """Append `idx` (B, T) to `cache` in one pass at `n_loops`; their logits (B, T, V)."""
    start, end = cache.length, cache.length + idx.size(1)
    writes = _Writes(cache, idx.size(0))
    inputs = model.prepare(idx, plan=_plan(model, start, end, writes))
    previous = None
    for loop in range(n_loops):
        previous = model.loop_state(model.loop(inputs, previous, loop))
    logits = model.logits(previous, inputs.plan)  # (a coda's keys are written here)
    writes.commit(idx.size(1))
    return logits


@torch.no_grad()
def decode_step(model: LoopedGPT, tokens: torch.Tensor, cache: ReferenceCache, n_loops: int,
                adaptive: AdaptiveLoops | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Append one token per row (`tokens` (B,)); the next-token logits (B, V) and the loops
    spent per row (B,). With `adaptive`, a row stops after the first loop t >= min_loops
    whose state converged (or, criterion "gate", whose cumulative exit probability
    reached the threshold; "kl_previous", KL(p_{t-1} || p_t)); it leaves the batch, and its
    skipped loops' keys are copies of its last computed loop's."""
    batch, depth = tokens.size(0), model.config.depth
    if adaptive is not None:  # the criterion and min_loops the model takes by default
        adaptive = adaptive.resolved(model.exit_gate is not None)
    cdf, remaining = torch.zeros(batch), torch.ones(batch)
    writes = _Writes(cache, batch)
    plan = _plan(model, cache.length, cache.length + 1, writes)
    all_inputs = model.prepare(tokens[:, None], plan=plan)
    inputs = all_inputs
    final = torch.empty_like(all_inputs.embedded)
    spent = torch.zeros(batch, dtype=torch.long)
    active = torch.arange(batch)
    previous = previous_logp = None
    for loop in range(n_loops):
        h = model.loop_state(model.loop(inputs, previous, loop))
        spent[active] += 1
        if loop == n_loops - 1:
            final[active] = h
            break
        criterion = None if adaptive is None else adaptive.criterion
        kl, gate = criterion in ("kl", "kl_previous"), criterion == "gate"
        logp = F.log_softmax(model.logits(h, inputs.plan)[:, -1], dim=-1) if kl else None
        if gate:  # p_t = lambda_t * (what is left), summed
            lam = model.exit_probability(h[:, -1])
            cdf = cdf + lam * remaining
            remaining = remaining * (1 - lam)
        if adaptive is None or loop + 1 < adaptive.min_loops:
            previous, previous_logp = h, logp
            continue
        if gate:
            converged = cdf >= adaptive.threshold
        elif not kl:
            change = (h - previous).float().norm(dim=-1) / h.float().norm(dim=-1)
            converged = change[:, -1] < adaptive.threshold
        elif criterion == "kl":
            converged = (logp.exp() * (logp - previous_logp)).sum(-1) < adaptive.threshold
        else:  # Huginn's: KL(p_{t-1} || p_t), p_0 uniform
            before = torch.full_like(logp, -math.log(logp.size(-1))) if previous_logp is None \
                else previous_logp
            converged = (before.exp() * (before - logp)).sum(-1) < adaptive.threshold
        if converged.any():
            done = active[converged]
            final[done] = h[converged]
            writes.fill(loop, done, n_loops, depth)
            active, h = active[~converged], h[~converged]
            cdf, remaining = cdf[~converged], remaining[~converged]
            logp = None if logp is None else logp[~converged]
            if active.numel() == 0:
                break
            writes.rows = active
            inputs = all_inputs.select_rows(active, plan)
        previous, previous_logp = h, logp
    writes.rows = torch.arange(batch)
    logits = model.logits(final, all_inputs.plan)[:, -1]
    writes.commit(1)
    return logits, spent
