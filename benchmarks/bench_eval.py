"""Evaluation wall time across loop counts (docs/design.md#evaluation: the budget evaluation).

    python benchmarks/bench_eval.py [--run RUN] [--loops 1,3,6,9,12] [--max-examples 20]
                                    [--tasks downstream] [--data-dir DIR]

Without --run it times an untrained `tiny` preset with a BPE tokenizer trained on the
bundled corpus (or, if that is missing, on task text). Prints the wall time of every metric
at every loop count, and the per-task time. The machine may be shared: timings are noisy.
"""

from __future__ import annotations

import argparse
import time

import torch

from loopedlm import LoopedGPT, ModelConfig
from loopedlm.evaluate.budget import evaluate_budget, markdown_table, parse_loops
from loopedlm.evaluate.tasks import load_task, resolve_task_names


def tiny_model_and_tokenizer():
    from loopedlm.data import tokenizer_training as tokmod

    try:
        from loopedlm.data.corpus import default_data_dir
        from loopedlm.data.loader import iter_texts
        texts = list(iter_texts(default_data_dir(), "train"))[:200]
        source = "the bundled corpus"
    except Exception:  # noqa: BLE001 - any missing corpus: fall back to task text
        _, items = load_task("piqa")
        texts = [it["query"] + " " + " ".join(it["choices"]) for it in items]
        source = "PIQA text"
    tok = tokmod.train_tokenizer(texts, 4096)
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size)
    print(f"tiny preset, random init, BPE {tok.vocab_size} trained on {source}")
    return LoopedGPT.from_config(cfg, seed=0).eval(), tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None)
    parser.add_argument("--loops", default="1,3,6,9,12")
    parser.add_argument("--max-examples", type=int, default=20)
    parser.add_argument("--tasks", default="downstream")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--val-batches", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.run:
        from loopedlm.data.runs import load_run
        model, tok, folder, _ = load_run(args.run)
        print(f"checkpoint {folder}")
    else:
        model, tok = tiny_model_and_tokenizer()
    loops = parse_loops(args.loops)
    tasks = resolve_task_names(args.tasks)
    for name in tasks:  # load (and cache) the task data outside the timed part
        load_task(name)
    start = time.perf_counter()
    results = evaluate_budget(model, tok, loops, tasks=tasks, data_dir=args.data_dir,
                              max_examples=args.max_examples, val_batches=args.val_batches,
                              progress=lambda _msg: None)
    total = time.perf_counter() - start
    print(markdown_table(results))
    print(f"threads={torch.get_num_threads()} tasks={len(tasks)} "
          f"max_examples={args.max_examples}")
    for n in loops:
        print(f"N={n:2d}: {results['wall_time_s'][str(n)]:7.1f} s")
    print(f"total: {total:.1f} s; per loop count per task: "
          f"{total / (len(loops) * max(1, len(tasks))):.2f} s")


if __name__ == "__main__":
    main()
