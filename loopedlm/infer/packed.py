"""`PackedBatch`: a continuous-batching decode engine over `loopedlm.generate`'s exact KV
cache (SPEC 2: one entry per (loop, layer)).

All running sequences live in one pooled `KVCache`, one batch row each, packed at the
front (rows 0 .. n-1), so a decode step runs on a slice of the pool without copying it.
A sequence joins by a prefill of its prompt alone (the same computation as
`generate` alone), whose keys and values are copied into a free row, right-aligned at
the pool's write position; the columns before it are marked invalid (left padding),
and each row keeps its own RoPE positions. A sequence that leaves is replaced by the
last row, so the rows stay packed. When the write position reaches the end of the pool,
the last `context_len` columns are moved to the front (every row fits in them).

Rows with different loop counts share a step: every loop runs on the rows that still
need it, a row leaves the step after its own last loop (or, with an adaptive
threshold, once its state has converged, as in `generate.decode_step`), so its blocks
are never run for loops it does not use.
"""

from __future__ import annotations

import logging

import torch

from loopedlm.attention import KVCache, norm
from loopedlm.generate import sample_next
from loopedlm.infer.protocol import SequenceParams, TokenEvent
from loopedlm.model import LoopedGPT

log = logging.getLogger(__name__)


class _Row:
    """One running sequence: its slot, options, sampler and the token to feed next."""

    def __init__(self, slot: int, params: SequenceParams, device: torch.device):
        self.slot, self.params = slot, params
        self.generator = torch.Generator(device=device)
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)
        self.next_token = 0
        self.length = 0  # tokens in the cache


