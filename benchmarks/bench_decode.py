"""Decoding speed (issues 6, 25): one table of the decode modes against the authors' naive
generate, the server's throughput with adaptive loops, self-speculative decoding on a trained
model, the default path's targets, and (issue 6) the quality cost of adaptive loops and
shared cache slots.

Sections (all by default; `--sections` picks some):

- `table`: tokens/s of default (`compile="auto"`, what `generate()`, `loopedlm sample` and
  the server use), eager (`compile=False`), compiled (`compile="step"`, timed after its
  compile), loop (`compile="loop"`), speculative (`draft_loops`) and adaptive
  (`adaptive_threshold`, eager and under `compile="loop"`), at N = 1, 3,
  12 and batch 1, 16, next to the naive baseline measured in the same run: the authors'
  generate, recomputing the whole sequence at every token (`vs naive` = tokens/s over the
  naive's at the same N and batch). The model is the trained stand-in (below), prompts are
  held-out text; every row decodes greedily `--tokens` tokens after `--warmup` steps.
- `server`: the server's scheduler (`loopedlm.infer.scheduler.Scheduler`, in process, no
  HTTP) with 16 slots and 16 clients, each sending `--requests` requests in a row: all at
  N=12 against adaptive loops, with the threshold chosen (on other prompts) so that the
  mean is about `--adaptive-mean` loops, for each engine compile in `--server-compile`
  (`loop` compiles adaptive steps too: like for like). Target: >= 2.5x.
- `adaptive`: one long-lived engine of `--clients` slots per kind (all at N=12, adaptive at
  the server section's threshold), prompts prefilled together, `--tokens` steps per round,
  plain and adaptive rounds alternated `--adaptive-rounds` times (the first dropped), for
  each compile in `--server-compile`: the medians and every round's ratio. Under `auto` the
  steps' packages (the plain step; the adaptive step's two loops) are built first, here, as
  the warming process builds them (so no round runs eagerly while they are missing).
- `speculative`: the trained stand-in at N=12, batch 1, greedy: plain against
  `draft_loops` K (several), the same text token for token (checked), the acceptance rate
  and the mean tokens per verify pass. Target: >= 2x plain N=12.
- `targets`: the default path at the issue's shape (the tiny preset: 2 blocks, d=128, vocab
  4096; sequence_len 1024, a 512-token prompt, batch 1, random weights): tokens/s of
  `generate()` with its defaults at N=1 and 12 over `--target-tokens` tokens, against the
  naive generate (in this process, no warming process); then `compile="auto"` across runs
  in fresh processes sharing one empty LOOPEDLM_HOME: run 1 (eager; it starts the warming
  process), run 2 (generate() twice: a compile does not pay for that many tokens) and run 3
  (a long-lived engine, as a server's: compiled from the warm caches); and the seconds from
  `loopedlm sample RUN --max-tokens 1` to its exit (a
  stand-in run, random weights). Targets: >= 1,000 tok/s at N=1, >= 200 at N=12, <= 10 s.
- `compile`: seconds of the first compiled step (its compile) of `compile="step"` and
  `"loop"` at N=1 and 12 (the `targets` shape, batch 1), each in a fresh process: cold (an
  empty torch.compile cache folder) and then warm (the same folder, now filled), wall clock
  and the child's CPU seconds.
- `quality` (issue 6): teacher-forced bits per byte of adaptive loops and shared cache
  slots against fixed N, and KV-cache bytes per token.

The trained stand-in: a byte-level FLT (1 token = 1 byte) with the tiny preset's shape,
trained here with AdamW and the every-loop loss at N=12 (so that fewer loops already
predict: what drafts and adaptive loops need) on the English text of Python's bundled
documentation (`pydoc_data.topics`), the last 10% held out; cached in `--model-cache`.
`--run RUN --text FILE` uses a trained loopedlm run instead. Timings are wall clock on
`--threads` threads (default 1); the load average is printed first: on a shared machine
compare ratios, not absolute figures.

    python benchmarks/bench_decode.py [--sections table server speculative targets quality]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from loopedlm import LoopedGPT, ModelConfig
from loopedlm.infer import (
    AdaptiveLoops,
    DecodeEngine,
    SamplingParams,
    SequenceParams,
    loop_slot_map,
)
from loopedlm.infer.generate import decode_nll, generate
from loopedlm.infer.scheduler import Scheduler, Sequence
from loopedlm.infer.warm import WARMUP_ENV, markers_dir, package_state

GREEDY = SamplingParams(temperature=0)
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
clock = CLOCKS["wall"]  # set by --clock
SECTIONS = ("table", "server", "adaptive", "prefill", "speculative", "targets", "compile",
            "quality")


# ---- the naive baseline ------------------------------------------------------------------
@torch.no_grad()
def naive_rate(model: LoopedGPT, prompts: torch.Tensor, n_loops: int, n_tokens: int) -> float:
    """Tokens/s of the authors' generate: the whole sequence recomputed for each new token
    (no cache), greedy, for the rows of `prompts` (B, T) together."""
    idx = prompts
    model(idx, n_loops=n_loops)  # warm-up
    start = clock()
    for _ in range(n_tokens):
        logits = model(idx, n_loops=n_loops)[:, -1]
        idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], 1)
    return prompts.size(0) * n_tokens / (clock() - start)


# ---- the table ---------------------------------------------------------------------------
@torch.no_grad()
def engine_rate(model: LoopedGPT, prompts: torch.Tensor, params: SequenceParams, n_tokens: int,
                warmup: int, compile_mode, wait_compiled: bool = False
                ) -> tuple[float, DecodeEngine, float]:
    """(tokens/s, the engine, mean loops per token) of decoding n_tokens tokens per row of
    `prompts` after `warmup` steps (a compiled engine: after its compile, when
    wait_compiled)."""
    batch, length = prompts.shape
    n_loops = params.n_loops
    engine = DecodeEngine(model, max_batch=batch, max_loops=n_loops, compile=compile_mode,
                          max_len=min(model.config.sequence_len,
                                      length + warmup + n_tokens + 2 * params.draft_tokens + 4))
    for slot in range(batch):
        engine.add(slot, prompts[slot].tolist(), params)
    for _ in range(warmup):
        engine.step()
    if wait_compiled:
        engine.wait_compiled(1800)
    emitted, loops = 0, 0
    start = clock()
    for _ in range(n_tokens):
        tokens, spent = engine.step().host()
        emitted += sum(t >= 0 for t in tokens)
        loops += sum(n for t, n in zip(tokens, spent, strict=True) if t >= 0)
    seconds = clock() - start
    engine.wait_compiled(1800)  # a compile still running on a worker thread: not in the next
    return emitted / seconds, engine, loops / max(emitted, 1)


def table_section(args, model: LoopedGPT, held_out: torch.Tensor) -> None:
    print(f"\n== decode modes: trained stand-in, {args.prompt}-token held-out prompts, "
          f"{args.tokens} tokens per row after {args.warmup} warm-up steps, greedy")
    print(f"{'mode':<12} {'N':>3} {'batch':>5} {'tok/s':>9} {'vs naive':>9} "
          f"{'loops/tok':>9}  notes")
    for n_loops in args.loops:
        for batch in args.batches:
            prompts = held_out[:batch, :args.prompt]
            naive = naive_rate(model, prompts, n_loops, args.naive_tokens)
            print(f"{'naive':<12} {n_loops:>3} {batch:>5} {naive:>9.1f} {1.0:>8.1f}x "
                  f"{n_loops:>9.2f}  authors' generate: no cache, recompute per token",
                  flush=True)
            rows = [("eager", SequenceParams(n_loops=n_loops, sampling=GREEDY), False, ""),
                    ("default", SequenceParams(n_loops=n_loops, sampling=GREEDY), "auto",
                     "compile='auto': first tokens of a fresh engine")]
            if "compiled" in args.modes:
                rows.append(("compiled", SequenceParams(n_loops=n_loops, sampling=GREEDY),
                             "step", "compile='step', after its compile"))
            rows.append(("loop", SequenceParams(n_loops=n_loops, sampling=GREEDY), "loop",
                         "compile='loop', compiled in the warm-up steps"))
            if n_loops > 1:
                draft = max(1, n_loops // 4)
                rows.append(("speculative", SequenceParams(n_loops=n_loops, sampling=GREEDY,
                                                           draft_loops=draft),
                             False, f"draft_loops={draft}"))
                rows.append(("adaptive", SequenceParams(
                    n_loops=n_loops, sampling=GREEDY,
                    adaptive=AdaptiveLoops(args.threshold, "state")), False,
                    f"state < {args.threshold:g}"))
                rows.append(("adaptive-loop", SequenceParams(
                    n_loops=n_loops, sampling=GREEDY,
                    adaptive=AdaptiveLoops(args.threshold, "state")), "loop",
                    f"state < {args.threshold:g}, compile='loop' (vs loop: like for like)"))
            for name, params, compile_mode, note in rows:
                if name not in args.modes:
                    continue
                start = clock()
                rate, engine, loops = engine_rate(model, prompts, params, args.tokens,
                                                  args.warmup, compile_mode,
                                                  wait_compiled=compile_mode == "step")
                if compile_mode == "step":
                    note += f" ({clock() - start:.0f} s in all)"
                if name == "speculative":
                    note += (f", acceptance {engine.speculation.acceptance:.2f}, "
                             f"{engine.speculation.tokens_per_round:.2f} tokens/verify")
                print(f"{name:<12} {n_loops:>3} {batch:>5} {rate:>9.1f} {rate / naive:>8.1f}x "
                      f"{loops:>9.2f}  {note}", flush=True)


# ---- the server's throughput ---------------------------------------------------------------
class _Bytes:
    """The scheduler's tokenizer: one token per byte."""

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("latin-1")


