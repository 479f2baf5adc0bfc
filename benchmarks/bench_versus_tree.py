"""The default decode path of this checkout against another one (e.g. main before a change):
decode tokens/s of `DecodeEngine` with its defaults (eager, greedy), batch 1, one thread.

The model is the `tiny` preset with sequence_len=1024 (weights from init_weights(); speed
does not depend on their values), a `--prompt`-token prompt, N=`--loops`. Each measurement
runs in a fresh subprocess with PYTHONPATH set to one checkout, alternating between the
two, `--rounds` times each, so that a busy machine slows both alike; it prints every
measurement, the medians, the best of each and their ratios. Eager decoding of a model this
small is bound by per-op dispatch, so it also prints the aten operations one step
dispatches (deterministic, whatever the load).

    python benchmarks/bench_versus_tree.py /tmp/main-checkout [--rounds 5] [--loops 12]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

# runs in the checkout under test; works with the engine's API before and after issue 23
SNIPPET = r"""
import sys, time, torch
torch.set_num_threads(1)
from loopedlm import LoopedGPT, ModelConfig
from loopedlm.infer import DecodeEngine, SamplingParams
loops, prompt, steps, warmup = (int(a) for a in sys.argv[1:5])
model = LoopedGPT.from_config(ModelConfig.preset("tiny", sequence_len=1024), seed=0).eval()
ids = torch.randint(0, model.config.vocab_size, (prompt,),
                    generator=torch.Generator().manual_seed(0)).tolist()
engine = DecodeEngine(model, max_batch=1, max_loops=loops, max_len=prompt + steps + warmup + 2)
greedy = SamplingParams(temperature=0)
try:
    from loopedlm.infer import SequenceParams
    engine.add(0, ids, SequenceParams(n_loops=loops, sampling=greedy))
except ImportError:
    engine.add(0, ids, n_loops=loops, sampling=greedy)
with torch.no_grad():
    for _ in range(warmup):
        engine.step()
    start = time.perf_counter()
    for _ in range(steps):
        out = engine.step()
    out.tokens.tolist()
    rate = steps / (time.perf_counter() - start)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))
    with Count():
        engine.step()
print(Count.ops, rate)
"""


def measure(tree: Path, args) -> tuple[int, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SNIPPET, str(args.loops), str(args.prompt),
                           str(args.steps), str(args.warmup)], env=env, cwd=tree,
                          capture_output=True, text=True, check=True)
    ops, rate = done.stdout.strip().splitlines()[-1].split()
    return int(ops), float(rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", help="the other checkout (its root folder)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loops", type=int, default=12)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--warmup", type=int, default=4)
    args = parser.parse_args()
    trees = {"this": HERE, "other": Path(args.other).resolve()}
    rates: dict[str, list[float]] = {name: [] for name in trees}
    ops: dict[str, int] = {}
    print(f"decode tok/s, default engine path, tiny preset (context 1024), N={args.loops}, "
          f"batch 1, {args.prompt}-token prompt, 1 thread, greedy")
    print(f"  this  = {trees['this']}\n  other = {trees['other']}")
    for round_ in range(args.rounds):
        for name, tree in (trees.items() if round_ % 2 == 0 else reversed(trees.items())):
            ops[name], rate = measure(tree, args)
            rates[name].append(rate)
        print(f"round {round_ + 1}: this {rates['this'][-1]:7.1f}  other {rates['other'][-1]:7.1f}",
              flush=True)
    this, other = statistics.median(rates["this"]), statistics.median(rates["other"])
    print(f"median: this {this:.1f} tok/s, other {other:.1f} tok/s, this / other = "
          f"{this / other:.3f}")
    this, other = max(rates["this"]), max(rates["other"])
    print(f"best:   this {this:.1f} tok/s, other {other:.1f} tok/s, this / other = "
          f"{this / other:.3f}")
    print(f"aten ops per step: this {ops['this']}, other {ops['other']}")


if __name__ == "__main__":
    main()
