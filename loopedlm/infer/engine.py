"""The decode engine (docs/design.md#decoding): a static KV cache with a slot per sequence,
and a decode step of fixed shapes that needs no host sync (captured once per step variant as
a CUDA graph on GPUs).

The slot API (what `loopedlm.infer.generate` and the server's scheduler build on)::

    engine = DecodeEngine(model, max_batch=8)           # buckets 1, 2, 4, 8
    params = SequenceParams(n_loops=6, sampling=SamplingParams(temperature=0.8, seed=1),
                            max_new_tokens=100, stop_ids=(bos,))
    first = engine.add(slot, prompt_ids, params)        # prefill; the first token (device)
    out = engine.step()          # one token for every active slot: StepOutput of device
                                 # tensors (tokens, finished, loops), all (bucket,)
    engine.release(slot)         # the slot is free for the next sequence

Slots are independent rows: each has its own position, loop count, sampling settings, stop
ids and token budget (`SequenceParams`: every per-row option, in one place), so sequences
join and leave between steps. A step runs the rows [0, bucket) where bucket is the smallest
batch bucket holding every active slot (so a server should fill low slots first); inactive
and finished rows are computed but masked (their token is -1 and their state does not move).

Exactness (tests/test_kv_cache.py, tests/test_engine.py): the cache holds one entry per
(loop, layer), every row attends to its own keys only, and rows with different loop counts
share a step by running the largest count and taking each row's output from its own last
loop; the extra loops of a row write cache entries of loops it never reads (with shared
cache slots, such writes are masked out). In `flt` and `ltai` the first layer's keys and
values are the same in every loop: the model computes them once per token
(`LoopedGPT.prepare`) and the cache keeps one entry for layer 0 instead of N.

Adaptive loops (`AdaptiveLoops`) change the batch shape inside a step (rows that converge
leave it), so a step with an adaptive row runs eagerly, never captured: the documented
fallback, measured in benchmarks/bench_engine.py.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from loopedlm.common.validation import is_int
from loopedlm.infer.cache import ChunkWrites, StaticKVCache, StepWrites, loop_slot_map
from loopedlm.infer.options import COMPILE_MODES, CRITERIA
from loopedlm.infer.sampling import SamplingParams, sample_rows
from loopedlm.model.attention import AttentionPlan, attention_masks, norm, rotary_at
from loopedlm.model.config import check_token_ids
from loopedlm.model.gpt import LoopedGPT, LoopInputs

log = logging.getLogger(__name__)

KV_LEN_STEP = 64  # eager steps attend over the filled length rounded up to this
MAX_LOGPROBS = 5  # most likely tokens a step reports per row (as OpenAI's `logprobs` <= 5)


# ---- the per-row options -----------------------------------------------------------------------
@dataclass(frozen=True)
class AdaptiveLoops:
    """Stop looping a decoded token once its loop state has converged (the prompt always runs
    every loop). The skipped loops' cache entries at that position get the keys and values of
    the token's last computed loop: convergence means the loop map is (nearly) at a fixed
    point for this token, so the next loop would write (nearly) the same keys; copying them
    is the best estimate that costs no compute (docs/design.md#decoding).

    criterion "state" (default): relative change of the loop output,
        ||h^t - h^{t-1}|| / ||h^t|| < threshold. Free: h^t is computed anyway, and it is
        what the next loop reads.
    criterion "kl": KL(p_t || p_{t-1}) < threshold between successive loops' next-token
        distributions (nats). Closer to what the user sees, but it costs one LM-head
        evaluation per loop, which for small models is as large as a loop itself.
    min_loops: never stop before this many loops (>= 2: a change needs two loops).
    """

    threshold: float
    criterion: str = "state"
    min_loops: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, int | float) or math.isnan(self.threshold) \
                or self.threshold < 0:
            raise ValueError(f"adaptive_threshold={self.threshold!r} is not allowed: a number >= 0")
        if self.criterion not in CRITERIA:
            raise ValueError(f"adaptive_criterion={self.criterion!r} is not allowed: choose one "
                             f"of {list(CRITERIA)}")
        if not is_int(self.min_loops) or self.min_loops < 2:
            raise ValueError(f"min_loops={self.min_loops!r} is not allowed: an integer >= 2")


@dataclass(frozen=True)
class SequenceParams:
    """How one sequence is decoded: every per-row setting of the engine.

    n_loops: loops per token (None: the model's, filled by the engine; at most the engine's
        `max_loops`). sampling: temperature, top-k, top-p and seed. max_new_tokens: the token
        budget, the first token included (None: until the cache is full). stop_ids: the row
        finishes when it samples one (the stop token is returned, flagged finished).
    adaptive: adaptive loops, or None (every token runs n_loops).
    logprobs: None, or report each sampled token's log-probability and the `logprobs` (0 ..
        MAX_LOGPROBS) most likely tokens' (`StepOutput.host_logprobs`): the model's
        distribution, before temperature and top-k/top-p.
    """

    n_loops: int | None = None
    sampling: SamplingParams = SamplingParams()
    max_new_tokens: int | None = None
    stop_ids: tuple[int, ...] = ()
    adaptive: AdaptiveLoops | None = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.sampling, SamplingParams):
            raise ValueError(f"sampling={self.sampling!r} must be a SamplingParams")
        if self.adaptive is not None and not isinstance(self.adaptive, AdaptiveLoops):
            raise ValueError(f"adaptive={self.adaptive!r} must be an AdaptiveLoops or None")
        if self.max_new_tokens is not None and (not is_int(self.max_new_tokens)
                                                or self.max_new_tokens < 1):
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} is not allowed: an "
                             f"integer >= 1")
        if self.logprobs is not None and (not is_int(self.logprobs)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs={self.logprobs!r} is not allowed: an integer in "
                             f"[0, {MAX_LOGPROBS}] (or None)")
        object.__setattr__(self, "stop_ids", tuple(self.stop_ids))

    @property
    def filtered(self) -> bool:
        """Uses top-k or top-p (the step then sorts the logits)."""
        return self.sampling.top_k is not None or self.sampling.top_p < 1

    @property
    def greedy(self) -> bool:
        return self.sampling.temperature == 0


# ---- the step's outputs and variants --------------------------------------------------------
@dataclass
class StepOutput:
    """One step's result, device tensors over the step's bucket of rows: `tokens[b]` the
    token slot b sampled (-1 if it was inactive or had finished), `finished[b]` whether
    slot b is done (it sampled a stop id, used its token budget or filled the cache),
    `loops[b]` the loops it ran for this token. For slots whose params ask for `logprobs`
    (these three span every slot, not only the bucket): `logprobs[b]` the sampled token's
    log-probability, `top_ids[b]` / `top_logprobs[b]` the MAX_LOGPROBS most likely tokens'
    (other slots: stale values)."""

    tokens: torch.Tensor
    finished: torch.Tensor
    loops: torch.Tensor
    logprobs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None

    def host(self) -> tuple[list[int], list[int]]:
        """(tokens, loops) as lists, brought to the host in one transfer."""
        tokens, loops = torch.stack([self.tokens, self.loops]).tolist()
        return tokens, loops

    def host_logprobs(self) -> list[tuple[float, list[tuple[int, float]]]]:
        """Per row (the sampled token's logprob, [(token id, logprob)] of the most likely
        tokens), brought to the host in one transfer (float64 holds every token id)."""
        rows = torch.cat([self.logprobs[:, None].double(), self.top_logprobs.double(),
                          self.top_ids.double()], dim=1).tolist()
        k = self.top_ids.size(1)
        return [(row[0], [(int(i), lp) for i, lp in zip(row[1 + k:], row[1:1 + k], strict=True)])
                for row in rows]


@dataclass(frozen=True)
class StepKey:
    """A variant of the fixed-loop step: each is built once (eager, compiled or captured).

    batch: the bucket. n_loops: the loops it runs (the largest of its rows). kv_len: key
    positions attended. mixed: rows differ in n_loops. filtered: a row uses top-k/top-p.
    greedy: every row is greedy (no noise to draw). logprobs: a row asks for logprobs."""

    batch: int
    n_loops: int
    kv_len: int
    mixed: bool
    filtered: bool
    greedy: bool
    logprobs: bool = False


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes a step runs at: powers of two below `max_batch`, then `max_batch`."""
    buckets, size = [], 1
    while size < max_batch:
        buckets.append(size)
        size *= 2
    return [*buckets, max_batch]


