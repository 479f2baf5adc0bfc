"""The LM head + loss alone, forward + backward: plain (full logits) vs fused (issue 16).

    python benchmarks/bench_head_loss.py                         # tiny preset and Qwen3 shapes
    python benchmarks/bench_head_loss.py --rows 16384 --width 384 --vocab 151669 --device cuda

Plain: `LoopedGPT.logits` + `F.cross_entropy`. Fused: `loopedlm.model.head_loss.head_loss`
(cut-cross-entropy on CUDA when installed, else the chunked PyTorch path). Timings
interleave the two and report medians, so a busy machine biases both alike; on CUDA with
CUDA events after warm-up, bf16 autocast. Peak memory: `torch.cuda.max_memory_allocated`
on CUDA (not measured on CPU here: see bench_train.py --loss-loops for whole steps).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from loopedlm.model.head_loss import cut_cross_entropy_available, head_loss


def plain(h, weight, targets, softcap=15.0):
    logits = (h @ weight.T).float()
    logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, ignore_index=-1)


def fused(h, weight, targets):
    return head_loss(h, weight, targets, 15.0)


def time_once(fn, h, weight, targets, device) -> tuple[float, int]:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        loss = fn(h, weight, targets)
    loss.backward()
    if cuda:
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    h.grad = weight.grad = None
    return time.perf_counter() - t0, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="2048x128x4096,1024x128x151669",
                        help="comma list of ROWSxWIDTHxVOCAB")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"# device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cut-cross-entropy {'used' if cut_cross_entropy_available(device) else 'not used'}")
    print("| rows x width x vocab | plain ms | fused ms | fused/plain | plain GiB | fused GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for shape in args.shapes.split(","):
        rows, width, vocab = (int(v) for v in shape.split("x"))
        gen = torch.Generator().manual_seed(0)
        h = torch.randn(rows, width, generator=gen).to(device).requires_grad_()
        weight = (torch.randn(vocab, width, generator=gen) * 0.05).to(device).requires_grad_()
        targets = torch.randint(0, vocab, (rows,), generator=gen).to(device)
        results = {"plain": [], "fused": []}
        for fn in (plain, fused):  # warm-up
            time_once(fn, h, weight, targets, device)
        for _ in range(args.repeats):
            for name, fn in (("plain", plain), ("fused", fused)):
                results[name].append(time_once(fn, h, weight, targets, device))
        ms = {k: 1000 * statistics.median(t for t, _ in v) for k, v in results.items()}
        gib = {k: max(p for _, p in v) / 2**30 for k, v in results.items()}
        mem = (f"{gib['plain']:.2f} | {gib['fused']:.2f}" if device.type == "cuda"
               else "- | -")
        print(f"| {shape} | {ms['plain']:.1f} | {ms['fused']:.1f} | "
              f"{ms['fused'] / ms['plain']:.2f} | {mem} |", flush=True)


if __name__ == "__main__":
    main()
