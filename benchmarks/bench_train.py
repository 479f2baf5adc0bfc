"""Training throughput and peak memory of the tiny preset (issue 4's figures).

    python benchmarks/bench_train.py                 # tokens/s at N=1,4,12; memory at N=1,6,12
    python benchmarks/bench_train.py --device cuda --preset small --dtype bfloat16 --compile
    python benchmarks/bench_train.py --loops= --memory-loops=2,12 --backprop-loops=2
                                                     # truncated backprop: memory flat in N
    # issue 16's CPU bar: every-loop loss vs last-loop loss, Qwen3 vocabulary, N=6
    python benchmarks/bench_train.py --vocab-size 151669 --batch-size 4 --loops= \
        --memory-loops=6 --loss-loops=last,all --no-checkpointing-memory

Throughput: full training steps (forward + backward with residual norms, gradient
clipping, Muon + AdamW) on random tokens, after warm-up steps, median step time.
Peak memory: each configuration runs in a fresh subprocess. On CUDA it is
`torch.cuda.max_memory_allocated()`; on CPU it is the growth of the process's peak
resident set size (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, which includes
PyTorch's C++ allocations, unlike tracemalloc) over the resident size measured just
before the first training step (activations, gradients, optimizer state), with
glibc's mmap threshold pinned so that freed tensors leave the resident set.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from loopedlm import LoopedGPT, ModelConfig
from loopedlm.train.optim import LoopedOptimizer, OptimConfig
from loopedlm.train.parallel import apply_activation_checkpointing


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident size (VmHWM) to the current."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    # not ru_maxrss: Linux carries it over from the parent across fork + exec
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _setup(args, n_loops: int, checkpointing: bool, loss_loops: str = "last"):
    torch.manual_seed(0)
    overrides = {"sequence_len": args.seq_len} if args.seq_len else {}
    if args.vocab_size:
        overrides["vocab_size"] = args.vocab_size
    cfg = ModelConfig.preset(args.preset, n_loops=n_loops, loss_loops=loss_loops, **overrides)
    model = LoopedGPT.from_config(cfg, device=args.device, seed=0)
    if checkpointing:
        apply_activation_checkpointing(model)
    optimizer = LoopedOptimizer(model, OptimConfig())
    run = torch.compile(model) if args.compile else model
    T = cfg.sequence_len
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, T + 1), device=args.device)
    autocast = (torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16)
                if args.dtype == "bfloat16" else torch.autocast("cpu", enabled=False))

    def step():
        with autocast:
            loss, _ = run(x[:, :-1], x[:, 1:], return_residual_norms=True,
                          backprop_loops=args.backprop_loops)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return float(loss.detach())

    return model, step, args.batch_size * T


def throughput(args, n_loops: int) -> dict:
    model, step, tokens = _setup(args, n_loops, args.checkpointing)
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    flops = model.estimate_flops(n_loops, args.backprop_loops)
    return {"n_loops": n_loops, "tokens_per_s": tokens / dt, "step_s": dt,
            "flops_per_token": flops,
            "achieved_flops": flops * tokens / dt}


def memory(args, n_loops: int, checkpointing: bool, loss_loops: str = "last") -> dict:
    _, step, _ = _setup(args, n_loops, checkpointing, loss_loops)
    if args.device.startswith("cuda"):
        step()  # allocate optimizer state first, then measure a steady step
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated()
        method = "torch.cuda.max_memory_allocated"
    else:
        # the parent sets MALLOC_MMAP_THRESHOLD_ so that large tensors are mmap'd and
        # returned on free: the resident size then follows live memory
        step()
        reset_peak_rss()
        before = rss_bytes()
        step()
        peak = peak_rss_bytes() - before
        method = "VmHWM growth over RSS before a steady step"
    return {"n_loops": n_loops, "checkpointing": checkpointing, "loss_loops": loss_loops,
            "peak_bytes": peak, "method": method}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=0, help="0: the preset's")
    parser.add_argument("--vocab-size", type=int, default=0, help="0: the preset's")
    parser.add_argument("--loss-loops", default="last",
                        help="comma list of loss_loops settings for the memory table")
    parser.add_argument("--no-checkpointing-memory", action="store_true",
                        help="memory table without the activation-checkpointing column")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--loops", default="1,4,12", help="throughput loop counts")
    parser.add_argument("--memory-loops", default="1,6,12")
    parser.add_argument("--backprop-loops", type=int, default=0,
                        help="gradients through the last K loops only (0: all; issue 14)")
    parser.add_argument("--checkpointing", action="store_true",
                        help="throughput with activation checkpointing")
    parser.add_argument("--_memory-child", dest="memory_child", default="")
    args = parser.parse_args()

    if args.memory_child:  # one measurement in a fresh process
        n, ckpt, loss_loops = args.memory_child.split(":")
        print(json.dumps(memory(args, int(n), ckpt == "1", loss_loops)))
        return

    print(f"# {args.preset} preset, batch {args.batch_size}, device {args.device}, "
          f"dtype {args.dtype}, compile {args.compile}, torch threads {torch.get_num_threads()}, "
          f"backprop_loops {args.backprop_loops or 'all'}")
    print("loops  tokens/s  step_s  GFLOP/s(all loops)")
    for n in (int(v) for v in args.loops.split(",") if v):
        r = throughput(args, n)
        print(f"{n:5d}  {r['tokens_per_s']:8.0f}  {r['step_s']:6.3f}  "
              f"{r['achieved_flops'] / 1e9:8.2f}")
    print("loops  loss_loops  peak MiB (no ckpt)  peak MiB (activation ckpt)  method")
    base = [sys.executable, __file__, "--preset", args.preset, "--device", args.device,
            "--dtype", args.dtype, "--batch-size", str(args.batch_size),
            "--seq-len", str(args.seq_len), "--vocab-size", str(args.vocab_size),
            "--backprop-loops", str(args.backprop_loops)] + (["--compile"] if args.compile else [])
    peaks = {}
    for n in (int(v) for v in args.memory_loops.split(",") if v):
        for loss_loops in args.loss_loops.split(","):
            res = []
            for ckpt in (0,) if args.no_checkpointing_memory else (0, 1):
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
                out = subprocess.run(base + ["--_memory-child", f"{n}:{ckpt}:{loss_loops}"],
                                     check=True, capture_output=True, text=True, env=env).stdout
                res.append(json.loads(out.strip().splitlines()[-1]))
            ckpt_mib = f"{res[1]['peak_bytes'] / 2**20:26.1f}" if len(res) > 1 else f"{'-':>26}"
            print(f"{n:5d}  {loss_loops:>10}  {res[0]['peak_bytes'] / 2**20:18.1f}  {ckpt_mib}"
                  f"  {res[0]['method']}")
            peaks.setdefault(loss_loops, {})[n] = res[0]["peak_bytes"]
    for loss_loops, by_n in peaks.items():
        if len(by_n) > 1:
            low, high = min(by_n), max(by_n)
            print(f"peak memory (no ckpt, loss_loops {loss_loops}) at N={high} / at N={low}: "
                  f"{by_n[high] / by_n[low]:.3f}x (backprop_loops {args.backprop_loops or 'all'})")


if __name__ == "__main__":
    main()
