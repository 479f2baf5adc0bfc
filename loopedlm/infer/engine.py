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

Adaptive loops (`AdaptiveLoops`) stop rows inside a step. Eagerly, rows that converge leave
the batch; under compile="auto" on a CPU, packaged loops (`adaptive_loop`) run every row and
mask the stopped ones. A step with an adaptive row is never captured as a CUDA graph.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F

import loopedlm.infer.packaged as packaged
from loopedlm.common.paths import use_compile_cache
from loopedlm.common.validation import is_int
from loopedlm.infer.adaptive_prompt import adaptive_prefill
from loopedlm.infer.cache import (
    ChunkWrites,
    Entry,
    PromptWrites,
    StaticKVCache,
    StepWrites,
    loop_slot_map,
)
from loopedlm.infer.exits import (
    EXIT_CRITERIA,
    PROMPT_CRITERIA,
    LoopSignals,
    check_criterion,
    default_criterion,
    relative_change,
    rows_converged,
    update_exit_cdf,
)
from loopedlm.infer.options import (
    COMPILE_MODES,
    CRITERIA,
    DEFAULT_DRAFT_TOKENS,
    MAX_DRAFT_TOKENS,
)
from loopedlm.infer.sampling import (
    CORRECT,
    DRAFT,
    SamplingParams,
    row_probs,
    sample_rows,
    speculative_accept,
)
from loopedlm.infer.warm import (
    WarmSpec,
    compile_pays,
    package_path,
    package_state,
    prune,
    record,
    start_warming,
    warm_seconds,
)
from loopedlm.model.attention import AttentionPlan, Masks, attention_masks, rotary_at
from loopedlm.model.config import ModelConfig, check_token_ids
from loopedlm.model.gpt import LoopedGPT, LoopInputs

log = logging.getLogger(__name__)

KV_LEN_STEP = 64  # eager steps attend over the filled length rounded up to this
MAX_LOGPROBS = 5  # most likely tokens a step reports per row (as OpenAI's `logprobs` <= 5)
# compile="background": a step variant is compiled (on a worker thread) once it has run this
# many times, so short generations never pay for a compile (measured in bench_decode.py);
# compile="auto" on a CPU weighs a compile (`loopedlm.infer.warm`) every this many runs
AUTO_COMPILE_AFTER = 32
COMPILED_VARIANTS = 256  # graphs of the compiled step (one per step variant) before eager
COMPILE_EXIT_WAIT = 120.0  # seconds an exiting process waits for a compile on a worker thread


