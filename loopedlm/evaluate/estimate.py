"""How long a budget evaluation will take, said before it starts (issue 21: the README's
`eval RUN --n-loops 1,3,6,9,12` ran for hours on a CPU without a word).

The tokens it will score at each loop count are counted from the tasks themselves (a few
examples of each, tokenized with their few-shot prompts exactly as they will be scored,
times the examples that run) plus the validation tokens; the model's speed is measured on
a batch at the smallest loop count and one more (compute grows linearly with the loops),
and the two give the estimate: a rough figure (prompt lengths vary, the first
batches warm up), meant to tell minutes from hours.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loopedlm.evaluate.core import default_max_len
from loopedlm.evaluate.loading import EvalTarget, val_settings
from loopedlm.evaluate.prompts import prepare_example, select_examples
from loopedlm.evaluate.scoring import score_sequences
from loopedlm.evaluate.tasks import load_task

SAMPLED_EXAMPLES = 8  # per task, to measure its prompt lengths
# sequences x tokens timed at each probed loop count: smaller batches are dominated by
# per-call costs that the evaluation's large batches do not pay
PROBE_SHAPE = (32, 128)


@dataclass(frozen=True)
class Estimate:
    """The tokens an evaluation scores at each loop count, and the seconds it should take."""

    tokens_per_loop_count: int
    seconds: float

    def describe(self) -> str:
        return (f"about {format_duration(self.seconds)} "
                f"({self.tokens_per_loop_count / 1e6:.2f}M tokens scored at each loop count)")


def format_duration(seconds: float) -> str:
    """"45 s", "12 min", "3 h 20 min"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def task_tokens(tokenizer: Any, spec: Any, items: Sequence[dict], max_examples: int | None,
                max_len: int | None) -> int:
    """About how many tokens scoring the task takes: the mean over a few of its examples
    (every sequence, few-shot prompt included) times the examples that run."""
    order = select_examples(len(items), max_examples)
    evaluated = [items[i] for i in order]
    step = max(1, len(order) // SAMPLED_EXAMPLES)
    sampled = range(0, len(order), step)[:SAMPLED_EXAMPLES]
    sizes = [sum(len(s) for s in prepare_example(evaluated, pos, spec, tokenizer,
                                                  max_len).sequences) for pos in sampled]
    return round(statistics.fmean(sizes) * len(order)) if sizes else 0


def seconds_per_token(model: Any, loops: Sequence[int], *, device: Any = "cpu",
                      vocab_size: int | None = None) -> dict[int, float]:
    """Seconds per scored token at each loop count: a batch of PROBE_SHAPE timed at the
    smallest loop count N and at N + 1 (after a small warm-up), and a line through the two
    (the loops cost alike; the embedding and the head are the rest). Probing at N + 1 rather
    than at the largest N keeps the probe short for a large model."""
    batch, length = PROBE_SHAPE
    max_len = default_max_len(model)
    if max_len is not None:
        length = min(length, max_len)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or vocab_size or 2

    def timed(n: int, rows: int = batch) -> float:
        seqs = [[(7 * i + 3 * j) % (vocab - 1) + 1 for j in range(length)] for i in range(rows)]
        start = time.perf_counter()
        score_sequences(model, seqs, [1] * rows, [length] * rows, n_loops=n, device=device,
                        vocab_size=vocab_size)
        if str(device).startswith("cuda"):  # the estimate, not a hot path: sync once
            import torch

            torch.cuda.synchronize()
        return (time.perf_counter() - start) / (rows * length)

    low = min(loops)
    timed(low, rows=2)  # warm-up: first-call allocations and kernels
    at_low = timed(low)
    if max(loops) == low:  # one loop count (an external model has no other)
        return {low: at_low}
    per_loop = max(timed(low + 1) - at_low, 0.0)
    return {n: at_low + per_loop * (n - low) for n in loops}


def estimate_evaluation(model: Any, tokenizer: Any, loops: Sequence[int],
                        tasks: dict[str, tuple[Any, Sequence[dict]]], *,
                        max_examples: int | None, val_tokens: int = 0,
                        device: Any = "cpu") -> Estimate:
    """The estimate of `evaluate_budget` over `tasks` (name -> (spec, items)) and
    `val_tokens` validation tokens at every loop count of `loops`."""
    max_len = default_max_len(model)
    tokens = val_tokens + sum(task_tokens(tokenizer, spec, items, max_examples, max_len)
                              for spec, items in tasks.values())
    per_token = seconds_per_token(model, loops, device=device,
                                  vocab_size=getattr(tokenizer, "vocab_size", None))
    return Estimate(tokens, sum(tokens * per_token[n] for n in loops))


def estimate_target(target: EvalTarget, tasks: Sequence[str], *, max_examples: int | None,
                    batch_size: int | None, val_batches: int | None) -> Estimate:
    """The estimate of `run_budget_evaluation` with these settings (tasks that cannot be
    loaded are left out: the evaluation itself records why)."""
    loaded = {}
    for name in tasks:
        try:
            loaded[name] = load_task(name)
        except (ValueError, FileNotFoundError, OSError):
            continue
    val_tokens = 0
    if target.data_dir is not None:
        val = val_settings(target.meta, target.model, batch_size, val_batches)
        seq_len = val["val_seq_len"] or target.model.config.sequence_len
        val_tokens = val["val_batches"] * val["val_batch_size"] * seq_len
    return estimate_evaluation(target.model, target.tokenizer, target.loops, loaded,
                               max_examples=max_examples, val_tokens=val_tokens,
                               device=target.device)
