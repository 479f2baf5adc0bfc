"""The LM head + loss alone, forward + backward: plain (full logits) vs fused (issues 16
and 24).

    python benchmarks/bench_head_loss.py                         # tiny preset and Qwen3 shapes
    python benchmarks/bench_head_loss.py --shapes 16384x384x151669 --device cuda --cce

Plain: `LoopedGPT.logits` + `F.cross_entropy`. Chunked: `loopedlm.model.head_loss.head_loss`
(the default backend), eager and with its chunk body compiled (`compile=True`, what
`compile=true` training runs; compilation happens in the warm-up, outside the timings).
`--cce` adds cut-cross-entropy (CUDA, `pip install 'loopedlm[cuda]'`). Timings interleave
the variants and report medians, so a busy machine biases them alike; on CUDA after
warm-up, under bf16 autocast. Peak memory: `torch.cuda.max_memory_allocated` on CUDA (not
measured on CPU here: see bench_train.py --loss-loops for whole steps).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from loopedlm.model.head_loss import head_loss


def plain(h, weight, targets, softcap=15.0):
    logits = (h @ weight.T).float()
    logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, ignore_index=-1)


VARIANTS = {
    "plain": plain,
    "chunked": lambda h, w, t: head_loss(h, w, t, 15.0),
    "compiled": lambda h, w, t: head_loss(h, w, t, 15.0, compile=True),
    "cce": lambda h, w, t: head_loss(h, w, t, 15.0, backend="cce"),
}


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
    parser.add_argument("--cce", action="store_true", help="add cut-cross-entropy (CUDA)")
    args = parser.parse_args()
    device = torch.device(args.device)
    names = ["plain", "chunked", "compiled"] + (["cce"] if args.cce else [])
    print(f"# device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"ms per forward + backward, median of {args.repeats} interleaved repeats")
    print("| rows x width x vocab | " + " | ".join(f"{n} ms" for n in names)
          + " | compiled/chunked | " + " | ".join(f"{n} GiB" for n in names) + " |")
    print("|---|" + "---:|" * (2 * len(names) + 1))
    for shape in args.shapes.split(","):
        rows, width, vocab = (int(v) for v in shape.split("x"))
        gen = torch.Generator().manual_seed(0)
        h = torch.randn(rows, width, generator=gen).to(device).requires_grad_()
        weight = (torch.randn(vocab, width, generator=gen) * 0.05).to(device).requires_grad_()
        targets = torch.randint(0, vocab, (rows,), generator=gen).to(device)
        results = {name: [] for name in names}
        for name in names:  # warm-up (and compilation)
            time_once(VARIANTS[name], h, weight, targets, device)
        for _ in range(args.repeats):
            for name in names:
                results[name].append(time_once(VARIANTS[name], h, weight, targets, device))
        ms = {k: 1000 * statistics.median(t for t, _ in v) for k, v in results.items()}
        gib = {k: max(p for _, p in v) / 2**30 for k, v in results.items()}
        mem = " | ".join(f"{gib[n]:.2f}" if device.type == "cuda" else "-" for n in names)
        print(f"| {shape} | " + " | ".join(f"{ms[n]:.1f}" for n in names)
              + f" | {ms['compiled'] / ms['chunked']:.2f} | {mem} |", flush=True)


if __name__ == "__main__":
    main()