def capture_step(body: Callable[[], None], state: list[torch.Tensor],
                 device: torch.device) -> Callable[[], None]:
    """CUDA-graph capture of a step `body` that updates the tensors `state` in place: warm
    up (which advances the state), put the state back, then record. Keys/values the warm-up
    wrote lie at or after each row's position, so the real steps rewrite them before any
    query can read them. Off CUDA the same procedure runs and the 'replay' is a plain call
    (tested on CPU)."""
    saved = [t.clone() for t in state]
    on_cuda = device.type == "cuda"
    stream = torch.cuda.Stream() if on_cuda else None
    try:
        if on_cuda:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    body()
            torch.cuda.current_stream().wait_stream(stream)
        else:
            for _ in range(2):
                body()
    finally:  # also when the warm-up fails: a failed step leaves every slot as it was
        for tensor, value in zip(state, saved, strict=True):
            tensor.copy_(value)
    if not on_cuda:
        return body
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph.replay


# ---- per-slot state ----------------------------------------------------------------------------
@dataclass
class SlotInfo:
    """What the host knows of an open slot: its options (n_loops filled) and length."""

    params: SequenceParams
    length: int = 0  # tokens in the cache (an upper bound once finished)


class SlotState:
    """Rows 0 .. max_batch-1, one per slot: device tensors that are the fixed-shape step's
    static inputs and outputs, updated in place, so that a step captured as a CUDA graph
    reads and writes the same memory on every replay; `infos` maps each open slot to its
    `SlotInfo`. `record` is how a sampled token moves a row on."""

    def __init__(self, max_batch: int, max_len: int, vocab_size: int, device: torch.device):
        self.max_batch, self.max_len, self.device = max_batch, max_len, device
        self.vocab_size = vocab_size

        def state(dtype, fill=0):
            return torch.full((max_batch,), fill, dtype=dtype, device=device)
        # the step's static inputs, updated in place by the step itself
        self.tokens = state(torch.long)           # the token to feed next
        self.pos = state(torch.long)              # the position it is written at
        self.counter = state(torch.long)          # tokens sampled so far
        self.max_new = state(torch.long, 1)
        self.n_loops = state(torch.long, 1)
        self.temperature = state(torch.float32, 1.0)
        self.top_k = state(torch.long, vocab_size)
        self.top_p = state(torch.float32, 1.0)
        self.seed = state(torch.long)
        self.active = state(torch.bool, False)
        self.finished = state(torch.bool, False)
        self.stop_table = torch.full((max_batch, 1), -1, dtype=torch.long, device=device)
        # the step's static outputs
        self.out_tokens = state(torch.long, -1)
        self.out_loops = state(torch.long)
        top = min(MAX_LOGPROBS, vocab_size)
        self.out_logprobs = state(torch.float32)
        self.out_top_ids = torch.zeros((max_batch, top), dtype=torch.long, device=device)
        self.out_top_logprobs = torch.zeros((max_batch, top), dtype=torch.float32, device=device)
        self.infos: dict[int, SlotInfo] = {}

    def open(self, slot: int, params: SequenceParams) -> bool:
        """Open `slot` with `params` (n_loops filled) at position 0. Returns whether the stop
        table grew (a new shape: captured steps no longer fit)."""
        self.infos[slot] = SlotInfo(params)
        sampling = params.sampling
        self.n_loops[slot] = params.n_loops
        self.temperature[slot] = float(sampling.temperature)
        self.top_k[slot] = self.vocab_size if sampling.top_k is None \
            else min(sampling.top_k, self.vocab_size)
        self.top_p[slot] = float(sampling.top_p)
        self.seed[slot] = random.getrandbits(62) if sampling.seed is None else sampling.seed
        self.max_new[slot] = self.max_len if params.max_new_tokens is None \
            else params.max_new_tokens
        stops = params.stop_ids
        grew = len(stops) > self.stop_table.size(1)
        if grew:  # rarely
            wider = torch.full((self.max_batch, len(stops)), -1, dtype=torch.long,
                               device=self.device)
            wider[:, : self.stop_table.size(1)] = self.stop_table
            self.stop_table = wider
        self.stop_table[slot] = -1
        if stops:
            self.stop_table[slot, : len(stops)] = torch.tensor(stops, device=self.device)
        self.pos[slot] = 0
        self.counter[slot] = 0
        self.finished[slot] = False
        self.active[slot] = True
        return grew

    def close(self, slot: int) -> None:
        self.infos.pop(slot, None)
        self.active[slot] = False
        self.finished[slot] = False

    def sampling(self, rows: slice) -> tuple[torch.Tensor, ...]:
        """The per-row settings `sample_rows` takes, for `rows`."""
        return (self.temperature[rows], self.top_k[rows], self.top_p[rows], self.seed[rows],
                self.counter[rows])

    def record(self, rows: slice, sampled: torch.Tensor, live: torch.Tensor,
               loops: torch.Tensor, *, advance: bool = True,
               logits: torch.Tensor | None = None) -> None:
        """Store the tokens `rows` sampled (those `live`), move their position past the
        token just fed (`advance`; not after a prefill), and flag the finished ones; given
        the `logits` they were sampled from, also their logprobs (`StepOutput`)."""
        if logits is not None:
            logp = logits.float().log_softmax(dim=-1)
            self.out_logprobs[rows] = logp.gather(1, sampled[:, None])[:, 0]
            top = logp.topk(self.out_top_ids.size(1), dim=-1)
            self.out_top_logprobs[rows], self.out_top_ids[rows] = top.values, top.indices
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

    def step_state(self) -> list[torch.Tensor]:
        """The tensors a step changes (what a capture's warm-up must put back)."""
        return [self.tokens, self.pos, self.counter, self.finished, self.out_tokens,
                self.out_loops, self.out_logprobs, self.out_top_ids, self.out_top_logprobs]


