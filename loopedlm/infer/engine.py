"""The decode engine: a static KV cache with a slot per sequence, and a decode step of fixed
shapes that needs no host sync (captured once per batch-size bucket as a CUDA graph).

The slot API (what `loopedlm.infer.generate` and a continuous-batching server build on)::

    engine = DecodeEngine(model, max_batch=8)           # buckets 1, 2, 4, 8
    first = engine.add(slot, prompt_ids, n_loops=6,     # prefill; the first token (device)
                       sampling=SamplingParams(temperature=0.8, seed=1),
                       max_new_tokens=100, stop_ids=[bos])
    out = engine.step()          # one token for every active slot: StepOutput of device
                                 # tensors (tokens, finished, loops), all (bucket,)
    engine.release(slot)         # the slot is free for the next sequence

Slots are independent rows: each has its own positions (tensors), loop count, sampling
settings, stop ids and length budget, so sequences join and leave between steps. A step
runs the rows [0, bucket) where bucket is the smallest batch bucket holding every active
slot (so a server should fill low slots first); inactive and finished rows are computed
but masked (their token is -1 and their state does not move).

Exactness (tests/test_engine.py, tests/test_kv_cache.py): the cache holds one entry per
(loop, layer) as SPEC 2 requires, every row attends to its own keys only, and rows with
different loop counts share a step by running max(n_loops) loops and taking each row's
output from its own last loop; the extra loops of a row write cache entries of loops it
never reads (with shared cache slots, such writes are masked out). In `flt` and `ltai` the
first layer's keys/values are the same in every loop (`LoopMode.first_layer_kv_invariant`):
the model computes them once per token (`LoopedGPT.prepare`) and the cache keeps one
entry for layer 0 instead of N.

Adaptive loops (`AdaptiveLoops` per slot) change the batch shape inside a step (rows that
converge leave it), so steps with an adaptive row run eagerly (never captured): the
documented fallback, measured in benchmarks/bench_engine.py.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loopedlm.infer.options import AdaptiveLoops, loop_slot_map
from loopedlm.infer.sampling import SamplingParams, sample_rows
from loopedlm.model.attention import AttentionPlan, norm
from loopedlm.model.config import ModelConfig
from loopedlm.model.gpt import LoopedGPT, LoopInputs

log = logging.getLogger(__name__)

KV_LEN_STEP = 64  # eager steps attend over the filled length rounded up to this


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes a step runs at: powers of two below `max_batch`, then `max_batch`."""
    buckets, size = [], 1
    while size < max_batch:
        buckets.append(size)
        size *= 2
    return [*buckets, max_batch]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---- the static cache ------------------------------------------------------------------------
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


class _RowWrites:
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

    def select(self, keep: torch.Tensor) -> _RowWrites:
        """These writes for the rows `keep` (an index tensor over self.rows)."""
        return _RowWrites(self.cache, self.rows[keep], self.pos[keep], self.kv_len)


class _LoopWrites:
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


def _one_loop(model: LoopedGPT, x0, embedded, first_kv, cos, sin, masks, rows, pos, entries,
              write_first: bool, live, previous) -> torch.Tensor:
    """h^t of one decode loop: the model's own loop on a plan whose cache is this loop's
    static entries. Written as a function of tensors so that torch.compile builds two
    graphs (the first loop and every later one), not one per loop."""
    plan = AttentionPlan(cos, sin, masks, cache=_LoopWrites(entries, rows, pos, write_first,
                                                           live))
    inputs = LoopInputs(x0, embedded, plan, first_kv)
    return norm(model.loop(inputs, previous, 0 if previous is None else 1))


class _ChunkWrites:
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


# ---- the engine --------------------------------------------------------------------------------
@dataclass
class StepOutput:
    """One step's result, device tensors over the step's bucket of rows: `tokens[b]` the
    token slot b sampled (-1 if it was inactive or had finished), `finished[b]` whether
    slot b is done (it sampled a stop id, used its token budget or filled the cache),
    `loops[b]` the loops it ran for this token."""

    tokens: torch.Tensor
    finished: torch.Tensor
    loops: torch.Tensor


