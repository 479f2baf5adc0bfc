"""Sampling with the KV cache (SPEC 2): prefill, token-by-token decode, streaming, adaptive
loops and shared cache slots; the `loopedlm sample` command.

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
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from loopedlm.attention import AttentionPlan, KVCache, build_plan, norm
from loopedlm.model import LoopedGPT

log = logging.getLogger(__name__)

CRITERIA = ("state", "kl")
SLOT_POLICIES = ("block", "modulo")


# ---- options -------------------------------------------------------------------------
@dataclass(frozen=True)
class AdaptiveLoops:
    """Stop looping a decoded token once its loop state has converged.

    criterion "state" (default): relative change of the loop output,
        ||h^t - h^{t-1}|| / ||h^t|| < threshold. Free: h^t is computed anyway, and it is
        what the next loop reads, so a small change means the next loop would see the
        same input (the fixed-point argument above).
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
        if isinstance(self.min_loops, bool) or not isinstance(self.min_loops, int) \
                or self.min_loops < 2:
            raise ValueError(f"min_loops={self.min_loops!r} is not allowed: an integer >= 2")


def loop_slot_map(n_loops: int, cache_slots: int | None = None,
                  policy: str = "block") -> list[int]:
    """The cache slot of each loop (0-based): the identity when `cache_slots` is None or
    >= n_loops (exact); otherwise `block` (floor(t*K/N)) or `modulo` (t mod K)."""
    if policy not in SLOT_POLICIES:
        raise ValueError(f"slot_policy={policy!r} is not allowed: choose one of "
                         f"{list(SLOT_POLICIES)}")
    if cache_slots is None or cache_slots >= n_loops:
        return list(range(n_loops))
    if isinstance(cache_slots, bool) or not isinstance(cache_slots, int) or cache_slots < 1:
        raise ValueError(f"cache_slots={cache_slots!r} is not allowed: an integer >= 1")
    if policy == "block":
        return [t * cache_slots // n_loops for t in range(n_loops)]
    return [t % cache_slots for t in range(n_loops)]


# ---- one decode step with adaptive loops ------------------------------------------------
class _RowsCache:
    """The cache seen by a subset of the batch rows (those still looping)."""

    def __init__(self, cache: KVCache, rows: torch.Tensor):
        self.cache, self.rows = cache, rows

    def insert(self, loop: int, layer: int, k: torch.Tensor, v: torch.Tensor):
        c, slot = self.cache, self.cache.loop_slots[loop]
        t0, t1 = c.pos, c.pos + k.size(2)
        c.k[slot, layer, self.rows, :, t0:t1] = k
        c.v[slot, layer, self.rows, :, t0:t1] = v
        return c.k[slot, layer, self.rows, :, :t1], c.v[slot, layer, self.rows, :, :t1]


def _rows_plan(plan: AttentionPlan, rows: torch.Tensor, batch: int) -> AttentionPlan:
    """Restrict a plan's per-row tensors (RoPE slices, (B, 1, Tq, Tk) masks) to `rows`."""
    def pick(t):
        return t[rows] if t is not None and t.dim() == 4 and t.size(0) == batch else t
    masks = {w: (pick(m), causal) for w, (m, causal) in plan.masks.items()}
    return AttentionPlan(cos=pick(plan.cos), sin=pick(plan.sin), masks=masks,
                         cache=_RowsCache(plan.cache, rows))


def _fill_skipped_loops(cache: KVCache, rows: torch.Tensor, last_loop: int) -> None:
    """Give the loops after `last_loop` the keys/values of `last_loop` at the current
    position for `rows` (see the module docstring for why)."""
    src = cache.loop_slots[last_loop]
    for loop in range(last_loop + 1, cache.n_loops):
        dst = cache.loop_slots[loop]
        if dst != src:
            cache.k[dst, :, rows, :, cache.pos] = cache.k[src, :, rows, :, cache.pos]
            cache.v[dst, :, rows, :, cache.pos] = cache.v[src, :, rows, :, cache.pos]


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
    plan = build_plan(model.config, model.cos, model.sin, batch, tokens.size(1), cache=cache,
                      attention_mask=None, device=tokens.device)
    x0 = model.transformer.wte(tokens)
    embedded = norm(x0)
    final = torch.empty_like(embedded)
    spent = torch.zeros(batch, dtype=torch.long)
    active = torch.arange(batch, device=tokens.device)
    previous = previous_logp = None  # of the active rows
    for loop in range(n_loops):
        full = active.numel() == batch
        x0_a = x0 if full else x0[active]
        embedded_a = embedded if full else embedded[active]
        loop_plan = plan if full else _rows_plan(plan, active, batch)
        x = model._run_loop(model._stream_start(x0_a, embedded_a, previous), previous, loop,
                            loop_plan)
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
            logp = F.log_softmax(model._logits(h[:, -1]), dim=-1)
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
            _fill_skipped_loops(cache, done, loop)
            keep = ~converged
            active, h = active[keep], h[keep]
            logp = None if logp is None else logp[keep]
            if active.numel() == 0:
                break
        previous, previous_logp = h, logp
    cache.advance(tokens.size(1), torch.ones_like(tokens, dtype=torch.bool))
    return model._logits(final)[:, -1], spent


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


def _check_sampling(n_loops, max_tokens, temperature, top_k, top_p, seed) -> None:
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)
    if not is_int(n_loops) or n_loops < 1:
        raise ValueError(f"n_loops={n_loops!r} is not allowed: an integer >= 1")
    if not is_int(max_tokens) or max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens!r} is not allowed: an integer >= 1")
    if not isinstance(temperature, int | float) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature={temperature!r} is not allowed: a number >= 0 "
                         f"(0 = greedy)")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} is not allowed: an integer >= 1 (or None)")
    if not isinstance(top_p, int | float) or not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} is not allowed: a number in (0, 1]")
    if seed is not None and not is_int(seed):
        raise ValueError(f"seed={seed!r} is not allowed: an integer (or None)")