# ---- the per-row options -----------------------------------------------------------------------
@dataclass(frozen=True)
class AdaptiveLoops:
    """Stop looping a decoded token once its exit criterion says so (and, with `prompt`, each
    prompt token too). The skipped loops' cache entries at that position get the keys and
    values of the token's last computed loop: convergence means the loop map is (nearly) at a
    fixed point for this token, so the next loop would write (nearly) the same keys; copying
    them is the best estimate that costs no compute (docs/design.md#decoding).

    criterion: one of `loopedlm.infer.exits.EXIT_CRITERIA`; None (default): the model's own,
        `gate` for a model with an exit gate (Ouro), else `state`.
      "state": relative change of the loop output, ||h^t - h^{t-1}|| / ||h^t|| < threshold.
        Free: h^t is computed anyway, and it is what the next loop reads.
      "kl": KL(p_t || p_{t-1}) < threshold between successive loops' next-token
        distributions (nats). Closer to what the user sees, but it costs one LM-head
        evaluation per loop, which for small models is as large as a loop itself.
      "kl_previous": Huginn's: KL(p_{t-1} || p_t) < threshold, p_0 uniform.
      "gate": Ouro's rule: the cumulative exit probability of its gate reaches threshold.
    min_loops: never stop before this many loops (None: the criterion's earliest, 2 for a
        change between loops, 1 for the gate and kl_previous).
    prompt: the prompt's tokens stop looping by the same rule (`state` and `gate` only: the
        others read logits at every loop), each as if it had been decoded: its keys and
        values, and so everything after it, are those it would have had as a decoded token
        fed by `DecodeEngine.decode` (`loopedlm.infer.adaptive_prompt`). False (default):
        the prompt runs every loop.
    """

    threshold: float
    criterion: str | None = None
    min_loops: int | None = None
    prompt: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, int | float) or math.isnan(self.threshold) \
                or self.threshold < 0:
            raise ValueError(f"adaptive_threshold={self.threshold!r} is not allowed: a number >= 0")
        if self.criterion is not None:
            check_criterion(self.criterion, has_exit_gate=True)
        first = 1 if self.criterion is None else EXIT_CRITERIA[self.criterion].first_loop
        if self.min_loops is not None and (not is_int(self.min_loops) or self.min_loops < first):
            raise ValueError(f"min_loops={self.min_loops!r} is not allowed: an integer >= {first}")
        if not isinstance(self.prompt, bool):
            raise ValueError(f"adaptive_prompt={self.prompt!r} is not allowed: True or False")
        if self.prompt and self.criterion is not None \
                and EXIT_CRITERIA[self.criterion].needs_logits:
            raise ValueError(f"adaptive_prompt=True with adaptive_criterion={self.criterion!r} "
                             f"is not allowed: a prompt stops by {list(PROMPT_CRITERIA)} (the "
                             f"others read every token's logits at every loop)")

    @classmethod
    def given(cls, threshold: float | None, criterion: str | None = None,
              min_loops: int | None = None, prompt: bool = False) -> AdaptiveLoops | None:
        """The adaptive loops a request's settings ask for: None without a threshold (every
        loop; then `prompt`, which needs one, is refused with its value)."""
        if threshold is None:
            if prompt is not False:
                raise ValueError(f"adaptive_prompt={prompt!r} needs an adaptive_threshold "
                                 f"(the exit rule the prompt's tokens follow)")
            return None
        return cls(threshold, criterion, min_loops, prompt)

    def resolved(self, has_exit_gate: bool) -> AdaptiveLoops:
        """These settings for a model (`has_exit_gate`): criterion and min_loops filled, and
        checked against it."""
        criterion = default_criterion(has_exit_gate) if self.criterion is None else self.criterion
        check_criterion(criterion, has_exit_gate)
        return AdaptiveLoops(self.threshold, criterion, EXIT_CRITERIA[criterion].first_loop
                             if self.min_loops is None else self.min_loops, self.prompt)


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
    draft_loops: self-speculative decoding (docs/design.md#decoding): the same weights at
        this many loops (1 .. n_loops - 1) draft `draft_tokens` tokens, which one pass at
        n_loops verifies; the output is the n_loops output exactly (greedy: token for token;
        sampling: in distribution). None: off.
    """

    n_loops: int | None = None
    sampling: SamplingParams = SamplingParams()
    max_new_tokens: int | None = None
    stop_ids: tuple[int, ...] = ()
    adaptive: AdaptiveLoops | None = None
    draft_loops: int | None = None
    draft_tokens: int = DEFAULT_DRAFT_TOKENS
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
        check_draft_loops(self.draft_loops, self.n_loops)
        if not is_int(self.draft_tokens) or not 1 <= self.draft_tokens <= MAX_DRAFT_TOKENS:
            raise ValueError(f"draft_tokens={self.draft_tokens!r} is not allowed: an integer "
                             f"in [1, {MAX_DRAFT_TOKENS}]")
        if self.draft_loops is not None and self.adaptive is not None:
            raise ValueError("draft_loops and adaptive loops do not combine: speculative "
                             "decoding verifies at a fixed n_loops")
        object.__setattr__(self, "stop_ids", tuple(self.stop_ids))

    @property
    def earliest_stop(self) -> int:
        """The first loop (1-based) after which an adaptive step may stop this row: its
        min_loops, or its n_loops for a row without adaptive loops (n_loops resolved)."""
        if self.adaptive is None:
            return self.n_loops
        return min(self.adaptive.min_loops, self.n_loops)

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
    greedy: every row is greedy (no noise to draw). speculative: some rows decode
    speculatively (they take their tokens from their verified ones instead). logprobs: a row
    asks for logprobs. loop_program: not a step but a part of an adaptive step (a package's
    only): one of its loops (`adaptive_loop`), "first" or "later" (the other fields but
    `batch` and `rows` are then unused), or its end, "coda" (`adaptive_coda`: the sampling
    flags count). rows: a later loop over only this many of the batch's rows, gathered
    (the rows still looping, and rows that stopped to fill the bucket); 0: every row."""

    batch: int
    n_loops: int
    kv_len: int
    mixed: bool
    filtered: bool
    greedy: bool
    speculative: bool = False
    logprobs: bool = False
    loop_program: str = ""
    rows: int = 0


def check_draft_loops(draft_loops: int | None, n_loops: int | None) -> None:
    """A ValueError naming both counts unless the draft runs fewer loops than the model it
    drafts for (where a speculative request enters: `SequenceParams`, the engine, the
    server); n_loops None (not known yet): an integer >= 1. The one check of draft_loops."""
    if draft_loops is None:
        return
    if n_loops is None:
        if not (is_int(draft_loops) and draft_loops >= 1):
            raise ValueError(f"draft_loops={draft_loops!r} is not allowed: an integer >= 1, "
                             f"below n_loops (or None)")
    elif not (is_int(draft_loops) and 1 <= draft_loops < n_loops):
        raise ValueError(f"draft_loops={draft_loops!r} is not allowed with n_loops={n_loops}: "
                         f"the draft runs fewer loops than the model it drafts for "
                         f"(1 .. {n_loops - 1})")


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes a step runs at: powers of two below `max_batch`, then `max_batch`."""
    buckets, size = [], 1
    while size < max_batch:
        buckets.append(size)
        size *= 2
    return [*buckets, max_batch]


def capture_step(body: Callable[[], None], state: list[torch.Tensor],
                 device: torch.device, pool: Any = None) -> Callable[[], None]:
    """CUDA-graph capture of a step `body` that updates the tensors `state` in place: warm
    up (which advances the state), put the state back, then record, on `device` (the
    engine's, whichever device the calling thread has current) and into memory `pool`
    (`torch.cuda.graph_pool_handle()`: one pool that all of an engine's graphs share;
    None: a private one). Keys/values the warm-up wrote lie at or after each row's position,
    so the real steps rewrite them before any query can read them. Unlike
    `torch.cuda.graph`, the capture does not synchronise and empty the allocator's cache
    each time. Off CUDA the same procedure runs and the 'replay' is a plain call (tested on
    CPU)."""
    saved = [t.clone() for t in state]
    on_cuda = device.type == "cuda"

    def restore() -> None:
        for tensor, value in zip(state, saved, strict=True):
            tensor.copy_(value)
    if not on_cuda:
        try:
            for _ in range(2):
                body()
        finally:  # also when the warm-up fails: a failed step leaves every slot as it was
            restore()
        return body
    with torch.cuda.device(device):
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(stream):
                try:
                    for _ in range(2):
                        body()
                finally:  # (as above)
                    restore()
                graph = torch.cuda.CUDAGraph()
                graph.capture_begin(*(() if pool is None else (pool,)))
                try:
                    body()
                finally:
                    graph.capture_end()
        finally:
            torch.cuda.current_stream(device).wait_stream(stream)
    return graph.replay


def cpu_compile_options(device: torch.device, options: dict[str, Any] | None) -> dict[str, Any]:
    """torch.compile keyword arguments for a decode step on `device`: `options` as given, and
    on a CPU with inductor (the default backend, no `mode`) inductor's C++ wrapper unless
    `options["options"]` says otherwise. A decode step is a few hundred small kernels, so
    the Python wrapper that calls them costs more than they do: the C++ one made the
    compiled step of the tiny preset 1.2-2x faster at N=1 and 12 (docs/design.md#decoding,
    `benchmarks/bench_decode.py`). On CUDA the step is replayed in CUDA graphs, which skip
    the wrapper anyway."""
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"compile_options={options!r} is not allowed: a dict of "
                         f"torch.compile keyword arguments (backend, mode, options, ...)")
    options = dict(options or {})
    if not isinstance(options.get("options", {}), dict):
        raise ValueError(f"compile_options['options']={options['options']!r} is not allowed: "
                         f"a dict of inductor settings, e.g. {{'cpp_wrapper': False}}")
    if device.type != "cpu" or options.get("backend", "inductor") != "inductor" \
            or "mode" in options:
        return options
    return {**options, "options": {"cpp_wrapper": True, **options.get("options", {})}}


def join_compiles(timeout: float = COMPILE_EXIT_WAIT) -> None:
    """Wait (up to `timeout` seconds each) for step compiles still running on worker threads.
    Run at exit: a daemon thread stopped inside a compile aborts the interpreter ("terminate
    called without an active exception")."""
    for thread in threading.enumerate():
        if thread.name == "loopedlm-compile" and thread.is_alive():
            log.info("decode engine: waiting for a decode-step compile to finish before exiting")
            thread.join(timeout)


atexit.register(join_compiles)


def dynamic_compile_config() -> contextlib.ExitStack:
    """Settings for compiling the step with dynamic shapes (compile="background", "auto" on a
    CPU): the recompile limit raised (one graph per step variant), and no duck sizing, so
    that sizes which happen to be equal (a key length of 128 and d_model 128) get separate
    symbols: the graph compiled on stand-ins by a warming process is then the one a run with
    other lengths looks up in the on-disk caches."""
    import torch.fx.experimental._config as fx_config

    stack = contextlib.ExitStack()
    # floats (a power, a scale) stay constants: traced as symbols they were specialized
    # anyway, after a restart of the whole trace that doubled a warm compile's time
    stack.enter_context(torch._dynamo.config.patch(recompile_limit=COMPILED_VARIANTS,
                                                   specialize_float=True))
    stack.enter_context(fx_config.patch(use_duck_shape=False))
    return stack


def stand_ins(tree: Any) -> Any:
    """`tree` (objects, lists, tuples of tensors) with every tensor replaced by a zero
    tensor of the same shape, strides, dtype and device, tensors that share storage mapped
    to views of one new storage: what a compile sees is the same, and warming it up on the
    stand-ins leaves the real tensors alone."""
    storages: dict[int, torch.Tensor] = {}
    seen: dict[int, Any] = {}

    def stand_in(t: torch.Tensor) -> torch.Tensor:
        # a view's base too has the shape and strides of the real one (a compile guards it)
        real = t if t._base is None else t._base
        base = storages.get(real.untyped_storage().data_ptr())
        if base is None:
            base = torch.empty_strided(real.size(), real.stride(), dtype=real.dtype,
                                       device=real.device).zero_()
            storages[real.untyped_storage().data_ptr()] = base
        return base if t is real else base.as_strided(t.size(), t.stride(), t.storage_offset())

    def walk(x: Any) -> Any:
        if id(x) in seen:
            return seen[id(x)]
        if isinstance(x, torch.Tensor):
            out = stand_in(x)
        elif isinstance(x, list | tuple):
            out = type(x)(walk(item) for item in x)
        elif hasattr(x, "__dict__") and not isinstance(x, type):
            out = copy.copy(x)
            for name, value in vars(x).items():
                if isinstance(value, torch.Tensor | list | tuple):
                    setattr(out, name, walk(value))
        else:
            out = x
        seen[id(x)] = out
        return out
    return walk(tree)


@dataclass
class SpeculationStats:
    """Self-speculative decoding so far: verify passes (one per row per round), tokens
    drafted, tokens emitted (the kept drafts and the verify pass's own token)."""

    rounds: int = 0
    drafted: int = 0
    emitted: int = 0

    @property
    def acceptance(self) -> float:
        """Share of the drafted tokens that the verify passes kept."""
        return (self.emitted - self.rounds) / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_round(self) -> float:
        """Mean tokens out of one verify pass (1 .. draft_tokens + 1)."""
        return self.emitted / self.rounds if self.rounds else float("nan")


# ---- per-slot state ----------------------------------------------------------------------------
@dataclass
class SlotInfo:
    """What the host knows of an open slot: its options (n_loops filled) and length."""

    params: SequenceParams
    length: int = 0  # tokens in the cache (an upper bound once finished)
    start: int = 0  # the prompt's length (where the token budget starts)
    pending: int = 0  # speculative: verified tokens not yet emitted
    ending: bool = False  # speculative: the pending tokens finish the sequence
    prompt_loops: int = 0  # loops its prompt's tokens ran, summed (adaptive prompts: fewer)
    last_loops: int = 0  # loops the prompt's last token ran (its first token's read-out)


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
        self.rows = torch.arange(max_batch, device=device)  # each row's index (constant)
        # self-speculative decoding: a row's verified tokens wait here (`pending`), and the
        # next steps emit them one per step (`pending_at`: the next one to emit)
        self.speculative = state(torch.bool, False)
        self.draft_loops = state(torch.long, 1)
        self.pending = torch.zeros((max_batch, MAX_DRAFT_TOKENS + 1), dtype=torch.long,
                                   device=device)
        self.pending_at = state(torch.long)
        top = min(MAX_LOGPROBS, vocab_size)
        span = MAX_DRAFT_TOKENS + 1  # the verify pass's logprobs of the verified tokens
        self.pending_logprobs = torch.zeros((max_batch, span), dtype=torch.float32, device=device)
        self.pending_top_ids = torch.zeros((max_batch, span, top), dtype=torch.long, device=device)
        self.pending_top_logprobs = torch.zeros((max_batch, span, top), dtype=torch.float32,
                                                device=device)
        # the step's static outputs
        self.out_tokens = state(torch.long, -1)
        self.out_loops = state(torch.long)
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
        self.speculative[slot] = params.draft_loops is not None
        self.draft_loops[slot] = params.draft_loops or 1
        self.pending_at[slot] = 0
        return grew

    def close(self, slot: int) -> None:
        """Free `slot`. A step computes every row of its bucket, free ones too, over the keys
        of the open rows' longest length: a free row goes back to position 0, so that it
        never writes beyond them (its writes land in its own free slot)."""
        self.infos.pop(slot, None)
        self.active[slot] = False
        self.finished[slot] = False
        self.pos[slot] = 0

    def sampling(self, rows: slice) -> tuple[torch.Tensor, ...]:
        """The per-row settings `sample_rows` takes, for `rows`."""
        return (self.temperature[rows], self.top_k[rows], self.top_p[rows], self.seed[rows],
                self.counter[rows])

    def record(self, rows: slice, sampled: torch.Tensor, live: torch.Tensor,
               loops: torch.Tensor, *, advance: bool = True,
               logits: torch.Tensor | None = None, speculative: bool = False) -> None:
        """Store the tokens `rows` sampled (those `live`), move their position past the
        token just fed (`advance`; not after a prefill), and flag the finished ones; given
        the `logits` they were sampled from, also their logprobs (`StepOutput`), but for
        the speculative rows when `speculative` (theirs came with their verified tokens:
        `pop_pending`)."""
        if logits is not None:
            logp = logits.float().log_softmax(dim=-1)
            chosen = logp.gather(1, sampled[:, None])[:, 0]
            top = logp.topk(self.out_top_ids.size(1), dim=-1)
            values, ids = top.values, top.indices
            if speculative:
                keep = self.speculative[rows]
                chosen = torch.where(keep, self.out_logprobs[rows], chosen)
                values = torch.where(keep[:, None], self.out_top_logprobs[rows], values)
                ids = torch.where(keep[:, None], self.out_top_ids[rows], ids)
            self.out_logprobs[rows] = chosen
            self.out_top_logprobs[rows], self.out_top_ids[rows] = values, ids
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

    def pop_pending(self, rows: slice, sampled: torch.Tensor, logprobs: bool = False
                    ) -> torch.Tensor:
        """`sampled` (rows,) with each speculative row's next verified token instead (the
        row moves on to the one after); with `logprobs`, that token's logprobs (from the
        verify pass) go to the speculative rows' outputs."""
        speculative = self.speculative[rows]
        at = self.pending_at[rows].clone()  # (a view, which the line below moves on)
        verified = self.pending[rows].gather(1, at[:, None])[:, 0]
        self.pending_at[rows] = at + speculative.long()
        if logprobs:
            index = at[:, None, None].expand(-1, 1, self.pending_top_ids.size(2))
            self.out_logprobs[rows] = torch.where(
                speculative, self.pending_logprobs[rows].gather(1, at[:, None])[:, 0],
                self.out_logprobs[rows])
            self.out_top_ids[rows] = torch.where(
                speculative[:, None], self.pending_top_ids[rows].gather(1, index)[:, 0],
                self.out_top_ids[rows])
            self.out_top_logprobs[rows] = torch.where(
                speculative[:, None], self.pending_top_logprobs[rows].gather(1, index)[:, 0],
                self.out_top_logprobs[rows])
        return torch.where(speculative, verified, sampled)

    def step_state(self) -> list[torch.Tensor]:
        """The tensors a step changes (what a capture's warm-up must put back)."""
        return [self.tokens, self.pos, self.counter, self.finished, self.out_tokens,
                self.out_loops, self.out_logprobs, self.out_top_ids, self.out_top_logprobs,
                self.pending_at]

# ---- the passes: a plan, one loop of a decode step, the fixed-loop step ---------------------------
def pass_plan(model: LoopedGPT, slots: torch.Tensor, n_keys: int, dtype: torch.dtype, *,
              from_start: bool = False, cache: Any = None,
              fused: list[torch.Tensor | None] | None = None,
              masks: Masks | None = None) -> AttentionPlan:
    """The plan of a decoding pass whose queries sit at positions `slots` (B|1, T) over key
    positions [0, n_keys), built once per pass for every layer and loop: the RoPE tables in
    the weights' dtype (the model keeps them in bf16, as nanochat, and an fp32 stream would
    promote them in every multiply; converting once is exact), the masks additive (SDPA
    would convert a boolean mask in every layer; `masks`: a pass's own, as given) and the
    fused projections."""
    cos, sin = rotary_at(model.cos, model.sin, slots)
    if masks is None:
        masks = attention_masks(model.config, slots, n_keys, from_start=from_start,
                                dtype=dtype)
    return AttentionPlan(cos.to(dtype), sin.to(dtype), masks, cache, fused)


def decode_loop(model: LoopedGPT, inputs: LoopInputs, previous: torch.Tensor | None,
                writes: StepWrites) -> torch.Tensor:
    """h^t of one loop of a decode step: the model's own loop, on the step's plan with this
    loop's cache writer. A function of its arguments alone (the writer holds this loop's
    entries, so the loop index is not needed), so that torch.compile builds two graphs for
    it (the first loop and every later one), not one per loop."""
    plan = inputs.plan
    plan = AttentionPlan(plan.cos, plan.sin, plan.masks, writes, plan.fused, plan.rows)
    return model.loop_state(model.loop(replace(inputs, plan=plan), previous, 0))


def outer_writes(model: LoopedGPT, entries: list[Entry], rows: torch.Tensor,
                 pos: torch.Tensor, gather: bool = False) -> StepWrites | None:
    """The cache writer of the layers outside the loop (Huginn's prelude and coda: one entry
    each, which every loop's `entries` hold), for `rows` of the entries at positions `pos`
    (`gather`: a subset, read gathered); None for a model without such layers. They write at
    every pass that runs them, so a coda read out again overwrites its keys."""
    if model.config.n_layers == model.config.depth:
        return None
    return StepWrites(entries, rows, pos, write_first=True, gather=gather)


def decode_pass(model: LoopedGPT, tokens: torch.Tensor, pos: torch.Tensor,
                n_loops: torch.Tensor, rows: torch.Tensor, cache: StaticKVCache,
                entries: list[list[Entry]], fused: list[torch.Tensor | None], *,
                max_loops: int, mixed: bool, gather: bool = False,
                loop_fn: Callable = decode_loop) -> torch.Tensor:
    """The logits (R, T, V) of `tokens` (R, T) fed at positions pos[r] .. pos[r]+T-1:
    every row runs `max_loops` loops and (`mixed`: rows differ in `n_loops`) reads out
    its own last loop's state; with shared cache slots, a row past its own count writes
    no keys. `entries[loop]`: that loop's cache views (`StaticKVCache.loop_entries`); row r
    is rows[r] of them (`gather`: a subset, read gathered). Their length is the keys
    attended (a dynamic size when compiled). Layers outside the loop (a prelude, a coda)
    write their single entries as they run."""
    n_keys = entries[0][0][0].size(2)
    slots = pos[:, None] if tokens.size(1) == 1 else \
        pos[:, None] + torch.arange(tokens.size(1), device=pos.device)
    outer = outer_writes(model, entries[0], rows, pos, gather)
    inputs = model.prepare(tokens, plan=pass_plan(model, slots, n_keys, cache.dtype,
                                                  cache=outer, fused=fused))
    shared = mixed and cache.slot_of_loop != list(range(len(cache.slot_of_loop)))
    previous = final = None
    for loop in range(max_loops):
        writes = StepWrites(entries[loop], rows, pos, write_first=cache.writes(loop, 0),
                            live=(n_loops > loop) if shared else None, gather=gather)
        h = loop_fn(model, inputs, previous, writes)
        if mixed:  # each row's output is its own last loop's
            final = h if final is None else torch.where((n_loops > loop)[:, None, None], h, final)
        previous = h
    return model.logits(final if mixed else previous, inputs.plan)


def step_logits(model: LoopedGPT, key: StepKey, tokens: torch.Tensor, pos: torch.Tensor,
                n_loops: torch.Tensor, rows: torch.Tensor, cache: StaticKVCache,
                key_slots: torch.Tensor, fused: list[torch.Tensor | None],
                loop_fn: Callable = decode_loop,
                entries: list[list[Entry]] | None = None) -> torch.Tensor:
    """Logits (batch, V) of `tokens` (batch,) fed at positions `pos` (`decode_pass` at
    `key.n_loops`). The keys attended are those at positions `key_slots` (0 .. kv_len-1: a
    tensor, so that a compiled step takes the length as a dynamic size); `entries[loop]`:
    that loop's cache views, if made already."""
    if entries is None:
        entries = [cache.loop_entries(loop, tokens.size(0), key_slots.size(0))
                   for loop in range(key.n_loops)]
    logits = decode_pass(model, tokens[:, None], pos, n_loops, rows, cache, entries, fused,
                         max_loops=key.n_loops, mixed=key.mixed, loop_fn=loop_fn)
    return logits[:, -1]


def fixed_step(model: LoopedGPT, key: StepKey, state: SlotState, cache: StaticKVCache,
               key_slots: torch.Tensor, fused: list[torch.Tensor | None],
               loop_fn: Callable = decode_loop,
               entries: list[list[Entry]] | None = None) -> None:
    """One fixed-loop decode step of rows [0, key.batch): feed each row its last token,
    sample the next, record it (`SlotState.record`). Static shapes and no host sync: what
    torch.compile compiles whole (`compile="step"`) and a CUDA graph captures. A function of
    its arguments, so that a compile can be warmed on stand-ins of the same shapes."""
    rows = slice(0, key.batch)
    live = state.active[rows] & ~state.finished[rows]
    logits = step_logits(model, key, state.tokens[rows], state.pos[rows], state.n_loops[rows],
                         state.rows[rows], cache, key_slots, fused, loop_fn, entries)
    finish_step(state, key, logits, live, state.n_loops[rows])


def finish_step(state: SlotState, key: StepKey, logits: torch.Tensor, live: torch.Tensor,
                loops: torch.Tensor) -> None:
    """The end of a decode step of rows [0, key.batch) (`live`: those open and not finished
    when it began): sample from `logits` (batch, V) as the variant `key` says, give the
    speculative rows their next verified token instead, and record the tokens and the
    `loops` each row spent (`SlotState.record`)."""
    rows = slice(0, key.batch)
    if key.greedy:  # no noise, no sort
        sampled = logits.argmax(dim=-1)
    else:
        sampled = sample_rows(logits, *state.sampling(rows), filtered=key.filtered)
    if key.speculative:  # their computed token is discarded (their cache writes are the
        # verified ones again: same inputs)
        sampled = state.pop_pending(rows, sampled, logprobs=key.logprobs)
    state.record(rows, sampled, live, loops, logits=logits if key.logprobs else None,
                 speculative=key.speculative)


def adaptive_loop(model: LoopedGPT, variant: StepKey, cache: StaticKVCache,
                  entries: list[Entry], rows: AdaptiveRows | list[torch.Tensor],
                  key_slots: torch.Tensor,
                  fused: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """One loop of an adaptive step over every row of a batch, as a packaged adaptive step
    runs it (`variant.loop_program`: "first", where `rows.previous` is unused, or "later"):
    this loop's cache `entries` (rows [0, B), every position; the keys attended are those at
    `key_slots`) and the rows' `AdaptiveRows` (all B, or those at `rows.index`). Rows not
    looping write no keys (a row that stopped, or one the step does not compute; a stopped
    row that fills a bucket of gathered rows); their state is computed and discarded. A
    looping row stops here at its budget, or from its earliest loop on once its state's
    relative change is below its threshold (the `state` criterion, which cannot stop a row
    in the first loop): its state goes to `final`, the loop count to `spent`, and it leaves
    `looping` (all three written in place). Returns the states h (B, 1, d) and which rows
    stopped here (B,)."""
    if not isinstance(rows, AdaptiveRows):  # a package's inputs, in the fields' order
        rows = AdaptiveRows(*rows)
    n_keys = key_slots.size(0)
    entries = [(k[:, :, :n_keys], v[:, :, :n_keys]) for k, v in entries]
    inputs = model.prepare(rows.tokens[:, None], plan=pass_plan(model, rows.pos[:, None], n_keys,
                                                                cache.dtype, fused=fused))
    first = variant.loop_program == "first"
    gathered = rows.index is not None  # some rows of the batch: attention reads theirs only
    index = rows.index if gathered else torch.arange(rows.tokens.size(0),
                                                     device=rows.tokens.device)
    writes = StepWrites(entries, index, rows.pos, write_first=cache.writes(0 if first else 1, 0),
                        live=rows.looping, gather=gathered)
    h = decode_loop(model, inputs, None if first else rows.previous, writes)
    count = rows.loop + 1  # this loop's number, 1-based (a tensor: one program, every loop)
    stopping = rows.budget == count
    if not first:
        converged = relative_change(h[:, -1], rows.previous[:, -1]) < rows.threshold
        stopping |= (count >= rows.earliest) & (rows.budget > count) & converged
    stopping &= rows.looping
    rows.final.copy_(torch.where(stopping[:, None, None], h, rows.final))
    rows.spent.copy_(torch.where(stopping, count, rows.spent))
    rows.looping.copy_(rows.looping & ~stopping)
    return h, stopping


def adaptive_coda(model: LoopedGPT, variant: StepKey, state: SlotState, cache: StaticKVCache,
                  ends: list[torch.Tensor]) -> None:
    """The end of an adaptive step whose loops ran packaged (`adaptive_loop`), as a packaged
    step runs it (`variant.loop_program` "coda"; its flags are the step's, as a fixed step's):
    `ends` are the rows' loop budgets (B,) (0: a row the step does not compute), the loops
    each spent (B,), the states they stopped with (B, 1, d) and the cache's `fill_tables`.
    Fills the skipped loops' cache entries of the rows that stopped before their budget,
    reads every row out (those not computed: zero logits), samples and records
    (`finish_step`)."""
    budget, spent, final, *tables = ends
    rows = slice(0, variant.batch)
    live = state.active[rows] & ~state.finished[rows]
    logits = adaptive_read_out(model, cache, budget, spent, final, state.pos[rows],
                               (tables[0], tables[1]))
    finish_step(state, variant, logits, live, spent)


def adaptive_read_out(model: LoopedGPT, cache: StaticKVCache, budget: torch.Tensor,
                      spent: torch.Tensor, final: torch.Tensor, pos: torch.Tensor,
                      tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """After an adaptive step's packaged loops: fill the skipped loops' cache entries of the
    rows that stopped before their `budget` (`StaticKVCache.fill_skipped_loops`, at `pos`)
    and return every row's logits (B, V) from the state it stopped with (rows the step does
    not compute, budget 0: zeros)."""
    cache.fill_skipped_loops(torch.where(spent < budget, spent - 1, -1), pos, tables=tables)
    return model.logits(final)[:, -1].masked_fill((budget == 0)[:, None], 0.0)


@dataclass
class AdaptiveRows:
    """The rows of a packaged adaptive step (`adaptive_loop`), all (B,) but `previous` and
    `final` (B, 1, d): the tokens fed and their positions; each row's loop budget, earliest
    loop it may stop at and threshold (rows the step does not compute: budget 0); this loop
    (0-based, shape (1,)); the previous loop's states; and what the loops write: whether a
    row still loops, the state it stopped with, the loops it spent."""

    tokens: torch.Tensor
    pos: torch.Tensor
    budget: torch.Tensor
    earliest: torch.Tensor
    threshold: torch.Tensor
    loop: torch.Tensor
    previous: torch.Tensor
    looping: torch.Tensor
    final: torch.Tensor
    spent: torch.Tensor
    index: torch.Tensor | None = None  # the batch rows these are (None: rows 0 .. B-1)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (getattr(self, f.name) for f in fields(self)) if t is not None]

    def gathered(self, index: torch.Tensor) -> AdaptiveRows:
        """The batch rows `index` of these (every row of the batch), as a later loop over
        fewer rows takes them (a copy: `scatter` writes back what its loops wrote)."""
        if self.index is not None:
            raise ValueError("these rows are gathered already: gather from the whole batch")
        return AdaptiveRows(*(t if name == "loop" else t.index_select(0, index)
                              for name, t in ((f.name, getattr(self, f.name))
                                              for f in fields(self) if f.name != "index")),
                            index=index)

    def scatter(self, into: AdaptiveRows) -> None:
        """Write these gathered rows' loop results back `into` the batch's rows."""
        for name in ("previous", "looping", "final", "spent"):
            getattr(into, name).index_copy_(0, self.index, getattr(self, name))


@dataclass
class AdaptivePackages:
    """The packages of an adaptive step (`DecodeEngine._adaptive_packages`): its first loop,
    a later loop (None: one loop at most), its coda (None: not built yet; it then ends
    eagerly), `fewer(rows)`: the later loop over that many rows of the batch (None: not
    built yet; looked for, and asked for, only where a step would run it, so that a bucket
    of rows that never pays is never built), and the key length they attend over."""

    first: Any
    later: Any
    coda: Any
    fewer: Callable[[int], Any]
    kv_len: int


def prompt_exits(params: SequenceParams) -> AdaptiveLoops | None:
    """The exit settings of a sequence whose prompt stops adaptively (`AdaptiveLoops.prompt`),
    else None."""
    return params.adaptive if params.adaptive is not None and params.adaptive.prompt else None


def pop_step(state: SlotState, batch: int, logprobs: bool = False) -> None:
    """A step in which every live row is speculative: each emits its next verified token
    (and, with `logprobs`, its logprobs from the verify pass), and nothing is computed."""
    rows = slice(0, batch)
    live = state.active[rows] & ~state.finished[rows]
    state.record(rows, state.pop_pending(rows, state.tokens[rows], logprobs), live,
                 state.n_loops[rows])


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
    compile:     "auto" (the default): where it pays: on CUDA the loop ("loop"), replayed in
                 CUDA graphs; on CPU each step variant runs eagerly, and is compiled whole
                 (at once: seconds) only once torch.compile's on-disk caches hold it and
                 the steps still to run repay the compile; a variant not compiled on this
                 machine before that has run AUTO_COMPILE_AFTER steps is compiled into the
                 caches by a separate low-priority process, for later runs
                 (`loopedlm.infer.warm`; LOOPEDLM_COMPILE_WARMUP=0: none). "background": each step
                 variant runs eagerly until it has run AUTO_COMPILE_AFTER times, is then
                 compiled whole on a worker thread (warmed on stand-ins of the step's
                 tensors) while decoding goes on eagerly, and runs compiled from then on
                 (pays for long outputs and servers). True or "step": the whole step compiled at once (one
                 graph per step variant, attending over all max_len positions); "loop": one
                 loop (two graphs at any loop count); False: eager. torch.compile's caches
                 live under $LOOPEDLM_HOME/torch_compile. compile_options: more
                 torch.compile keyword arguments (backend, fullgraph, mode, ...); on a CPU
                 inductor's C++ wrapper is on unless they say otherwise
                 (`cpu_compile_options`).
    long_lived:  the engine serves sequence after sequence (a server): under compile="auto"
                 on a CPU a compile is weighed against an unbounded number of steps rather
                 than the active sequences' remaining token budgets.

    It satisfies the server scheduler's `SlotEngine` protocol (`loopedlm.infer.scheduler`).
    """

    def __init__(self, model: LoopedGPT, *, max_batch: int = 8, max_len: int | None = None,
                 max_loops: int | None = None, cache_slots: int | None = None,
                 slot_policy: str = "block", share_first_layer: bool = True,
                 dtype: torch.dtype | None = None, graphs: bool | None = None,
                 compile: bool | str = "auto", compile_options: dict[str, Any] | None = None,
                 long_lived: bool = False):
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
            raise ValueError(f"compile={compile!r} is not allowed: 'auto', False, True "
                             f"(= 'step'), 'step', 'loop' or 'background'")
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
        self._cache_args = (cache_slots, slot_policy)
        self.cache = StaticKVCache(
            cfg, max_batch, max_len, loop_slot_map(self.max_loops, cache_slots, slot_policy),
            dtype=dtype, device=device,
            share_first_layer=share_first_layer and model.mode.first_layer_kv_invariant)
        self.state = SlotState(max_batch, max_len, cfg.vocab_size, device)
        self.graphs = device.type == "cuda" if graphs is None else graphs
        self.compile, self.compile_options = compile, cpu_compile_options(device, compile_options)
        # what is compiled: "none", "step" (the whole step, at its first run), "loop" (one
        # loop, two graphs, dynamic shapes so that the eager steps' growing key length and
        # the batch bucket need no recompile) or "background" (the whole step,
        # compiled on a worker thread for a variant that keeps running; eager until then)
        self.compiles = {False: "none", True: "step", "step": "step", "loop": "loop",
                         "background": "background",
                         "auto": "loop" if device.type == "cuda" else "auto"}[compile]
        if self.compiles != "none":
            use_compile_cache()
        self.loop_fn = decode_loop
        if self.compiles == "loop":
            self.loop_fn = torch.compile(decode_loop, **{"dynamic": True, **self.compile_options})
        self._compiled_step = None
        self.long_lived = bool(long_lived)
        if self.compiles in ("step", "background", "auto"):
            dynamic = self.compiles != "step"  # eager-sized key lengths: see _kv_len
            self._compiled_step = torch.compile(fixed_step,
                                                **{"dynamic": dynamic, **self.compile_options})
        self._steps: dict[StepKey, Callable[[], None]] = {}
        self._graph_pool: Any = None  # `_pool`
        self._entries: dict[tuple[int, int], list[list[Entry]]] = {}
        self._loop_views: dict[tuple[int, int], list[torch.Tensor]] = {}  # _adaptive_entries
        self._input_shapes: dict[tuple[int, ...], tuple] = {}  # _step_input_shapes
        self._loop_numbers = [torch.tensor([loop], device=device)
                              for loop in range(self.max_loops)]  # AdaptiveRows.loop
        self._slots: dict[int, torch.Tensor] = {}
        self._compile_runs: dict[StepKey, int] = {}  # background: eager runs per variant
        self._compiled: dict[StepKey, bool] = {}  # background: variant -> compiled (or failed)
        self._compiling: set[StepKey] = set()  # variants whose compile has started
        self._eager_time: dict[StepKey, list[float]] = {}  # auto: [seconds, runs] timed
        # auto on a CPU: (variant, input shapes) -> its AOTInductor package, None if none yet
        self._packages: dict[tuple, packaged.StepPackage | None] = {}
        self.speculation = SpeculationStats()
        # q, k and v projections in one matrix per layer, derived once (and again only if the
        # weights change: `_sync_weights`); the model's parameters stay as they are
        self.fused = [block.attn.fused_weight() for block in model.blocks()]
        self._weights_seen = self._weights_version()

    # ---- the weights ------------------------------------------------------------------------------
    def _weights_version(self) -> list[tuple[int, int]]:
        """Where the source model's parameters live and how often they were written in place
        (an optimizer step, load_state_dict): a change means the engine's derived weights
        (a cast copy, the fused projections) are stale."""
        return [(p.data_ptr(), p._version) for p in self.source.parameters()]

    @torch.no_grad()
    def _sync_weights(self) -> None:
        """Bring the derived weights up to date with the source model if it changed since
        (checked as each sequence starts): a model trained between samples decodes with its
        new weights. Copied in place, so captured CUDA graphs stay valid."""
        seen = self._weights_version()
        if seen == self._weights_seen:
            return
        if self.model is not self.source:
            for mine, theirs in zip(self.model.parameters(), self.source.parameters(), strict=True):
                mine.copy_(theirs)
        for fused, block in zip(self.fused, self.model.blocks(), strict=True):
            if fused is not None:
                fused.copy_(block.attn.fused_weight())
        for package in self._packages.values():
            if package is not None:
                package.bind(self)
        self._weights_seen = seen

    # ---- slots (the scheduler's protocol: add, step, output, release) ----------------------------
    @property
    def active_slots(self) -> list[int]:
        return sorted(self.state.infos)

    @property
    def compiled_steps(self) -> int:
        """Step variants compiled on worker threads and in use (compile="background")."""
        return sum(self._compiled.values())

    @property
    def packaged_steps(self) -> int:
        """Step variants (at their input shapes) running packaged by AOTInductor
        (compile="auto" on a CPU, `loopedlm.infer.packaged`)."""
        return sum(package is not None for package in self._packages.values())

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
            first = self._first_token(slot, logits, params, self.state.infos[slot].last_loops)
        except BaseException:
            self.release(slot)
            raise
        return first[0]

    def _first_token(self, slot: int, logits: torch.Tensor, params: SequenceParams,
                     loops: int) -> torch.Tensor:
        """Sample and record the first token (1,) of the sequence just opened in `slot` from
        its prompt's last logits (1, vocab_size), whose token ran `loops` loops."""
        rows = slice(slot, slot + 1)
        first = sample_rows(logits, *self.state.sampling(rows))
        self.state.record(rows, first, self.state.active[rows].clone(),
                          torch.full((1,), loops, device=self.device), advance=False,
                          logits=None if params.logprobs is None else logits)
        return first

    @torch.no_grad()
    def add_many(self, requests: Sequence[tuple[int, Sequence[int] | torch.Tensor,
                                                SequenceParams | None]]
                 ) -> list[ValueError | None]:
        """Start several sequences, as `add` does each (slot, prompt ids, params), with their
        prompts prefilled together (`prefill_many`), so a server admitting many requests
        runs one prefill, not one each. The first tokens are in `output()`.

        Returns, per request, None (started) or the ValueError that refused it (a bad slot
        or prompt, or parameters `add` would refuse): it fails alone and its slot stays
        free. An error of a pass itself is raised, with every slot of the call free again."""
        results = self.prefill_many(requests)
        started = [(slot, logits) for (slot, _, _), logits in zip(requests, results, strict=True)
                   if isinstance(logits, torch.Tensor)]
        try:
            for slot, logits in started:
                info = self.state.infos[slot]
                self._first_token(slot, logits[None], info.params, info.last_loops)
        except BaseException:
            for slot, _ in started:
                self.release(slot)
            raise
        return [None if isinstance(result, torch.Tensor) else result for result in results]

    @torch.no_grad()
    def prefill_many(self, requests: Sequence[tuple[int, Sequence[int] | torch.Tensor,
                                                    SequenceParams | None]]
                     ) -> list[torch.Tensor | ValueError]:
        """Open several free slots with their prompts (slot, prompt ids, params), prefilled
        together: one pass per loop count among them, the prompts right-padded to the
        longest (`PromptWrites`). Per request: its prompt's last logits (vocab_size,), or
        the ValueError that refused it (a bad slot or prompt, parameters `prefill` would
        refuse), which leaves its slot free. An error of a pass itself is raised, with
        every slot of the call free again. A model with coda layers (Huginn) prefills one
        prompt at a time (its read-out attends over the whole prompt)."""
        results: list[torch.Tensor | ValueError | None] = [None] * len(requests)
        groups: dict[tuple[int, bool], list[tuple[int, int, torch.Tensor, SequenceParams]]] = {}
        taken: set[int] = set()
        for i, (slot, ids, params) in enumerate(requests):
            try:
                self._check_slot(slot)
                if slot in self.state.infos or slot in taken:
                    raise ValueError(f"slot {slot} is in use: release it first")
                params = self._resolve(params)
                idx = self._prompt(slot, ids)
                self._check_room(0, idx.size(1))
            except ValueError as error:
                results[i] = error
                continue
            taken.add(slot)
            groups.setdefault((params.n_loops, prompt_exits(params) is not None), []).append(
                (i, slot, idx, params))
        transformer = self.model.transformer
        together = "coda" not in transformer or not len(transformer.coda)
        opened: list[int] = []
        try:
            for (n_loops, _), group in groups.items():
                if len(group) == 1 or not together:
                    for i, slot, idx, params in group:
                        opened.append(slot)
                        results[i] = self.prefill(slot, idx, params)[-1]
                    continue
                logits, spent = self._prompts_logits(
                    [slot for _, slot, _, _ in group], [idx for _, _, idx, _ in group], n_loops,
                    [prompt_exits(params) for _, _, _, params in group])
                for (i, slot, idx, params), row, loops in zip(group, logits, spent, strict=True):
                    opened.append(slot)
                    self._open(slot, params, idx.size(1))
                    self._prompt_ran(slot, loops[: idx.size(1)])
                    results[i] = row
        except BaseException:
            for slot in opened:
                self.release(slot)
            raise
        return [result for result in results if result is not None]  # (every one is set)

    def prompt_loops(self, slot: int) -> int:
        """The loops the prompt of the sequence in `slot` ran, summed over its tokens (n_loops
        each, or fewer where it stops adaptively: `AdaptiveLoops.prompt`)."""
        self._check_slot(slot)
        if slot not in self.state.infos:
            raise ValueError(f"slot {slot} is free: no prompt")
        return self.state.infos[slot].prompt_loops

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
        engine's max_loops), adaptive loops resolved for the model (`AdaptiveLoops.resolved`)
        and its stop ids checked against the vocabulary."""
        params = SequenceParams() if params is None else params
        if not isinstance(params, SequenceParams):
            raise ValueError(f"params={params!r} must be a SequenceParams or None")
        n_loops = self.config.loops(params.n_loops)
        if n_loops > self.max_loops:
            raise ValueError(f"n_loops={n_loops!r} is not allowed: an integer in "
                             f"[1, {self.max_loops}] (the engine's max_loops)")
        if params.draft_loops is not None:
            check_draft_loops(params.draft_loops, n_loops)
            if self.cache.slot_of_loop != list(range(self.max_loops)):
                raise ValueError("draft_loops needs the exact cache: with shared cache slots "
                                 "(cache_slots) a verify pass would read other loops' keys")
        vocab = self.config.vocab_size
        bad = [s for s in params.stop_ids if not is_int(s) or not 0 <= s < vocab]
        if bad:
            raise ValueError(f"unknown stop token {bad[0]!r}: ids lie in [0, {vocab})")
        adaptive = params.adaptive and params.adaptive.resolved(self.model.exit_gate is not None)
        if adaptive and adaptive.prompt and self.config.n_layers != self.config.depth:
            raise ValueError("adaptive_prompt=True is not allowed for this model: its layers "
                             "outside the loop (a prelude, a coda) attend over the whole "
                             "prompt, which then runs every loop")
        return replace(params, n_loops=n_loops, adaptive=adaptive)

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
        self._check_room(start, end)
        settings = params if info is None else info.params
        self._sync_weights()
        logits, spent = self._chunk_logits(slot, idx, start, settings.n_loops,
                                           prompt_exits(settings))
        if info is None:
            self._open(slot, params, end)
        else:
            info.length = end
            self.state.pos[slot] = end
        self._prompt_ran(slot, spent)
        return logits

    def _check_room(self, start: int, end: int) -> None:
        """A prompt that would fill a slot's positions start .. end-1 must fit the context."""
        if end > self.max_len:
            limit = self.max_len if self.max_len < self.config.sequence_len else None
            raise ValueError(f"prompt of {end} tokens{f' ({start} cached)' if start else ''} is "
                             f"longer than the context (" + (f"the engine's max_len={limit}"
                             if limit else f"sequence_len={self.config.sequence_len}") + ")")

    def _open(self, slot: int, params: SequenceParams, length: int) -> None:
        """Open `slot` for a sequence whose prompt of `length` tokens is in the cache."""
        if self.state.open(slot, params):
            self._steps.clear()
        info = self.state.infos[slot]
        info.start = info.length = length
        self.state.pos[slot] = length

    def _prompt_ran(self, slot: int, loops: torch.Tensor) -> None:
        """Count the loops (T,) that the prompt tokens just prefilled into `slot` ran."""
        info = self.state.infos[slot]
        info.prompt_loops += int(loops.sum())
        info.last_loops = int(loops[-1])

    # ---- the decode step ----------------------------------------------------------------------
    def _variants_allowed(self) -> Any:
        """compile="loop": adaptive steps (a batch that shrinks, rows gathered) and speculative
        passes give the compiled loop more graphs than the fixed-loop steps' two; the
        recompile limit is raised so that they never fall back to eager without a word."""
        if self.compiles != "loop":
            return contextlib.nullcontext()
        return torch._dynamo.config.patch(recompile_limit=COMPILED_VARIANTS)

    @torch.no_grad()
    def step(self) -> StepOutput:
        """Feed every active slot its last token and sample the next (no host sync on the
        fixed-loop path). Returns device tensors over the step's bucket. A step that raises
        has moved no slot on (the state is written once the tokens are sampled), so it may be
        retried, with or without some slots released."""
        with self._variants_allowed():
            return self._step()

    def _step(self) -> StepOutput:
        batch = self._bucket()
        infos = list(self.state.infos.values())
        speculative = [slot for slot, info in self.state.infos.items()
                       if info.params.draft_loops is not None]
        if speculative:
            due = [slot for slot in speculative if not self.state.infos[slot].pending
                   and not self.state.infos[slot].ending]
            if due:
                self._speculate(due)
        if any(info.params.adaptive is not None for info in infos):
            self._adaptive_step(batch)
        elif len(speculative) == len(infos):  # every row emits a verified token
            pop_step(self.state, batch, any(info.params.logprobs is not None for info in infos))
        else:
            self._runner(self._step_key(batch))()
        for info in infos:
            info.length = min(info.length + 1, self.max_len)
            info.pending = max(0, info.pending - 1)
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
        if any(info.params.draft_loops is not None for info in infos):
            raise ValueError("decode() feeds given tokens: speculative rows (draft_loops) "
                             "only generate")
        live = state.active[:batch].clone()
        with self._variants_allowed():
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
        """Key positions a step attends over: all of them in a captured or a statically
        compiled step (one graph per variant); elsewhere the longest filled length, rounded
        up."""
        if self.graphs or self.compiles == "step":
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
                       speculative=any(p.draft_loops is not None for p in params),
                       logprobs=any(p.logprobs is not None for p in params))

    def _loop_entries(self, batch: int, kv_len: int) -> list[list[Entry]]:
        """Every loop's cache views for rows [0, batch) and key positions [0, kv_len),
        made once per shape (views of tensors that never move)."""
        shape = (batch, kv_len)
        if shape not in self._entries:
            self._entries[shape] = [self.cache.loop_entries(loop, batch, kv_len)
                                    for loop in range(self.max_loops)]
        return self._entries[shape]

    def _key_slots(self, kv_len: int) -> torch.Tensor:
        """Key positions 0 .. kv_len-1 (made once per length)."""
        if kv_len not in self._slots:
            self._slots[kv_len] = torch.arange(kv_len, device=self.device)
        return self._slots[kv_len]

    def _runner(self, key: StepKey) -> Callable[[], None]:
        """The step variant `key`, built once: eager, compiled, or captured as a CUDA graph."""
        if key in self._steps:
            return self._steps[key]
        args = (self.model, key, self.state, self.cache, self._key_slots(key.kv_len),
                self.fused, self.loop_fn)
        if self.compiles == "step":
            body = functools.partial(self._compile_step, args)
        elif self.compiles in ("background", "auto"):
            body = functools.partial(self._step_or_compile, args)
        else:  # eager: the cache views made once
            body = functools.partial(fixed_step, *args,
                                     entries=self._loop_entries(key.batch, key.kv_len))
        if self.graphs:
            body = capture_step(body, self.state.step_state(), self.device, self._pool())
        self._steps[key] = body
        return body

    def _compile_step(self, args: tuple) -> None:
        """Run the compiled step; its first run compiles it. Each variant is one more graph of
        `fixed_step`: the recompile limit is raised for that compile so that a server's many
        variants never fall back to eager without a word."""
        key = args[1]
        if key in self._compiled:
            self._compiled_step(*args)
            return
        with torch._dynamo.config.patch(recompile_limit=COMPILED_VARIANTS):
            self._compiled_step(*args)
        self._compiled[key] = True

    def _step_or_compile(self, args: tuple) -> None:
        """compile="background" and "auto" on a CPU: run the variant compiled once it is;
        until then eagerly. "background" compiles it on a worker thread (warmed on stand-ins
        of the step's tensors, `stand_ins`, so that decoding never waits for it) once it has
        run AUTO_COMPILE_AFTER times (a compile pays only for a variant that keeps running);
        "auto" every AUTO_COMPILE_AFTER runs asks `_compile_pays`, and compiles it at once
        (from warm caches: seconds) where it pays."""
        model, key, *rest = args
        variant = replace(key, kv_len=0)  # the key length is a dynamic shape
        runs = self._compile_runs.get(variant, 0) + 1
        if self.compiles == "auto":
            inputs = packaged.step_inputs(self)
            shapes = self._step_input_shapes()  # a package is for its shapes
            package = self._package(variant, shapes,
                                    look=runs == 1 or runs % AUTO_COMPILE_AFTER == 0)
            # a package attends over fewer than all positions (see `packaged`): as many as
            # the eager step, or all but the last where those are all yet not all needed
            kv_len = min(key.kv_len, self.max_len - 1)
            needed = max(info.length for info in self.state.infos.values()) + 1
            if package is not None and kv_len >= needed \
                    and self._run_package(package, inputs, kv_len):
                return
        done = self._compiled.get(variant)
        if done:
            self._compiled_step(model, variant, *rest)
            return
        self._compile_runs[variant] = runs
        if done is None and variant not in self._compiling:
            if self.compiles == "background" and runs == AUTO_COMPILE_AFTER:
                self._compiling.add(variant)
                threading.Thread(target=self._compile_in_background, args=(variant, args),
                                 name="loopedlm-compile", daemon=True).start()
            elif self.compiles == "auto" and runs % AUTO_COMPILE_AFTER == 0 \
                    and self._compile_pays(variant):
                # here and now: from warm caches it takes seconds, where on a worker thread,
                # sharing the GIL with decoding, it took 3-5x as long and slowed decoding 3x
                self._compiling.add(variant)
                self._compile_in_background(variant, args)
                if self._compiled.get(variant):
                    self._compiled_step(model, variant, *rest)
                    return
        start = time.perf_counter()
        fixed_step(*args, entries=self._loop_entries(key.batch, key.kv_len))
        if self.compiles == "auto" and runs > 1:  # the first run builds the cache views
            timed = self._eager_time.setdefault(variant, [0.0, 0])
            timed[0] += time.perf_counter() - start
            timed[1] += 1

    def _compile_in_background(self, variant: StepKey, args: tuple) -> None:
        try:
            seconds = self._compile_on_stand_ins(variant, args)
        except Exception:  # the eager step stays: correct, only slower
            log.warning("decode engine: compiling the step %s failed; it stays eager", variant,
                        exc_info=True)
            self._compiled[variant] = False
            return
        finally:
            self._compiling.discard(variant)
        log.info("decode engine: step %s compiled in %.1fs", variant, seconds)
        if self.compiles == "auto":  # it was warm on disk: what a warm compile takes here
            with contextlib.suppress(OSError, TypeError, ValueError):
                record(self.warm_spec(variant), seconds)

    def _compile_on_stand_ins(self, variant: StepKey, args: tuple) -> float:
        """Compile the step variant `variant` for the step's arguments `args`, run on
        stand-ins of its state and cache (`stand_ins`: the real ones are never touched);
        marks it compiled and returns the seconds."""
        model, _, state, cache, key_slots, fused, loop_fn = args
        start = time.perf_counter()
        state, cache = stand_ins((state, cache))
        with torch.no_grad(), dynamic_compile_config():
            self._compiled_step(model, variant, state, cache, key_slots, fused, loop_fn)
        self._compiled[variant] = True
        return time.perf_counter() - start

    def warm_spec(self, variant: StepKey) -> WarmSpec:
        """What a separate process needs to compile `variant` of this engine's step."""
        cache = self.cache
        return WarmSpec(config=self.config.to_dict(), dtype=str(self.dtype).removeprefix("torch."),
                        max_batch=self.max_batch, max_loops=self.max_loops,
                        cache_slots=self._cache_args[0], slot_policy=self._cache_args[1],
                        share_first_layer=cache.share_first_layer,
                        variant=asdict(replace(variant, kv_len=0)),
                        compile_options=self.compile_options, short_len=self.max_len == 1)

    def _run_package(self, package: packaged.StepPackage, inputs: list[torch.Tensor],
                     kv_len: int) -> bool:
        """Run one step (or an adaptive step's coda) from `package`; False (the step runs as
        it would without one, and the package is dropped and marked failed) if it raises.
        Its writes before the error are the cache keys of this step's own position (and
        the skipped loops' copies), which the step rewrites, and the slot state is written
        last."""
        try:
            package.run(inputs, self._key_slots(kv_len))
            return True
        except Exception as error:  # a package is only ever an optimisation
            self._drop_package(package, error)
            return False

    def _drop_package(self, package: packaged.StepPackage, error: Exception) -> None:
        """`package` raised: never used again, and its variant (the key it was loaded
        under) marked failed on disk."""
        log.warning("decode engine: the packaged step %s failed (%s): decoding without it",
                    package.path.name, error)
        for (variant, shapes), value in list(self._packages.items()):
            if value is package:
                self._packages[(variant, shapes)] = None
                with contextlib.suppress(TypeError, ValueError, OSError):
                    record(self.package_spec(variant), failed=True)

    def package_spec(self, variant: StepKey) -> WarmSpec:
        """What a separate process needs to build `variant`'s AOTInductor package for this
        engine: the warm spec, the cache length and the inputs' shapes. A ValueError for a
        model whose step draws random numbers (Huginn's random initial state: a package would
        draw them from its own generator, not torch's global one, as eager decoding does)."""
        if self.config.state_init == "random":
            raise ValueError("a step with a random initial state is not packaged")
        return replace(self.warm_spec(variant), package=True, max_len=self.max_len,
                       shapes=packaged.input_shapes(self))

    def _step_input_shapes(self) -> tuple:
        """The shapes of `packaged.step_inputs`: fixed, but for the stop-id table's, which
        grows with the most stop ids a sequence has had."""
        stops = tuple(self.state.stop_table.shape)
        if stops not in self._input_shapes:
            self._input_shapes[stops] = tuple(tuple(t.shape)
                                              for t in packaged.step_inputs(self))
        return self._input_shapes[stops]

    def _package(self, variant: StepKey, shapes: tuple, look: bool
                 ) -> packaged.StepPackage | None:
        """compile="auto" on a CPU: `variant`'s package for inputs of `shapes` (those of
        `packaged.step_inputs` now), loaded once it is on disk (`look`: check the disk if
        none is loaded yet; a package this machine never built is handed to the warming
        process, which builds it)."""
        found = self._packages.get((variant, shapes))
        if found is not None or not look:
            return found
        try:
            spec = self.package_spec(variant)
        except (TypeError, ValueError):  # options that do not travel, a state of views
            return None
        state = package_state(spec)
        if state == "ready":
            found = self._packages[(variant, shapes)] = packaged.load(package_path(spec), self)
            if found is None:  # it does not load here: never asked for again
                record(spec, failed=True)
        elif state is None and self.max_len >= 4 and \
                self._compile_runs.get(variant, 0) + 1 >= AUTO_COMPILE_AFTER:
            start_warming(spec)
        return found

    def _horizon(self) -> float:
        """Steps the engine will still run: unbounded when long-lived (a server), else the
        most any active row has left of its token budget and of the context."""
        if self.long_lived:
            return math.inf
        left = 0
        for info in self.state.infos.values():
            budget = info.params.max_new_tokens
            end = self.max_len if budget is None else min(self.max_len, info.start + budget - 1)
            left = max(left, end - info.length)
        return left

    def _compile_pays(self, variant: StepKey) -> bool:
        """compile="auto" on a CPU: whether to compile `variant` now: its compile is warm on
        disk and the steps left repay it (`loopedlm.infer.warm.compile_pays`, with this
        variant's measured eager step). A variant never compiled on this machine is handed
        to a low-priority process that compiles it for later runs."""
        try:
            spec = self.warm_spec(variant)
        except (TypeError, ValueError):  # compile_options that do not travel: never warmed
            return False
        seconds = warm_seconds(spec)
        if seconds is None:
            start_warming(spec)
            return False
        total, runs = self._eager_time.get(variant, (0.0, 0))
        return runs > 0 and compile_pays(self._horizon(), total / runs, seconds)

    def compile_variant(self, variant: StepKey, kv_len: int = 2 * KV_LEN_STEP) -> float:
        """Compile the step variant `variant` now (compile="background" or "auto" on a CPU),
        on stand-ins of the engine's tensors, so nothing real is touched; its seconds. What
        the warming process runs (`warm_main`)."""
        if self._compiled_step is None or self.compiles == "step":
            raise ValueError(f"compile={self.compile!r}: compile_variant needs 'background' "
                             f"(or 'auto' on a CPU)")
        variant = replace(variant, kv_len=0)
        return self._compile_on_stand_ins(variant, (
            self.model, variant, self.state, self.cache,
            self._key_slots(min(kv_len, self.max_len)), self.fused, self.loop_fn))

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Wait until the step variants being compiled on worker threads are (compile="background"
        on CPU); whether none is still compiling. For benchmarks and warm-ups."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threading.enumerate():
            if thread.name == "loopedlm-compile":
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.name == "loopedlm-compile" and t.is_alive()
                       for t in threading.enumerate())

    def _pool(self) -> Any:
        """One CUDA-graph memory pool that every captured step of this engine shares."""
        if self._graph_pool is None and self.device.type == "cuda":
            self._graph_pool = torch.cuda.graph_pool_handle()
        return self._graph_pool

    # ---- the passes: a prefill chunk, a fixed-loop step, an adaptive step ----------------------
    def _plan(self, slots: torch.Tensor, n_keys: int, *, from_start: bool = False,
              cache: Any = None, masks: Masks | None = None) -> AttentionPlan:
        return pass_plan(self.model, slots, n_keys, self.dtype, from_start=from_start,
                         cache=cache, fused=self.fused, masks=masks)

    def _chunk_logits(self, slot: int, ids: torch.Tensor, start: int, n_loops: int,
                      adaptive: AdaptiveLoops | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (T, vocab_size) of `ids` (1, T) appended to `slot`'s cache at `start`, and
        the loops each token ran (T,) (`adaptive`: the prompt's exits, `prompt_exits`)."""
        model, end = self.model, start + ids.size(1)
        slots = torch.arange(start, end, device=self.device)[None]
        plan = self._plan(slots, end, from_start=start == 0,
                          cache=ChunkWrites(self.cache, slot, start, end))
        final, spent = self._prompt_loops(torch.tensor([slot], device=self.device), ids,
                                          model.prepare(ids, plan=plan), start, n_loops,
                                          [adaptive])
        return model.logits(final, plan)[0], spent[0]

    def _prompts_logits(self, slots: list[int], prompts: list[torch.Tensor], n_loops: int,
                        adaptive: list[AdaptiveLoops | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """The last logits (R, vocab_size) of the prompts (1, T_r) of new sequences in
        `slots`, prefilled together from position 0 (`PromptWrites`): right-padded to the
        longest, which takes the causal path of a full forward; only the last real
        position of each row is read out. Also the loops each prompt token ran (R, W), past
        a row's end 0 (`adaptive`: each row's prompt exits, all None or none)."""
        model, width = self.model, max(p.size(1) for p in prompts)
        self._sync_weights()
        idx = torch.zeros((len(prompts), width), dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):
            idx[row, : prompt.size(1)] = prompt[0]
        rows = torch.tensor(slots, device=self.device)
        plan = self._plan(torch.arange(width, device=self.device)[None], width,
                          from_start=True, cache=PromptWrites(self.cache, rows, width))
        final, spent = self._prompt_loops(rows, idx, model.prepare(idx, plan=plan), 0, n_loops,
                                          adaptive, [p.size(1) for p in prompts])
        last = torch.tensor([p.size(1) - 1 for p in prompts], device=self.device)
        every = torch.arange(len(prompts), device=self.device)
        return model.logits(final[every, last][:, None], plan)[:, 0], spent

    def _prompt_loops(self, slots: torch.Tensor, idx: torch.Tensor, inputs: LoopInputs,
                      start: int, n_loops: int, adaptive: list[AdaptiveLoops | None],
                      lengths: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The loops of a prefill of `idx` (R, W) into rows `slots` at positions start ..
        start + W - 1, prepared (`inputs`): every loop for every token, or, for rows whose
        prompt stops adaptively (`adaptive`, all None or none), each token until its exit
        (`adaptive_prefill`). Returns the states each token stopped with (R, W, d) and the
        loops it ran (R, W) (past a row's end, `lengths`: 0)."""
        rows, width = idx.shape
        lengths = [width] * rows if lengths is None else lengths
        if adaptive[0] is not None:
            return adaptive_prefill(self.model, self.cache, slots, inputs, lengths, start,
                                    n_loops, adaptive, self._plan)
        previous = None
        for loop in range(n_loops):
            previous = self.model.loop_state(self.model.loop(inputs, previous, loop))
        spent = (torch.arange(width, device=self.device)[None]
                 < torch.tensor(lengths, device=self.device)[:, None]).long() * n_loops
        return previous, spent

    def _step_logits(self, tokens: torch.Tensor, key: StepKey) -> torch.Tensor:
        """`step_logits` of `tokens` (batch,) fed at the rows' positions."""
        batch, state = tokens.size(0), self.state
        return step_logits(self.model, key, tokens, state.pos[:batch], state.n_loops[:batch],
                           state.rows[:batch], self.cache, self._key_slots(key.kv_len),
                           self.fused, self.loop_fn, self._loop_entries(batch, key.kv_len))

    def _rows_pass(self, slots: list[int], tokens: torch.Tensor, pos: torch.Tensor,
                   n_loops: list[int], kv_len: int) -> torch.Tensor:
        """`decode_pass` (logits (R, T, V)) of the rows `slots` only (T tokens each): views
        of their cache rows when they are contiguous, else gathered."""
        count, first = len(slots), slots[0]
        contiguous = slots == list(range(first, first + count))
        batch = count if contiguous else self._bucket()
        start = first if contiguous else 0
        entries = [self.cache.loop_entries(loop, batch, kv_len, start)
                   for loop in range(max(n_loops))]
        rows = self.state.rows[:count] if contiguous else \
            torch.tensor(slots, device=self.device)
        loops = torch.tensor(n_loops, device=self.device)
        return decode_pass(self.model, tokens, pos, loops, rows, self.cache, entries,
                           self.fused, max_loops=max(n_loops),
                           mixed=len(set(n_loops)) > 1, gather=not contiguous,
                           loop_fn=self.loop_fn)

    @torch.no_grad()
    def _speculate(self, slots: list[int]) -> None:
        """One round of self-speculative decoding for `slots`, whose verified tokens are all
        emitted (docs/design.md#decoding). From the fed token on, each row drafts G tokens
        at its draft_loops, one token at a time; one pass at its n_loops then runs the fed
        token and the drafts, and speculative sampling (`speculative_accept`) keeps the
        drafts that the n_loops model confirms, plus one of its own: its next G + 1
        distributions are those of plain decoding at n_loops (the cache holds the n_loops
        keys of every earlier position). The kept tokens wait in `SlotState.pending`.

        The draft writes cache entries of loops 0 .. draft_loops-1 at the drafted positions,
        and the verify pass every loop at them; entries past the kept tokens are stale, but
        every later pass writes a position before any query reads it (a query reads only
        positions at or before its own), so nothing needs rolling back. One host sync."""
        state, infos = self.state, [self.state.infos[slot] for slot in slots]
        rows = torch.tensor(slots, device=self.device)
        params = [info.params for info in infos]
        room = min(self.max_len - 1 - info.length for info in infos)
        n_drafts = max(0, min(min(p.draft_tokens for p in params), room))
        longest = max(info.length for info in infos) + n_drafts + 1
        kv_len = min(self.max_len, -(-longest // KV_LEN_STEP) * KV_LEN_STEP)
        pos, fed, counter = state.pos[rows], state.tokens[rows], state.counter[rows]
        temperature, top_k, top_p, seed = (t[rows] for t in (state.temperature, state.top_k,
                                                              state.top_p, state.seed))
        filtered = any(p.filtered for p in params)
        drafts, draft_probs, token = [], [], fed
        for i in range(n_drafts):
            logits = self._rows_pass(slots, token[:, None], pos + i,
                                     [p.draft_loops for p in params], kv_len)[:, -1]
            draft_probs.append(row_probs(logits, temperature, top_k, top_p, filtered=filtered))
            token = sample_rows(logits, temperature, top_k, top_p, seed, counter + i,
                                filtered=filtered, stream=DRAFT)
            drafts.append(token)
        chunk = torch.stack([fed, *drafts], 1)
        logits = self._rows_pass(slots, chunk, pos, [p.n_loops for p in params], kv_len)
        span = n_drafts + 1
        logits = logits.flatten(0, 1)
        target = row_probs(logits, temperature.repeat_interleave(span),
                           top_k.repeat_interleave(span), top_p.repeat_interleave(span),
                           filtered=filtered).view(len(slots), span, -1)
        if n_drafts:
            tokens, emitted = speculative_accept(torch.stack(draft_probs, 1),
                                                 torch.stack(drafts, 1), target, seed, counter)
        else:
            tokens = sample_rows(logits, temperature, top_k, top_p, seed, counter,
                                 filtered=filtered, stream=CORRECT)[:, None]
            emitted = torch.ones_like(counter)
        state.pending[rows, :span] = tokens
        state.pending_at[rows] = 0
        if any(p.logprobs is not None for p in params):  # the n_loops model's, as plain decoding
            logp = logits.float().log_softmax(dim=-1)  # (rows * span, V)
            top = logp.topk(state.pending_top_ids.size(2), dim=-1)
            state.pending_logprobs[rows, :span] = logp.gather(
                1, tokens.reshape(-1, 1))[:, 0].view(len(slots), span)
            state.pending_top_ids[rows, :span] = top.indices.view(len(slots), span, -1)
            state.pending_top_logprobs[rows, :span] = top.values.view(len(slots), span, -1)
        # do the kept tokens end the sequence (a stop id, the token budget, the cache)?
        kept = torch.arange(span, device=self.device) < emitted[:, None]
        stop = ((tokens[:, :, None] == state.stop_table[rows][:, None, :]).any(-1) & kept).any(1)
        ends = stop | (counter + emitted >= state.max_new[rows]) | (pos + emitted >= self.max_len)
        emitted_host, ends_host = torch.stack([emitted, ends.long()]).tolist()
        for info, count, end in zip(infos, emitted_host, ends_host, strict=True):
            info.pending, info.ending = count, bool(end)
        self.speculation.rounds += len(slots)
        self.speculation.drafted += n_drafts * len(slots)
        self.speculation.emitted += sum(emitted_host)

    def _adaptive_step(self, batch: int) -> None:
        """A decode step with adaptive rows: its loops (`_adaptive_logits`), then the
        sampling and record of a fixed step (`finish_step`, as the variant `_coda_key` says).
        Where the loops ran packaged and the coda's package is built, the coda runs
        packaged too (`adaptive_coda`: the skipped loops' fill, the read-out, sampling and
        record in one call)."""
        state, rows = self.state, slice(0, batch)
        live = state.active[rows] & ~state.finished[rows]
        coda = self._coda_key(batch)
        logits, loops = self._adaptive_logits(state.tokens[rows], batch, coda)
        if logits is not None:  # (else the coda's package ran)
            finish_step(state, coda, logits, live, loops)

    def _coda_key(self, batch: int) -> StepKey:
        """The variant of an adaptive step's end (`adaptive_coda`) for the open rows: how
        they sample and what they record."""
        params = [info.params for info in self.state.infos.values()]
        return StepKey(batch, 0, 0, False, filtered=any(p.filtered for p in params),
                       greedy=all(p.greedy for p in params),
                       speculative=any(p.draft_loops is not None for p in params),
                       logprobs=any(p.logprobs is not None for p in params),
                       loop_program="coda")

    def _adaptive_logits(self, tokens: torch.Tensor, batch: int, coda: StepKey | None = None
                         ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(logits (batch, V), loops spent (batch,)) of `tokens` fed at the rows' positions.
        Each row stops after the first loop t >= its min_loops at which its exit criterion
        says so (`loopedlm.infer.exits`), or at its own n_loops, and leaves the batch: the
        later loops run the rows still looping only (their attention reads the keys of their
        own rows of the cache in place, `AttentionPlan.rows`), and the cache entries of a
        stopped row's skipped loops get its last computed loop's keys/values. A row is read
        out once, with its last loop's state (and at every loop for a criterion that reads
        logits; Huginn's coda writes its keys at each read-out, the last one's stay). Open
        slots only (speculative rows emit verified tokens; the other rows' logits are
        zeros); one host sync per loop from a row's min_loops on, to learn which rows stop,
        none at a loop that is every row's last. Under compile="auto" on a CPU the loops
        may run packaged instead (`_adaptive_packages`), with the same tokens; and then,
        given the step's `coda` variant, its package ends the step: logits None, the step
        recorded (`adaptive_coda`)."""
        model, state, cache = self.model, self.state, self.cache
        kv_len = self._kv_len()
        slots = [slot for slot in range(batch) if slot in state.infos
                 and state.infos[slot].params.draft_loops is None]
        params = [state.infos[slot].params for slot in slots]
        packages = self._adaptive_packages(batch, params, coda)
        if packages is not None:
            rows = self._packaged_adaptive_loops(tokens, batch, slots, params, packages)
            if rows is not None:
                if packages.coda is not None and self._run_package(
                        packages.coda, [*packaged.step_inputs(self), *self.coda_ends(rows)],
                        packages.kv_len):
                    return None, rows.spent
                return adaptive_read_out(model, cache, rows.budget, rows.spent, rows.final,
                                         rows.pos), rows.spent
        pos = state.pos[:batch]
        entries = self._loop_entries(batch, kv_len)
        # masks of every row, built once; the prelude (Huginn) runs for every row
        plan = self._plan(pos[:, None], kv_len,
                          cache=outer_writes(model, entries[0], state.rows[:batch], pos))
        all_inputs = model.prepare(tokens[:, None], plan=plan)
        final = torch.zeros_like(all_inputs.embedded)
        spent = torch.zeros(batch, dtype=torch.long, device=self.device)
        # the rows still looping, on the host: their loop budget and earliest stop (adaptive
        # settings are resolved: `_resolve`); on the device: their criteria's settings
        adaptive = [p.adaptive for p in params]
        budget = [p.n_loops for p in params]
        earliest = [p.earliest_stop for p in params]
        used = sorted({CRITERIA.index(a.criterion) for a in adaptive if a})
        criterion_ids = torch.tensor([CRITERIA.index(a.criterion) if a else 0 for a in adaptive],
                                     device=self.device)
        # a row without adaptive loops never converges (threshold -inf under `state`)
        threshold = torch.tensor([a.threshold if a else -math.inf for a in adaptive],
                                 dtype=torch.float32, device=self.device)
        needs_logits = any(EXIT_CRITERIA[CRITERIA[i]].needs_logits for i in used)
        needs_gate = any(EXIT_CRITERIA[CRITERIA[i]].needs_gate for i in used)
        exit_cdf = torch.zeros(len(slots), dtype=torch.float32, device=self.device)
        remaining = torch.ones_like(exit_cdf)
        computed = active = torch.tensor(slots, device=self.device)
        active_slots, skipped = list(slots), {}  # slot -> its last loop, if before its budget
        inputs = self._rows_inputs(all_inputs, active, batch, entries)
        previous = previous_logp = None
        for loop in range(max(budget, default=0)):
            writes = StepWrites(entries[loop], active, pos[active],
                                write_first=cache.writes(loop, 0))
            h = self.loop_fn(model, inputs, previous, writes)  # compiled under "loop"
            logp = None
            if needs_logits:
                logp = F.log_softmax(model.logits(h, inputs.plan)[:, -1], dim=-1)
            if needs_gate:
                exit_cdf, remaining = update_exit_cdf(exit_cdf, remaining,
                                                      model.exit_probability(h[:, -1]))
            if loop + 1 < min(earliest):  # no row can stop yet: no host sync
                previous, previous_logp = h, logp
                continue
            last = torch.tensor([n == loop + 1 for n in budget], device=self.device)
            ready = torch.tensor([loop + 1 >= e for e in earliest], device=self.device)
            signals = LoopSignals(loop, h[:, -1], None if previous is None else previous[:, -1],
                                  logp, previous_logp, exit_cdf if needs_gate else None)
            converged = rows_converged(signals, criterion_ids, threshold, used) & ready & ~last
            if all(n == loop + 1 for n in budget):  # every row's last loop: no need to ask
                stops = [True] * len(budget)
            else:
                stops = (converged | last).tolist()  # the loop's one host sync
            if not any(stops):
                previous, previous_logp = h, logp
                continue
            stopped = [i for i, stop in enumerate(stops) if stop]
            at = torch.tensor(stopped, device=self.device)
            final.index_copy_(0, active[at], h[at])
            spent.index_fill_(0, active[at], loop + 1)
            for i in stopped:
                if budget[i] > loop + 1:  # its skipped loops are filled at the step's end
                    skipped[active_slots[i]] = loop
            kept = [i for i, stop in enumerate(stops) if not stop]
            if not kept:
                break
            keep = torch.tensor(kept, device=self.device)
            active, previous = active[keep], h[keep]
            active_slots = [active_slots[i] for i in kept]
            previous_logp = None if logp is None else logp[keep]
            threshold, criterion_ids = threshold[keep], criterion_ids[keep]
            exit_cdf, remaining = exit_cdf[keep], remaining[keep]
            budget = [budget[i] for i in kept]
            earliest = [earliest[i] for i in kept]
            inputs = self._rows_inputs(all_inputs, active, batch, entries)
        self._fill_skipped(skipped, batch)
        # the read-out of the rows computed (a coda attends, so it runs on theirs alone)
        read = self._rows_inputs(all_inputs, computed, batch, entries)
        if read is all_inputs:
            return model.logits(final, plan)[:, -1], spent
        logits = model.logits(final[computed], read.plan)[:, -1]
        every = logits.new_zeros((batch, logits.size(-1))).index_copy_(0, computed, logits)
        return every, spent

    def _adaptive_packages(self, batch: int, params: list[SequenceParams],
                           coda: StepKey | None = None) -> AdaptivePackages | None:
        """compile="auto" on a CPU: the packages that run an adaptive step of `batch` rows
        (`AdaptivePackages`: those of its loops, of later loops over fewer rows, of its `coda`
        variant), each looked for, and handed to the warming process to build, as `_package`
        does for fixed steps; None where the step runs eagerly: a criterion other than
        `state` (the others read logits or a gate at every loop), layers outside the loop
        (Huginn), a random initial state, keys beyond a package's reach, or no loop
        packages yet."""
        if self.compiles != "auto" or self.config.n_layers != self.config.depth or \
                any(p.adaptive is not None and p.adaptive.criterion != "state" for p in params):
            return None
        kv_len = min(self._kv_len(), self.max_len - 1)
        if kv_len < max(info.length for info in self.state.infos.values()) + 1:
            return None
        shapes = self._step_input_shapes()

        def look(variant: StepKey) -> packaged.StepPackage | None:
            runs = self._compile_runs.get(variant, 0) + 1
            self._compile_runs[variant] = runs
            return self._package(variant, shapes,
                                 look=runs == 1 or runs % AUTO_COMPILE_AFTER == 0)

        loops = [look(StepKey(batch, 0, 0, False, False, False, loop_program=program))
                 for program in ("first", "later")[: min(2, self.max_loops)]]
        ending = None if coda is None else look(coda)  # (asked for with the loops)
        if any(package is None for package in loops):
            return None

        def fewer(rows: int) -> packaged.StepPackage | None:  # asked for where it would run
            return look(StepKey(batch, 0, 0, False, False, False, loop_program="later",
                                rows=rows))

        return AdaptivePackages(loops[0], loops[-1] if len(loops) > 1 else None, ending, fewer,
                                kv_len)

    def adaptive_rows(self, tokens: torch.Tensor, slots: list[int],
                      params: list[SequenceParams]) -> AdaptiveRows:
        """The `AdaptiveRows` of an adaptive step of rows [0, len(tokens)) that computes the
        rows `slots` (with their `params`), at the first loop."""
        batch, device = tokens.size(0), self.device
        budget, earliest = [0] * batch, [0] * batch
        threshold = [-math.inf] * batch
        for slot, p in zip(slots, params, strict=True):
            budget[slot] = p.n_loops
            earliest[slot] = p.earliest_stop
            if p.adaptive:
                threshold[slot] = p.adaptive.threshold
        looping = torch.tensor([n > 0 for n in budget], device=device)
        previous = torch.zeros((batch, 1, self.config.d_model), dtype=self.dtype, device=device)
        return AdaptiveRows(tokens, self.state.pos[:batch], torch.tensor(budget, device=device),
                            torch.tensor(earliest, device=device),
                            torch.tensor(threshold, dtype=torch.float32, device=device),
                            self._loop_numbers[0], previous, looping, torch.zeros_like(previous),
                            torch.zeros(batch, dtype=torch.long, device=device))

    def _packaged_adaptive_loops(self, tokens: torch.Tensor, batch: int, slots: list[int],
                                 params: list[SequenceParams], packages: AdaptivePackages
                                 ) -> AdaptiveRows | None:
        """The loops of `_adaptive_logits` by packaged loops (`adaptive_loop`): every row of
        the batch runs each loop until every computed row (`slots`) has stopped, and a row
        that stopped writes no keys, so each row's tokens are those of the eager step, where
        it leaves the batch. On a dispatch-bound CPU a loop of all rows, packaged, costs
        less than a loop of fewer rows run eagerly. Once the rows still looping fit a
        smaller bucket whose package is built (`packages.fewer`), the later loops run on
        those rows only, gathered (with stopped rows to fill the bucket). One host sync per
        loop from the rows' earliest stop on, to learn which rows stop. Returns the rows
        (their states, the loops they spent; the skipped loops not filled yet), or None if
        a package raises (the step is then run eagerly, which rewrites every key this one
        wrote; the package is not used again)."""
        rows = every = self.adaptive_rows(tokens, slots, params)
        order = list(range(batch))  # the batch row of each of `rows`' rows
        gathered = None  # the package of the later loops over `order`, once gathered
        key_slots = self._key_slots(packages.kv_len)
        budget = {slot: p.n_loops for slot, p in zip(slots, params, strict=True)}
        earliest = {slot: p.earliest_stop for slot, p in zip(slots, params, strict=True)}
        for loop in range(max(budget.values(), default=0)):
            rows.loop = self._loop_numbers[loop]
            package = packages.first if loop == 0 else gathered or packages.later
            try:
                rows.previous, stopping = package.run(
                    [*self._adaptive_entries(batch, loop), *rows.tensors()], key_slots)
            except Exception as error:  # a package is only ever an optimisation
                self._drop_package(package, error)
                return None
            if loop + 1 < min(earliest[slot] for slot in budget):  # none stops: no sync
                continue
            if all(n == loop + 1 for n in budget.values()):  # every row's last loop
                break
            for at, stop in enumerate(stopping.tolist()):
                if stop:
                    del budget[order[at]], earliest[order[at]]
            if not budget:
                break
            size = next(b for b in self.buckets if b >= len(budget))
            fewer = packages.fewer(size) if size < len(order) else None
            if fewer is not None:  # the later loops on fewer rows
                if rows is not every:
                    rows.scatter(every)
                order = sorted(budget)
                order += [row for row in range(batch) if row not in budget][: size - len(order)]
                rows, gathered = every.gathered(torch.tensor(order, device=self.device)), fewer
        if rows is not every:
            rows.scatter(every)
        return every

    def coda_ends(self, rows: AdaptiveRows) -> list[torch.Tensor]:
        """The `ends` an adaptive step's coda takes (`adaptive_coda`) after its loops ran on
        `rows`."""
        return [rows.budget, rows.spent, rows.final, *self.cache.fill_tables(self.device)]

    def _fill_skipped(self, skipped: dict[int, int], batch: int) -> None:
        """Fill the skipped loops' cache entries of the rows that stopped early in this
        step (`skipped`: slot -> its last loop; `StaticKVCache.fill_skipped_loops`)."""
        if skipped:
            last = torch.tensor([skipped.get(row, -1) for row in range(batch)],
                                device=self.device)
            self.cache.fill_skipped_loops(last, self.state.pos[:batch])

    def _adaptive_entries(self, batch: int, loop: int) -> list[torch.Tensor]:
        """`packaged.loop_inputs`, made once per (batch, loop): views that never move."""
        if (batch, loop) not in self._loop_views:
            self._loop_views[(batch, loop)] = packaged.loop_inputs(self, batch, loop)
        return self._loop_views[(batch, loop)]

    def _rows_inputs(self, inputs: LoopInputs, active: torch.Tensor, batch: int,
                     entries: list[list[Entry]]) -> LoopInputs:
        """The loop inputs of rows `active` of a batch whose masks and cache rows stay whole
        (`AttentionPlan.rows`): what a loop of the rows still looping, and their read-out,
        run on (the layers outside the loop write those rows' entries: `outer_writes`)."""
        if active.numel() == batch:  # every row, in order (the rows are 0 .. batch-1)
            return inputs
        plan, pos = inputs.plan, self.state.pos[active]
        rows_plan = AttentionPlan(plan.cos[active], plan.sin[active], plan.masks,
                                  outer_writes(self.model, entries[0], active, pos),
                                  plan.fused, rows=active)
        return inputs.select_rows(active, rows_plan)


def build_package(engine: DecodeEngine, spec: WarmSpec) -> int:
    """The warming process's part for a package spec: an engine of the spec's shapes (the
    stop-id table widened as the spec's is), its variant built into the package; a failure
    is marked, so that engines run that variant without a package rather than ask again."""
    try:
        names = [name for name, _ in packaged.state_tensors(engine)]
        shapes = spec.shapes or []
        if len(shapes) == len(packaged.input_shapes(engine)):
            stops = shapes[len(shapes) - len(names) + names.index("stop_table")]
            engine.state.stop_table = torch.full(tuple(stops), -1, dtype=torch.long,
                                                 device=engine.device)
        if packaged.input_shapes(engine) != shapes:
            raise ValueError(f"this engine's inputs {packaged.input_shapes(engine)} are not "
                             f"the spec's {shapes}")
        variant = StepKey(**spec.variant)
        if variant.loop_program:
            rows = engine.adaptive_rows(engine.state.tokens[: variant.batch], [], [])
            if variant.rows:
                rows = rows.gathered(torch.arange(variant.rows, device=engine.device))
            coda = variant.loop_program == "coda"
            seconds = packaged.build(engine, variant, package_path(spec),
                                     adaptive_coda if coda else adaptive_loop,
                                     engine.coda_ends(rows) if coda else rows.tensors())
        else:
            seconds = packaged.build(engine, variant, package_path(spec),
                                     functools.partial(fixed_step, loop_fn=decode_loop))
    except Exception:
        log.exception("building the packaged step %s failed", spec.signature())
        record(spec, failed=True)
        return 1
    record(spec)
    log.info("packaged %s in %.1f s", spec.signature(), seconds)
    return 0


def warm_main(argv: list[str] | None = None) -> int:
    """The compile-warming process (`loopedlm.infer.warm.start_warming`): a `WarmSpec` as JSON
    on stdin; compiles its step variant on a model of its shape (random weights: a compile
    does not depend on them) into torch.compile's on-disk caches, and marks it warm.
    argv[0]: the lock file to remove at the end, however it ends."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with contextlib.suppress(AttributeError, OSError):
        os.nice(10)
    try:
        spec = WarmSpec.from_json(sys.stdin.read())
        pruned = prune()
        if pruned:
            log.info("deleted %d package file(s) and marker(s) unused for 30 days", pruned)
        torch.set_num_threads(1)
        model = LoopedGPT.from_config(ModelConfig.from_dict(spec.config), seed=0).eval()
        engine = DecodeEngine(model, max_batch=spec.max_batch,
                              max_len=spec.max_len or (1 if spec.short_len else None),
                              max_loops=spec.max_loops,
                              cache_slots=spec.cache_slots, slot_policy=spec.slot_policy,
                              share_first_layer=spec.share_first_layer,
                              dtype=getattr(torch, spec.dtype),
                              compile="background" if not spec.package else False,
                              compile_options=spec.compile_options)
        if spec.package:
            return build_package(engine, spec)
        seconds = engine.compile_variant(StepKey(**spec.variant))
        record(spec)
        log.info("compiled %s in %.1f s", spec.signature(), seconds)
        return 0
    finally:
        if argv:
            with contextlib.suppress(OSError):
                os.unlink(argv[0])


__all__ = ["DecodeEngine", "SequenceParams", "AdaptiveLoops", "StepOutput", "StepKey",
           "SpeculationStats", "check_draft_loops", "decode_pass", "step_logits", "fixed_step",
           "pop_step", "SlotState", "batch_buckets", "capture_step", "decode_loop", "adaptive_loop",
           "adaptive_coda", "adaptive_read_out", "finish_step", "AdaptiveRows",
           "AdaptivePackages",
           "outer_writes", "CRITERIA", "MAX_LOGPROBS", "warm_main", "cpu_compile_options",
           "build_package"]