@torch.no_grad()
def serve_rate(model: LoopedGPT, prompts: torch.Tensor, params: SequenceParams, clients: int,
               requests: int, max_tokens: int, compile_mode="auto"
               ) -> tuple[float, float, float, int]:
    """(generated tokens/s, mean loops per generated token, mean loops per prompt token, step
    variants compiled or packaged) of `clients`
    clients, each sending `requests` requests in a row (prompts: rows of `prompts`), through
    the server's scheduler over one engine of `clients` slots, long-lived as `loopedlm
    serve`'s (`compile_mode`: the engine's compile). A compiling engine is warmed up first by
    untimed rounds, so that its compiles are not timed: "loop" one round; "auto" one round,
    then (once the warming process it may have started is done) more, until the step
    variants now warm or packaged on disk are in use (at most 6)."""
    engine = DecodeEngine(model, max_batch=clients, max_loops=params.n_loops,
                          max_len=prompts.size(1) + max_tokens + 2, compile=compile_mode,
                          long_lived=True)
    scheduler = Scheduler(engine, _Bytes(), max_queue=clients)
    finished, tokens, loops, prompt = threading.Semaphore(0), [0], [0], [0, 0]

    def client(index: int, requests: int = requests) -> None:
        for r in range(requests):
            done = threading.Event()

            def sink(delta, done=done):
                if delta.finish_reason is not None:
                    done.set()
            seq = Sequence(prompt=prompts[(index * requests + r) % len(prompts)].tolist(),
                           params=params, max_tokens=max_tokens, sink=sink)
            scheduler.submit([seq])
            done.wait()
            tokens[0] += len(seq.tokens)
            loops[0] += sum(seq.loops)
            prompt[0] += len(seq.prompt)
            prompt[1] += seq.prompt_loops
        finished.release()
    def warm_up() -> None:
        warmup = [threading.Thread(target=client, args=(i, 1)) for i in range(clients)]
        for thread in warmup:
            thread.start()
        for thread in warmup:
            thread.join()
        tokens[0] = loops[0] = prompt[0] = prompt[1] = 0

    warming = os.environ.get(WARMUP_ENV)
    scheduler.start()
    try:
        if compile_mode in ("loop", "auto"):
            warm_up()
        if compile_mode == "auto":  # the variants warm on disk compile at a later check
            # (an adaptive step's packages are three, its first loop, a later one and its
            # coda, built one after the other)
            wanted = 3 if params.adaptive is not None else 1
            for _ in range(6):
                wait_warmed(markers_dir())
                warm_up()
                if engine.compiled_steps or engine.packaged_steps >= wanted:
                    break
            wait_warmed(markers_dir())
        # no warming process (building a package, on these 2 cores) during the timed part
        os.environ[WARMUP_ENV] = "0"
        start = clock()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = clock() - start
        failed = scheduler.stats["failed_steps"]
    finally:
        scheduler.close()
        restore_env(WARMUP_ENV, warming)
    if failed:  # (requests ended in an error: the figure would not be a throughput)
        raise RuntimeError(f"{failed} decode step(s) failed in the server section")
    return (tokens[0] / seconds, loops[0] / tokens[0], prompt[1] / prompt[0],
            engine.compiled_steps + engine.packaged_steps)