@torch.no_grad()
def stream(model: LoopedGPT, prompts: Any, *, tokenizer: Any = None, n_loops: int | None = None,
           max_tokens: int = 64, temperature: float = 1.0, top_k: int | None = None,
           top_p: float = 1.0, seed: int | None = None, stop: Any = None,
           adaptive_threshold: float | None = None, adaptive_criterion: str = "state",
           min_loops: int = 2, cache_slots: int | None = None, slot_policy: str = "block",
           add_bos: bool = True) -> Iterator[GenerationStep]:
    """Generate, yielding one `GenerationStep` per sampled position (see `generate`)."""
    cfg = model.config
    n_loops = cfg.n_loops if n_loops is None else n_loops
    _check_sampling(n_loops, max_tokens, temperature, top_k, top_p, seed)
    rows = _prompt_ids(prompts, tokenizer, add_bos, cfg.vocab_size, cfg.sequence_len)
    stop_ids = _stop_ids(stop, tokenizer, cfg.vocab_size)
    adaptive = None if adaptive_threshold is None else AdaptiveLoops(
        adaptive_threshold, adaptive_criterion, min_loops)
    slots = loop_slot_map(n_loops, cache_slots, slot_policy)

    device = model.lm_head.weight.device
    batch, width = len(rows), max(len(r) for r in rows)
    # the last sampled token is never fed back, so the context allows one more
    room = cfg.sequence_len - width + 1
    n_steps = min(max_tokens, room)
    if n_steps < max_tokens:
        log.warning("max_tokens=%d does not fit in the context (sequence_len=%d, prompt of %d "
                    "tokens): generating at most %d", max_tokens, cfg.sequence_len, width, room)
    idx = torch.zeros(batch, width, dtype=torch.long, device=device)
    mask = torch.zeros(batch, width, dtype=torch.bool, device=device)
    for r, ids in enumerate(rows):  # left padding: every row's last token is at width - 1
        idx[r, width - len(ids):] = torch.tensor(ids, device=device)
        mask[r, width - len(ids):] = True
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # a fresh random seed, leaving the global RNG alone
    else:
        generator.manual_seed(seed)
    cache = KVCache.for_model(cfg, batch, n_loops=n_loops, max_len=width + n_steps - 1,
                              loop_slots=slots, dtype=model.lm_head.weight.dtype, device=device)

    logits = model(idx, n_loops=n_loops, kv_cache=cache,
                   attention_mask=None if bool(mask.all()) else mask)[:, -1]
    loops = torch.full((batch,), n_loops, dtype=torch.long)
    done = [False] * batch
    for step in range(n_steps):
        nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                          generator=generator)
        ids = nxt.tolist()
        new: list[int | None] = []
        for r in range(batch):
            if done[r] or ids[r] in stop_ids:
                done[r] = True
                new.append(None)
            else:
                new.append(ids[r])
        last = step == n_steps - 1
        yield GenerationStep(step, new, loops.tolist(), [d or last for d in done])
        if all(done) or last:
            return
        logits, loops = decode_step(model, nxt[:, None], cache, adaptive=adaptive)


