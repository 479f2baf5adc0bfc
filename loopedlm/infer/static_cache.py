"""The decode engine's static KV cache, and the only code that writes its tensors.

`StaticKVCache` preallocates keys and values per (cache slot, layer) for every sequence
slot. An attention plan writes through one of three writers, one per kind of pass of the
engine (`loopedlm.infer.cached_forward`): `ChunkWrites` (a prefill chunk of one slot),
`LoopWrites` (one loop of the fixed-shape decode step) and `RowWrites` (the adaptive
step, whose batch shrinks as rows converge). `StaticKVCache.fill_skipped_loops` gives an
adaptive row's skipped loops the keys/values of its last computed loop (the rationale is
in `loopedlm.infer.generate`'s docstring).
"""

from __future__ import annotations

import torch

from loopedlm.model.config import ModelConfig


class StaticKVCache:
    """Preallocated keys and values: per (cache slot, layer) one tensor of shape
    (max_batch, n_kv_head, max_len, head_dim), written in place, never reallocated.

    `loop_slots[t]` is loop t's cache slot (the identity is exact; fewer slots share).
    With `share_first_layer`, layer 0 has a single entry that every loop reads (its keys
    and values do not depend on the loop in `flt`/`ltai`)."""

    def __init__(self, config: ModelConfig, max_batch: int, max_len: int,
                 loop_slots: list[int], *, share_first_layer: bool,
                 dtype: torch.dtype, device: torch.device | str):
        self.loop_slots = list(loop_slots)
        self.share_first_layer = share_first_layer
        self.max_batch, self.max_len = max_batch, max_len
        n_slots = max(loop_slots) + 1
        shape = (max_batch, config.n_kv_head, max_len, config.head_dim)

        def entries(count):
            return [(torch.zeros(shape, dtype=dtype, device=device),
                     torch.zeros(shape, dtype=dtype, device=device)) for _ in range(count)]
        self.entries = [entries(1) * n_slots if layer == 0 and share_first_layer
                        else entries(n_slots) for layer in range(config.depth)]

    def entry(self, loop: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (keys, values) tensors that loop `loop` (0-based) of `layer` uses."""
        return self.entries[layer][self.loop_slots[loop]]

    def writes(self, loop: int, layer: int) -> bool:
        """Whether this loop writes its keys/values (a shared first layer: loop 0 only)."""
        return not (layer == 0 and self.share_first_layer and loop > 0)

    def nbytes(self) -> int:
        unique = {id(t): t for layer in self.entries for kv in layer for t in kv}
        return sum(t.numel() * t.element_size() for t in unique.values())

    def bytes_per_token(self) -> int:
        """Cache bytes per (sequence, position)."""
        return self.nbytes() // (self.max_batch * self.max_len)

    def fill_skipped_loops(self, last_loop: int, rows: torch.Tensor, pos: torch.Tensor):
        """Give the loops after `last_loop` (up to the last loop of `loop_slots`) the
        keys/values `last_loop` wrote at `pos` for `rows` (an adaptive row's skipped loops;
        see loopedlm.infer.generate)."""
        for layer in range(len(self.entries)):
            src_k, src_v = self.entry(last_loop, layer)
            for loop in range(last_loop + 1, len(self.loop_slots)):
                dst_k, dst_v = self.entry(loop, layer)
                if dst_k is not src_k:
                    dst_k[rows, :, pos] = src_k[rows, :, pos]
                    dst_v[rows, :, pos] = src_v[rows, :, pos]


class RowWrites:
    """The attention plan's cache in an adaptive (eager) step, for the batch `rows` still
    looping: row b's new keys go to position pos[b]; attention reads the first `kv_len`
    positions of those rows (gathered; masked per row)."""

    def __init__(self, cache: StaticKVCache, rows: torch.Tensor, pos: torch.Tensor,
                 kv_len: int):
        self.cache, self.rows, self.pos, self.kv_len = cache, rows, pos, kv_len

    def insert(self, loop: int, layer: int, k: torch.Tensor, v: torch.Tensor):
        k_all, v_all = self.cache.entry(loop, layer)
        if self.cache.writes(loop, layer):
            k_all[self.rows, :, self.pos] = k[:, :, 0]
            v_all[self.rows, :, self.pos] = v[:, :, 0]
        return k_all[self.rows, :, : self.kv_len], v_all[self.rows, :, : self.kv_len]

    def select(self, keep: torch.Tensor) -> RowWrites:
        """These writes for the rows `keep` (an index tensor over self.rows)."""
        return RowWrites(self.cache, self.rows[keep], self.pos[keep], self.kv_len)


class LoopWrites:
    """The plan's cache for one loop of a decode step: `entries[layer]` are that loop's
    (keys, values) for the step's rows and key range; row b writes at pos[b], except the
    rows `live` marks False (with shared slots, a row past its own loop count)."""

    def __init__(self, entries, rows, pos, write_first: bool, live):
        self.entries, self.rows, self.pos = entries, rows, pos
        self.write_first, self.live = write_first, live

    def insert(self, loop: int, layer: int, k: torch.Tensor, v: torch.Tensor):
        k_all, v_all = self.entries[layer]
        if layer > 0 or self.write_first:
            new_k, new_v = k[:, :, 0], v[:, :, 0]
            if self.live is not None:
                live = self.live[:, None, None]
                new_k = torch.where(live, new_k, k_all[self.rows, :, self.pos])
                new_v = torch.where(live, new_v, v_all[self.rows, :, self.pos])
            k_all[self.rows, :, self.pos] = new_k
            v_all[self.rows, :, self.pos] = new_v
        return k_all, v_all


class ChunkWrites:
    """The plan's cache while one slot takes a chunk of T tokens at positions p0.."""

    def __init__(self, cache: StaticKVCache, slot: int, start: int, length: int):
        self.cache, self.slot, self.start, self.end = cache, slot, start, start + length

    def insert(self, loop: int, layer: int, k: torch.Tensor, v: torch.Tensor):
        k_all, v_all = self.cache.entry(loop, layer)
        if self.cache.writes(loop, layer):
            k_all[self.slot, :, self.start:self.end] = k[0]
            v_all[self.slot, :, self.start:self.end] = v[0]
        row = slice(self.slot, self.slot + 1)
        return k_all[row, :, : self.end], v_all[row, :, : self.end]


__all__ = ["StaticKVCache", "RowWrites", "LoopWrites", "ChunkWrites"]
