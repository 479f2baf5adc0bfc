"""The model's forward over the engine's static KV cache, in the three shapes the decode
engine (`loopedlm.infer.engine`) runs it: a chunk of tokens of one slot (prefill), one
token per row with fixed loop counts (the step that is captured as a CUDA graph), and one
token per row with adaptive loops (eager: rows that converge leave the batch).

Every pass runs the model's own per-loop API (`LoopedGPT.prepare`, `loop`, `logits`) on an
`AttentionPlan` whose cache is one of the writers of `loopedlm.infer.static_cache`, so the
decoded logits equal a full forward's (tests/test_engine.py, tests/test_kv_cache.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loopedlm.infer.options import AdaptiveLoops
from loopedlm.infer.static_cache import ChunkWrites, LoopWrites, RowWrites, StaticKVCache
from loopedlm.model.attention import AttentionPlan, norm
from loopedlm.model.gpt import LoopedGPT, LoopInputs


def decode_loop(model: LoopedGPT, x0, embedded, first_kv, cos, sin, masks, rows, pos, entries,
                write_first: bool, live, previous) -> torch.Tensor:
    """h^t of one decode loop: the model's own loop on a plan whose cache is this loop's
    static entries. Written as a function of tensors so that torch.compile builds two
    graphs (the first loop and every later one), not one per loop."""
    plan = AttentionPlan(cos, sin, masks, cache=LoopWrites(entries, rows, pos, write_first,
                                                          live))
    inputs = LoopInputs(x0, embedded, plan, first_kv)
    return norm(model.loop(inputs, previous, 0 if previous is None else 1))


def adaptive_row_settings(adaptive: list[AdaptiveLoops | None], device: torch.device
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (threshold, uses the KL criterion, min_loops) tensors; a row without
    adaptive loops never converges (threshold -inf)."""
    def per_row(value, dtype):
        return torch.tensor(value, dtype=dtype, device=device)
    inf = float("inf")
    threshold = per_row([a.threshold if a else -inf for a in adaptive], torch.float32)
    use_kl = per_row([bool(a and a.criterion == "kl") for a in adaptive], torch.bool)
    min_loops = per_row([a.min_loops if a else 1 for a in adaptive], torch.long)
    return threshold, use_kl, min_loops