def build_packages(model: LoopedGPT, batch: int, n_loops: int, max_len: int) -> None:
    """Build (where this machine has not yet) the packages that greedy decoding of `batch`
    rows runs under compile="auto": the step at `n_loops`, and an adaptive step's loops, its
    coda and its later loops over fewer rows, as the warming process would, so that no
    timed round overlaps a build."""
    from loopedlm.infer.engine import StepKey, build_package

    engine = DecodeEngine(model, max_batch=batch, max_loops=n_loops, max_len=max_len)
    for key in [StepKey(batch, n_loops, 0, False, False, True),
                *[StepKey(batch, 0, 0, False, False, False, loop_program=program)
                  for program in ("first", "later")],
                StepKey(batch, 0, 0, False, False, True, loop_program="coda"),
                *[StepKey(batch, 0, 0, False, False, False, loop_program="later", rows=rows)
                  for rows in engine.buckets if rows < batch]]:
        spec = engine.package_spec(key)
        if package_state(spec) != "ready":
            start = clock()
            build_package(DecodeEngine(model, max_batch=batch, max_loops=n_loops,
                                       max_len=max_len, compile=False), spec)
            name = f"{key.loop_program or 'the step'}{f' ({key.rows} rows)' if key.rows else ''}"
            print(f"  (built the package of {name} in {clock() - start:.0f} s)", flush=True)


@torch.no_grad()
def adaptive_section(args, model: LoopedGPT, held_out: torch.Tensor) -> None:
    n_loops, batch = 12, args.clients
    threshold, _ = choose_threshold(args, model, held_out)
    prompts = held_out[:batch, :args.prompt]
    kinds = {"all at N=12": SequenceParams(n_loops=n_loops, sampling=GREEDY),
             "adaptive": SequenceParams(n_loops=n_loops, sampling=GREEDY,
                                        adaptive=AdaptiveLoops(threshold, "state"))}
    max_len = args.prompt + args.tokens + 2
    print(f"\n== adaptive against all at N={n_loops}, engine level: batch {batch}, "
          f"{args.prompt}-token prompts, {args.tokens} steps a round, state < {threshold:g}, "
          f"{args.adaptive_rounds} rounds alternated (the first dropped)")
    for mode in args.server_compile:
        engines = {kind: DecodeEngine(model, max_batch=batch, max_loops=n_loops,
                                      max_len=max_len, compile=mode, long_lived=True)
                   for kind in kinds}
        if mode == "auto":
            build_packages(model, batch, n_loops, max_len)
        rates: dict[str, list[float]] = {kind: [] for kind in kinds}
        loops = {}
        for round_ in range(args.adaptive_rounds):
            for kind, params in kinds.items():
                engine = engines[kind]
                engine.reset()
                engine.add_many([(i, prompts[i].tolist(), params) for i in range(batch)])
                spent, start = 0, clock()
                for _ in range(args.tokens):
                    spent += int(engine.step().loops.sum())
                if round_:
                    rates[kind].append(batch * args.tokens / (clock() - start))
                loops[kind] = spent / (batch * args.tokens)
        plain, adaptive = (statistics.median(rates[kind]) for kind in kinds)
        ratios = [a / p for p, a in zip(*rates.values(), strict=True)]
        packaged_steps = sum(engine.packaged_steps for engine in engines.values())
        print(f"compile={mode!r:<8} all at N=12 {plain:>9.1f} tok/s  adaptive {adaptive:>9.1f} "
              f"tok/s ({loops['adaptive']:.2f} loops/token)  {adaptive / plain:.2f}x; rounds "
              f"{min(ratios):.2f}-{max(ratios):.2f}x  ({packaged_steps} packaged)", flush=True)


