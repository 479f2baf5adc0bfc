"""Sampling with the KV cache (SPEC 2): prefill, token-by-token decode, streaming, adaptive
loops and shared cache slots.

`generate` and `stream` (and teacher-forced scoring, `loopedlm.infer.scoring.decode_nll`)
run on the decode engine (`loopedlm.infer.DecodeEngine`: a static cache with a slot per
sequence, a sync-free step captured as a CUDA graph on GPUs, sampling on the device).
`loopedlm.infer.reference.decode_step` is the model's own forward with a `KVCache` (the
reference path, kept for tests and benchmarks).

Decoding with the cache is exact: the cache holds one entry per (loop, layer), so every
loop of a new token reads every earlier token's keys at that same loop, and the logits
equal a full forward's (tests/test_kv_cache.py). Two options trade exactness for compute
or memory:

* **Adaptive loops** (`adaptive_threshold=`): during decoding, a token stops looping once
  its loop state has converged, and the remaining loops are skipped (their blocks are
  never run). The cache entries of the skipped loops at that position are filled with the
  keys/values of the token's last computed loop. Why: convergence means the loop map is
  (nearly) at a fixed point for this token: in every mode, loop t+1 gets the same inputs as
  loop t did (the same stream start and injection, since h^{t+1} ~ h^t), so it would write
  (nearly) the same keys and values, and copying them is the best estimate that costs no
  compute. Later tokens therefore attend, at loop u, to the skipped token's keys of its
  last computed loop. The prompt (prefill) always runs every loop.
* **Shared cache slots** (`cache_slots=K`): the N loops share K < N storage slots, so the
  cache holds K entries per layer instead of N. Within one pass everything is exact; a
  slot keeps the keys/values of the last loop written to it, so a later token at loop t
  reads the earlier tokens' keys of another loop of the same slot. The default policy
  `block` maps loop t to slot floor(t * K / N): loops that share a slot are neighbours,
  whose states are closest; `modulo` (t mod K) is the alternative, measured in
  benchmarks/bench_decode.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from loopedlm.common.validation import is_int
from loopedlm.infer.engine import DecodeEngine
from loopedlm.infer.options import AdaptiveLoops, loop_slot_map
from loopedlm.infer.sampling import SamplingParams
from loopedlm.model.gpt import LoopedGPT

log = logging.getLogger(__name__)


# ---- generation ------------------------------------------------------------------------
@dataclass
class GenerationStep:
    """One streamed step. `tokens[r]` is row r's new token, or None when row r produced
    none (it had finished, or it just sampled a stop token, which is not part of the
    output); `loops[r]` the loops spent on it; `done[r]` whether row r has finished."""

    index: int
    tokens: list[int | None]
    loops: list[int]
    done: list[bool]


@dataclass
class GenerationResult:
    """Generated tokens per row (stop tokens excluded), loops spent per token, why each row
    ended ("stop", "length": max_tokens, "context": sequence_len reached), and the texts
    when a tokenizer was given."""

    tokens: list[list[int]]
    loops: list[list[int]]
    finish_reasons: list[str]
    texts: list[str] | None = None
    seconds: float = 0.0

    @property
    def mean_loops(self) -> float:
        flat = [n for row in self.loops for n in row]
        return sum(flat) / len(flat) if flat else float("nan")


def _prompt_ids(prompts: Any, tokenizer: Any, add_bos: bool, vocab_size: int,
                sequence_len: int) -> list[list[int]]:
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
        bad = [t for t in ids if not is_int(t) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} holds token id {bad[0]!r}, outside the vocabulary "
                             f"[0, {vocab_size})")
        if len(ids) > sequence_len:
            raise ValueError(f"prompt {i} has {len(ids)} tokens, longer than the model's "
                             f"context (sequence_len={sequence_len})")
        rows.append(ids)
    return rows


def _stop_ids(stop: Any, tokenizer: Any, vocab_size: int) -> set[int]:
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
        if not is_int(item) or not 0 <= item < vocab_size:
            raise ValueError(f"unknown stop token {item!r}: ids lie in [0, {vocab_size})")
        ids.add(item)
    return ids


def _check_lengths(n_loops, max_tokens) -> None:
    for name, value in (("n_loops", n_loops), ("max_tokens", max_tokens)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name}={value!r} is not allowed: an integer >= 1")


def _start(model: LoopedGPT, prompts: Any, *, tokenizer: Any = None,
           n_loops: int | None = None, max_tokens: int = 64, temperature: float = 1.0,
           top_k: int | None = None, top_p: float = 1.0, seed: int | None = None,
           stop: Any = None, adaptive_threshold: float | None = None,
           adaptive_criterion: str = "state", min_loops: int = 2,
           cache_slots: int | None = None, slot_policy: str = "block", add_bos: bool = True,
           dtype: torch.dtype | None = None, compile: bool = False,
           engine: DecodeEngine | None = None) -> tuple[DecodeEngine, int, set[int], int]:
    """Check every option, build an engine for this batch (or check and reset the one
    given) and add every prompt (one slot each, so ragged prompts need no padding).
    Returns (engine, batch, stop ids, the most steps any row can still take)."""
    cfg = model.config
    n_loops = cfg.loops(n_loops)
    _check_lengths(n_loops, max_tokens)
    sampling = SamplingParams(temperature, top_k, top_p, seed)  # checks them
    rows = _prompt_ids(prompts, tokenizer, add_bos, cfg.vocab_size, cfg.sequence_len)
    stop_ids = _stop_ids(stop, tokenizer, cfg.vocab_size)
    adaptive = None if adaptive_threshold is None else AdaptiveLoops(
        adaptive_threshold, adaptive_criterion, min_loops)
    loop_slot_map(n_loops, cache_slots, slot_policy)  # checks them
    # the last sampled token is never fed back, so a row of P tokens can take
    # sequence_len - P + 1 new ones
    rooms = [min(max_tokens, cfg.sequence_len - len(ids) + 1) for ids in rows]
    if min(rooms) < max_tokens:
        log.warning("max_tokens=%d does not fit in the context (sequence_len=%d) after a "
                    "prompt of %d tokens: generating at most %d", max_tokens,
                    cfg.sequence_len, max(len(r) for r in rows), min(rooms))
    max_len = min(cfg.sequence_len, max(len(ids) + max_tokens - 1 for ids in rows))
    if engine is None:
        engine = DecodeEngine(model, max_batch=len(rows), max_len=max_len, max_loops=n_loops,
                              cache_slots=cache_slots, slot_policy=slot_policy, dtype=dtype,
                              compile=compile)
    else:
        _check_engine(engine, model, len(rows), max_len, n_loops, cache_slots, slot_policy,
                      dtype, compile)
        engine.reset()
    for slot, ids in enumerate(rows):
        engine.add(slot, ids, n_loops=n_loops, sampling=sampling, max_new_tokens=max_tokens,
                   stop_ids=sorted(stop_ids), adaptive=adaptive)
    return engine, len(rows), stop_ids, max(rooms) - 1


def _check_engine(engine: DecodeEngine, model: LoopedGPT, batch: int, max_len: int,
                  n_loops: int, cache_slots: int | None, slot_policy: str,
                  dtype: torch.dtype | None, compile: bool) -> None:
    """A reused engine must be this model's and big enough; its dtype, compile and cache
    slots are its own (set when it was built)."""
    if not isinstance(engine, DecodeEngine) or engine.source is not model:
        raise ValueError("engine= must be a DecodeEngine built for this model")
    for name, need, has in (("prompts", batch, engine.max_batch),
                            ("positions (prompt + max_tokens - 1)", max_len, engine.max_len),
                            ("n_loops", n_loops, engine.max_loops)):
        if need > has:
            raise ValueError(f"the engine holds at most {has} {name}; this call needs {need}: "
                             f"build a larger DecodeEngine")
    if dtype is not None or compile or cache_slots is not None or slot_policy != "block":
        raise ValueError("dtype, compile, cache_slots and slot_policy belong to the "
                         "DecodeEngine when engine= is given: set them when building it")


@torch.no_grad()
def stream(model: LoopedGPT, prompts: Any, **options: Any) -> Iterator[GenerationStep]:
    """Generate, yielding one `GenerationStep` per sampled position (see `generate`); the
    tokens of each step come to the host in one transfer."""
    engine, batch, stop_ids, n_steps = _start(model, prompts, **options)
    out = engine.output(batch)
    for index in range(n_steps + 1):
        tokens, finished, loops = torch.stack([out.tokens, out.finished.long(),
                                               out.loops]).tolist()
        new = [None if t < 0 or t in stop_ids else t for t in tokens]
        done = [bool(f) for f in finished]
        yield GenerationStep(index, new, loops, done)
        if all(done):
            return
        out = engine.step()


def generate(model: LoopedGPT, prompts: Any, *, tokenizer: Any = None, **options: Any
             ) -> GenerationResult:
    """Generate continuations of one or more prompts with the decode engine
    (`loopedlm.infer.DecodeEngine`: a static KV cache, one slot per prompt).

    prompts: a string or a list of strings (needs `tokenizer`; BOS is prepended unless
        add_bos=False), or a list of token ids, or a list of such lists. Prompts of
        different lengths are batched, each in its own cache slot with its own positions.
    n_loops: loop count (default: the model's). max_tokens: tokens to generate per row.
    temperature (0 = greedy), top_k, top_p in (0, 1], seed (same seed and prompt, same
        text, whatever else is in the batch).
    stop: token id(s) or single-token string(s); a row ends when it samples one.
    adaptive_threshold / adaptive_criterion ("state" | "kl") / min_loops: adaptive loops
        (`AdaptiveLoops`). cache_slots / slot_policy: shared cache slots (`loop_slot_map`).
    dtype: weights and cache (default: bf16 on CUDA, else the model's); compile:
        torch.compile the decode loop (pays off for long generations on CPU).
    engine: a `DecodeEngine` of this model to reuse across calls (large enough for the
        prompts, their lengths and n_loops): no new cache, cast copy or CUDA-graph
        capture per call. Without it each call builds its own.
    Bad values raise ValueError naming the value.
    """
    start = time.perf_counter()
    max_tokens = options.get("max_tokens", 64)
    with torch.no_grad():
        engine, batch, stop_ids, n_steps = _start(model, prompts, tokenizer=tokenizer,
                                                  **options)
        outputs = [_snapshot(engine.output(batch))]
        for step in range(n_steps):
            # one host sync every SYNC_EVERY steps to stop early; tokens stay on the device
            if step % SYNC_EVERY == 0 and bool(engine.finished[:batch].all()):
                break
            outputs.append(_snapshot(engine.step()))
        tokens_steps, loops_steps = torch.stack(outputs, 1).tolist()  # (2, steps, batch)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    loops: list[list[int]] = [[] for _ in range(batch)]
    reasons = [""] * batch
    for step_tokens, step_loops in zip(tokens_steps, loops_steps, strict=True):
        for r, (tok, spent) in enumerate(zip(step_tokens, step_loops, strict=True)):
            if tok < 0 or reasons[r]:
                continue
            if tok in stop_ids:
                reasons[r] = "stop"
            else:
                tokens[r].append(tok)
                loops[r].append(spent)
    for r, reason in enumerate(reasons):
        if not reason:
            reasons[r] = "length" if len(tokens[r]) >= max_tokens else "context"
    texts = [tokenizer.decode(t) for t in tokens] if tokenizer is not None else None
    return GenerationResult(tokens, loops, reasons, texts, time.perf_counter() - start)


SYNC_EVERY = 8


def _snapshot(out) -> torch.Tensor:
    """A step's tokens and loops, copied out of the engine's static buffers (2, batch)."""
    return torch.stack([out.tokens, out.loops])


def strip_trailing_spaces(prompt: str) -> str:
    """The prompt to condition on: without its trailing spaces. BPE tokenizers put the space
    in front of the next word (" king"), so "The " would end in a lone space token that
    training text rarely has, and the model's next word would bring a second space."""
    return prompt.rstrip(" ") or prompt


__all__ = ["GenerationStep", "GenerationResult", "generate", "stream", "strip_trailing_spaces"]