class PackedBatch:
    """A `SlotEngine` (loopedlm.infer.protocol) for one `LoopedGPT`.

    capacity: most sequences at once. max_loops: the largest n_loops a sequence may ask
    for (the pool holds that many cache entries per layer).
    """

    def __init__(self, model: LoopedGPT, *, capacity: int, max_loops: int):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity={capacity!r} is not allowed: an integer >= 1")
        if isinstance(max_loops, bool) or not isinstance(max_loops, int) or max_loops < 1:
            raise ValueError(f"max_loops={max_loops!r} is not allowed: an integer >= 1")
        self.model = model
        self.max_loops = max_loops
        self._capacity = capacity
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self._context = model.config.sequence_len
        # twice the context: the write position moves one column per step, and the pool
        # is compacted once every `context_len` steps
        self.pool = KVCache.for_model(model.config, capacity, n_loops=max_loops,
                                      max_len=2 * self._context, dtype=self.dtype,
                                      device=self.device)
        self.pool.pos = self._context
        log.info("decode engine: %d slots, up to %d loops, %.1f MiB of KV cache", capacity,
                 max_loops, self.pool.nbytes() / 2**20)
        self.rows: list[_Row] = []  # row i of the pool holds self.rows[i]

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def context_len(self) -> int:
        return self._context

    @property
    def size(self) -> int:
        """Sequences running now."""
        return len(self.rows)

    def _row_of(self, slot: int) -> int:
        for i, row in enumerate(self.rows):
            if row.slot == slot:
                return i
        raise KeyError(f"slot {slot} holds no sequence")

    # ---- the protocol -------------------------------------------------------------------
    @torch.no_grad()
    def add(self, slot: int, prompt: list[int], params: SequenceParams) -> TokenEvent:
        if len(self.rows) >= self._capacity:
            raise RuntimeError(f"all {self._capacity} slots are in use")
        if any(row.slot == slot for row in self.rows):
            raise ValueError(f"slot {slot} already holds a sequence")
        if not 1 <= params.n_loops <= self.max_loops:
            raise ValueError(f"n_loops={params.n_loops} is not allowed: 1 .. {self.max_loops}")
        if not 1 <= len(prompt) <= self._context:
            raise ValueError(f"a prompt of {len(prompt)} tokens does not fit: 1 .. "
                             f"{self._context} tokens")
        n_loops, length = params.n_loops, len(prompt)
        # the prefill alone, exactly as generate() runs it for one prompt
        alone = KVCache.for_model(self.model.config, 1, n_loops=n_loops, max_len=length,
                                  dtype=self.dtype, device=self.device)
        idx = torch.tensor([prompt], dtype=torch.long, device=self.device)
        logits = self.model(idx, n_loops=n_loops, kv_cache=alone)[:, -1]
        if self.pool.pos + 1 > self.pool.max_len:
            self._compact()
        r, pool, end = len(self.rows), self.pool, self.pool.pos
        pool.k[:n_loops, :, r, :, end - length:end] = alone.k[:, :, 0]
        pool.v[:n_loops, :, r, :, end - length:end] = alone.v[:, :, 0]
        pool.valid[r] = False
        pool.valid[r, end - length:end] = True
        pool.key_pos[r, end - length:end] = alone.key_pos[0]
        pool.n_real[r] = length
        row = _Row(slot, params, self.device)
        row.length = length
        self.rows.append(row)
        token = self._sample(logits, [row])[0]
        return TokenEvent(slot, token, n_loops)

    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        n = len(self.rows)
        if n == 0:
            return []
        if self.pool.pos + 1 > self.pool.max_len:
            self._compact()
        if max(row.length for row in self.rows) >= self._context:
            raise RuntimeError(f"a sequence has reached the context ({self._context} tokens); "
                               f"release it first")
        tokens = torch.tensor([[row.next_token] for row in self.rows], dtype=torch.long,
                              device=self.device)
        view = self._view(n)
        logits, spent = self._decode(tokens, view)
        self.pool.pos += 1
        for row in self.rows:
            row.length += 1
        sampled = self._sample(logits, self.rows)
        return [TokenEvent(row.slot, tok, loops)
                for row, tok, loops in zip(self.rows, sampled, spent.tolist(), strict=True)]

    def release(self, slot: int) -> None:
        r, last = self._row_of(slot), len(self.rows) - 1
        if r != last:  # keep the rows packed: the last row moves into the hole
            pool = self.pool
            for t in (pool.k, pool.v):
                t[:, :, r] = t[:, :, last]
            for t in (pool.valid, pool.key_pos, pool.n_real):
                t[r] = t[last]
            self.rows[r] = self.rows[last]
        self.rows.pop()

    # ---- internals ------------------------------------------------------------------------
    def _view(self, n: int) -> KVCache:
        """The pool restricted to its first n rows and to the columns they use (from the
        longest row's first token on), sharing its storage (slices, no copy)."""
        pool, view = self.pool, KVCache.__new__(KVCache)
        start = pool.pos - max(row.length for row in self.rows[:n])
        view.loop_slots, view.n_loops = pool.loop_slots, pool.n_loops
        view.max_len = pool.max_len - start
        view.k, view.v = pool.k[:, :, :n, :, start:], pool.v[:, :, :n, :, start:]
        view.valid, view.key_pos = pool.valid[:n, start:], pool.key_pos[:n, start:]
        view.n_real, view.pos = pool.n_real[:n], pool.pos - start
        return view

    def _compact(self) -> None:
        """Move the last `context_len` columns to the front (every row fits in them)."""
        pool, width = self.pool, self._context
        start = pool.pos - width
        for t in (pool.k, pool.v):
            t[..., :width, :] = t[..., start:pool.pos, :].clone()
        pool.valid[:, :width] = pool.valid[:, start:pool.pos].clone()
        pool.key_pos[:, :width] = pool.key_pos[:, start:pool.pos].clone()
        pool.valid[:, width:] = False
        pool.pos = width

    def _decode(self, tokens: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row through each row's own loop count; logits (n, V) and the
        loops spent per row (n,), as `generate.decode_step` computes them for one row."""
        model, n = self.model, tokens.size(0)
        want = torch.tensor([row.params.n_loops for row in self.rows])
        thresholds = [row.params.adaptive_threshold for row in self.rows]
        adaptive = torch.tensor([t is not None for t in thresholds])
        threshold = torch.tensor([0.0 if t is None else t for t in thresholds])
        inputs = model.prepare(tokens, kv_cache=cache)
        final = torch.empty_like(inputs.embedded)
        spent = torch.zeros(n, dtype=torch.long)
        active = torch.arange(n)  # rows still looping (CPU indices)
        previous = None
        for loop in range(int(want.max())):
            full = active.numel() == n
            rows = active.to(self.device)
            x = model.loop(inputs if full else inputs.select_rows(rows), previous, loop)
            h = norm(x)
            spent[active] += 1
            ends = want[active] == loop + 1
            if loop >= 1 and bool(adaptive[active].any()):
                # as generate.decode_step with min_loops=2 (a change needs two loops)
                change = (h - previous).float().norm(dim=-1) / h.float().norm(dim=-1)
                converged = adaptive[active] & (change[:, -1].cpu() < threshold[active]) & ~ends
                if bool(converged.any()):
                    cache.fill_loops_from(loop, active[converged].to(self.device))
                ends = ends | converged
            if bool(ends.any()):
                final[active[ends].to(self.device)] = h[ends.to(self.device)]
                keep = ~ends
                active, h = active[keep], h[keep.to(self.device)]
                if active.numel() == 0:
                    break
            previous = h
        cache.advance(1, torch.ones_like(tokens, dtype=torch.bool))
        return model.logits(final)[:, -1], spent

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """One token per row, each with its own options and generator, as `sample_next`
        draws it (so a seeded row samples what `generate` samples for it alone). The
        softmax of the plain (no top_p) sampled rows is taken in one batch."""
        greedy = logits.argmax(dim=-1).tolist()
        plain = [i for i, row in enumerate(rows)
                 if row.params.temperature > 0 and row.params.top_p == 1.0]
        probs = {}
        if plain:
            index = torch.tensor(plain, device=logits.device)
            temperature = torch.tensor([rows[i].params.temperature for i in plain],
                                       device=logits.device)
            batch = (logits[index].float() / temperature[:, None]).softmax(dim=-1)
            probs = dict(zip(plain, batch, strict=True))
        out = []
        for i, row in enumerate(rows):
            p = row.params
            if p.temperature == 0:
                token = greedy[i]
            elif i in probs:
                token = int(torch.multinomial(probs[i][None], 1, generator=row.generator))
            else:
                token = int(sample_next(logits[i:i + 1], temperature=p.temperature,
                                        top_p=p.top_p, generator=row.generator)[0])
            row.next_token = token
            out.append(token)
        return out


__all__ = ["PackedBatch"]