def choose_threshold(args, model: LoopedGPT, held_out: torch.Tensor) -> tuple[float, float]:
    """(threshold, its mean loops) of the server and adaptive sections: the first of a
    descending ladder whose mean loop count at N=12, measured on other prompts than the
    timed ones, reaches `--adaptive-mean`."""
    calibration = held_out[-args.clients:, :args.prompt]
    chosen = mean = None
    for threshold in args.server_thresholds:
        mean = adaptive_mean_loops(model, calibration, 12, threshold, 16)
        chosen = threshold
        if mean >= args.adaptive_mean:
            break
    return chosen, mean


@torch.no_grad()
def adaptive_mean_loops(model, prompts, n_loops, threshold, n_tokens) -> float:
    params = SequenceParams(n_loops=n_loops, sampling=GREEDY,
                            adaptive=AdaptiveLoops(threshold, "state"))
    return engine_rate(model, prompts, params, n_tokens, 0, False)[2]


def server_section(args, model: LoopedGPT, held_out: torch.Tensor) -> None:
    n_loops, clients = 12, args.clients
    chosen, mean = choose_threshold(args, model, held_out)
    print(f"\n== the server's throughput: {clients} clients x {args.requests} requests of "
          f"{args.server_tokens} tokens, {args.prompt}-token held-out prompts, greedy, "
          f"N={n_loops}; adaptive threshold state < {chosen:g} (calibration mean "
          f"{mean:.2f} loops, target ~{args.adaptive_mean:g}); {args.server_rounds} round(s) "
          f"of each, alternated")
    prompts = held_out[:clients * args.requests, :args.prompt]
    kinds = {"all at N=12": SequenceParams(n_loops=n_loops, sampling=GREEDY),
             "adaptive": SequenceParams(n_loops=n_loops, sampling=GREEDY,
                                        adaptive=AdaptiveLoops(chosen, "state")),
             "adaptive, prompt too": SequenceParams(
                 n_loops=n_loops, sampling=GREEDY,
                 adaptive=AdaptiveLoops(chosen, "state", prompt=True))}
    for mode in args.server_compile:
        if mode == "auto":  # (a server's engine holds its prompts and outputs, + 2)
            build_packages(model, clients, n_loops, args.prompt + args.server_tokens + 2)
        rates: dict[str, list[float]] = {kind: [] for kind in kinds}
        loops, prompt_loops, compiled = {}, {}, {}
        for _ in range(args.server_rounds):
            for kind, params in kinds.items():
                rate, loops[kind], prompt_loops[kind], compiled[kind] = serve_rate(
                    model, prompts, params, clients, args.requests, args.server_tokens, mode)
                rates[kind].append(rate)
        plain = statistics.median(rates["all at N=12"])
        for kind in kinds:
            rate = statistics.median(rates[kind])
            ratios = [a / p for p, a in zip(rates["all at N=12"], rates[kind], strict=True)]
            versus = "" if kind == "all at N=12" else \
                f"{rate / plain:.2f}x, rounds {min(ratios):.2f}-{max(ratios):.2f}x; target >= 2.5x; "
            print(f"compile={mode!r:<8} {kind:<20} {rate:>9.1f} tok/s  loops/token "
                  f"{loops[kind]:.2f}, prompt {prompt_loops[kind]:.2f}  ({versus}{compiled[kind]} "
                  f"step variant(s) compiled or packaged)", flush=True)


@torch.no_grad()
def prefill_section(args, model: LoopedGPT, held_out: torch.Tensor) -> None:
    """Prefilling `--clients` prompts together (`add_many`, the server's admission), every
    loop against adaptive prompts (`AdaptiveLoops(prompt=True)`), at each `--prefill-lengths`."""
    n_loops, batch = 12, args.clients
    threshold, _ = choose_threshold(args, model, held_out)
    print(f"\n== prefill: {batch} held-out prompts together (add_many), N={n_loops}, "
          f"state < {threshold:g}, {args.adaptive_rounds} rounds alternated (the first dropped)")
    kinds = {"every loop": SequenceParams(n_loops=n_loops, sampling=GREEDY,
                                          adaptive=AdaptiveLoops(threshold, "state")),
             "adaptive prompt": SequenceParams(n_loops=n_loops, sampling=GREEDY,
                                               adaptive=AdaptiveLoops(threshold, "state",
                                                                      prompt=True))}
    for length in args.prefill_lengths:
        prompts = held_out[:batch, :length]
        engine = DecodeEngine(model, max_batch=batch, max_loops=n_loops, compile=False,
                              max_len=prompts.size(1) + 2)
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        loops = {}
        for round_ in range(args.adaptive_rounds):
            for kind, params in kinds.items():
                engine.reset()
                start = clock()
                engine.add_many([(i, prompts[i].tolist(), params) for i in range(batch)])
                if round_:
                    times[kind].append(clock() - start)
                loops[kind] = sum(engine.prompt_loops(i) for i in range(batch)) / prompts.numel()
        plain, adaptive = (statistics.median(times[kind]) for kind in kinds)
        ratios = [p / a for p, a in zip(*times.values(), strict=True)]
        print(f"{prompts.size(1):>4} tokens each: every loop {plain * 1e3:7.1f} ms, adaptive "
              f"prompt {adaptive * 1e3:7.1f} ms ({loops['adaptive prompt']:.2f} loops/token): "
              f"{plain / adaptive:.2f}x faster (rounds {min(ratios):.2f}-{max(ratios):.2f}x)",
              flush=True)


