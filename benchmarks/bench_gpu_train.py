"""Training speed, MFU, peak memory and compile time over the settings of issue 16.

One table, one row per setting: preset x loops N x compile (eager / regional `blocks` /
whole `model`) x loss_loops x activation checkpointing. Each row runs in a fresh
subprocess (clean peak memory, and an out-of-memory row does not end the table).

    python benchmarks/bench_gpu_train.py                       # CUDA: small, base; N=1,3,12
    python benchmarks/bench_gpu_train.py --presets small --loops 3 --compile blocks \\
        --loss last --checkpointing off --batch-size 32        # one row, device batch 32
    python benchmarks/bench_gpu_train.py --quick               # CPU smoke run, toy size

Columns:
- tok/s: training tokens per second over `--steps` timed steps after `--warmup` steps
  (forward + backward + clipping + Muon/AdamW step, random tokens); CUDA events on CUDA.
- MFU: `loopedlm.train.metrics.mfu` with FLOPs that count every loop (docs/design.md#loop-modes) against the
  GPU's bf16 peak (`peak_flops`); "-" where the peak is unknown (CPU).
- peak GiB: `torch.cuda.max_memory_allocated()` over the timed steps on CUDA (weights,
  optimizer state, activations); on CPU the peak resident set (VmHWM) over them.
- first step s: wall time of the first step, compilation included (the compile warm-up);
  `compile s` = first step minus a steady step.
On CUDA the step runs under bf16 autocast (fp32 on CPU).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

import torch
from bench_train import peak_rss_bytes, reset_peak_rss

from loopedlm import LoopedGPT, ModelConfig
from loopedlm.train.metrics import mfu, peak_flops
from loopedlm.train.optim import LoopedOptimizer, OptimConfig
from loopedlm.train.parallel import apply_activation_checkpointing

COMPILE_MODES = ("eager", "blocks", "model")


def _split(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def measure(args, preset: str, n_loops: int, compile_mode: str, loss_loops: str,
            checkpointing: bool) -> dict:
    """One setting, in this process."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    overrides = {"sequence_len": args.seq_len} if args.seq_len else {}
    cfg = ModelConfig.preset(preset, n_loops=n_loops, loss_loops=loss_loops, **overrides)
    model = LoopedGPT.from_config(cfg, device=device, seed=0)
    if checkpointing:
        apply_activation_checkpointing(model)
    optimizer = LoopedOptimizer(model, OptimConfig())
    run = model
    if compile_mode == "blocks":
        model.compile_blocks()
    elif compile_mode == "model":
        run = torch.compile(model)
    T = cfg.sequence_len
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, T + 1), device=device)
    cuda = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    def step():
        with autocast:
            loss = run(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    step()
    sync()
    first_step = time.perf_counter() - t0
    for _ in range(max(0, args.warmup - 1)):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    else:
        reset_peak_rss()
        t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        end.record()
        sync()
        elapsed = start.elapsed_time(end) / 1000
        peak = torch.cuda.max_memory_allocated(device)
    else:
        elapsed = time.perf_counter() - t0
        peak = peak_rss_bytes()
    step_s = elapsed / args.steps
    tokens_per_s = args.batch_size * T / step_s
    flops = model.estimate_flops(n_loops)
    return {"tokens_per_s": tokens_per_s, "step_s": step_s,
            "mfu": mfu(flops, tokens_per_s, peak_flops(device)), "peak_bytes": peak,
            "first_step_s": first_step, "compile_s": max(0.0, first_step - step_s)}


def _child(args, setting: str) -> dict:
    preset, n, compile_mode, loss_loops, ckpt = setting.split(":")
    try:
        return measure(args, preset, int(n), compile_mode, loss_loops, ckpt == "on")
    except torch.OutOfMemoryError as exc:
        return {"error": "out of memory: " + str(exc).splitlines()[0][:120]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--presets", default="small,base")
    parser.add_argument("--loops", default="1,3,12")
    parser.add_argument("--compile", default="eager,blocks",
                        help=f"comma list of {list(COMPILE_MODES)} (blocks = regional)")
    parser.add_argument("--loss", default="last,all", help="comma list of loss_loops")
    parser.add_argument("--checkpointing", default="off,on", help="comma list of off/on")
    parser.add_argument("--batch-size", type=int, default=16, help="device batch (sequences)")
    parser.add_argument("--seq-len", type=int, default=0, help="0: the preset's")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing (>= 1)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per setting")
    parser.add_argument("--quick", action="store_true",
                        help="CPU smoke run: tiny preset, N=1,3, eager, 2x32 tokens, 1 step "
                             "(unless given)")
    parser.add_argument("--_child", dest="child", default="")
    args = parser.parse_args()
    if args.quick:  # toy defaults; settings given on the command line still apply
        for name, value in (("presets", "tiny"), ("loops", "1,3"), ("compile", "eager"),
                            ("batch_size", 2), ("seq_len", 32), ("steps", 1), ("warmup", 1)):
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
        args.device = "cpu"
    for mode in _split(args.compile):
        if mode not in COMPILE_MODES:
            parser.error(f"--compile {mode!r} is not allowed: choose from {list(COMPILE_MODES)}")
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")

    if args.child:
        print(json.dumps(_child(args, args.child)))
        return

    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {gpu}, torch {torch.__version__}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, device batch "
          f"{args.batch_size} x {args.seq_len or 'preset'} tokens, {args.steps} timed steps "
          f"after {args.warmup}, torch threads {torch.get_num_threads()}")
    header = ("| preset | N | compile | loss | ckpt | tok/s | MFU | peak GiB | first step s "
              "| compile s |")
    print(header)
    print("|---|---:|---|---|---|---:|---:|---:|---:|---:|")
    passthrough = ["--device", args.device, "--batch-size", str(args.batch_size),
                   "--seq-len", str(args.seq_len), "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]
    grid = itertools.product(_split(args.presets), [int(n) for n in _split(args.loops)],
                             _split(args.compile), _split(args.loss), _split(args.checkpointing))
    for preset, n, compile_mode, loss_loops, ckpt in grid:
        setting = f"{preset}:{n}:{compile_mode}:{loss_loops}:{ckpt}"
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed CPU memory leaves RSS
        try:
            out = subprocess.run([sys.executable, __file__, *passthrough, "--_child", setting],
                                 capture_output=True, text=True, env=env,
                                 timeout=args.timeout)
            lines = out.stdout.strip().splitlines()
            r = json.loads(lines[-1]) if out.returncode == 0 and lines else {
                "error": (out.stderr.strip().splitlines() or ["failed"])[-1][:120]}
        except subprocess.TimeoutExpired:
            r = {"error": f"timed out after {args.timeout} s"}
        row = f"| {preset} | {n} | {compile_mode} | {loss_loops} | {ckpt} | "
        if "error" in r:
            print(row + f"{r['error']} | | | | |", flush=True)
            continue
        mfu_text = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(row + f"{r['tokens_per_s']:,.0f} | {mfu_text} | {r['peak_bytes'] / 2**30:.2f} | "
              f"{r['first_step_s']:.1f} | {r['compile_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
