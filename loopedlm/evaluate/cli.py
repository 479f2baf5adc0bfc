"""`loopedlm eval`, `loopedlm eval-tasks` and `loopedlm lm-eval`.

    loopedlm eval RUN_OR_CHECKPOINT --loops 1,3,6,9,12 [--tasks core] [--wikitext PATH]
                  [--data-dir DIR] [--max-examples 200] [--out DIR] [--device auto]
    loopedlm eval-tasks [--fetch-bigbench [--sdist PATH]]
    loopedlm lm-eval --model loopedlm --model_args path=RUN,n_loops=6 --tasks ...
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _find_key(data: Any, key: str) -> Any:
    """The first value stored under `key` anywhere in a nested JSON object."""
    if isinstance(data, dict):
        if key in data:
            return data[key]
        for value in data.values():
            found = _find_key(value, key)
            if found is not None:
                return found
    return None


def _run_data_dir(model_folder: Path, meta: dict[str, Any]) -> Path | None:
    """The training data folder recorded with the run ("" means the bundled corpus)."""
    configs = [meta]
    for folder in [model_folder, *model_folder.parents][:3]:
        if (folder / "config.json").is_file():
            try:
                configs.append(json.loads((folder / "config.json").read_text()))
            except json.JSONDecodeError:
                continue
    for config in configs:
        value = _find_key(config, "data_dir")
        if value is not None:
            if value:
                return Path(value)
            from loopedlm.data import default_data_dir
            return default_data_dir()
    return None


def load_run(path: str | Path, device: str = "cpu", tokenizer: str | None = None):
    """(model, tokenizer, model_folder, meta) of a run folder or a checkpoint folder."""
    from loopedlm.checkpoint import find_tokenizer_dir, load_model, resolve_model_folder
    from loopedlm.tokenizer import load_tokenizer

    folder = resolve_model_folder(path)
    model, meta = load_model(folder, device=device)
    if tokenizer is None:
        tok_dir = find_tokenizer_dir(folder)
        if tok_dir is None:
            raise FileNotFoundError(f"no tokenizer/ folder saved with {path}; pass --tokenizer "
                                    f"(qwen3 or a tokenizer folder)")
        tokenizer = str(tok_dir)
    tok = load_tokenizer(tokenizer)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer} has {tok.vocab_size} tokens but the model's "
                         f"vocab_size is {model.config.vocab_size}")
    return model, tok, folder, meta


def _cmd_eval(args: argparse.Namespace) -> int:
    from loopedlm.evaluate.budget import evaluate_budget, markdown_table, parse_loops, write_budget_outputs
    from loopedlm.evaluate.tasks import resolve_task_names

    loops = parse_loops(args.loops)  # validated before the (slow) model load
    tasks = resolve_task_names(args.tasks) if args.tasks != "none" else []
    if args.wikitext is not None and not Path(args.wikitext).exists():
        raise FileNotFoundError(f"--wikitext {args.wikitext} does not exist")
    from loopedlm.parallel import resolve_device

    args.device = str(resolve_device(args.device))  # "auto": the GPU when there is one
    model, tok, folder, meta = load_run(args.run, args.device, args.tokenizer)
    data_dir = Path(args.data_dir) if args.data_dir else _run_data_dir(folder, meta)
    if data_dir is not None and not data_dir.exists():
        logger.warning("validation data %s not found: skipping val_bpb/val_ppl", data_dir)
        data_dir = None
    out = Path(args.out) if args.out else folder / "eval"
    print(f"evaluating {folder} at N={loops} on {len(tasks)} tasks "
          f"(max {args.max_examples} examples each); results -> {out}", file=sys.stderr)
    results = evaluate_budget(model, tok, loops, tasks=tasks, data_dir=data_dir,
                              wikitext=args.wikitext, max_examples=args.max_examples,
                              val_batches=args.val_batches, batch_size=args.batch_size,
                              device=args.device)
    results["checkpoint"] = str(folder)
    paths = write_budget_outputs(results, out)
    print(markdown_table(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    from loopedlm.evaluate.tasks import CORE_TASKS, DOWNSTREAM_TASKS, fetch_bigbench, task_status

    if args.fetch_bigbench:
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
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="a run folder or a checkpoint folder")
    p.add_argument("--loops", default="1,3,6,9,12", help="comma list of loop counts (>= 1)")
    p.add_argument("--tasks", default="core",
                   help="comma list of task names or groups: core (22 DCLM tasks, those "
                        "present), downstream (the paper's six), all, none")
    p.add_argument("--wikitext", default=None,
                   help="WikiText-2 validation: wiki.valid.raw, a validation-*.parquet, or a "
                        "folder holding one")
    p.add_argument("--data-dir", default=None,
                   help="Parquet data folder whose last shard is the validation split "
                        "(default: the run's)")
    p.add_argument("--max-examples", type=_positive_int, default=200,
                   help="examples per task (a fixed random subset)")
    p.add_argument("--val-batches", type=_positive_int, default=20,
                   help="validation batches for val_bpb")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer name or folder (default: the run's tokenizer/)")
    p.add_argument("--out", default=None, help="output folder (default: CHECKPOINT/eval)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda[:N]")
    p.set_defaults(func=_cmd_eval)

    t = subparsers.add_parser("eval-tasks", help="list the evaluation tasks available offline")
    t.add_argument("--fetch-bigbench", action="store_true",
                   help="extract the CORE BIG-bench tasks from the bigbench sdist (pip download)")
    t.add_argument("--sdist", default=None, help="a local bigbench-1.0.0.tar.gz to use instead")
    t.set_defaults(func=_cmd_tasks)

    h = subparsers.add_parser("lm-eval", help="run EleutherAI lm-evaluation-harness with the "
                              "'loopedlm' model registered", add_help=False)
    h.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    h.set_defaults(func=_cmd_lm_eval)