def speculative_section(args, model: LoopedGPT, held_out: torch.Tensor) -> None:
    n_loops = 12
    prompts = held_out[:1, :args.prompt]
    print(f"\n== self-speculative decoding: trained stand-in at N={n_loops}, batch 1, greedy, "
          f"{args.spec_tokens} tokens after a {args.prompt}-token held-out prompt, "
          f"{args.spec_rounds} rounds (configurations alternated; median)")
    configs = {"plain N=12": SequenceParams(n_loops=n_loops, sampling=GREEDY)}
    for k in args.draft_loops:
        for d in args.draft_tokens:
            configs[f"draft_loops={k} tokens={d}"] = SequenceParams(
                n_loops=n_loops, sampling=GREEDY, draft_loops=k, draft_tokens=d)
    rates = {name: [] for name in configs}
    stats = {}
    for _ in range(args.spec_rounds):
        for name, params in configs.items():
            rate, engine, _ = engine_rate(model, prompts, params, args.spec_tokens, 2, False)
            rates[name].append(rate)
            stats[name] = engine.speculation
    outputs = {name: generate(model, prompts[0].tolist(), max_tokens=args.spec_tokens,
                              temperature=0, n_loops=n_loops, add_bos=False,
                              draft_loops=params.draft_loops,
                              draft_tokens=params.draft_tokens).tokens[0]
               for name, params in configs.items()}
    base = statistics.median(rates["plain N=12"])
    print(f"{'':<28} {'tok/s':>8} {'vs plain':>9} {'acceptance':>11} {'tokens/verify':>14} "
          f"{'same text':>10}")
    for name in configs:
        rate = statistics.median(rates[name])
        accept = "" if name.startswith("plain") else f"{stats[name].acceptance:.2f}"
        per = "" if name.startswith("plain") else f"{stats[name].tokens_per_round:.2f}"
        same = outputs[name] == outputs["plain N=12"]
        print(f"{name:<28} {rate:>8.1f} {rate / base:>8.2f}x {accept:>11} {per:>14} "
              f"{str(same):>10}")


# ---- the default path's targets -------------------------------------------------------------
def first_token_seconds(args) -> float:
    """Seconds from launching `loopedlm sample RUN --max-tokens 1` to its exit (a stand-in
    run of the tiny shape, random weights, made once in a temporary folder)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_serve import stand_in_run

    with tempfile.TemporaryDirectory() as folder:
        run = stand_in_run(Path(folder))
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
               "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        command = [sys.executable, "-m", "loopedlm", "sample", str(run), "--prompt", "The",
                   "--max-tokens", "1", "--device", "cpu"]
        times = []
        for _ in range(args.startup_repeats):
            start = time.perf_counter()
            subprocess.run(command, env=env, check=True, capture_output=True)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def targets_section(args) -> None:
    os.environ["LOOPEDLM_COMPILE_WARMUP"] = "0"  # this process: the first run's default path
    cfg = ModelConfig.preset("tiny", sequence_len=1024)
    model = LoopedGPT.from_config(cfg, seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, 512), generator=gen)
    print(f"\n== the default path's targets: tiny preset (vocab {cfg.vocab_size}), sequence_len "
          f"1024, a 512-token prompt, batch 1, generate() with its defaults, "
          f"{args.target_tokens} tokens (prefill excluded)")
    print(f"{'N':>3} {'default tok/s':>14} {'naive tok/s':>12} {'vs naive':>9}  target")
    for n_loops, target in ((1, 1000), (12, 200)):
        naive = naive_rate(model, ids, n_loops, args.naive_tokens)
        generate(model, ids[0].tolist(), max_tokens=1, n_loops=n_loops)  # the prefill alone
        start = clock()
        generate(model, ids[0].tolist(), max_tokens=1, n_loops=n_loops)
        prefill = clock() - start
        start = clock()
        out = generate(model, ids[0].tolist(), max_tokens=args.target_tokens, n_loops=n_loops,
                       temperature=0)
        seconds = clock() - start - prefill
        rate = (len(out.tokens[0]) - 1) / seconds
        print(f"{n_loops:>3} {rate:>14.1f} {naive:>12.2f} {rate / naive:>8.1f}x  >= {target:,}"
              f" tok/s: {'met' if rate >= target else 'NOT met'}", flush=True)
    warm_section(args)
    seconds = first_token_seconds(args)
    print(f"command to first token (`loopedlm sample RUN --max-tokens 1`, launch to exit, "
          f"median of {args.startup_repeats}): {seconds:.1f} s; target <= 10 s: "
          f"{'met' if seconds <= 10 else 'NOT met'}")


WARM_CHILD = """
import sys, time, torch
from loopedlm import LoopedGPT, ModelConfig
from loopedlm.infer import DecodeEngine
from loopedlm.infer.generate import generate
torch.set_num_threads(int(sys.argv[5]))
n_loops, long_lived, tokens, rounds = (int(a) for a in sys.argv[1:5])
cfg = ModelConfig.preset("tiny", sequence_len=1024)
model = LoopedGPT.from_config(cfg, seed=rounds).eval()
ids = torch.randint(0, cfg.vocab_size, (512,), generator=torch.Generator().manual_seed(0)).tolist()
engine = DecodeEngine(model, max_batch=1, max_loops=n_loops, long_lived=bool(long_lived))
for r in range(rounds):
    start = time.perf_counter()
    generate(model, ids, max_tokens=1, n_loops=n_loops, temperature=0, engine=engine)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    generate(model, ids, max_tokens=tokens + 1, n_loops=n_loops, temperature=0, engine=engine)
    rate = tokens / (time.perf_counter() - start - prefill)
    print(f"ROUND {r} {rate:.1f} {engine.compiled_steps + engine.packaged_steps}", flush=True)
