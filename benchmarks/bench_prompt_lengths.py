"""How many CORE prompts a `sequence_len` model would crop, with and without the 10x RoPE table.

    python benchmarks/bench_prompt_lengths.py [--tasks boolq,squad,hellaswag] [--tokenizer qwen3]
                                              [--sequence-len 1024] [--max-examples N]

Tokenizes every evaluated example of each task exactly as `loopedlm eval` does (BOS first,
nanochat's few-shot selection) and prints, per task: the examples, their longest scored
sequence, how many exceed `sequence_len + 1` tokens (cropped before issue 17, when the RoPE
table covered only `sequence_len`) and how many exceed `10 x sequence_len + 1` (cropped
now). No model is run.
"""

from __future__ import annotations

import argparse

from loopedlm.data.tokenizer import load_tokenizer
from loopedlm.evaluate.prompts import prepare_example, select_examples
from loopedlm.evaluate.tasks import load_task, resolve_task_names
from loopedlm.model.config import ROTARY_LENGTH_FACTOR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="boolq,squad,hellaswag",
                        help="task names or groups (core, downstream, all)")
    parser.add_argument("--tokenizer", default="qwen3")
    parser.add_argument("--sequence-len", type=int, default=1024)
    parser.add_argument("--max-examples", type=int, default=None,
                        help="examples per task (default: all, as --max-examples unset)")
    args = parser.parse_args()
    tok = load_tokenizer(args.tokenizer)
    old_limit = args.sequence_len + 1  # the last token is only a target
    new_limit = ROTARY_LENGTH_FACTOR * args.sequence_len + 1
    print(f"tokenizer {tok.name} (BOS {tok.bos_id}), sequence_len {args.sequence_len}: "
          f"cropped before = longer than {old_limit} tokens, now = longer than {new_limit}")
    print(f"| task | shots | examples | longest | cropped at {old_limit} | "
          f"cropped at {new_limit} |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in resolve_task_names(args.tasks):
        try:
            spec, items = load_task(name)
        except (FileNotFoundError, ValueError) as exc:
            print(f"| {name} | - | - | - | missing: {exc} | |")
            continue
        order = select_examples(len(items), args.max_examples)
        evaluated = [items[i] for i in order]
        longest = [max(len(s) for s in prepare_example(evaluated, pos, spec, tok).sequences)
                   for pos in range(len(order))]
        before = sum(n > old_limit for n in longest)
        after = sum(n > new_limit for n in longest)
        print(f"| {name} | {spec.num_fewshot} | {len(longest)} | {max(longest)} | "
              f"{before} ({100 * before / len(longest):.1f}%) | {after} |", flush=True)


if __name__ == "__main__":
    main()
