"""Start-up time of the `loopedlm` command: seconds from launch to exit for commands that do
no work (`--help` of every command, `eval-tasks`), median of several runs, next to two
baselines measured in the same run: an empty Python and `import torch`.

    python benchmarks/bench_startup.py [--repeats 5] [--tree PATH ...]

Each `--tree` is a loopedlm checkout (default: this one) put first on PYTHONPATH, so a
before/after comparison runs in one process on one machine state:
`git worktree add /tmp/before main` then `--tree /tmp/before --tree .`. The commands are
interleaved (one run of each, repeated), so a change of load hits every command alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = [
    ["--help"], ["info", "--help"], ["train", "--help"], ["eval", "--help"], ["eval-tasks"],
    ["sample", "--help"], ["serve", "--help"], ["data", "prepare", "--help"],
    ["tokenizer", "--help"], ["sweep", "--help"], ["plot", "--help"], ["report", "--help"],
]
LAUNCH = "import sys; from loopedlm.cli import main; sys.exit(main())"  # the console script


def timed(argv: list[str], tree: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    # run in the tree: `python -c` puts the working folder first on sys.path
    result = subprocess.run(argv, env=env, cwd=tree, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {result.returncode}: {result.stderr[-500:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tree", action="append", type=Path,
                        help="a loopedlm checkout to time (repeatable; default: this one)")
    args = parser.parse_args()
    trees = [tree.resolve() for tree in args.tree or [ROOT]]
    rows = {"python -c pass": (ROOT, [sys.executable, "-c", "pass"]),
            "python -c 'import torch'": (ROOT, [sys.executable, "-c", "import torch"])}
    for tree in trees:
        for cmd in COMMANDS:
            label = "loopedlm " + " ".join(cmd) + (f"  [{tree}]" if len(trees) > 1 else "")
            rows[label] = (tree, [sys.executable, "-c", LAUNCH, *cmd])
    times: dict[str, list[float]] = {label: [] for label in rows}
    for _ in range(args.repeats):
        for label, (tree, argv) in rows.items():
            times[label].append(timed(argv, tree))
    torch_s = statistics.median(times["python -c 'import torch'"])
    load = os.getloadavg()[0]
    print(f"median of {args.repeats} runs, seconds; load average {load:.1f} on "
          f"{os.cpu_count()} cores; ratio = median / `import torch`")
    width = max(len(label) for label in rows)
    for label, values in times.items():
        median = statistics.median(values)
        print(f"{label:{width}s}  {median:6.2f} s  {median / torch_s:5.2f}x")


if __name__ == "__main__":
    main()