"""


def warm_rounds(args, home: str, n_loops: int, long_lived: bool, tokens: int, rounds: int
                ) -> list[tuple[float, int]]:
    """(tok/s, step variants compiled or packaged) of each round of a fresh process's engine,
    default compile ("auto"), its caches, packages and warm markers under `home`."""
    env = {**os.environ, "LOOPEDLM_HOME": home, "OMP_NUM_THREADS": str(args.threads),
           "LOOPEDLM_COMPILE_WARMUP": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", WARM_CHILD, str(n_loops), str(int(long_lived)),
                          str(tokens), str(rounds), str(args.threads)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return [(float(line.split()[2]), int(line.split()[3])) for line in out.splitlines()
            if line.startswith("ROUND")]


def restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def wait_warmed(folder: Path, timeout: float = 900) -> float:
    """Seconds until no warming process holds a lock in the markers' `folder` (at most
    `timeout`)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout and any(folder.glob("*.lock")):
        time.sleep(1)
    return time.perf_counter() - start


def warm_section(args) -> None:
    """compile="auto" on a CPU across runs, each a fresh process sharing one empty
    LOOPEDLM_HOME: run 1 decodes eagerly and starts the warming process; once that is done,
    a long-lived engine (a server's) compiles from the warm caches while decoding, and a
    plain generate() stays eager where the compile would not pay."""
    print(f"\n== compile='auto' on a CPU across runs (the targets' shape, {args.target_tokens} "
          f"tokens a round, fresh processes sharing one empty LOOPEDLM_HOME)")
    for n_loops in (1, 12):
        with tempfile.TemporaryDirectory() as home:
            first = warm_rounds(args, home, n_loops, False, args.target_tokens, 1)
            waited = wait_warmed(Path(home) / "torch_compile" / "loopedlm_warm")
            markers = list((Path(home) / "torch_compile" / "loopedlm_warm").glob("*.json"))
            print(f"N={n_loops:<3} run 1, generate(): {first[0][0]:.1f} tok/s (eager); the "
                  f"warming process ended {waited:.0f} s later, {len(markers)} step variant(s) "
                  f"marked warm", flush=True)
            plain = warm_rounds(args, home, n_loops, False, args.target_tokens, 2)
            print(f"N={n_loops:<3} run 2, generate() twice: "
                  + ", ".join(f"{rate:.1f} tok/s ({'compiled or packaged' if c else 'eager'})"
                              for rate, c in plain), flush=True)
            served = warm_rounds(args, home, n_loops, True, args.target_tokens, 6)
            print(f"N={n_loops:<3} run 3, a long-lived engine (a server's), 6 rounds: "
                  + ", ".join(f"{rate:.1f}{'*' if c else ''}" for rate, c in served)
                  + " tok/s (* = a compiled or packaged step in use)", flush=True)


# ---- compile time, cold and warm on-disk caches --------------------------------------------
COMPILE_CHILD = """
import sys, time, torch
from loopedlm import LoopedGPT, ModelConfig
from loopedlm.infer import DecodeEngine, SamplingParams, SequenceParams
torch.set_num_threads(int(sys.argv[3]))
model = LoopedGPT.from_config(ModelConfig.preset("tiny", sequence_len=1024), seed=0).eval()
engine = DecodeEngine(model, max_batch=1, max_len=600, compile=sys.argv[1],
                      max_loops=int(sys.argv[2]))
params = SequenceParams(n_loops=int(sys.argv[2]), sampling=SamplingParams(temperature=0))
engine.add(0, list(range(512)), params)
start = time.perf_counter()
engine.step().host()
first = time.perf_counter() - start
start = time.perf_counter()
engine.step().host()
print(first - (time.perf_counter() - start))
"""


