"""Generation and scoring through the decode engine (docs/design.md#decoding): `generate`,
`stream` and teacher-forced `decode_nll`, the public entry points of decoding.

They run on the decode engine (`loopedlm.infer.engine.DecodeEngine`: a static cache with a
slot per sequence, a sync-free step captured as a CUDA graph on GPUs, sampling on the
device). Decoding with the cache is exact: the cache holds one entry per (loop, layer), so
every loop of a new token reads every earlier token's keys at that same loop, and the
logits equal a full forward's (tests/test_kv_cache.py). Two options trade exactness for
compute or memory:

* **Adaptive loops** (`adaptive_threshold=`): a decoded token stops looping once its loop
  state has converged; its skipped loops' cache entries get its last computed loop's keys
  (`loopedlm.infer.engine.AdaptiveLoops`). The prompt (prefill) always runs every loop.
* **Shared cache slots** (`cache_slots=K`): the N loops share K < N storage slots, so the
  cache holds K entries per layer instead of N (`loopedlm.infer.cache.loop_slot_map`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from loopedlm.common.validation import is_int
from loopedlm.infer.engine import (
    AdaptiveLoops,
    DecodeEngine,
    SequenceParams,
    SpeculationStats,
    StepOutput,
)
from loopedlm.infer.options import DEFAULT_DRAFT_TOKENS, DEFAULT_MAX_TOKENS
from loopedlm.infer.sampling import SamplingParams
from loopedlm.model.gpt import LoopedGPT

log = logging.getLogger(__name__)

SYNC_EVERY = 8  # generate checks for finished rows (a host sync) every this many steps
CACHE_LEN_STEP = 256  # generate's engines have cache lengths in multiples of this


# ---- generation ------------------------------------------------------------------------
@dataclass
class GenerationStep:
    """One streamed step. `tokens[r]` is row r's new token, or None when row r produced
    none (it had finished, or it just sampled a stop token, which is not part of the
    output); `loops[r]` the loops spent on it; `done[r]` whether row r has finished;
    `speculation`: with draft_loops, the speculative decoding's counts so far."""

    index: int
    tokens: list[int | None]
    loops: list[int]
    done: list[bool]
    speculation: SpeculationStats | None = None


@dataclass
class GenerationResult:
    """Generated tokens per row (stop tokens excluded), loops spent per token, why each row
    ended ("stop", "length": max_tokens, "context": sequence_len reached), the texts
    when a tokenizer was given, and with draft_loops the speculative decoding's counts
    (acceptance, tokens per verify pass)."""

    tokens: list[list[int]]
    loops: list[list[int]]
    finish_reasons: list[str]
    texts: list[str] | None = None
    seconds: float = 0.0
    speculation: SpeculationStats | None = None

    @property
    def mean_loops(self) -> float:
        flat = [n for row in self.loops for n in row]
        return sum(flat) / len(flat) if flat else float("nan")


