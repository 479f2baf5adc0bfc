"""The default decode path against an earlier commit's, in the same session (issue 25: "the
default path got slower than before the engine existed").

Checks out REV (default a2b73e9, the last commit before the decode engine: its KV-cache
generate) into a temporary git worktree and times `generate()` with its defaults there and in
this tree, each in a fresh process, alternately, `--rounds` times: the targets' shape of
`bench_decode.py` (tiny preset, sequence_len 1024, a 512-token prompt, batch 1, random
weights, greedy, `--tokens` tokens after the prefill) at N=1 and N=12, one torch thread,
timed by the process clock (this host's wall-clock speed drifts by up to 2x over minutes);
and, free of that noise, the aten calls per token made from Python (the profiler's
top-level events: on a dispatch-bound CPU the cost follows them).

    python benchmarks/bench_decode_vs_commit.py [REV] [--rounds 3] [--tokens 128] [--second-run]

`--second-run` times this tree as a machine's second run: its decode steps packaged first
(`compile="auto"` on a CPU builds them in a low-priority process during a first run).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import os, sys, time, torch
torch.set_num_threads(1)
from loopedlm import LoopedGPT, ModelConfig
try:
    from loopedlm.infer.generate import generate
except ImportError:  # before the engine: loopedlm/generate.py
    from loopedlm.generate import generate
tokens = int(sys.argv[1])
cfg = ModelConfig.preset("tiny", sequence_len=1024)
model = LoopedGPT.from_config(cfg, seed=0).eval()
ids = torch.randint(0, cfg.vocab_size, (512,), generator=torch.Generator().manual_seed(0)).tolist()
rates = []
for n_loops in (1, 12):
    generate(model, ids, max_tokens=1, n_loops=n_loops)
    start = time.process_time()
    generate(model, ids, max_tokens=1, n_loops=n_loops)
    prefill = time.process_time() - start
    start = time.process_time()
    generate(model, ids, max_tokens=tokens + 1, n_loops=n_loops, temperature=0)
    rates.append(tokens / (time.process_time() - start - prefill))
print("RATES", *rates)
# aten calls per token made from Python (not counting those they make): a count, so free of
# this host's noise; from the profiler, over 64 tokens less the prefill's
from torch.profiler import ProfilerActivity, profile
def top_level_ops(max_tokens):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(model, ids, max_tokens=max_tokens, n_loops=n_loops, temperature=0)
    return sum(event.cpu_parent is None for event in prof.events())
counts = []
for n_loops in (1, 12):
    counts.append((top_level_ops(65) - top_level_ops(1)) / 64)
print("OPS", *counts)
"""


def child_env(tree: Path, home: str | None, warming: bool = False) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1",
           "LOOPEDLM_COMPILE_WARMUP": "1" if warming else "0"}
    if home is not None:  # this tree's packages and caches there, and nowhere else
        env["LOOPEDLM_HOME"] = home
        env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    return env


def warm_home(home: str, tokens: int, attempts: int = 4) -> int:
    """Run this tree's child with the compile-warming process on, under `home`, until its
    N=1 and N=12 steps are packaged (or `attempts` runs); the packages built. What a
    machine's second run finds."""
    markers = Path(home) / "torch_compile" / "loopedlm_warm"
    for _ in range(attempts):
        subprocess.run([sys.executable, "-c", CHILD, str(tokens)], cwd=ROOT,
                       env=child_env(ROOT, home, warming=True), check=True, capture_output=True)
        deadline = time.monotonic() + 900
        while any(markers.glob("*.lock")) and time.monotonic() < deadline:
            time.sleep(1)
        if len(list(markers.glob("*.pt2"))) >= 2:
            break
    return len(list(markers.glob("*.pt2")))


def measure(tree: Path, tokens: int, home: str | None = None) -> dict[str, tuple[float, float]]:
    """{"RATES": (N=1, N=12) tok/s, "OPS": (N=1, N=12) top-level aten calls per token}."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(tokens)], cwd=tree,
                         env=child_env(tree, home), check=True, capture_output=True,
                         text=True).stdout
    found = {}
    for line in out.splitlines():
        key, *values = line.split()
        if key in ("RATES", "OPS"):
            found[key] = (float(values[0]), float(values[1]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", nargs="?", default="a2b73e9")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--second-run", action="store_true",
                        help="time this tree as a machine's second run: its steps packaged "
                             "first (compile='auto' on a CPU) in a temporary LOOPEDLM_HOME; "
                             "without it, as a first run (the warming process off: eager)")
    args = parser.parse_args()
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (2 cores expected), "
          f"one torch thread, process clock, {args.tokens} tokens after a 512-token prompt")
    with tempfile.TemporaryDirectory() as folder:
        home = None
        if args.second_run:
            home = str(Path(folder) / "home")
            start = time.monotonic()
            built = warm_home(home, args.tokens)
            print(f"this tree as a second run: {built} step(s) packaged first, in "
                  f"{time.monotonic() - start:.0f} s")
        old = Path(folder) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(old),
                        args.rev], check=True)
        try:
            print(f"{'round':>5} {'tree':<22} {'N=1 tok/s':>10} {'N=12 tok/s':>11} "
                  f"{'N=1 ops/tok':>12} {'N=12 ops/tok':>13}")
            results: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
            for r in range(args.rounds):
                for name, tree in (("old", old), ("new", ROOT)):
                    found = measure(tree, args.tokens, home if name == "new" else None)
                    (n1, n12), (ops1, ops12) = found["RATES"], found["OPS"]
                    results[name].append((n1, n12))
                    label = f"{args.rev} (old)" if name == "old" else "this tree"
                    print(f"{r + 1:>5} {label:<22} {n1:>10.1f} {n12:>11.1f} {ops1:>12.1f} "
                          f"{ops12:>13.1f}", flush=True)
            for i, n in enumerate((1, 12)):
                ratios = [new[i] / old[i] for old, new in
                          zip(results["old"], results["new"], strict=True)]
                print(f"N={n}: this tree / {args.rev}, round by round: "
                      + ", ".join(f"{x:.2f}x" for x in ratios))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)],
                           check=False)
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
