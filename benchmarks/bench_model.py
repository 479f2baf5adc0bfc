"""Forward+backward time per training step: flt vs lt vs plain GPT (issue 2).

FLT adds no parameters and no FLOPs over LT, so its step should cost (almost) the same.
The plain GPTs are `lt` models run once: one with the same unique depth (what each loop
costs) and one `depth * n_loops` deep (the same compute, n_loops times the parameters).

Timings interleave the models round-robin and report medians, so a busy machine biases
every model alike.

    python benchmarks/bench_model.py [--preset tiny] [--n-loops 3] [--batch 8] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from loopedlm import LoopedGPT, ModelConfig


def step_time(model: LoopedGPT, idx: torch.Tensor, n_loops: int) -> float:
    t0 = time.perf_counter()
    loss = model(idx, idx, n_loops=n_loops)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--n-loops", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = ModelConfig.preset(args.preset, n_loops=args.n_loops)
    n = args.n_loops
    models = {
        "flt": (ModelConfig.preset(args.preset, loop_mode="flt", n_loops=n), n),
        "lt": (ModelConfig.preset(args.preset, loop_mode="lt", n_loops=n), n),
        f"plain depth {base.depth} (x1)": (ModelConfig.preset(args.preset, loop_mode="lt",
                                                              n_loops=1), 1),
        f"plain depth {base.depth * n} (x1)": (ModelConfig.preset(
            args.preset, loop_mode="lt", n_loops=1, depth=base.depth * n,
            d_model=base.d_model, n_head=base.n_head), 1),
    }
    built = {name: (LoopedGPT.from_config(cfg, seed=0).train(), loops)
             for name, (cfg, loops) in models.items()}
    idx = torch.randint(0, base.vocab_size, (args.batch, base.sequence_len))
    for model, loops in built.values():  # warm-up
        step_time(model, idx, loops)
    times: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(args.repeats):
        for name, (model, loops) in built.items():
            times[name].append(step_time(model, idx, loops))

    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"preset={args.preset} n_loops={n} batch={args.batch}x{base.sequence_len} "
          f"threads={torch.get_num_threads()} repeats={args.repeats}")
    for name, t in med.items():
        model = built[name][0]
        print(f"  {name:<24} {t * 1000:8.1f} ms/step  ({model.num_params():,} params)")
    ratio = med["flt"] / med["lt"]
    print(f"flt / lt            = {ratio:.3f}  (target <= 1.05)")
    print(f"flt / plain same-compute = {med['flt'] / med[list(med)[3]]:.3f}")
    print(f"lt / plain one pass = {med['lt'] / med[list(med)[2]]:.3f} (expected about n_loops={n})")


if __name__ == "__main__":
    main()
