"""Sampling with the KV cache (SPEC 2): prefill, token-by-token decode, streaming, adaptive
loops and shared cache slots; the `loopedlm sample` command.

`generate`, `stream` and `decode_nll` run on the decode engine
(`loopedlm.infer.DecodeEngine`: a static cache with a slot per sequence, a sync-free step
captured as a CUDA graph on GPUs, sampling on the device). `decode_step` is the model's own
forward with a `KVCache` (the reference path, kept for tests and benchmarks).

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

import argparse
import itertools
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from loopedlm.infer.engine import DecodeEngine
from loopedlm.infer.options import CRITERIA, SLOT_POLICIES, AdaptiveLoops, loop_slot_map
from loopedlm.infer.sampling import SamplingParams
from loopedlm.model.attention import KVCache, norm
from loopedlm.model.gpt import LoopedGPT

log = logging.getLogger(__name__)



# ---- one decode step with adaptive loops ------------------------------------------------
@torch.no_grad()
def decode_step(model: LoopedGPT, tokens: torch.Tensor, cache: KVCache, *,
                adaptive: AdaptiveLoops | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Append one token per row (`tokens` (B, 1)) to `cache`; return the next-token logits
    (B, vocab_size) and the loops spent per row (B,).

    Without `adaptive` this is the model's own forward (exact). With it, each row stops
    after the first loop t >= min_loops whose state has converged; rows that stopped are
    dropped from the batch for the remaining loops, so their blocks are never run.
    """
    n_loops, batch = cache.n_loops, tokens.size(0)
    if adaptive is None:
        logits = model(tokens, n_loops=n_loops, kv_cache=cache)[:, -1]
        return logits, torch.full((batch,), n_loops, dtype=torch.long)
    inputs = model.prepare(tokens, kv_cache=cache)
    final = torch.empty_like(inputs.embedded)
    spent = torch.zeros(batch, dtype=torch.long)
    active = torch.arange(batch, device=tokens.device)
    previous = previous_logp = None  # of the active rows
    for loop in range(n_loops):
        full = active.numel() == batch
        x = model.loop(inputs if full else inputs.select_rows(active), previous, loop)
        h = norm(x)
        if full:  # (the common case kept free of indexing: it is per loop and per token)
            spent += 1
        else:
            spent[active.cpu()] += 1
        if loop == n_loops - 1:
            if full:
                final = h
            else:
                final[active] = h
            break
        logp = None
        if adaptive.criterion == "kl":
            logp = F.log_softmax(model.logits(h[:, -1]), dim=-1)
        if loop + 1 < adaptive.min_loops:
            previous, previous_logp = h, logp
            continue
        if adaptive.criterion == "state":
            change = (h - previous).float().norm(dim=-1) / h.float().norm(dim=-1)
            converged = change[:, -1] < adaptive.threshold
        else:
            kl = (logp.exp() * (logp - previous_logp)).sum(-1)
            converged = kl < adaptive.threshold
        if bool(converged.any()):
            done = active[converged]
            final[done] = h[converged]
            cache.fill_loops_from(loop, done)
            keep = ~converged
            active, h = active[keep], h[keep]
            logp = None if logp is None else logp[keep]
            if active.numel() == 0:
                break
        previous, previous_logp = h, logp
    cache.advance(tokens.size(1), torch.ones_like(tokens, dtype=torch.bool))
    return model.logits(final)[:, -1], spent


# ---- sampling --------------------------------------------------------------------------
def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from logits (B, V): greedy when temperature == 0, else softmax
    sampling at `temperature` restricted to the `top_k` most likely tokens and to the
    smallest set whose probability reaches `top_p` (nucleus)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int)
               or not 0 <= t < vocab_size]
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
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < vocab_size:
            raise ValueError(f"unknown stop token {item!r}: ids lie in [0, {vocab_size})")
        ids.add(item)
    return ids


