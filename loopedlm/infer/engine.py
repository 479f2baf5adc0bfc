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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from loopedlm.common.validation import is_int
from loopedlm.infer.cached_forward import CachedForward
from loopedlm.infer.graphs import batch_buckets, capture_step
from loopedlm.infer.options import AdaptiveLoops, loop_slot_map
from loopedlm.infer.sampling import SamplingParams, sample_rows
from loopedlm.infer.slot_state import SlotState
from loopedlm.infer.static_cache import StaticKVCache
from loopedlm.model.gpt import LoopedGPT

log = logging.getLogger(__name__)

KV_LEN_STEP = 64  # eager steps attend over the filled length rounded up to this



@dataclass
class StepOutput:
    """One step's result, device tensors over the step's bucket of rows: `tokens[b]` the
    token slot b sampled (-1 if it was inactive or had finished), `finished[b]` whether
    slot b is done (it sampled a stop id, used its token budget or filled the cache),
    `loops[b]` the loops it ran for this token."""

    tokens: torch.Tensor
    finished: torch.Tensor
    loops: torch.Tensor


class DecodeEngine(SlotState):
    """Static-cache decoding for a `LoopedGPT` (see the module docstring for the API);
    its per-slot tensors and their updates are those of `SlotState`.

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
        self.source = model  # the model as given (self.model may be a cast copy)
        max_len = cfg.sequence_len if max_len is None else max_len
        max_loops = cfg.n_loops if max_loops is None else max_loops
        if not is_int(max_batch) or max_batch < 1:
            raise ValueError(f"max_batch={max_batch!r} is not allowed: an integer >= 1")
        if not is_int(max_len) or not 1 <= max_len <= cfg.sequence_len:
            raise ValueError(f"max_len={max_len!r} is not allowed: an integer in "
                             f"[1, sequence_len={cfg.sequence_len}]")
        if not is_int(max_loops) or max_loops < 1:
            raise ValueError(f"n_loops={max_loops!r} is not allowed: an integer >= 1")
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else model.lm_head.weight.dtype
        if model.lm_head.weight.dtype != dtype:
            log.info("decode engine: casting a copy of the model to %s", dtype)
            model = copy.deepcopy(model).to(dtype)
        self.model, self.config, self.dtype, self.max_loops = model, cfg, dtype, max_loops
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
        self.forward = CachedForward(model, self.cache, dtype, compile_loop=compile == "loop")
        super().__init__(max_batch, max_len, cfg.vocab_size, device)
        self._steps: dict[tuple, Callable[[], None]] = {}

    # ---- slots -----------------------------------------------------------------------------
    @property
    def active_slots(self) -> list[int]:
        return sorted(self._slots)

    def _check_slot(self, slot) -> None:
        if not is_int(slot) or not 0 <= slot < self.max_batch:
            raise ValueError(f"slot {slot!r} is outside [0, {self.max_batch}): the largest "
                             f"batch bucket is {self.max_batch}")

    def _check_loops(self, n_loops) -> None:
        if not is_int(n_loops) or not 1 <= n_loops <= self.max_loops:
            raise ValueError(f"n_loops={n_loops!r} is not allowed: an integer in "
                             f"[1, {self.max_loops}] (the engine's max_loops)")

    def _check_ids(self, ids: Sequence[int] | torch.Tensor, what: str) -> torch.Tensor:
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        ids = list(ids)
        if not ids:
            raise ValueError(f"{what} is empty: at least one token is needed")
        vocab = self.config.vocab_size
        bad = [t for t in ids if not is_int(t) or not 0 <= t < vocab]
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
        self._check_loops(n_loops)
        sampling = SamplingParams() if sampling is None else sampling
        if max_new_tokens is not None and (not is_int(max_new_tokens) or max_new_tokens < 1):
            raise ValueError(f"max_new_tokens={max_new_tokens!r} is not allowed: an integer >= 1")
        stops = [int(s) for s in stop_ids]
        bad = [s for s in stops if not 0 <= s < self.config.vocab_size]
        if bad:
            raise ValueError(f"unknown stop token {bad[0]!r}: ids lie in "
                             f"[0, {self.config.vocab_size})")
        if not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling={sampling!r} must be a SamplingParams or None")
        ids = self._check_ids(prompt_ids, f"prompt for slot {slot}")
        # everything is checked above; a failure from here on frees the slot again, so one
        # bad sequence never leaves the engine holding a slot nobody owns (issue 22, D1)
        try:
            logits = self.prefill(slot, ids, n_loops=n_loops, adaptive=adaptive)[-1:]
            if self.set_sampling(slot, sampling, max_new_tokens, stops):
                self._steps.clear()
            rows = slice(slot, slot + 1)
            first = sample_rows(logits, self.temperature[rows], self.top_k[rows],
                                self.top_p[rows], self.seed[rows], self.counter[rows])
            self.record(rows, first, self.active[rows].clone(), self.row_loops[rows].clone(),
                        advance=False)
        except BaseException:
            self.release(slot)
            raise
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
        self._check_loops(n_loops)
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
        logits = self.forward.chunk_logits(slot, idx, start, n_loops)
        if info is None:
            self.open_slot(slot, n_loops, adaptive)
            info = self._slots[slot]
        info.length = end
        self.pos[slot] = end
        return logits

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

    def _step_logits(self, tokens: torch.Tensor, batch: int, n_loops: int, kv_len: int,
                     mixed: bool) -> torch.Tensor:
        """Logits (batch, V) of `tokens` fed at self.pos for rows [0, batch), every row
        running max loops `n_loops` and reading its output at its own loop count."""
        shared_slots = mixed and self.loop_slots != list(range(self.max_loops))
        return self.forward.step_logits(tokens, self.pos[:batch], self.row_loops[:batch],
                                        n_loops, kv_len, mixed, shared_slots)

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
        self.record(rows, sampled, live, self.row_loops[rows])

    def _runner(self, key: tuple) -> Callable[[], None]:
        """The step for `key`, built once: eager, compiled, or captured as a CUDA graph."""
        if key in self._steps:
            return self._steps[key]

        def body():
            self._step_body(*key)
        if self.compile in (True, "step"):
            body = torch.compile(body, dynamic=False)
        if self.graphs:
            body = capture_step(body, self.step_state(), self.device)
        self._steps[key] = body
        return body

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
        self.record(rows, sampled, live, loops)

    def _adaptive_logits(self, tokens: torch.Tensor, batch: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and loops spent of rows [0, batch), each with its own adaptive loops
        (`CachedForward.adaptive_logits`)."""
        adaptive = [info.adaptive if info else None
                    for info in (self._slots.get(r) for r in range(batch))]
        n_loops = max(info.n_loops for info in self._slots.values())
        return self.forward.adaptive_logits(tokens, self.pos[:batch], self.row_loops[:batch],
                                            adaptive, n_loops, self._kv_len())


__all__ = ["DecodeEngine", "StepOutput"]
