"""The decode engine's KV cache (docs/design.md#kv-cache): one static cache, and the two
writers through which a pass of the engine stores keys and values in it.

A looped model recomputes every layer at every loop, so a token's keys at loop t differ
from its keys at loop t': the cache holds one entry per (loop, layer), and loop t of a new
token reads every earlier token's keys of that same loop (the authors' code caches the last
loop only, which makes earlier loops see a single token while decoding).

Attention writes through the `CacheWriter` protocol (`loopedlm.model.attention`): the
plan of a pass carries a `ChunkWrites` (a prefill: a chunk of tokens of one slot), a
`PromptWrites` (the prompts of several new sequences at once), a `TokenWrites` (a loop of an
adaptive prompt over the tokens still looping) or a `StepWrites` (one loop of a decode step:
one token per row, at each row's own position).
"""

from __future__ import annotations

import copy

import torch

from loopedlm.common.validation import is_int
from loopedlm.infer.options import SLOT_POLICIES
from loopedlm.model.config import ModelConfig

Entry = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each (batch, n_kv_head, length, head_dim)


def loop_slot_map(n_loops: int, cache_slots: int | None = None,
                  policy: str = "block") -> list[int]:
    """The cache slot of each loop (0-based): the identity when `cache_slots` is None or
    >= n_loops (exact); otherwise `block` (floor(t*K/N)) or `modulo` (t mod K).

    With K < N slots, loops share storage: within one pass everything is exact, but a slot
    keeps the keys of the last loop written to it, so a later token at loop t reads earlier
    tokens' keys of another loop of the same slot. `block` makes the loops that share a
    slot neighbours, whose states are closest (measured in benchmarks/bench_decode.py)."""
    if policy not in SLOT_POLICIES:
        raise ValueError(f"slot_policy={policy!r} is not allowed: choose one of "
                         f"{list(SLOT_POLICIES)}")
    if cache_slots is None or cache_slots >= n_loops:
        return list(range(n_loops))
    if not is_int(cache_slots) or cache_slots < 1:
        raise ValueError(f"cache_slots={cache_slots!r} is not allowed: an integer >= 1")
    if policy == "block":
        return [t * cache_slots // n_loops for t in range(n_loops)]
    return [t % cache_slots for t in range(n_loops)]


class StaticKVCache:
    """Preallocated keys and values: per (cache slot, layer) one tensor of shape
    (max_batch, n_kv_head, max_len, head_dim), written in place, never reallocated.

    `slot_of_loop[t]` is loop t's cache slot (`loop_slot_map`). With `share_first_layer`,
    layer 0 has a single entry that every loop reads (its keys and values do not depend on
    the loop in `flt`/`ltai`: `LoopMode.first_layer_kv_invariant`). Layers outside the loop
    (a prelude's and a coda's, numbered after the `depth` looped ones: Huginn) have a single
    entry too, written by every pass that runs them."""

    def __init__(self, config: ModelConfig, max_batch: int, max_len: int,
                 slot_of_loop: list[int], *, share_first_layer: bool,
                 dtype: torch.dtype, device: torch.device | str):
        self.slot_of_loop = list(slot_of_loop)
        self.share_first_layer = share_first_layer
        self.dtype = dtype
        self.max_batch, self.max_len = max_batch, max_len
        n_slots = max(slot_of_loop) + 1
        shape = (max_batch, config.n_kv_head, max_len, config.head_dim)
        # per layer, the keys and the values of all its entries in one tensor (entry, *shape),
        # so that filling an adaptive row's skipped loops is one write per layer
        counts = [1 if layer == 0 and share_first_layer else n_slots
                  for layer in range(config.depth)]
        counts += [1] * (config.n_layers - config.depth)
        self.stores = [(torch.zeros((count, *shape), dtype=dtype, device=device),
                        torch.zeros((count, *shape), dtype=dtype, device=device))
                       for count in counts]
        # entries[layer][slot]: views of the stores (a single entry: every slot's view)
        self.entries = [[(k[min(slot, k.size(0) - 1)], v[min(slot, k.size(0) - 1)])
                         for slot in range(n_slots)] for k, v in self.stores]
        self._fill: tuple[torch.Tensor, torch.Tensor] | None = None

    def on(self, stores: list[tuple[torch.Tensor, torch.Tensor]]) -> StaticKVCache:
        """This cache's layout over other stores of the same shapes (a traced step's inputs):
        a copy whose entries are views of `stores` at this cache's entries' offsets."""
        other = copy.copy(self)
        other.stores = list(stores)
        # as strided views, not selects: an exported step writing through a select of an
        # input copied the whole store back at every write (10x slower, measured)
        other.entries = [[(k.as_strided(mk.size(), mk.stride(), mk.storage_offset()),
                           v.as_strided(mv.size(), mv.stride(), mv.storage_offset()))
                          for mk, mv in mine]
                         for (k, v), mine in zip(other.stores, self.entries, strict=True)]
        other._fill = None
        return other

    def entry(self, loop: int, layer: int) -> Entry:
        """The (keys, values) tensors that loop `loop` (0-based) of `layer` uses."""
        return self.entries[layer][self.slot_of_loop[loop]]

    def loop_entries(self, loop: int, batch: int, kv_len: int, start: int = 0) -> list[Entry]:
        """Loop `loop`'s entries of every layer, as views of rows [start, start + batch) and
        key positions [0, kv_len): what one loop of a decode pass reads and writes."""
        rows = slice(start, start + batch)
        return [(k[rows, :, :kv_len], v[rows, :, :kv_len])
                for k, v in (self.entry(loop, layer) for layer in range(len(self.entries)))]

    def writes(self, loop: int, layer: int) -> bool:
        """Whether this loop writes its keys/values (a shared first layer: loop 0 only; a
        layer outside the loop: every time it runs)."""
        return not (layer == 0 and self.share_first_layer and loop > 0)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.stores for t in kv)

    def bytes_per_token(self) -> int:
        """Cache bytes per (sequence, position)."""
        return self.nbytes() // (self.max_batch * self.max_len)

    def fill_skipped_loops(self, last: torch.Tensor, pos: torch.Tensor,
                           tables: tuple[torch.Tensor, torch.Tensor] | None = None,
                           rows: torch.Tensor | None = None) -> None:
        """Rows [0, B) of the batch (`last` and `pos` (B,) tensors: no host sync; `rows`:
        the cache rows they are, if not those): give row r's loops after `last[r]` the
        keys/values that loop wrote at pos[r] (-1: the row has nothing to fill). These are
        the loops an adaptive token skipped (`AdaptiveLoops`: a converged state means the
        next loop would write nearly the same keys, and copying them costs nothing).
        Once per decode step, for every row that stopped early (a row that stopped writes
        no keys, so its fill may wait for the step's end); in an adaptive prompt's prefill,
        after each loop, for its tokens that stopped there (several per cache row, at
        their positions: `loopedlm.infer.adaptive_prompt`). Every (slot, row, head) vector at
        the rows' positions is gathered and scattered through flat indices, itself where
        there is nothing to copy: one read and one write per store with entries of its own
        per loop, whatever loops the rows stopped at, from tables made once (host lists of
        pairs cost 4x as much, and advanced indexing over the 5-d stores 10x, measured):
        `fill_tables`, or `tables` (a packaged step takes them as inputs: a package holds
        no tensors but the weights it is given)."""
        stores = [t for kv in self.stores for t in kv if t.size(0) > 1]
        if not stores:
            return
        n_slots, batch, heads, length, dim = stores[0].shape
        device = stores[0].device
        source, skipped = self.fill_tables(device) if tables is None else tables
        at = last + 1  # the tables' row 0 is "nothing to fill"
        rows = torch.arange(last.size(0), device=device) if rows is None else rows
        # flat index of the vector (slot, row, head 0, pos) of each (slot, row): (S, R)
        base = (torch.arange(n_slots, device=device)[:, None] * batch + rows) * heads * length \
            + pos
        reads = torch.where(skipped[at].T, ((source[at] * batch + rows) * heads * length + pos),
                            base)
        offsets = torch.arange(heads, device=device) * length
        writes = (base[..., None] + offsets).flatten()
        reads = (reads[..., None] + offsets).flatten()
        for store in stores:
            flat = store.view(-1, dim)
            flat.index_copy_(0, writes, flat.index_select(0, reads))

    def fill_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`fill_skipped_loops`'s tables, by a row's last loop + 1 (row 0: none): the cache
        slot it copies from (max_loops + 1,), and the slots it fills (max_loops + 1,
        n_slots): those of the later loops, other than its own."""
        if self._fill is None:
            n_slots = max(self.slot_of_loop) + 1
            source = [0] + list(self.slot_of_loop)
            skipped = [[False] * n_slots]
            for last, own in enumerate(self.slot_of_loop):
                later = {self.slot_of_loop[t] for t in range(last + 1, len(self.slot_of_loop))}
                skipped.append([slot in later - {own} for slot in range(n_slots)])
            self._fill = (torch.tensor(source, device=device),
                          torch.tensor(skipped, device=device))
        return self._fill


class ChunkWrites:
    """A `CacheWriter` for a prefill: slot `slot` takes a chunk of tokens at positions
    start .. end-1 and attends over its own positions 0 .. end-1."""

    def __init__(self, cache: StaticKVCache, slot: int, start: int, end: int):
        self.cache, self.slot, self.start, self.end = cache, slot, start, end

    def insert(self, loop: int, layer: int, k: torch.Tensor, v: torch.Tensor) -> Entry:
        k_all, v_all = self.cache.entry(loop, layer)
        if self.cache.writes(loop, layer):
            k_all[self.slot, :, self.start:self.end] = k[0]
            v_all[self.slot, :, self.start:self.end] = v[0]
        row = slice(self.slot, self.slot + 1)
        return k_all[row, :, : self.end], v_all[row, :, : self.end]


class PromptWrites:
    """A `CacheWriter` for the prompts of several new sequences prefilled together: row r of
    the pass is slot `slots[r]`, its tokens at positions 0 .. width-1, right-padded to the
    longest prompt. Each row attends over its own keys from position 0, which are exactly
    the ones this pass computes, so they are returned as they are (no read back). A padding
    position's keys lie past its row's end: the row's next token overwrites them before any
    query reads them (a step writes its position, then attends)."""

    def __init__(self, cache: StaticKVCache, slots: torch.Tensor, width: int):
        self.cache, self.slots, self.width = cache, slots, width

    def insert(self, loop: int, layer: int, k: torch.Tensor, v: torch.Tensor) -> Entry:
        if self.cache.writes(loop, layer):
            k_all, v_all = self.cache.entry(loop, layer)
            k_all[self.slots, :, : self.width] = k
            v_all[self.slots, :, : self.width] = v
        return k, v


class TokenWrites:
    """A `CacheWriter` for one loop of an adaptive prompt's pass over the tokens still looping
    (`loopedlm.infer.adaptive_prompt`): query (i, j) of the pass is a token of the prompt in
    cache row slots[rows[i, j]] at position pos[i, j]; those `live` write their keys and
    values (the others pad a row to the pass's width and write nothing). Attention reads each
    prompt row's keys at positions [0, n_keys) back from the cache, where the tokens that
    stopped hold the keys of their last loop: per row (the pass's rows are the prompt's), or,
    `flat`, every row's side by side as one row (the pass is one sequence of tokens from all
    rows, each masked to its own row's keys)."""

    def __init__(self, cache: StaticKVCache, slots: torch.Tensor, rows: torch.Tensor,
                 pos: torch.Tensor, live: torch.Tensor, n_keys: int, *, flat: bool = False):
        self.cache, self.slots, self.pos, self.n_keys, self.flat = cache, slots, pos, n_keys, flat
        self.at = slots[rows]
        self.live = None if flat else live[..., None, None]

    def insert(self, loop: int, layer: int, k: torch.Tensor, v: torch.Tensor) -> Entry:
        k_all, v_all = self.cache.entry(loop, layer)
        if self.cache.writes(loop, layer):
            for new, store in ((k, k_all), (v, v_all)):
                new = new.transpose(1, 2)  # (rows, T, H, D), as store[at, :, pos] reads
                if self.live is not None:
                    new = torch.where(self.live, new, store[self.at, :, self.pos])
                store[self.at, :, self.pos] = new
        keys, values = k_all[self.slots, :, : self.n_keys], v_all[self.slots, :, : self.n_keys]
        if self.flat:  # (1, H, rows * n_keys, D)
            rows, heads, _, dim = keys.shape
            keys = keys.transpose(0, 1).reshape(1, heads, rows * self.n_keys, dim)
            values = values.transpose(0, 1).reshape(1, heads, rows * self.n_keys, dim)
        return keys, values


class StepWrites:
    """A `CacheWriter` for one loop of a decode pass: T new tokens per row (T = 1 in a decode
    step; the drafted tokens and the one before them in a verify pass of speculative
    decoding).

    entries: that loop's (keys, values) per layer (`StaticKVCache.loop_entries`). Row
    rows[b] (an index into the entries' rows) writes its tokens at positions pos[b] ..
    pos[b] + T - 1, except where `live` is False (with shared cache slots, a row past its
    own loop count: the slot holds another loop's keys; T = 1). write_first: whether layer 0
    writes (a shared first layer is written by loop 0 only). gather: `rows` is a strict
    subset of the entries' rows (adaptive rows still looping, speculative rows): attention
    reads those rows only, gathered.

    The loop index `insert` gets is not used: the entries are this loop's already, so that
    one compiled graph serves every loop (`compile="loop"`)."""

    def __init__(self, entries: list[Entry], rows: torch.Tensor, pos: torch.Tensor, *,
                 write_first: bool, live: torch.Tensor | None = None, gather: bool = False):
        self.entries, self.rows, self.pos = entries, rows, pos
        self.write_first, self.live, self.gather = write_first, live, gather
        self._positions: torch.Tensor | None = None

    def insert(self, loop: int, layer: int, k: torch.Tensor, v: torch.Tensor) -> Entry:
        k_all, v_all = self.entries[layer]
        if layer > 0 or self.write_first:
            if k.size(2) == 1:
                new_k, new_v = k[:, :, 0], v[:, :, 0]
                if self.live is not None:
                    live = self.live[:, None, None]
                    new_k = torch.where(live, new_k, k_all[self.rows, :, self.pos])
                    new_v = torch.where(live, new_v, v_all[self.rows, :, self.pos])
                k_all[self.rows, :, self.pos] = new_k
                v_all[self.rows, :, self.pos] = new_v
            else:
                if self._positions is None:
                    span = torch.arange(k.size(2), device=self.pos.device)
                    self._positions = self.pos[:, None] + span
                rows = self.rows[:, None]
                k_all[rows, :, self._positions] = k.transpose(1, 2)
                v_all[rows, :, self._positions] = v.transpose(1, 2)
        if self.gather:
            return k_all[self.rows], v_all[self.rows]
        return k_all, v_all


__all__ = ["StaticKVCache", "ChunkWrites", "PromptWrites", "TokenWrites", "StepWrites", "loop_slot_map",
           "SLOT_POLICIES"]