def _check_lengths(n_loops, max_tokens) -> None:
    for name, value in (("n_loops", n_loops), ("max_tokens", max_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is not allowed: an integer >= 1")


def _start(model: LoopedGPT, prompts: Any, *, tokenizer: Any = None,
           n_loops: int | None = None, max_tokens: int = 64, temperature: float = 1.0,
           top_k: int | None = None, top_p: float = 1.0, seed: int | None = None,
           stop: Any = None, adaptive_threshold: float | None = None,
           adaptive_criterion: str = "state", min_loops: int = 2,
           cache_slots: int | None = None, slot_policy: str = "block", add_bos: bool = True,
           dtype: torch.dtype | None = None, compile: bool = False
           ) -> tuple[DecodeEngine, int, set[int], int]:
    """Check every option, build an engine for this batch and add every prompt (one slot
    each, so ragged prompts need no padding). Returns (engine, batch, stop ids, the most
    steps any row can still take)."""
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
    engine = DecodeEngine(model, max_batch=len(rows), max_len=max_len, max_loops=n_loops,
                          cache_slots=cache_slots, slot_policy=slot_policy, dtype=dtype,
                          compile=compile)
    for slot, ids in enumerate(rows):
        engine.add(slot, ids, n_loops=n_loops, sampling=sampling, max_new_tokens=max_tokens,
                   stop_ids=sorted(stop_ids), adaptive=adaptive)
    return engine, len(rows), stop_ids, max(rooms) - 1


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


# ---- teacher-forced scoring through the decoding path ----------------------------------------
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
    token at a time. With neither `adaptive` nor `cache_slots` it equals the full
    forward's loss; with them it measures their quality cost."""
    n_loops = model.config.loops(n_loops)
    batch, length = tokens.shape
    if not 1 <= prefill < length:
        raise ValueError(f"prefill={prefill} must lie in [1, {length})")
    engine = DecodeEngine(model, max_batch=batch, max_len=length - 1, max_loops=n_loops,
                          cache_slots=cache_slots, slot_policy=slot_policy,
                          dtype=model.lm_head.weight.dtype)
    logits = torch.stack([engine.prefill(r, tokens[r, :prefill], n_loops=n_loops,
                                         adaptive=adaptive)[-1] for r in range(batch)])
    spent = torch.full((batch,), n_loops, dtype=torch.long, device=tokens.device)
    nll, loops = [], []
    for t in range(prefill, length):
        nll.append(F.cross_entropy(logits.float(), tokens[:, t], reduction="none"))
        loops.append(spent)
        if t < length - 1:
            logits, spent = engine.decode(tokens[:, t])
    return DecodeScore(torch.stack(nll, 1).cpu(), torch.stack(loops, 1).cpu())


# ---- the `loopedlm sample` command -------------------------------------------------------------
def strip_trailing_spaces(prompt: str) -> str:
    """The prompt to condition on: without its trailing spaces. BPE tokenizers put the space
    in front of the next word (" king"), so "The " would end in a lone space token that
    training text rarely has, and the model's next word would bring a second space."""
    return prompt.rstrip(" ") or prompt


def _load_tokenizer(run: str):
    from loopedlm.data.tokenizer import load_tokenizer
    from loopedlm.model.checkpoint import find_tokenizer_dir, resolve_model_folder

    folder = find_tokenizer_dir(resolve_model_folder(run))
    if folder is None:
        raise FileNotFoundError(f"{run} has no tokenizer/ folder beside its checkpoints")
    return load_tokenizer(folder)


def _cmd_sample(args: argparse.Namespace) -> int:
    from loopedlm.model.checkpoint import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_model(args.run, device=device)
    tokenizer = _load_tokenizer(args.run)
    # documents are BOS-delimited in training, so a generated BOS ends the text
    stop = [tokenizer.bos_id, *args.stop_id, *args.stop]
    options = dict(n_loops=args.n_loops, max_tokens=args.max_tokens,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, stop=stop, adaptive_threshold=args.adaptive_threshold,
                   adaptive_criterion=args.adaptive_criterion, min_loops=args.min_loops,
                   cache_slots=args.cache_slots, slot_policy=args.slot_policy,
                   compile=False if args.compile == "none" else args.compile)
    prompts = [strip_trailing_spaces(p) for p in args.prompt]
    start = time.perf_counter()
    outputs: list[list[int]] = [[] for _ in prompts]
    spent: list[int] = []
    shown = ""
    events = stream(model, prompts, tokenizer=tokenizer, **options)
    first = next(events, None)  # validates every option before anything is printed
    if len(prompts) == 1:
        sys.stdout.write(prompts[0])
    for event in itertools.chain([first] if first is not None else [], events):
        for r, tok in enumerate(event.tokens):
            if tok is not None:
                outputs[r].append(tok)
                spent.append(event.loops[r])
        if len(prompts) == 1:
            # print the new text as it comes; hold back an incomplete UTF-8 character
            text = tokenizer.decode(outputs[0])
            if not text.endswith("\ufffd"):
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
    if len(prompts) == 1:
        sys.stdout.write(tokenizer.decode(outputs[0])[len(shown):] + "\n")
    else:
        for prompt, ids in zip(prompts, outputs, strict=True):
            print(f"--- {prompt}\n{prompt}{tokenizer.decode(ids)}")
    seconds = time.perf_counter() - start
    n_tokens = sum(len(o) for o in outputs)
    mean_loops = sum(spent) / len(spent) if spent else float("nan")
    print(f"[{n_tokens} tokens in {seconds:.2f}s, {n_tokens / max(seconds, 1e-9):.1f} tokens/s, "
          f"loops per token {mean_loops:.2f} of {args.n_loops or model.config.n_loops}]",
          file=sys.stderr)
    return 0


def register(subparsers: Any) -> None:
    """Add `loopedlm sample`."""
    p = subparsers.add_parser("sample", help="generate text from a trained run",
                              description="Generate text from a run (its latest checkpoint) "
                                          "or a checkpoint folder, streaming tokens to stdout.")
    p.add_argument("run", help="run folder or checkpoint folder")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text (repeat for a batch; one prompt streams)")
    p.add_argument("--n-loops", type=int, default=None, help="loops (default: the model's)")
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[],
                   help="stop string (a single token); BOS always stops")
    p.add_argument("--stop-id", action="append", type=int, default=[], help="stop token id")
    p.add_argument("--adaptive-threshold", type=float, default=None,
                   help="stop looping a token once its loop state changes less than this")
    p.add_argument("--adaptive-criterion", choices=CRITERIA, default="state")
    p.add_argument("--min-loops", type=int, default=2)
    p.add_argument("--cache-slots", type=int, default=None,
                   help="loops share this many KV-cache slots (less memory, approximate)")
    p.add_argument("--slot-policy", choices=SLOT_POLICIES, default="block")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--compile", choices=["none", "step", "loop"], default="none",
                   help="torch.compile the decode step or one loop (pays off on CPU for long "
                        "outputs; see benchmarks/README.md)")
    p.set_defaults(func=_cmd_sample)


__all__ = ["AdaptiveLoops", "GenerationStep", "GenerationResult", "DecodeScore", "generate",
           "stream", "decode_step", "decode_nll", "sample_next", "loop_slot_map", "register"]