@dataclass(frozen=True)
class GenerationOptions:
    """The options of `generate` and `stream` (each a keyword argument of theirs).

    n_loops: loop count (default: the model's). max_tokens: tokens to generate per row.
    temperature (0 = greedy), top_k, top_p in (0, 1], seed (same seed and prompt, same
        text, whatever else is in the batch).
    stop: token id(s) or single-token string(s); a row ends when it samples one.
    adaptive_threshold / adaptive_criterion ("state" | "kl" | "kl_previous" | "gate"; None:
        the model's own) / min_loops (None: the criterion's earliest): adaptive loops
        (`AdaptiveLoops`); adaptive_prompt: the prompt's tokens stop by the same rule
        (`state` and `gate`; default False: the prompt runs every loop).
    cache_slots / slot_policy: shared cache slots (`loop_slot_map`).
    draft_loops / draft_tokens: self-speculative decoding (`SequenceParams`): the model at
        draft_loops loops drafts draft_tokens tokens that one pass at n_loops verifies; the
        output is that of n_loops (greedy: the same tokens).
    add_bos: text prompts start with BOS, as documents in training.
    dtype: weights and cache (default: bf16 on CUDA, else the model's); compile:
        torch.compile the decode step or loop ("auto", the default, compiles where it pays;
        False, "step", "loop": `DecodeEngine`).
    """

    n_loops: int | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None
    stop: Any = None
    adaptive_threshold: float | None = None
    adaptive_criterion: str | None = None
    min_loops: int | None = None
    adaptive_prompt: bool = False
    draft_loops: int | None = None
    draft_tokens: int = DEFAULT_DRAFT_TOKENS
    cache_slots: int | None = None
    slot_policy: str = "block"
    add_bos: bool = True
    dtype: torch.dtype | None = None
    compile: bool | str = "auto"

    def __post_init__(self) -> None:
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} is not allowed: an integer >= 1")

    @classmethod
    def of(cls, options: dict[str, Any]) -> GenerationOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown generation option(s) {unknown}: the options are "
                            f"{sorted(known)}")
        return cls(**options)

    def sequence_params(self, stop_ids: set[int]) -> SequenceParams:
        """The per-row settings of every prompt (checked: a bad value raises ValueError)."""
        adaptive = AdaptiveLoops.given(self.adaptive_threshold, self.adaptive_criterion,
                                       self.min_loops, self.adaptive_prompt)
        return SequenceParams(
            n_loops=self.n_loops,
            sampling=SamplingParams(self.temperature, self.top_k, self.top_p, self.seed),
            max_new_tokens=self.max_tokens, stop_ids=tuple(sorted(stop_ids)),
            adaptive=adaptive, draft_loops=self.draft_loops, draft_tokens=self.draft_tokens)


def _prompt_ids(prompts: Any, tokenizer: Any, add_bos: bool, sequence_len: int
                ) -> list[list[int]]:
    """Token ids of each prompt (their values are checked where they enter the engine)."""
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                    and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(f"prompts={prompts!r} is empty: give a string, a list of token ids, "
                         f"or a list of either")
    rows = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError(f"prompt {i} is text ({prompt[:30]!r}); pass a tokenizer "
                                 f"or token ids")
            ids = ([tokenizer.bos_id] if add_bos else []) + tokenizer.encode(prompt)
            if not prompt:
                ids = []
        else:
            ids = list(prompt)
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty: at least one token is needed")
        if len(ids) > sequence_len:
            raise ValueError(f"prompt {i} has {len(ids)} tokens, longer than the model's "
                             f"context (sequence_len={sequence_len})")
        rows.append(ids)
    return rows


def _stop_ids(stop: Any, tokenizer: Any) -> set[int]:
    """Stop token ids of `stop` (ids or single-token strings; the engine checks the ids)."""
    if stop is None:
        return set()
    if isinstance(stop, int | str):
        stop = [stop]
    ids = set()
    for item in stop:
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError(f"stop={item!r} is text; pass a tokenizer or a token id")
            encoded = tokenizer.encode(item)
            if len(encoded) != 1:
                raise ValueError(f"stop={item!r} is not a single token of the vocabulary "
                                 f"(it encodes to {encoded}); give a token id or one token")
            item = encoded[0]
        ids.add(item)
    return ids


@dataclass
class _Started:
    """A generation under way: its engine, rows, stop ids and the steps it may still take."""

    engine: DecodeEngine
    batch: int
    stop_ids: set[int]
    steps: int


