"""The decode engine (issue 11): decode tokens/s at batch 1, 8, 64 and N in {1, 4, 12}, in
fp32 and bf16, KV-cache bytes per token (with and without the shared first layer), the
naive baseline (recomputing the whole sequence for each token, as the FLT authors'
generate does), the eager adaptive-loops fallback, and torch.compile on CPU.

Every slot holds a `--prompt`-token random prompt (weights from init_weights(); speed does
not depend on their values); a step decodes one token for every slot. Timing: CUDA events
after warm-up on GPUs, wall clock on CPU; tokens/s = batch x steps / time.

    python benchmarks/bench_engine.py                       # CPU: tiny preset, 1,024 context
    python benchmarks/bench_engine.py --device cuda --preset small
    python benchmarks/bench_engine.py --batches 1 --loops 12 --compile none step loop
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from loopedlm import LoopedGPT, ModelConfig
from loopedlm.infer import AdaptiveLoops, DecodeEngine, SamplingParams, SequenceParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Timer:
    """Seconds of a block: CUDA events on GPUs (after a synchronize), else wall clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


def build_engine(model, batch, n_loops, dtype, args, compile_mode, adaptive=None):
    engine = DecodeEngine(model, max_batch=batch, max_loops=n_loops, dtype=dtype,
                          max_len=args.prompt + args.warmup + args.steps + 2,
                          compile=False if compile_mode == "none" else compile_mode)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    for slot in range(batch):
        ids = torch.randint(0, vocab, (args.prompt,), generator=gen).tolist()
        engine.add(slot, ids, SequenceParams(n_loops=n_loops, adaptive=adaptive,
                                             sampling=SamplingParams(temperature=0)))
    return engine


@torch.no_grad()
def decode_rate(engine: DecodeEngine, args) -> tuple[float, float]:
    """(tokens/s, seconds of the first step: capture or compile included)."""
    with Timer(engine.device) as first:
        engine.step()
    for _ in range(args.warmup):
        engine.step()
    with Timer(engine.device) as timed:
        for _ in range(args.steps):
            out = engine.step()
        out.tokens.tolist()
    return len(engine.active_slots) * args.steps / timed.seconds, first.seconds


@torch.no_grad()
def naive_rate(model, n_loops, dtype, args) -> float:
    """Tokens/s of recomputing the whole sequence (prompt + 1) for one new token, batch 1."""
    model = model.to(dtype)
    idx = torch.randint(0, model.config.vocab_size, (1, args.prompt + 1), device=model.cos.device)
    times = []
    for _ in range(args.naive_repeats + 1):
        with Timer(idx.device) as t:
            model(idx, n_loops=n_loops)
        times.append(t.seconds)
    return 1 / statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="tiny", help="tiny (2 blocks of width 128, "
                        "vocab 4096) on CPU; small (the paper's 127M) on GPUs")
    parser.add_argument("--context", type=int, default=1024, help="the model's sequence_len")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8, 64])
    parser.add_argument("--loops", type=int, nargs="*", default=[1, 4, 12])
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--compile", nargs="*", default=["none"],
                        choices=["none", "step", "loop"], help="engine compile modes (CPU)")
    parser.add_argument("--steps", type=int, default=32, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--naive-repeats", type=int, default=3)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--adaptive", type=float, nargs="*", default=[0.0, float("inf")],
                        help="thresholds for the eager adaptive fallback (batch 1, max N); 0 "
                             "runs every loop (the fallback's own cost), inf stops at 2")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = ModelConfig.preset(args.preset, sequence_len=args.context)
    model = LoopedGPT.from_config(cfg, device=device, seed=0).eval()
    hardware = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"CPU, {torch.get_num_threads()} thread(s)")
    print(f"== decode engine: {args.preset} preset ({cfg.loop_mode}, depth {cfg.depth}, "
          f"width {cfg.d_model}, vocab {cfg.vocab_size}), context {args.context}, "
          f"{args.prompt}-token prompts, greedy; {hardware}, torch {torch.__version__}")

    print("\n-- cache bytes per token (one sequence, one position)")
    for n_loops in args.loops:
        for name in args.dtypes:
            sizes = [DecodeEngine(model, max_batch=1, max_len=8, max_loops=n_loops,
                                  dtype=DTYPES[name], share_first_layer=share
                                  ).cache.bytes_per_token() for share in (True, False)]
            print(f"N={n_loops:>2} {name:>8}: {sizes[0]:>8,} B with the shared first layer, "
                  f"{sizes[1]:>8,} B without (saved {sizes[1] - sizes[0]:,} B, "
                  f"{1 - sizes[0] / sizes[1]:.0%})")

    print(f"\n-- decode tokens/s ({args.steps} steps after {args.warmup} warm-up)")
    print(f"{'dtype':>8} {'compile':>7} {'N':>3} {'batch':>5} {'tok/s':>9} {'ms/step':>8} "
          f"{'first step s':>12} {'naive tok/s':>11} {'vs naive':>8}")
    for name in args.dtypes:
        for n_loops in args.loops:
            naive = None if args.skip_naive else naive_rate(model, n_loops, DTYPES[name], args)
            for compile_mode in args.compile:
                for batch in args.batches:
                    engine = build_engine(model, batch, n_loops, DTYPES[name], args, compile_mode)
                    rate, first = decode_rate(engine, args)
                    versus = f"{rate / naive:7.1f}x" if naive and batch == 1 else ""
                    naive_text = f"{naive:11.2f}" if naive and batch == 1 else ""
                    print(f"{name:>8} {compile_mode:>7} {n_loops:>3} {batch:>5} {rate:>9.1f} "
                          f"{1e3 * batch / rate:>8.2f} {first:>12.2f} {naive_text:>11} "
                          f"{versus:>8}", flush=True)
                    del engine
    model = model.float()

    if args.adaptive:
        n_loops = max(args.loops)
        print(f"\n-- adaptive loops: the eager fallback (batch 1, N={n_loops}, fp32)")
        fixed, _ = decode_rate(build_engine(model, 1, n_loops, torch.float32, args, "none"),
                               args)
        print(f"fixed N={n_loops:<14} {fixed:8.1f} tok/s")
        for threshold in args.adaptive:
            engine = build_engine(model, 1, n_loops, torch.float32, args, "none",
                                  adaptive=AdaptiveLoops(threshold))
            rate, _ = decode_rate(engine, args)
            print(f"adaptive state<{threshold:<6g} {rate:8.1f} tok/s "
                  f"({int(engine.output().loops[0])} loops per token)")


if __name__ == "__main__":
    main()