def generate(model: LoopedGPT, prompts: Any, *, tokenizer: Any = None, **options: Any
             ) -> GenerationResult:
    """Generate continuations of one or more prompts with the KV cache.

    prompts: a string or a list of strings (needs `tokenizer`; BOS is prepended unless
        add_bos=False), or a list of token ids, or a list of such lists. Prompts of
        different lengths are batched with left padding.
    n_loops: loop count (default: the model's). max_tokens: tokens to generate per row.
    temperature (0 = greedy), top_k, top_p in (0, 1], seed (same seed, same text).
    stop: token id(s) or single-token string(s); a row ends when it samples one.
    adaptive_threshold / adaptive_criterion ("state" | "kl") / min_loops: adaptive loops
        (`AdaptiveLoops`). cache_slots / slot_policy: shared cache slots (`loop_slot_map`).
    Bad values raise ValueError naming the value.
    """
    start = time.perf_counter()
    max_tokens = options.get("max_tokens", 64)
    tokens: list[list[int]] = []
    loops: list[list[int]] = []
    reasons: list[str] = []
    steps = 0
    for event in stream(model, prompts, tokenizer=tokenizer, **options):
        if not tokens:
            tokens = [[] for _ in event.tokens]
            loops = [[] for _ in event.tokens]
            reasons = [""] * len(event.tokens)
        for r, tok in enumerate(event.tokens):
            if tok is not None:
                tokens[r].append(tok)
                loops[r].append(event.loops[r])
            elif not reasons[r]:
                reasons[r] = "stop"
        steps = event.index + 1
    for r, reason in enumerate(reasons):
        if not reason:
            reasons[r] = "length" if steps >= max_tokens else "context"
    texts = [tokenizer.decode(t) for t in tokens] if tokenizer is not None else None
    return GenerationResult(tokens, loops, reasons, texts, time.perf_counter() - start)


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
    """Teacher-forced NLL of `tokens` (B, T) computed the way generation computes it: the
    first `prefill` tokens in one pass, then one token at a time through the cache. With
    neither `adaptive` nor `cache_slots` it equals the full forward's loss; with them it
    measures their quality cost."""
    n_loops = model.config.n_loops if n_loops is None else n_loops
    batch, length = tokens.shape
    if not 1 <= prefill < length:
        raise ValueError(f"prefill={prefill} must lie in [1, {length})")
    cache = KVCache.for_model(model.config, batch, n_loops=n_loops, max_len=length - 1,
                              loop_slots=loop_slot_map(n_loops, cache_slots, slot_policy),
                              dtype=model.lm_head.weight.dtype, device=tokens.device)
    logits = model(tokens[:, :prefill], n_loops=n_loops, kv_cache=cache)[:, -1]
    spent = torch.full((batch,), n_loops, dtype=torch.long)
    nll, loops = [], []
    for t in range(prefill, length):
        nll.append(F.cross_entropy(logits.float(), tokens[:, t], reduction="none"))
        loops.append(spent)
        if t < length - 1:
            logits, spent = decode_step(model, tokens[:, t:t + 1], cache, adaptive=adaptive)
    return DecodeScore(torch.stack(nll, 1).cpu(), torch.stack(loops, 1))


# ---- the `loopedlm sample` command -------------------------------------------------------------
def strip_trailing_spaces(prompt: str) -> str:
    """The prompt to condition on: without its trailing spaces. BPE tokenizers put the space
    in front of the next word (" king"), so "The " would end in a lone space token that
    training text rarely has, and the model's next word would bring a second space."""
    return prompt.rstrip(" ") or prompt


def _load_tokenizer(run: str):
    from loopedlm.checkpoint import find_tokenizer_dir, resolve_model_folder
    from loopedlm.tokenizer import load_tokenizer

    folder = find_tokenizer_dir(resolve_model_folder(run))
    if folder is None:
        raise FileNotFoundError(f"{run} has no tokenizer/ folder beside its checkpoints")
    return load_tokenizer(folder)


def _cmd_sample(args: argparse.Namespace) -> int:
    from loopedlm.checkpoint import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_model(args.run, device=device)
    tokenizer = _load_tokenizer(args.run)
    # documents are BOS-delimited in training, so a generated BOS ends the text
    stop = [tokenizer.bos_id, *args.stop_id, *args.stop]
    options = dict(n_loops=args.n_loops, max_tokens=args.max_tokens,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, stop=stop, adaptive_threshold=args.adaptive_threshold,
                   adaptive_criterion=args.adaptive_criterion, min_loops=args.min_loops,
                   cache_slots=args.cache_slots, slot_policy=args.slot_policy)
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
    p.set_defaults(func=_cmd_sample)


__all__ = ["AdaptiveLoops", "GenerationStep", "GenerationResult", "DecodeScore", "generate",
           "stream", "decode_step", "decode_nll", "sample_next", "loop_slot_map", "register"]