class CachedForward:
    """`model` (already in the cache's dtype) computing logits over `cache`.
    compile_loop: torch.compile one decode loop (`decode_loop`)."""

    def __init__(self, model: LoopedGPT, cache: StaticKVCache, dtype: torch.dtype, *,
                 compile_loop: bool = False):
        self.model, self.cache, self.dtype = model, cache, dtype
        self.config = model.config
        device = model.lm_head.weight.device
        self.key_index = torch.arange(cache.max_len, device=device)
        self.rows = torch.arange(cache.max_batch, device=device)
        self.loop_fn = torch.compile(decode_loop) if compile_loop else decode_loop

    # ---- positions and masks ---------------------------------------------------------------
    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables at `positions` (B, T), shaped (B, T, 1, D/2), in the weights' dtype:
        the model keeps them in bf16 (as nanochat), and an fp32 stream would promote them
        in each of the 8 multiplies per layer; converting once per step is exact."""
        cos, sin = self.model.cos[positions], self.model.sin[positions]
        return cos[:, :, None, :].to(self.dtype), sin[:, :, None, :].to(self.dtype)

    def chunk_masks(self, start: int, end: int) -> dict:
        """Masks of a chunk of queries at positions start..end-1 over keys 0..end-1, with the
        SDPA paths a full forward takes (plain causal when the chunk starts at 0)."""
        masks = {}
        for window in set(self.config.window_sizes()):
            if window is None and start == 0:
                masks[window] = (None, True)
                continue
            q = self.key_index[start:end, None]
            k = self.key_index[None, :end]
            mask = k <= q
            if window is not None:
                mask = mask & (q - k < window)
            masks[window] = (mask, False)
        return masks

    def step_masks(self, pos: torch.Tensor, kv_len: int) -> dict:
        keys = self.key_index[None, :kv_len]
        valid = keys <= pos[:, None]
        masks = {}
        for window in set(self.config.window_sizes()):
            mask = valid if window is None else valid & (pos[:, None] - keys < window)
            masks[window] = (mask[:, None, None, :], False)
        return masks

    # ---- the three passes ------------------------------------------------------------------
    def chunk_logits(self, slot: int, ids: torch.Tensor, start: int, n_loops: int
                     ) -> torch.Tensor:
        """Logits (T, vocab_size) of `ids` (1, T) appended to `slot`'s cache at `start`."""
        model, end = self.model, start + ids.size(1)
        cos, sin = self.rotary(self.key_index[None, start:end])
        plan = AttentionPlan(cos=cos, sin=sin, masks=self.chunk_masks(start, end),
                             cache=ChunkWrites(self.cache, slot, start, ids.size(1)))
        inputs = model.prepare(ids, plan=plan)
        previous = None
        for loop in range(n_loops):
            previous = norm(model.loop(inputs, previous, loop))
        return model.logits(previous)[0]

    def step_logits(self, tokens: torch.Tensor, pos: torch.Tensor, row_loops: torch.Tensor,
                    n_loops: int, kv_len: int, mixed: bool, shared_slots: bool
                    ) -> torch.Tensor:
        """Logits (batch, V) of `tokens` fed at `pos` for rows [0, batch), every row running
        max loops `n_loops` and reading its output at its own loop count `row_loops`
        (`mixed`: they differ); with `shared_slots`, a row past its own loop count writes
        no keys."""
        model, batch = self.model, tokens.size(0)
        cos, sin = self.rotary(pos[:, None])
        masks = self.step_masks(pos, kv_len)
        inputs = model.prepare(tokens[:, None], plan=AttentionPlan(cos, sin, masks))
        rows = self.rows[:batch]
        previous = final = None
        for loop in range(n_loops):
            entries = [tuple(t[:batch, :, :kv_len] for t in self.cache.entry(loop, layer))
                       for layer in range(self.config.depth)]
            write_first = self.cache.writes(loop, 0)
            h = self.loop_fn(model, inputs.x0, inputs.embedded, inputs.first_kv, cos, sin,
                             masks, rows, pos, entries, write_first,
                             (row_loops > loop) if shared_slots else None, previous)
            if mixed:  # each row's output is its own last loop's
                final = h if final is None else torch.where(
                    (row_loops > loop)[:, None, None], h, final)
            previous = h
        return model.logits((final if mixed else previous)[:, -1])

    def adaptive_logits(self, tokens: torch.Tensor, pos: torch.Tensor,
                        row_loops: torch.Tensor, adaptive: list[AdaptiveLoops | None],
                        n_loops: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (batch, V), loops spent (batch,)) of `tokens` fed at `pos`. Each row
        stops after the first loop t >= its min_loops whose state converged, or at its own
        `row_loops`; stopped rows leave the batch (their blocks do not run) and the cache
        entries of their skipped loops get the last computed loop's keys/values."""
        model, batch = self.model, tokens.size(0)
        threshold, use_kl, min_loops = adaptive_row_settings(adaptive, pos.device)
        any_kl = bool(use_kl.any())
        writes = RowWrites(self.cache, self.rows[:batch], pos, kv_len)
        cos, sin = self.rotary(pos[:, None])
        plan = AttentionPlan(cos=cos, sin=sin, masks=self.step_masks(pos, kv_len),
                             cache=writes)
        all_inputs = model.prepare(tokens[:, None], plan=plan)
        inputs = all_inputs
        final = torch.empty_like(all_inputs.embedded)
        spent = torch.zeros(batch, dtype=torch.long, device=pos.device)
        active = self.rows[:batch]
        previous = previous_logp = None
        for loop in range(n_loops):
            h = norm(model.loop(inputs, previous, loop))
            spent[active] += 1
            logp = F.log_softmax(model.logits(h[:, -1]), dim=-1) if any_kl else None
            last = row_loops[active] == loop + 1
            if previous is None:
                converged = torch.zeros_like(last)
            else:
                change = ((h - previous).float().norm(dim=-1) / h.float().norm(dim=-1))[:, -1]
                measure = change
                if any_kl:
                    kl = (logp.exp() * (logp - previous_logp)).sum(-1)
                    measure = torch.where(use_kl[active], kl, change)
                converged = (measure < threshold[active]) & (loop + 1 >= min_loops[active])
            stop = last | converged
            if bool(stop.any()):
                final[active[stop]] = h[stop]
                filled = active[converged & ~last]
                if filled.numel():
                    self.cache.fill_skipped_loops(loop, filled, pos[filled])
                keep = ~stop
                active, h = active[keep], h[keep]
                logp = None if logp is None else logp[keep]
                if active.numel() == 0:
                    break
                inputs = all_inputs.select_rows(active)
                inputs.plan.cache = writes.select(active)
            previous, previous_logp = h, logp
        return model.logits(final[:, -1]), spent


__all__ = ["CachedForward", "decode_loop", "adaptive_row_settings"]