def _start(model: LoopedGPT, prompts: Any, tokenizer: Any, options: GenerationOptions,
           engine: DecodeEngine | None) -> _Started:
    """Check every option, build an engine for this batch (or check and reset the one
    given) and add every prompt (one slot each, so ragged prompts need no padding)."""
    cfg = model.config
    stop_ids = _stop_ids(options.stop, tokenizer)
    params = options.sequence_params(stop_ids)
    rows = _prompt_ids(prompts, tokenizer, options.add_bos, cfg.sequence_len)
    max_tokens = options.max_tokens
    # the last sampled token is never fed back, so a row of P tokens can take
    # sequence_len - P + 1 new ones
    rooms = [min(max_tokens, cfg.sequence_len - len(ids) + 1) for ids in rows]
    if min(rooms) < max_tokens:
        log.warning("max_tokens=%d does not fit in the context (sequence_len=%d) after a "
                    "prompt of %d tokens: generating at most %d", max_tokens,
                    cfg.sequence_len, max(len(r) for r in rows), min(rooms))
    max_len = min(cfg.sequence_len, max(len(ids) + max_tokens - 1 for ids in rows))
    if engine is None:
        # the cache's length rounded up, so that runs with other prompt lengths share one
        # packaged step (a package is built for its cache length; `loopedlm.infer.packaged`)
        capacity = min(cfg.sequence_len, -(-max_len // CACHE_LEN_STEP) * CACHE_LEN_STEP)
        engine = DecodeEngine(model, max_batch=len(rows), max_len=capacity,
                              max_loops=options.n_loops, cache_slots=options.cache_slots,
                              slot_policy=options.slot_policy, dtype=options.dtype,
                              compile=options.compile)
    else:
        _check_engine(engine, model, len(rows), max_len, options)
        engine.reset()
    engine.speculation = SpeculationStats()  # this call's
    # the prompts prefilled together (one pass); a refused one refuses the call
    errors = engine.add_many([(slot, ids, params) for slot, ids in enumerate(rows)])
    refused = next((error for error in errors if error is not None), None)
    if refused is not None:
        engine.reset()
        raise refused
    return _Started(engine, len(rows), stop_ids, max(rooms) - 1)


def _check_engine(engine: DecodeEngine, model: LoopedGPT, batch: int, max_len: int,
                  options: GenerationOptions) -> None:
    """A reused engine must be this model's and big enough (its n_loops capacity is checked
    as the prompts are added); its dtype, compile and cache slots are its own."""
    if not isinstance(engine, DecodeEngine) or engine.source is not model:
        raise ValueError("engine= must be a DecodeEngine built for this model")
    for name, need, has in (("prompts", batch, engine.max_batch),
                            ("positions (prompt + max_tokens - 1)", max_len, engine.max_len)):
        if need > has:
            raise ValueError(f"the engine holds at most {has} {name}; this call needs {need}: "
                             f"build a larger DecodeEngine")
    if options.dtype is not None or options.compile != "auto" \
            or options.cache_slots is not None or options.slot_policy != "block":
        raise ValueError("dtype, compile, cache_slots and slot_policy belong to the "
                         "DecodeEngine when engine= is given: set them when building it")


@torch.no_grad()
def stream(model: LoopedGPT, prompts: Any, *, tokenizer: Any = None,
           engine: DecodeEngine | None = None, **options: Any) -> Iterator[GenerationStep]:
    """Generate, yielding one `GenerationStep` per sampled position (the options are
    `generate`'s); the tokens of each step come to the host in one transfer."""
    opts = GenerationOptions.of(options)
    run = _start(model, prompts, tokenizer, opts, engine)
    speculation = None if opts.draft_loops is None else run.engine.speculation
    out = run.engine.output(run.batch)
    for index in range(run.steps + 1):
        tokens, finished, loops = torch.stack([out.tokens, out.finished.long(),
                                               out.loops]).tolist()
        new = [None if t < 0 or t in run.stop_ids else t for t in tokens]
        done = [bool(f) for f in finished]
        yield GenerationStep(index, new, loops, done, speculation)
        if all(done):
            return
        out = run.engine.step()


def generate(model: LoopedGPT, prompts: Any, *, tokenizer: Any = None,
             engine: DecodeEngine | None = None, **options: Any) -> GenerationResult:
    """Generate continuations of one or more prompts with the decode engine
    (`DecodeEngine`: a static KV cache, one slot per prompt).

    prompts: a string or a list of strings (needs `tokenizer`; BOS is prepended unless
        add_bos=False), or a list of token ids, or a list of such lists. Prompts of
        different lengths are batched, each in its own cache slot with its own positions.
    options: the fields of `GenerationOptions` (n_loops, max_tokens, temperature, top_k,
        top_p, seed, stop, adaptive_threshold, adaptive_criterion, min_loops, adaptive_prompt,
        draft_loops, draft_tokens, cache_slots, slot_policy, add_bos, dtype, compile).
    engine: a `DecodeEngine` of this model to reuse across calls (large enough for the
        prompts, their lengths and n_loops): no new cache, cast copy or CUDA-graph
        capture per call. Without it each call builds its own.
    Bad values raise ValueError naming the value.
    """
    start = time.perf_counter()
    opts = GenerationOptions.of(options)
    with torch.no_grad():
        run = _start(model, prompts, tokenizer, opts, engine)
        outputs = [_snapshot(run.engine.output(run.batch))]
        for step in range(run.steps):
            # one host sync every SYNC_EVERY steps to stop early; tokens stay on the device
            if step % SYNC_EVERY == 0 and bool(run.engine.output(run.batch).finished.all()):
                break
            outputs.append(_snapshot(run.engine.step()))
        tokens_steps, loops_steps = torch.stack(outputs, 1).tolist()  # (2, steps, batch)
    tokens: list[list[int]] = [[] for _ in range(run.batch)]
    loops: list[list[int]] = [[] for _ in range(run.batch)]
    reasons = [""] * run.batch
    for step_tokens, step_loops in zip(tokens_steps, loops_steps, strict=True):
        for r, (tok, spent) in enumerate(zip(step_tokens, step_loops, strict=True)):
            if tok < 0 or reasons[r]:
                continue
            if tok in run.stop_ids:
                reasons[r] = "stop"
            else:
                tokens[r].append(tok)
                loops[r].append(spent)
    for r, reason in enumerate(reasons):
        if not reason:
            reasons[r] = "length" if len(tokens[r]) >= opts.max_tokens else "context"
    texts = [tokenizer.decode(t) for t in tokens] if tokenizer is not None else None
    speculation = None if opts.draft_loops is None else run.engine.speculation
    return GenerationResult(tokens, loops, reasons, texts, time.perf_counter() - start,
                            speculation)


def _snapshot(out: StepOutput) -> torch.Tensor:
    """A step's tokens and loops, copied out of the engine's static buffers (2, batch)."""
    return torch.stack([out.tokens, out.loops])


def strip_trailing_spaces(prompt: str) -> str:
    """The prompt to condition on: without its trailing spaces. BPE tokenizers put the space
    in front of the next word (" king"), so "The " would end in a lone space token that
    training text rarely has, and the model's next word would bring a second space."""
    return prompt.rstrip(" ") or prompt


# ---- teacher-forced scoring through the decoding path ---------------------------------------
@dataclass
class DecodeScore:
    """Per-position next-token NLL (nats) and loops spent, from token-by-token decoding."""

    nll: torch.Tensor    # (B, T - prefill)
    loops: torch.Tensor  # (B, T - prefill)


@torch.no_grad()
def decode_nll(model: LoopedGPT, tokens: torch.Tensor, *, n_loops: int | None = None,
               prefill: int = 1, adaptive: AdaptiveLoops | None = None,
               cache_slots: int | None = None, slot_policy: str = "block") -> DecodeScore:
    """Teacher-forced NLL of `tokens` (B, T) computed the way generation computes it (the
    decode engine, in the model's dtype): the first `prefill` tokens in one pass, then one
    token at a time, so that the quality cost of adaptive loops and shared cache slots can
    be measured. With neither it equals the full forward's loss."""
    batch, length = tokens.shape
    if not 1 <= prefill < length:
        raise ValueError(f"prefill={prefill} must lie in [1, {length})")
    engine = DecodeEngine(model, max_batch=batch, max_len=length - 1, max_loops=n_loops,
                          cache_slots=cache_slots, slot_policy=slot_policy,
                          dtype=model.lm_head.weight.dtype)
    params = SequenceParams(n_loops=n_loops, adaptive=adaptive)
    # the rows' first `prefill` tokens in one pass
    prefilled = engine.prefill_many([(r, tokens[r, :prefill], params) for r in range(batch)])
    refused = next((p for p in prefilled if isinstance(p, ValueError)), None)
    if refused is not None:
        raise refused
    logits = torch.stack(prefilled)
    spent = engine.state.n_loops[:batch].clone()  # the prefill runs every loop
    nll, loops = [], []
    for t in range(prefill, length):
        nll.append(F.cross_entropy(logits.float(), tokens[:, t], reduction="none"))
        loops.append(spent)
        if t < length - 1:
            logits, spent = engine.decode(tokens[:, t])
    return DecodeScore(torch.stack(nll, 1).cpu(), torch.stack(loops, 1).cpu())


__all__ = ["GenerationOptions", "GenerationStep", "GenerationResult", "generate", "stream",
           "strip_trailing_spaces", "DecodeScore", "decode_nll", "DEFAULT_MAX_TOKENS"]