# ---- one loop of a decode step ---------------------------------------------------------------
def decode_loop(model: LoopedGPT, inputs: LoopInputs, previous: torch.Tensor | None,
                writes: StepWrites) -> torch.Tensor:
    """h^t of one loop of a decode step: the model's own loop, on the step's plan with this
    loop's cache writer. A function of its arguments alone (the writer holds this loop's
    entries, so the loop index is not needed), so that torch.compile builds two graphs for
    it (the first loop and every later one), not one per loop."""
    plan = AttentionPlan(inputs.plan.cos, inputs.plan.sin, inputs.plan.masks, writes)
    return norm(model.loop(LoopInputs(inputs.x0, inputs.embedded, plan, inputs.first_kv),
                           previous, 0))


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


# ---- the engine ----------------------------------------------------------------------------------
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
    graphs:      capture each step variant as a CUDA graph (default: on CUDA). On CPU, True
                 runs the same capture procedure (warm-up, state restore) and replays eagerly.
    compile:     torch.compile the whole step (True or "step": one graph per step variant,
                 attending over all max_len positions) or one loop ("loop": two graphs); off
                 by default (see benchmarks/README.md for what it buys). compile_options:
                 more torch.compile keyword arguments (backend, fullgraph, mode, ...).

    It satisfies the server scheduler's `SlotEngine` protocol (`loopedlm.infer.scheduler`).
    """

    def __init__(self, model: LoopedGPT, *, max_batch: int = 8, max_len: int | None = None,
                 max_loops: int | None = None, cache_slots: int | None = None,
                 slot_policy: str = "block", share_first_layer: bool = True,
                 dtype: torch.dtype | None = None, graphs: bool | None = None,
                 compile: bool | str = False, compile_options: dict[str, Any] | None = None):
        cfg = model.config
        device = model.lm_head.weight.device
        self.source = model  # the model as given (self.model may be a cast copy)
        max_len = cfg.sequence_len if max_len is None else max_len
        if not is_int(max_batch) or max_batch < 1:
            raise ValueError(f"max_batch={max_batch!r} is not allowed: an integer >= 1")
        if not is_int(max_len) or not 1 <= max_len <= cfg.sequence_len:
            raise ValueError(f"max_len={max_len!r} is not allowed: an integer in "
                             f"[1, sequence_len={cfg.sequence_len}]")
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile={compile!r} is not allowed: False, True (= 'step') "
                             f"or 'loop'")
        # the engine's capacity: as many loops as the model runs by default, unless asked
        self.max_loops = cfg.loops(max_loops)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else model.lm_head.weight.dtype
        if model.lm_head.weight.dtype != dtype:
            log.info("decode engine: casting a copy of the model to %s", dtype)
            model = copy.deepcopy(model).to(dtype)
        self.model, self.config, self.dtype, self.device = model, cfg, dtype, device
        self.max_batch, self.max_len = max_batch, max_len
        self.buckets = batch_buckets(max_batch)
        self.cache = StaticKVCache(
            cfg, max_batch, max_len, loop_slot_map(self.max_loops, cache_slots, slot_policy),
            dtype=dtype, device=device,
            share_first_layer=share_first_layer and model.mode.first_layer_kv_invariant)
        self.state = SlotState(max_batch, max_len, cfg.vocab_size, device)
        self.graphs = device.type == "cuda" if graphs is None else graphs
        self.compile, self.compile_options = compile, dict(compile_options or {})
        self.loop_fn = torch.compile(decode_loop, **self.compile_options) \
            if compile == "loop" else decode_loop
        self.row_index = torch.arange(max_batch, device=device)
        self._steps: dict[StepKey, Callable[[], None]] = {}

    # ---- slots (the scheduler's protocol: add, step, output, release) ----------------------------
    @property
    def active_slots(self) -> list[int]:
        return sorted(self.state.infos)

    @property
    def step_variants(self) -> int:
        """Step variants built so far (each captured as one CUDA graph when `graphs`)."""
        return len(self._steps)

    def add(self, slot: int, prompt_ids: Sequence[int] | torch.Tensor,
            params: SequenceParams | None = None) -> torch.Tensor:
        """Start a sequence in a free `slot`: prefill its prompt and sample its first token
        (returned as a 0-d device tensor; it is also what the next `step` feeds)."""
        self._check_slot(slot)
        if slot in self.state.infos:
            raise ValueError(f"slot {slot} is in use: release it first")
        params = self._resolve(params)
        ids = self._prompt(slot, prompt_ids)
        # everything is checked above; a failure from here on frees the slot again, so one
        # bad sequence never leaves the engine holding a slot nobody owns
        try:
            logits = self.prefill(slot, ids, params)[-1:]
            rows = slice(slot, slot + 1)
            first = sample_rows(logits, *self.state.sampling(rows))
            self.state.record(rows, first, self.state.active[rows].clone(),
                              self.state.n_loops[rows].clone(), advance=False,
                              logits=None if params.logprobs is None else logits)
        except BaseException:
            self.release(slot)
            raise
        return first[0]

    def release(self, slot: int) -> None:
        """Free `slot` (its cache contents are simply overwritten by the next sequence)."""
        self._check_slot(slot)
        self.state.close(slot)

    def reset(self) -> None:
        for slot in self.active_slots:
            self.release(slot)

    def _check_slot(self, slot: Any) -> None:
        if not is_int(slot) or not 0 <= slot < self.max_batch:
            raise ValueError(f"slot {slot!r} is outside [0, {self.max_batch}): the largest "
                             f"batch bucket is {self.max_batch}")

    def _resolve(self, params: SequenceParams | None) -> SequenceParams:
        """`params` with n_loops filled (the model's by default, checked against this
        engine's max_loops) and its stop ids checked against the vocabulary."""
        params = SequenceParams() if params is None else params
        if not isinstance(params, SequenceParams):
            raise ValueError(f"params={params!r} must be a SequenceParams or None")
        n_loops = self.config.loops(params.n_loops)
        if n_loops > self.max_loops:
            raise ValueError(f"n_loops={n_loops!r} is not allowed: an integer in "
                             f"[1, {self.max_loops}] (the engine's max_loops)")
        vocab = self.config.vocab_size
        bad = [s for s in params.stop_ids if not is_int(s) or not 0 <= s < vocab]
        if bad:
            raise ValueError(f"unknown stop token {bad[0]!r}: ids lie in [0, {vocab})")
        return replace(params, n_loops=n_loops)

    def _prompt(self, slot: int, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Checked token ids (1, T) on the engine's device: where ids enter decoding."""
        what = f"prompt for slot {slot}"
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1)
        elif not isinstance(ids, Sequence) or isinstance(ids, str):
            raise ValueError(f"{what} must be token ids (a list of ints or a tensor)")
        if len(ids) == 0:
            raise ValueError(f"{what} is empty: at least one token is needed")
        check_token_ids(ids, self.config.vocab_size, f"{what}: token id")
        if isinstance(ids, torch.Tensor):
            return ids.to(self.device, torch.long)[None]
        return torch.tensor(list(ids), dtype=torch.long, device=self.device)[None]

    # ---- prefill -----------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, slot: int, ids: Sequence[int] | torch.Tensor,
                params: SequenceParams | None = None) -> torch.Tensor:
        """Append `ids` to `slot`'s cache in one pass and return their logits
        (T, vocab_size). A free slot is opened with `params` (from position 0); an open one
        is extended (a prompt split anywhere is exact; `params` None or of the slot's
        n_loops). `add` uses it for the prompt; `decode` then feeds tokens."""
        self._check_slot(slot)
        info = self.state.infos.get(slot)
        if info is None or params is not None:
            params = self._resolve(params)
        if info is not None and params is not None and params.n_loops != info.params.n_loops:
            raise ValueError(f"slot {slot} runs n_loops={info.params.n_loops}, not "
                             f"{params.n_loops}")
        idx = self._prompt(slot, ids)
        start = 0 if info is None else info.length
        end = start + idx.size(1)
        if end > self.max_len:
            limit = self.max_len if self.max_len < self.config.sequence_len else None
            raise ValueError(f"prompt of {end} tokens{f' ({start} cached)' if start else ''} is "
                             f"longer than the context (" + (f"the engine's max_len={limit}"
                             if limit else f"sequence_len={self.config.sequence_len}") + ")")
        n_loops = (params if info is None else info.params).n_loops
        logits = self._chunk_logits(slot, idx, start, n_loops)
        if info is None:
            if self.state.open(slot, params):
                self._steps.clear()
            info = self.state.infos[slot]
        info.length = end
        self.state.pos[slot] = end
        return logits

    # ---- the decode step ----------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> StepOutput:
        """Feed every active slot its last token and sample the next (no host sync on the
        fixed-loop path). Returns device tensors over the step's bucket. A step that raises
        has moved no slot on (the state is written once the tokens are sampled), so it may be
        retried, with or without some slots released."""
        batch = self._bucket()
        infos = list(self.state.infos.values())
        if any(info.params.adaptive is not None for info in infos):
            self._adaptive_step(batch)
        else:
            self._runner(self._step_key(batch))()
        for info in infos:
            info.length = min(info.length + 1, self.max_len)
        return self.output(batch)

    def output(self, batch: int | None = None) -> StepOutput:
        """The last step's (or the adds') outputs for rows [0, batch) (default: the
        current bucket), as views of the engine's static buffers."""
        batch = self._bucket() if batch is None else batch
        state = self.state
        # (the logprob buffers whole, over every slot: no view to build in each step)
        return StepOutput(state.out_tokens[:batch], state.finished[:batch],
                          state.out_loops[:batch], state.out_logprobs, state.out_top_ids,
                          state.out_top_logprobs)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced step: feed `tokens` (bucket,) at the active slots' positions and
        return (logits (bucket, vocab_size), loops spent (bucket,)); nothing is sampled."""
        batch, state = self._bucket(), self.state
        if tokens.shape != (batch,):
            raise ValueError(f"tokens have shape {tuple(tokens.shape)}; this step takes "
                             f"({batch},)")
        full = [slot for slot, info in state.infos.items() if info.length >= self.max_len]
        if full:
            raise ValueError(f"slot {full[0]} holds max_len={self.max_len} tokens: no room "
                             f"for another")
        infos = list(state.infos.values())
        live = state.active[:batch].clone()
        if any(info.params.adaptive is not None for info in infos):
            logits, loops = self._adaptive_logits(tokens, batch)
        else:
            logits = self._step_logits(tokens, self._step_key(batch))
            loops = state.n_loops[:batch].clone()
        state.pos[:batch] += live.long()
        for info in infos:
            info.length = min(info.length + 1, self.max_len)
        return logits, loops

    def _bucket(self) -> int:
        if not self.state.infos:
            raise ValueError("no active slot: add a sequence first")
        highest = max(self.state.infos) + 1
        return next(b for b in self.buckets if b >= highest)

    def _kv_len(self) -> int:
        """Key positions a step attends over: all of them in a captured or compiled step (one
        graph per variant); in eager steps the longest filled length, rounded up."""
        if self.graphs or self.compile in (True, "step"):
            return self.max_len
        longest = max(info.length for info in self.state.infos.values()) + 1
        return min(self.max_len, -(-longest // KV_LEN_STEP) * KV_LEN_STEP)

    def _step_key(self, batch: int) -> StepKey:
        params = [info.params for info in self.state.infos.values()]
        n_loops = max(p.n_loops for p in params)
        return StepKey(batch, n_loops, self._kv_len(),
                       mixed=any(p.n_loops != n_loops for p in params),
                       filtered=any(p.filtered for p in params),
                       greedy=all(p.greedy for p in params),
                       logprobs=any(p.logprobs is not None for p in params))

    def _runner(self, key: StepKey) -> Callable[[], None]:
        """The step variant `key`, built once: eager, compiled, or captured as a CUDA graph."""
        if key in self._steps:
            return self._steps[key]

        def body() -> None:
            self._step_body(key)
        if self.compile in (True, "step"):
            body = torch.compile(body, **{"dynamic": False, **self.compile_options})
        if self.graphs:
            body = capture_step(body, self.state.step_state(), self.device)
        self._steps[key] = body
        return body

    def _step_body(self, key: StepKey) -> None:
        state, rows = self.state, slice(0, key.batch)
        live = state.active[rows] & ~state.finished[rows]
        logits = self._step_logits(state.tokens[rows], key)
        if key.greedy:
            sampled = logits.argmax(dim=-1)
        else:
            sampled = sample_rows(logits, *state.sampling(rows), filtered=key.filtered)
        state.record(rows, sampled, live, state.n_loops[rows],
                     logits=logits if key.logprobs else None)

    # ---- the passes: a prefill chunk, a fixed-loop step, an adaptive step ----------------------
    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables at `positions`, in the weights' dtype: the model keeps them in bf16 (as
        nanochat), and an fp32 stream would promote them in each of the 8 multiplies per
        layer; converting once per pass is exact."""
        cos, sin = rotary_at(self.model.cos, self.model.sin, positions)
        return cos.to(self.dtype), sin.to(self.dtype)

    def _step_plan(self, pos: torch.Tensor, kv_len: int) -> AttentionPlan:
        """The plan of one token per row at positions `pos`, over key positions [0, kv_len)."""
        cos, sin = self._rotary(pos[:, None])
        return AttentionPlan(cos, sin, attention_masks(self.config, pos[:, None], kv_len))

    def _chunk_logits(self, slot: int, ids: torch.Tensor, start: int, n_loops: int
                      ) -> torch.Tensor:
        """Logits (T, vocab_size) of `ids` (1, T) appended to `slot`'s cache at `start`."""
        model, end = self.model, start + ids.size(1)
        slots = torch.arange(start, end, device=self.device)[None]
        cos, sin = self._rotary(slots)
        plan = AttentionPlan(cos, sin, attention_masks(self.config, slots, end,
                                                       from_start=start == 0),
                             ChunkWrites(self.cache, slot, start, end))
        inputs = model.prepare(ids, plan=plan)
        previous = None
        for loop in range(n_loops):
            previous = norm(model.loop(inputs, previous, loop))
        return model.logits(previous)[0]

    def _step_logits(self, tokens: torch.Tensor, key: StepKey) -> torch.Tensor:
        """Logits (batch, V) of `tokens` fed at the rows' positions, every row running
        `key.n_loops` loops and reading its output at its own loop count; with shared cache
        slots, a row past its own count writes no keys."""
        model, batch, cache = self.model, tokens.size(0), self.cache
        pos, n_loops = self.state.pos[:batch], self.state.n_loops[:batch]
        inputs = model.prepare(tokens[:, None], plan=self._step_plan(pos, key.kv_len))
        rows = self.row_index[:batch]
        shared = key.mixed and cache.slot_of_loop != list(range(self.max_loops))
        previous = final = None
        for loop in range(key.n_loops):
            writes = StepWrites(cache.loop_entries(loop, batch, key.kv_len), rows, pos,
                                write_first=cache.writes(loop, 0),
                                live=(n_loops > loop) if shared else None)
            h = self.loop_fn(model, inputs, previous, writes)
            if key.mixed:  # each row's output is its own last loop's
                final = h if final is None else torch.where(
                    (n_loops > loop)[:, None, None], h, final)
            previous = h
        return model.logits((final if key.mixed else previous)[:, -1])

    def _adaptive_step(self, batch: int) -> None:
        state, rows = self.state, slice(0, batch)
        live = state.active[rows] & ~state.finished[rows]
        logits, loops = self._adaptive_logits(state.tokens[rows], batch)
        logprobs = any(info.params.logprobs is not None for info in state.infos.values())
        state.record(rows, sample_rows(logits, *state.sampling(rows)), live, loops,
                     logits=logits if logprobs else None)

    def _adaptive_logits(self, tokens: torch.Tensor, batch: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (batch, V), loops spent (batch,)) of `tokens` fed at the rows' positions.
        Each row stops after the first loop t >= its min_loops whose state converged, or at
        its own n_loops; stopped rows leave the batch (their blocks do not run) and the cache
        entries of their skipped loops get the last computed loop's keys/values."""
        model, state, cache = self.model, self.state, self.cache
        kv_len = self._kv_len()
        pos, n_loops = state.pos[:batch], state.n_loops[:batch]
        adaptive = [info.params.adaptive if info else None
                    for info in (state.infos.get(r) for r in range(batch))]
        threshold, use_kl, min_loops = adaptive_row_settings(adaptive, pos.device)
        any_kl = bool(use_kl.any())
        all_inputs = model.prepare(tokens[:, None], plan=self._step_plan(pos, kv_len))
        inputs = all_inputs
        final = torch.empty_like(all_inputs.embedded)
        spent = torch.zeros(batch, dtype=torch.long, device=pos.device)
        active = self.row_index[:batch]
        previous = previous_logp = None
        for loop in range(max(info.params.n_loops for info in state.infos.values())):
            writes = StepWrites(cache.loop_entries(loop, batch, kv_len), active, pos[active],
                                write_first=cache.writes(loop, 0),
                                gather=active.numel() < batch)
            h = decode_loop(model, inputs, previous, writes)
            spent[active] += 1
            logp = F.log_softmax(model.logits(h[:, -1]), dim=-1) if any_kl else None
            last = n_loops[active] == loop + 1
            if previous is None:
                converged = torch.zeros_like(last)
            else:
                measure = ((h - previous).float().norm(dim=-1) / h.float().norm(dim=-1))[:, -1]
                if any_kl:
                    kl = (logp.exp() * (logp - previous_logp)).sum(-1)
                    measure = torch.where(use_kl[active], kl, measure)
                converged = (measure < threshold[active]) & (loop + 1 >= min_loops[active])
            stop = last | converged
            if bool(stop.any()):
                final[active[stop]] = h[stop]
                filled = active[converged & ~last]
                if filled.numel():
                    cache.fill_skipped_loops(loop, filled, pos[filled])
                keep = ~stop
                active, h = active[keep], h[keep]
                logp = None if logp is None else logp[keep]
                if active.numel() == 0:
                    break
                inputs = all_inputs.select_rows(active, self._step_plan(pos[active], kv_len))
            previous, previous_logp = h, logp
        return model.logits(final[:, -1]), spent


__all__ = ["DecodeEngine", "SequenceParams", "AdaptiveLoops", "StepOutput", "StepKey",
           "SlotState", "batch_buckets", "capture_step", "decode_loop", "CRITERIA",
           "MAX_LOGPROBS"]
