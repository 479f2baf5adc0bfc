"""Replay training logs through the collapse detector and print what it flags.

    python benchmarks/bench_collapse.py [RUN_OR_SWEEP_DIR ...]

Always replays the two real 127M, 12-loop H100 logs in tests/fixtures/ (LT collapsed,
FLT trained), then every run folder given (a sweep folder stands for all its runs). Each
log is replayed with the default thresholds, with two tightened ones (to show the margin
of the defaults) and, for runs too short for the default 200-step window, with the
windows shortened to fit (min_steps 20, state_window 40, plateau_window 40).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from loopedlm.train.collapse import CollapseThresholds, replay_log
from loopedlm.train.run_log import read_log

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
VARIANTS = {
    "default": CollapseThresholds(),
    "growth>=1.5x": CollapseThresholds(state_growth=1.5),
    "stall<2%": CollapseThresholds(stall_improvement=0.02),
    "short windows": CollapseThresholds(min_steps=20, state_window=40, plateau_window=40),
}


def logs(paths: list[str]) -> list[Path]:
    found = sorted(FIXTURES.glob("*.jsonl.gz"))
    for path in map(Path, paths):
        found += [path] if (path / "log.jsonl").exists() else sorted(
            p.parent for p in path.glob("*/log.jsonl"))
    return found


def first_event(detector) -> str:
    if not detector.events:
        return "ok"
    e = detector.events[0]
    return f"{e.kind}@{e.step}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", help="run folders or sweep folders")
    args = parser.parse_args()
    print("thresholds:", {k: v for k, v in dataclasses.asdict(CollapseThresholds()).items()
                          if k.startswith(("state", "stall", "min"))})
    print(f"{'log':<72} {'steps':>5}  " + "  ".join(f"{v:>16}" for v in VARIANTS))
    flagged = {name: 0 for name in VARIANTS}
    for path in logs(args.runs):
        records = read_log(path)
        steps = max((r["step"] for r in records if "loss" in r), default=0)
        cells = []
        for name, thresholds in VARIANTS.items():
            result = first_event(replay_log(records, thresholds))
            flagged[name] += result != "ok"
            cells.append(f"{result:>16}")
        print(f"{path.name[:72]:<72} {steps:>5}  " + "  ".join(cells))
    print("flagged:", flagged)


if __name__ == "__main__":
    main()
