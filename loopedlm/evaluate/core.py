"""The DCLM CORE evaluator (docs/design.md#evaluation): in-context tasks of three types, scored from logits.

An *item* is a dict whose fields depend on the task type (the DCLM / MosaicML eval-bundle
JSONL format):

- `multiple_choice`: `{"query", "choices": [...], "gold": int}`. The prompt for choice `c` is
  `query + delimiter + c`; each choice is scored by its mean token loss over the tokens where
  the choices differ (after their common token prefix); the lowest mean loss is the answer.
- `schema`: `{"context_options": [...], "continuation", "gold": int}`. Each context is scored
  by the mean loss of the shared continuation (the common token suffix).
- `language_modeling`: `{"context", "continuation"}`. Correct when greedy decoding reproduces
  the continuation exactly (argmax at every continuation position).

Which examples run, and their shots, follow nanochat's `base_eval` (the FLT authors' CORE
code): a task's items are shuffled with `random.Random(1337)` and cut to `max_examples` (all
of them when None); the example at position `i` of that list draws its few-shot examples
without replacement from the same list, never itself, with `random.Random(1234 + i)`. Shots
are joined by a blank line.
A task's accuracy becomes a *centered accuracy* `(acc - r) / (1 - r)` with `r` its random
baseline; CORE is the mean centered accuracy over the tasks.

Scoring is batched across examples: every sequence of every selected example is tokenized
first, then forwarded in length-sorted batches bounded by a logits budget.

Its parts: `items` (TaskSpec, the item format), `prompts` (example and few-shot selection,
templates, scored spans), `scoring` (batched scoring from logits), `bundle` (eval bundles on
disk); this module runs a task and computes CORE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from loopedlm.evaluate.items import TaskSpec
from loopedlm.evaluate.prompts import Prepared, prepare_example, select_examples
from loopedlm.evaluate.scoring import DEFAULT_LOGITS_BUDGET, score_sequences


def evaluate_task(model: Any, tokenizer: Any, spec: TaskSpec, items: Sequence[dict], *,
                  n_loops: int | None = None, max_examples: int | None = None,
                  device: str | torch.device = "cpu", max_len: int | None = None,
                  logits_budget: int = DEFAULT_LOGITS_BUDGET,
                  return_details: bool = False) -> dict[str, Any]:
    """Accuracy and centered accuracy of one task. Under torch.distributed the examples are
    split across ranks and the counts summed.

    `max_len` (tokens per scored sequence) defaults to what the model's RoPE table covers,
    `config.rotary_len` (10 x sequence_len) + 1: the last token is only a target. Longer
    sequences are cropped on the left; `truncated` counts the examples that were.
    """
    if len(items) == 0:
        raise ValueError(f"task {spec.name!r} has no items")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples={max_examples!r} must be >= 1 (or None for all)")
    if max_len is None:
        max_len = default_max_len(model)
    rank, world = _rank_world()
    order = select_examples(len(items), max_examples)
    evaluated = [items[i] for i in order]  # shots are drawn from this list, by position
    prepared = [prepare_example(evaluated, pos, spec, tokenizer, max_len)
                for pos in range(rank, len(order), world)]
    scores, greedy = _score_examples(model, tokenizer, prepared, n_loops=n_loops, device=device,
                                     logits_budget=logits_budget)
    outcomes = [_judge(spec, p, s, g) for p, s, g in zip(prepared, scores, greedy, strict=True)]
    correct = sum(int(ok) for ok, _ in outcomes)
    counts = [correct, len(prepared), sum(p.truncated for p in prepared)]
    correct_all, total, truncated = _sum_over_ranks(counts, device, world)
    result = _task_result(spec, len(items), correct_all, total, truncated, max_len)
    if return_details:
        details = [_detail(p, order, pred, ok, s)
                   for p, s, (ok, pred) in zip(prepared, scores, outcomes, strict=True)]
        result["details"] = sorted(details, key=lambda d: d["index"])  # in the items' order
    return result


def default_max_len(model: Any) -> int | None:
    """Tokens per scored sequence the model's RoPE table covers (`rotary_len`, else
    `sequence_len`) + 1, as the last token is only a target; None when the model says neither."""
    config = getattr(model, "config", None)
    positions = getattr(config, "rotary_len", None) or getattr(config, "sequence_len", None)
    return None if positions is None else positions + 1


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _score_examples(model: Any, tokenizer: Any, prepared: Sequence[Prepared], *,
                    n_loops: int | None, device: str | torch.device, logits_budget: int
                    ) -> tuple[list[list[float]], list[list[bool]]]:
    """Every sequence of every example scored in one batched pass; per example, the mean loss
    and the greedy match of each of its sequences."""
    flat_seqs, flat_starts, flat_ends = [], [], []
    for p in prepared:
        flat_seqs += p.sequences
        flat_starts += p.starts
        flat_ends += p.ends
    losses, greedy, _ = score_sequences(model, flat_seqs, flat_starts, flat_ends, n_loops=n_loops,
                                        device=device, logits_budget=logits_budget,
                                        vocab_size=getattr(tokenizer, "vocab_size", None))
    scores, matches, offset = [], [], 0
    for p in prepared:
        k = len(p.sequences)
        scores.append(losses[offset:offset + k])
        matches.append(greedy[offset:offset + k])
        offset += k
    return scores, matches


def _judge(spec: TaskSpec, prepared: Prepared, scores: Sequence[float],
           greedy: Sequence[bool]) -> tuple[bool, int | None]:
    """(correct, predicted choice) of one example; language modelling predicts no choice."""
    if spec.task_type == "language_modeling":
        return greedy[0], None
    pred = min(range(len(scores)), key=lambda j: scores[j])  # first lowest mean loss wins ties
    return pred == prepared.gold, pred


def _detail(prepared: Prepared, order: Sequence[int], pred: int | None, ok: bool,
            scores: Sequence[float]) -> dict[str, Any]:
    """One example's record, its indices into the task's items."""
    return {"index": order[prepared.index], "position": prepared.index,
            "fewshot": [order[i] for i in prepared.fewshot], "gold": prepared.gold,
            "pred": pred, "correct": bool(ok), "scores": [round(s, 6) for s in scores],
            "truncated": prepared.truncated}


def _sum_over_ranks(counts: Sequence[int], device: str | torch.device,
                    world: int) -> tuple[int, ...]:
    """The counts summed over the ranks (as they are without torch.distributed)."""
    summed = torch.tensor(counts, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(summed)
    return tuple(int(x) for x in summed.tolist())


def _task_result(spec: TaskSpec, n_available: int, correct: int, total: int, truncated: int,
                 max_len: int | None) -> dict[str, Any]:
    accuracy = correct / total
    return {
        "task": spec.name, "task_type": spec.task_type, "num_fewshot": spec.num_fewshot,
        "n": total, "n_available": n_available, "correct": correct, "accuracy": accuracy,
        "random_baseline": spec.random_baseline,
        "centered": centered_accuracy(accuracy, spec.random_baseline),
        "truncated": truncated, "max_len": max_len,
    }


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
    """DCLM's centered accuracy: 0 at the random baseline, 1 at perfect accuracy."""
    return (accuracy - random_baseline) / (1.0 - random_baseline)


def core_metric(task_results: dict[str, dict[str, Any]]) -> float:
    """CORE: the mean centered accuracy over the tasks that produced a result."""
    centered = [r["centered"] for r in task_results.values() if "centered" in r]
    return float(sum(centered) / len(centered)) if centered else math.nan