def compile_seconds(mode: str, n_loops: int, folder: str, threads: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the first step's compile in a fresh process whose torch.compile
    caches live in `folder`."""
    import resource

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": folder, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-c", COMPILE_CHILD, mode, str(n_loops),
                          str(threads)], env=env, check=True, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return float(out.stdout.split()[-1]), cpu


def compile_section(args) -> None:
    print("\n== compile time: the first compiled step (the targets' shape, batch 1), each in a "
          "fresh process; cold = empty cache folder, warm = the same folder again")
    print(f"{'mode':<6} {'N':>3} {'cold s':>8} {'warm s':>8} {'cold CPU s':>11} "
          f"{'warm CPU s':>11} {'warm/cold':>10}")
    for mode in ("step", "loop"):
        for n_loops in (1, 12):
            with tempfile.TemporaryDirectory() as folder:
                cold, cold_cpu = compile_seconds(mode, n_loops, folder, args.threads)
                warm, warm_cpu = compile_seconds(mode, n_loops, folder, args.threads)
            print(f"{mode:<6} {n_loops:>3} {cold:>8.1f} {warm:>8.1f} {cold_cpu:>11.1f} "
                  f"{warm_cpu:>11.1f} {warm_cpu / cold_cpu:>9.2f}x", flush=True)


# ---- quality (issue 6) --------------------------------------------------------------------
def cache_bytes(model: LoopedGPT, n_loops: int) -> int:
    """KV-cache bytes per token at `n_loops` loops, fp32, one entry per (loop, layer)."""
    engine = DecodeEngine(model, max_batch=1, max_len=1, max_loops=n_loops,
                          share_first_layer=False, dtype=torch.float32)
    return engine.cache.bytes_per_token()


def corpus_bytes() -> bytes:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics)).encode("utf-8")


def train_byte_model(args) -> LoopedGPT:
    """The stand-in: a byte-level flt model, tiny-preset shape, trained here on CPU."""
    path = Path(args.model_cache)
    cfg = ModelConfig.preset("tiny", vocab_size=256, loop_mode="flt", n_loops=args.train_loops,
                             loss_loops=args.train_loss_loops)
    model = LoopedGPT.from_config(cfg, seed=0)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        print(f"(stand-in model loaded from {path})")
        return model.eval()
    data = torch.tensor(list(corpus_bytes()), dtype=torch.long)
    train = data[: int(0.9 * len(data))]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    seq, batch = args.train_seq, args.train_batch
    start = clock()
    for step in range(args.train_steps):
        lr = 3e-3 * min(1.0, (args.train_steps - step) / (0.2 * args.train_steps))
        for group in opt.param_groups:
            # constant, then linear to zero over the last 20% (docs/design.md#training-recipe)
            group["lr"] = lr
        starts = torch.randint(0, len(train) - seq - 1, (batch,), generator=gen)
        window = torch.stack([train[s:s + seq + 1] for s in starts])
        loss = model(window[:, :-1], window[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.train_steps - 1:
            print(f"  train step {step:>4}: loss {loss.item():.3f} "
                  f"({clock() - start:.0f}s)")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def held_out_rows(args, tokenizer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) token windows of held-out text and the UTF-8 bytes of each target token."""
    if tokenizer is None:
        data = torch.tensor(list(corpus_bytes()), dtype=torch.long)
        data = data[int(0.9 * len(data)):]
        token_bytes = torch.ones(256, dtype=torch.long)
    else:
        ids = tokenizer.encode(Path(args.text).read_text(encoding="utf-8"))
        data = torch.tensor(ids, dtype=torch.long)
        token_bytes = tokenizer.token_bytes()
    length = args.eval_len
    n_rows = min(args.eval_rows, len(data) // length)
    rows = data[: n_rows * length].view(n_rows, length)
    return rows, token_bytes[rows[:, 1:]]


def bpb(nll: torch.Tensor, n_bytes: torch.Tensor) -> float:
    keep = n_bytes > 0  # docs/design.md#evaluation: special tokens count in neither sum
    return float(nll[keep].sum() / (math.log(2) * n_bytes[keep].sum()))


@torch.no_grad()
def times_per_token(model, row, n_loops, options: dict[str, dict]) -> dict[str, tuple[float, float]]:
    """Mean decode-step time at batch 1 along one held-out row, and mean loops spent, for each
    named set of `SequenceParams` options. The configurations are stepped round-robin, token by
    token, so that a busy machine slows them all alike."""
    engines, times = {}, {name: [] for name in options}
    loops = {name: [] for name in options}
    for name, kw in options.items():
        engines[name] = DecodeEngine(model, max_batch=1, max_loops=n_loops, max_len=row.numel())
        engines[name].prefill(0, row[:1], SequenceParams(n_loops=n_loops, **kw))
    for t in range(1, row.numel()):
        for name in options:
            start = clock()
            _, spent = engines[name].decode(row[t:t + 1])
            times[name].append(clock() - start)
            loops[name].append(int(spent[0]))
    return {name: (statistics.mean(times[name]), statistics.mean(loops[name]))
            for name in options}


def quality_section(args) -> None:
    if args.run:
        from loopedlm.data.runs import load_run

        model, tokenizer, _, _ = load_run(args.run)
        source = f"trained run {args.run}, held-out text {args.text}"
    else:
        model, tokenizer = train_byte_model(args), None
        source = (f"stand-in byte-level flt model (tiny shape, trained {args.train_steps} "
                  f"steps at N={args.train_loops} here), held-out 10% of pydoc_data.topics")
    rows, n_bytes = held_out_rows(args, tokenizer)
    n_loops = args.eval_loops or model.config.n_loops
    print(f"\n== quality of the decoding path: {source}")
    print(f"   {rows.size(0)} rows x {rows.size(1)} tokens, teacher-forced token-by-token "
          f"decoding, N={n_loops}")

    def run(label, **kw):
        start = clock()
        score = decode_nll(model, rows, n_loops=kw.pop("n", n_loops), **kw)
        seconds = clock() - start
        return label, bpb(score.nll, n_bytes), float(score.loops[:, 1:].float().mean()), seconds

    def show(results, reference):
        print(f"{'':<28} {'bpb':>7} {'d bpb':>8} {'loops/token':>12} {'eval s':>7}")
        for label, value, loops, seconds in results:
            print(f"{label:<28} {value:>7.4f} {value - reference:>+8.4f} {loops:>12.2f} "
                  f"{seconds:>7.1f}")

    fixed = run(f"fixed N={n_loops}")
    results = [run(f"fixed N={n}", n=n) for n in range(1, n_loops)] + [fixed]
    print("\n-- adaptive loops (decoded tokens; the prompt's first token is a full prefill)")
    for threshold in args.state_thresholds:
        results.append(run(f"adaptive state < {threshold:g}",
                           adaptive=AdaptiveLoops(threshold, "state")))
    for threshold in args.kl_thresholds:
        results.append(run(f"adaptive KL < {threshold:g} nats",
                           adaptive=AdaptiveLoops(threshold, "kl")))
    show(results, fixed[1])

    row = rows[0, : args.timing_len]
    options = {f"fixed N={n_loops}": {}}
    options.update({f"adaptive state < {th:g}": {"adaptive": AdaptiveLoops(th, "state")}
                    for th in args.state_thresholds})
    options.update({f"adaptive KL < {th:g} nats": {"adaptive": AdaptiveLoops(th, "kl")}
                    for th in args.kl_thresholds})
    timed = times_per_token(model, row, n_loops, options)
    base = timed[f"fixed N={n_loops}"][0]
    print(f"\n   decode time per token at batch 1 (first {row.numel()} tokens of row 0, "
          f"mean, configurations interleaved):")
    for name, (seconds, loops) in timed.items():
        print(f"   {name:<26} {1e3 * seconds:6.2f} ms  ({base / seconds:.2f}x)  "
              f"loops/token {loops:.2f}")

    print("\n-- shared cache slots (exact cache = N slots)")
    results = [fixed]
    per_slot = cache_bytes(model, 1)
    for slots in args.slots:
        if slots >= n_loops:
            continue
        for policy in ("block", "modulo"):
            mapping = loop_slot_map(n_loops, slots, policy)
            results.append(run(f"K={slots} {policy} {mapping}", cache_slots=slots,
                               slot_policy=policy))
    show(results, fixed[1])
    print(f"   cache bytes/token: {per_slot:,} per slot (fp32), so N={n_loops} slots = "
          f"{per_slot * n_loops:,}; K slots = K x {per_slot:,}")


def trained_model(args) -> tuple[LoopedGPT, torch.Tensor, str]:
    """(model, `--prompt-rows` held-out rows (B, T), its description)."""
    prompt_rows = argparse.Namespace(**{**vars(args), "eval_rows": args.prompt_rows})
    if args.run:
        from loopedlm.data.runs import load_run

        model, tokenizer, _, _ = load_run(args.run)
        rows, _ = held_out_rows(prompt_rows, tokenizer)
        return model.eval(), rows, f"trained run {args.run}"
    model = train_byte_model(args)
    rows, _ = held_out_rows(prompt_rows)
    return model, rows, (f"stand-in byte-level flt (tiny shape, vocab 256, trained "
                         f"{args.train_steps} steps at N={args.train_loops}, loss on "
                         f"{args.train_loss_loops} loops)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="*", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: batch-1 decoding of tiny models is "
                             "fastest on one, and the shared machine is noisy)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall clock (default), or this process's CPU time (all its "
                             "threads): steadier on a busy shared machine")
    parser.add_argument("--modes", nargs="*", default=["eager", "default", "compiled", "loop",
                                                       "speculative", "adaptive",
                                                       "adaptive-loop"])
    parser.add_argument("--loops", type=int, nargs="*", default=[1, 3, 12])
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--prompt", type=int, default=24, help="prompt tokens (table, server, "
                        "speculative; the stand-in is trained on 64-token windows)")
    parser.add_argument("--prompt-rows", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--naive-tokens", type=int, default=4)
    parser.add_argument("--threshold", type=float, default=0.1,
                        help="the table's adaptive threshold (state criterion)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--server-tokens", type=int, default=32)
    parser.add_argument("--server-rounds", type=int, default=2,
                        help="server section: rounds of each kind, alternated (the median)")
    parser.add_argument("--adaptive-mean", type=float, default=3.0)
    parser.add_argument("--adaptive-rounds", type=int, default=7)
    parser.add_argument("--prefill-lengths", type=int, nargs="*", default=[24, 64],
                        help="prompt tokens of the prefill section (at most --eval-len)")
    parser.add_argument("--server-compile", nargs="*", default=["auto", "loop", False],
                        type=lambda x: False if x == "False" else x,
                        help="the engines' compile in the server section (auto: the default; "
                             "loop: every step, adaptive too, compiled; False: eager)")
    parser.add_argument("--server-thresholds", type=float, nargs="*",
                        default=[0.4, 0.3, 0.2, 0.15, 0.1, 0.07, 0.05, 0.03, 0.02, 0.01])
    parser.add_argument("--draft-loops", type=int, nargs="*", default=[1, 2, 3])
    parser.add_argument("--draft-tokens", type=int, nargs="*", default=[4, 8])
    parser.add_argument("--spec-tokens", type=int, default=32)
    parser.add_argument("--spec-rounds", type=int, default=3)
    parser.add_argument("--target-tokens", type=int, default=128)
    parser.add_argument("--startup-repeats", type=int, default=3)
    parser.add_argument("--run", default=None, help="a trained loopedlm run (needs --text)")
    parser.add_argument("--text", default=None, help="held-out text file for --run")
    parser.add_argument("--model-cache",
                        default="/tmp/loopedlm_bench_decode/byte_flt_n12_all_300.pt")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--train-loops", type=int, default=12)
    parser.add_argument("--train-loss-loops", default="all")
    parser.add_argument("--train-seq", type=int, default=64)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--eval-loops", type=int, default=None)
    parser.add_argument("--eval-rows", type=int, default=32)
    parser.add_argument("--eval-len", type=int, default=64)
    parser.add_argument("--timing-len", type=int, default=64)
    parser.add_argument("--state-thresholds", type=float, nargs="*",
                        default=[0.3, 0.2, 0.1, 0.05])
    parser.add_argument("--kl-thresholds", type=float, nargs="*", default=[0.1, 0.01])
    parser.add_argument("--slots", type=int, nargs="*", default=[1, 2])
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    if args.run and not args.text:
        parser.error("--run needs --text (a held-out text file)")
    if args.server_rounds < 1:
        parser.error(f"--server-rounds={args.server_rounds}: at least 1 round of each kind")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"({os.cpu_count()} cores), {torch.get_num_threads()} torch thread(s), "
          f"torch {torch.__version__}, timed by the {args.clock} clock")
    needs_model = {"table", "server", "adaptive", "prefill", "speculative",
                   "quality"} & set(args.sections)
    if needs_model:
        model, held_out, source = trained_model(args)
        print(f"model: {source}")
    if "table" in args.sections:
        table_section(args, model, held_out)
    if "server" in args.sections:
        server_section(args, model, held_out)
    if "adaptive" in args.sections:
        adaptive_section(args, model, held_out)
    if "prefill" in args.sections:
        prefill_section(args, model, held_out)
    if "speculative" in args.sections:
        speculative_section(args, model, held_out)
    if "targets" in args.sections:
        targets_section(args)
    if "compile" in args.sections:
        compile_section(args)
    if "quality" in args.sections:
        quality_section(args)
    print(f"\nload average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