@dataclass
class _Slot:
    n_loops: int
    filtered: bool                      # uses top-k or top-p
    greedy: bool                        # temperature 0
    adaptive: AdaptiveLoops | None
    length: int                         # tokens in the cache (an upper bound once finished)


class DecodeEngine:
    """Static-cache decoding for a `LoopedGPT` (see the module docstring for the API).

    max_batch:   slots (sequences decoded together); steps run at batch buckets
                 1, 2, 4, ... up to max_batch.
    max_len:     cache positions per slot (default: the model's sequence_len).
    max_loops:   the largest n_loops a slot may use (default: the model's n_loops).
    cache_slots / slot_policy: shared cache slots (`loop_slot_map` over max_loops loops).
    share_first_layer: one cache entry for layer 0 in `flt`/`ltai` (exact; default on).
    dtype:       weights and cache (default: bf16 on CUDA, the model's dtype elsewhere);
                 the model is cast once (a copy) if it differs, never per step.
    graphs:      capture each step as a CUDA graph (default: on CUDA). On CPU, True runs
                 the same capture procedure (warm-up, state restore) and replays eagerly.
    compile:     torch.compile the whole step (True or "step": one graph per bucket and
                 loop count, attending over all max_len positions) or one loop ("loop":
                 two graphs); off by default (see benchmarks/README.md for what it buys).
    """

    def __init__(self, model: LoopedGPT, *, max_batch: int = 8, max_len: int | None = None,
                 max_loops: int | None = None, cache_slots: int | None = None,
                 slot_policy: str = "block", share_first_layer: bool = True,
                 dtype: torch.dtype | None = None, graphs: bool | None = None,
                 compile: bool | str = False):
        cfg = model.config
        device = model.lm_head.weight.device
        max_len = cfg.sequence_len if max_len is None else max_len
        max_loops = cfg.n_loops if max_loops is None else max_loops
        if not _is_int(max_batch) or max_batch < 1:
            raise ValueError(f"max_batch={max_batch!r} is not allowed: an integer >= 1")
        if not _is_int(max_len) or not 1 <= max_len <= cfg.sequence_len:
            raise ValueError(f"max_len={max_len!r} is not allowed: an integer in "
                             f"[1, sequence_len={cfg.sequence_len}]")
        if not _is_int(max_loops) or max_loops < 1:
            raise ValueError(f"n_loops={max_loops!r} is not allowed: an integer >= 1")
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else model.lm_head.weight.dtype
        if model.lm_head.weight.dtype != dtype:
            log.info("decode engine: casting a copy of the model to %s", dtype)
            model = copy.deepcopy(model).to(dtype)
        self.model = model
        self.config, self.device, self.dtype = cfg, device, dtype
        self.max_batch, self.max_len, self.max_loops = max_batch, max_len, max_loops
        self.buckets = batch_buckets(max_batch)
        self.loop_slots = loop_slot_map(max_loops, cache_slots, slot_policy)
        self.cache = StaticKVCache(
            cfg, max_batch, max_len, self.loop_slots, dtype=dtype, device=device,
            share_first_layer=share_first_layer and model.mode.first_layer_kv_invariant)
        self.graphs = device.type == "cuda" if graphs is None else graphs
        self.compile = compile
        if compile not in (False, True, "step", "loop"):
            raise ValueError(f"compile={compile!r} is not allowed: False, True (= 'step') "
                             f"or 'loop'")
        self._loop_fn = torch.compile(_one_loop) if compile == "loop" else _one_loop

        def state(dtype, fill=0):
            return torch.full((max_batch,), fill, dtype=dtype, device=device)
        # per-slot state: the step's static inputs, updated in place by the step itself
        self.tokens = state(torch.long)           # the token to feed next
        self.pos = state(torch.long)              # the position it is written at
        self.counter = state(torch.long)          # tokens sampled so far
        self.max_new = state(torch.long, 1)
        self.row_loops = state(torch.long, 1)
        self.temperature = state(torch.float32, 1.0)
        self.top_k = state(torch.long, cfg.vocab_size)
        self.top_p = state(torch.float32, 1.0)
        self.seed = state(torch.long)
        self.active = state(torch.bool, False)
        self.finished = state(torch.bool, False)
        self.stop_table = torch.full((max_batch, 1), -1, dtype=torch.long, device=device)
        # the step's static outputs
        self.out_tokens = state(torch.long, -1)
        self.out_loops = state(torch.long)
        self._key_index = torch.arange(max_len, device=device)
        self._rows = torch.arange(max_batch, device=device)
        self._slots: dict[int, _Slot] = {}
        self._steps: dict[tuple, Callable[[], None]] = {}

    # ---- slots -----------------------------------------------------------------------------
    @property
    def active_slots(self) -> list[int]:
        return sorted(self._slots)

    def _check_slot(self, slot) -> None:
        if not _is_int(slot) or not 0 <= slot < self.max_batch:
            raise ValueError(f"slot {slot!r} is outside [0, {self.max_batch}): the largest "
                             f"batch bucket is {self.max_batch}")

    def _check_ids(self, ids: Sequence[int] | torch.Tensor, what: str) -> torch.Tensor:
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        ids = list(ids)
        if not ids:
            raise ValueError(f"{what} is empty: at least one token is needed")
        vocab = self.config.vocab_size
        bad = [t for t in ids if not _is_int(t) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{what} holds token id {bad[0]!r}, outside the vocabulary "
                             f"[0, {vocab})")
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def add(self, slot: int, prompt_ids: Sequence[int] | torch.Tensor, *,
            n_loops: int | None = None, sampling: SamplingParams | None = None,
            max_new_tokens: int | None = None, stop_ids: Sequence[int] = (),
            adaptive: AdaptiveLoops | None = None) -> torch.Tensor:
        """Start a sequence in a free `slot`: prefill its prompt and sample its first token
        (returned as a 0-d device tensor; it is also what the next `step` feeds).

        n_loops <= max_loops (default: the model's n_loops); max_new_tokens: the token
        budget, this first token included (default: until the cache is full); stop_ids:
        a row finishes when it samples one (the stop token is returned, flagged finished).
        """
        self._check_slot(slot)
        if slot in self._slots:
            raise ValueError(f"slot {slot} is in use: release it first")
        n_loops = self.config.n_loops if n_loops is None else n_loops
        if not _is_int(n_loops) or not 1 <= n_loops <= self.max_loops:
            raise ValueError(f"n_loops={n_loops!r} is not allowed: an integer in "
                             f"[1, {self.max_loops}] (the engine's max_loops)")
        sampling = SamplingParams() if sampling is None else sampling
        if max_new_tokens is not None and (not _is_int(max_new_tokens) or max_new_tokens < 1):
            raise ValueError(f"max_new_tokens={max_new_tokens!r} is not allowed: an integer >= 1")
        stops = [int(s) for s in stop_ids]
        bad = [s for s in stops if not 0 <= s < self.config.vocab_size]
        if bad:
            raise ValueError(f"unknown stop token {bad[0]!r}: ids lie in "
                             f"[0, {self.config.vocab_size})")
        ids = self._check_ids(prompt_ids, f"prompt for slot {slot}")
        logits = self.prefill(slot, ids, n_loops=n_loops, adaptive=adaptive)[-1:]
        self._slots[slot].filtered = sampling.top_k is not None or sampling.top_p < 1
        self._slots[slot].greedy = sampling.temperature == 0
        self.temperature[slot] = float(sampling.temperature)
        if sampling.top_k is not None:
            self.top_k[slot] = min(sampling.top_k, self.config.vocab_size)
        self.top_p[slot] = float(sampling.top_p)
        self.seed[slot] = random.getrandbits(62) if sampling.seed is None else sampling.seed
        if max_new_tokens is not None:
            self.max_new[slot] = max_new_tokens
        if len(stops) > self.stop_table.size(1):  # grows rarely: a new shape, new captures
            wider = torch.full((self.max_batch, len(stops)), -1, dtype=torch.long,
                               device=self.device)
            wider[:, : self.stop_table.size(1)] = self.stop_table
            self.stop_table = wider
            self._steps.clear()
        if stops:
            self.stop_table[slot, : len(stops)] = torch.tensor(stops, device=self.device)
        rows = slice(slot, slot + 1)
        first = sample_rows(logits, self.temperature[rows], self.top_k[rows], self.top_p[rows],
                            self.seed[rows], self.counter[rows])
        self._record(rows, first, self.active[rows].clone(), self.row_loops[rows].clone(),
                     advance=False)
        return first[0]

    def release(self, slot: int) -> None:
        """Free `slot` (its cache contents are simply overwritten by the next sequence)."""
        self._check_slot(slot)
        self._slots.pop(slot, None)
        self.active[slot] = False
        self.finished[slot] = False

    def reset(self) -> None:
        for slot in self.active_slots:
            self.release(slot)

    # ---- prefill -----------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, slot: int, ids: Sequence[int] | torch.Tensor, *,
                n_loops: int | None = None, adaptive: AdaptiveLoops | None = None
                ) -> torch.Tensor:
        """Append `ids` to `slot`'s cache in one pass and return their logits
        (T, vocab_size). A free slot is opened (from position 0, with `n_loops` and
        `adaptive`, greedy, no stop ids); an active one is extended (a prompt split
        anywhere is exact). `add` uses it for the prompt; `decode` then feeds tokens."""
        self._check_slot(slot)
        info = self._slots.get(slot)
        if n_loops is None:
            n_loops = info.n_loops if info is not None else self.config.n_loops
        if not _is_int(n_loops) or not 1 <= n_loops <= self.max_loops:
            raise ValueError(f"n_loops={n_loops!r} is not allowed: an integer in "
                             f"[1, {self.max_loops}] (the engine's max_loops)")
        if info is not None and n_loops != info.n_loops:
            raise ValueError(f"slot {slot} runs n_loops={info.n_loops}, not {n_loops}")
        if adaptive is not None and not isinstance(adaptive, AdaptiveLoops):
            raise ValueError(f"adaptive={adaptive!r} must be an AdaptiveLoops or None")
        idx = ids if isinstance(ids, torch.Tensor) and ids.device == self.device \
            and ids.dtype == torch.long else self._check_ids(ids, f"prompt for slot {slot}")
        idx = idx.reshape(1, -1)
        start = 0 if info is None else info.length
        end = start + idx.size(1)
        if end > self.max_len:
            limit = self.max_len if self.max_len < self.config.sequence_len else None
            raise ValueError(f"prompt of {end} tokens{f' ({start} cached)' if start else ''} is "
                             f"longer than the context (" + (f"the engine's max_len={limit}"
                             if limit else f"sequence_len={self.config.sequence_len}") + ")")
        model = self.model
        cos, sin = self._rotary(self._key_index[None, start:end])
        plan = AttentionPlan(cos=cos, sin=sin,
                             masks=self._chunk_masks(start, end),
                             cache=_ChunkWrites(self.cache, slot, start, idx.size(1)))
        inputs = model.prepare(idx, plan=plan)
        previous = None
        for loop in range(n_loops):
            previous = norm(model.loop(inputs, previous, loop))
        if info is None:
            self._open(slot, n_loops, adaptive)
            info = self._slots[slot]
        info.length = end
        self.pos[slot] = end
        return model.logits(previous)[0]

    def _open(self, slot: int, n_loops: int, adaptive: AdaptiveLoops | None) -> None:
        self._slots[slot] = _Slot(n_loops, False, True, adaptive, 0)
        self.row_loops[slot] = n_loops
        self.temperature[slot] = 0.0
        self.top_k[slot] = self.config.vocab_size
        self.top_p[slot] = 1.0
        self.max_new[slot] = self.max_len
        self.stop_table[slot] = -1
        self.counter[slot] = 0
        self.finished[slot] = False
        self.active[slot] = True

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables at `positions` (B, T), shaped (B, T, 1, D/2), in the weights' dtype:
        the model keeps them in bf16 (as nanochat), and an fp32 stream would promote them
        in each of the 8 multiplies per layer; converting once per step is exact."""
        cos, sin = self.model.cos[positions], self.model.sin[positions]
        return cos[:, :, None, :].to(self.dtype), sin[:, :, None, :].to(self.dtype)

    def _chunk_masks(self, start: int, end: int) -> dict:
        """Masks of a chunk of queries at positions start..end-1 over keys 0..end-1, with the
        SDPA paths a full forward takes (plain causal when the chunk starts at 0)."""
        masks = {}
        for window in set(self.config.window_sizes()):
            if window is None and start == 0:
                masks[window] = (None, True)
                continue
            q = self._key_index[start:end, None]
            k = self._key_index[None, :end]
            mask = k <= q
            if window is not None:
                mask = mask & (q - k < window)
            masks[window] = (mask, False)
        return masks

    # ---- the decode step ------------------------------------------------------------------
    def _bucket(self) -> int:
        if not self._slots:
            raise ValueError("no active slot: add a sequence first")
        highest = max(self._slots) + 1
        return next(b for b in self.buckets if b >= highest)

    def _kv_len(self) -> int:
        """Key positions a step attends over: all of them in a captured graph (one graph per
        bucket); in eager steps the longest filled length, rounded up."""
        if self.graphs or self.compile in (True, "step"):
            return self.max_len
        longest = max(info.length for info in self._slots.values()) + 1
        return min(self.max_len, -(-longest // KV_LEN_STEP) * KV_LEN_STEP)

    def _step_masks(self, pos: torch.Tensor, kv_len: int) -> dict:
        keys = self._key_index[None, :kv_len]
        valid = keys <= pos[:, None]
        masks = {}
        for window in set(self.config.window_sizes()):
            mask = valid if window is None else valid & (pos[:, None] - keys < window)
            masks[window] = (mask[:, None, None, :], False)
        return masks

    def _step_logits(self, tokens: torch.Tensor, batch: int, n_loops: int, kv_len: int,
                     mixed: bool) -> torch.Tensor:
        """Logits (batch, V) of `tokens` fed at self.pos for rows [0, batch), every row
        running max loops `n_loops` and reading its output at its own loop count."""
        model, pos = self.model, self.pos[:batch]
        row_loops = self.row_loops[:batch]
        shared_slots = mixed and self.loop_slots != list(range(self.max_loops))
        cos, sin = self._rotary(pos[:, None])
        masks = self._step_masks(pos, kv_len)
        inputs = model.prepare(tokens[:, None], plan=AttentionPlan(cos, sin, masks))
        rows = self._rows[:batch]
        previous = final = None
        for loop in range(n_loops):
            entries = [tuple(t[:batch, :, :kv_len] for t in self.cache.entry(loop, layer))
                       for layer in range(self.config.depth)]
            write_first = self.cache.writes(loop, 0)
            h = self._loop_fn(model, inputs.x0, inputs.embedded, inputs.first_kv, cos, sin,
                              masks, rows, pos, entries, write_first,
                              (row_loops > loop) if shared_slots else None, previous)
            if mixed:  # each row's output is its own last loop's
                final = h if final is None else torch.where(
                    (row_loops > loop)[:, None, None], h, final)
            previous = h
        return model.logits((final if mixed else previous)[:, -1])

    def _record(self, rows: slice, sampled: torch.Tensor, live: torch.Tensor,
                loops: torch.Tensor, *, advance: bool = True) -> None:
        """Store the tokens `rows` sampled (those `live`), move their position past the
        token just fed (`advance`; not after a prefill), and flag the finished ones."""
        pos = self.pos[rows] + live.long() if advance else self.pos[rows]
        counter = self.counter[rows] + live.long()
        stop = (sampled[:, None] == self.stop_table[rows]).any(1)
        done = stop | (counter >= self.max_new[rows]) | (pos >= self.max_len)
        self.out_tokens[rows] = torch.where(live, sampled, -1)
        self.out_loops[rows] = loops
        self.tokens[rows] = torch.where(live, sampled, self.tokens[rows])
        # a row that filled the cache is finished; it keeps computing (masked) in place
        self.pos[rows] = pos.clamp_max(self.max_len - 1)
        self.counter[rows] = counter
        self.finished[rows] = self.finished[rows] | (live & done)

    def _step_body(self, batch: int, n_loops: int, kv_len: int, mixed: bool,
                   filtered: bool, greedy: bool) -> None:
        rows = slice(0, batch)
        live = self.active[rows] & ~self.finished[rows]
        logits = self._step_logits(self.tokens[rows], batch, n_loops, kv_len, mixed)
        if greedy:  # every row greedy: no noise to draw
            sampled = logits.argmax(dim=-1)
        else:
            sampled = sample_rows(logits, self.temperature[rows], self.top_k[rows],
                                  self.top_p[rows], self.seed[rows], self.counter[rows],
                                  filtered=filtered)
        self._record(rows, sampled, live, self.row_loops[rows])

    def _state(self) -> list[torch.Tensor]:
        return [self.tokens, self.pos, self.counter, self.finished, self.out_tokens,
                self.out_loops]

    def _runner(self, key: tuple) -> Callable[[], None]:
        """The step for `key`, built once: eager, compiled, or captured as a CUDA graph."""
        if key in self._steps:
            return self._steps[key]

        def body():
            self._step_body(*key)
        if self.compile in (True, "step"):
            body = torch.compile(body, dynamic=False)
        if self.graphs:
            body = self._capture(body)
        self._steps[key] = body
        return body

    def _capture(self, body: Callable[[], None]) -> Callable[[], None]:
        """CUDA-graph capture of a stateful step: warm up (which advances the state), put
        the state back, then record. Keys/values the warm-up wrote lie at or after each
        row's position, so the real steps rewrite them before any query can read them.
        Off CUDA the same procedure runs and the 'replay' is a plain call (tested on CPU)."""
        saved = [t.clone() for t in self._state()]
        on_cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream() if on_cuda else None
        if on_cuda:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    body()
            torch.cuda.current_stream().wait_stream(stream)
        else:
            for _ in range(2):
                body()
        for tensor, value in zip(self._state(), saved, strict=True):
            tensor.copy_(value)
        if not on_cuda:
            return body
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        return graph.replay

    def output(self, batch: int | None = None) -> StepOutput:
        """The last step's (or the adds') outputs for rows [0, batch) (default: the
        current bucket), as views of the engine's static buffers."""
        batch = self._bucket() if batch is None else batch
        return StepOutput(self.out_tokens[:batch], self.finished[:batch],
                          self.out_loops[:batch])

    @torch.no_grad()
    def step(self) -> StepOutput:
        """Feed every active slot its last token and sample the next (no host sync on the
        fixed-loop path). Returns device tensors over the step's bucket."""
        batch = self._bucket()
        infos = [self._slots[s] for s in self._slots]
        if any(info.adaptive is not None for info in infos):
            self._adaptive_step(batch)
        else:
            n_loops = max(info.n_loops for info in infos)
            mixed = any(info.n_loops != n_loops for info in infos)
            filtered = any(info.filtered for info in infos)
            greedy = all(info.greedy for info in infos)
            self._runner((batch, n_loops, self._kv_len(), mixed, filtered, greedy))()
        for info in infos:
            info.length = min(info.length + 1, self.max_len)
        return self.output(batch)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced step: feed `tokens` (bucket,) at the active slots' positions and
        return (logits (bucket, vocab_size), loops spent (bucket,)); nothing is sampled."""
        batch = self._bucket()
        if tokens.shape != (batch,):
            raise ValueError(f"tokens have shape {tuple(tokens.shape)}; this step takes "
                             f"({batch},)")
        full = [slot for slot, info in self._slots.items() if info.length >= self.max_len]
        if full:
            raise ValueError(f"slot {full[0]} holds max_len={self.max_len} tokens: no room "
                             f"for another")
        infos = list(self._slots.values())
        live = self.active[:batch].clone()
        if any(info.adaptive is not None for info in infos):
            logits, loops = self._adaptive_logits(tokens, batch)
        else:
            n_loops = max(info.n_loops for info in infos)
            mixed = any(info.n_loops != n_loops for info in infos)
            logits = self._step_logits(tokens, batch, n_loops, self._kv_len(), mixed)
            loops = self.row_loops[:batch].clone()
        self.pos[:batch] += live.long()
        for info in infos:
            info.length = min(info.length + 1, self.max_len)
        return logits, loops

    # ---- adaptive loops: the eager fallback -----------------------------------------------------
    def _adaptive_step(self, batch: int) -> None:
        rows = slice(0, batch)
        live = self.active[rows] & ~self.finished[rows]
        logits, loops = self._adaptive_logits(self.tokens[rows], batch)
        sampled = sample_rows(logits, self.temperature[rows], self.top_k[rows],
                              self.top_p[rows], self.seed[rows], self.counter[rows])
        self._record(rows, sampled, live, loops)

    def _adaptive_logits(self, tokens: torch.Tensor, batch: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row stops after the first loop t >= its min_loops whose state converged, or
        at its own n_loops; stopped rows leave the batch (their blocks do not run) and the
        cache entries of their skipped loops get the last computed loop's keys/values."""
        model, pos = self.model, self.pos[:batch]
        infos = [self._slots.get(r) for r in range(batch)]

        def per_row(value, dtype):
            return torch.tensor(value, dtype=dtype, device=self.device)
        inf = float("inf")
        threshold = per_row([i.adaptive.threshold if i and i.adaptive else -inf
                             for i in infos], torch.float32)
        use_kl = per_row([bool(i and i.adaptive and i.adaptive.criterion == "kl")
                          for i in infos], torch.bool)
        min_loops = per_row([i.adaptive.min_loops if i and i.adaptive else 1 for i in infos],
                            torch.long)
        row_loops = self.row_loops[:batch]
        any_kl = bool(use_kl.any())
        kv_len = self._kv_len()
        writes = _RowWrites(self.cache, self._rows[:batch], pos, kv_len)
        cos, sin = self._rotary(pos[:, None])
        plan = AttentionPlan(cos=cos, sin=sin, masks=self._step_masks(pos, kv_len),
                             cache=writes)
        all_inputs = model.prepare(tokens[:, None], plan=plan)
        inputs = all_inputs
        final = torch.empty_like(all_inputs.embedded)
        spent = torch.zeros(batch, dtype=torch.long, device=self.device)
        active = self._rows[:batch]
        previous = previous_logp = None
        for loop in range(max(info.n_loops for info in self._slots.values())):
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
                    self._fill_skipped_loops(loop, filled, pos[filled])
                keep = ~stop
                active, h = active[keep], h[keep]
                logp = None if logp is None else logp[keep]
                if active.numel() == 0:
                    break
                inputs = all_inputs.select_rows(active)
                inputs.plan.cache = writes.select(active)
            previous, previous_logp = h, logp
        return model.logits(final[:, -1]), spent

    def _fill_skipped_loops(self, last_loop: int, rows: torch.Tensor, pos: torch.Tensor):
        """Give the loops after `last_loop` (up to max_loops) the keys/values `last_loop`
        wrote at `pos` for `rows` (an adaptive row's skipped loops; see loopedlm.infer.generate)."""
        for layer in range(self.config.depth):
            src_k, src_v = self.cache.entry(last_loop, layer)
            for loop in range(last_loop + 1, self.max_loops):
                dst_k, dst_v = self.cache.entry(loop, layer)
                if dst_k is not src_k:
                    dst_k[rows, :, pos] = src_k[rows, :, pos]
                    dst_v[rows, :, pos] = src_v[rows, :, pos]


__all__ = ["DecodeEngine", "StaticKVCache", "StepOutput", "batch_buckets"]
