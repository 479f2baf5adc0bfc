"""From CORE items to scored token sequences: which examples run, their few-shot examples,
the prompt templates, and the span of each sequence that is scored.

Which examples run, and their shots, follow nanochat's `base_eval` (the FLT authors' CORE
code): a task's items are shuffled with `random.Random(1337)` and cut to `max_examples` (all
of them when None); the example at position `i` of that list draws its few-shot examples
without replacement from the same list, never itself, with `random.Random(1234 + i)`. Shots
are joined by a blank line.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from loopedlm.evaluate.items import TaskSpec

FEWSHOT_SEED = 1234  # nanochat: random.Random(1234 + position) picks an example's shots
SUBSAMPLE_SEED = 1337  # nanochat shuffles a task's items with 1337 before cutting them


@dataclass
class Prepared:
    """The token sequences of one example and the span of each that is scored."""

    index: int
    sequences: list[list[int]]
    starts: list[int]  # first scored token of each sequence
    ends: list[int]  # one past the last scored token
    gold: int = 0
    truncated: bool = False
    fewshot: list[int] = field(default_factory=list)  # indices (into `items`) of the shots
    extra: dict[str, Any] = field(default_factory=dict)



def select_examples(n_items: int, max_examples: int | None) -> list[int]:
    """Indices of the items evaluated, in nanochat's order: all items shuffled with
    `random.Random(1337)`, then the first `max_examples` (all when None)."""
    indices = list(range(n_items))
    random.Random(SUBSAMPLE_SEED).shuffle(indices)
    return indices if max_examples is None else indices[:max_examples]


def render_prompts(item: dict, spec: TaskSpec, fewshot: Sequence[dict] = ()) -> list[str]:
    """The prompt strings of one example (DCLM templates).

    multiple_choice: one per choice; schema: one per context option; language_modeling:
    `[prompt without continuation (stripped), prompt with continuation]`.
    """
    delim = spec.continuation_delimiter
    if spec.task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{delim}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{delim}{choice}" for choice in item["choices"]]
    if spec.task_type == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{delim}{ex['continuation']}\n\n"
                        for ex in fewshot)
        return [f"{shots}{context}{delim}{item['continuation']}"
                for context in item["context_options"]]
    # language modelling: contexts are trimmed, as some datasets store trailing whitespace
    shots = "".join(f"{ex['context'].strip()}{delim}{ex['continuation']}\n\n" for ex in fewshot)
    without = f"{shots}{item['context'].strip()}{delim}"
    return [without.strip(), without + item["continuation"]]


def sample_fewshot(n_items: int, index: int, num_fewshot: int) -> list[int]:
    """Positions of the few-shot examples of the example at position `index` of the evaluated
    list of `n_items` (nanochat: `Random(1234 + index).sample` of the other positions, no
    replacement, never the example itself). A list too short for `num_fewshot` gives all
    the others (nanochat would raise)."""
    k = min(num_fewshot, n_items - 1)
    if k <= 0:
        return []
    rng = random.Random(FEWSHOT_SEED + index)
    return rng.sample([i for i in range(n_items) if i != index], k)


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix shared by all sequences."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def common_suffix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the token suffix shared by all sequences."""
    return common_prefix_length([list(reversed(s)) for s in seqs])


def prepare_example(items: Sequence[dict], index: int, spec: TaskSpec, tokenizer: Any,
                    max_len: int | None = None) -> Prepared:
    """Tokenize example `index` of `items` (BOS first) and find the scored span of each
    sequence. Its shots come from `items` (`sample_fewshot`): pass the evaluated list.

    Sequences longer than `max_len` are cropped on the left (the few-shot context goes first).
    """
    item = items[index]
    shot_indices = sample_fewshot(len(items), index, spec.num_fewshot)
    fewshot = [items[i] for i in shot_indices]
    prompts = render_prompts(item, spec, fewshot)
    bos = tokenizer.bos_id
    encoded = [[bos, *ids] for ids in tokenizer.encode_batch(prompts)]
    gold = int(item.get("gold", 0))
    if spec.task_type == "multiple_choice":
        # every choice keeps at least one scored token, even when one choice's tokens are a
        # prefix of another's (e.g. "5" and "50")
        start = min(common_prefix_length(encoded), min(len(s) for s in encoded) - 1)
        seqs, starts, ends = encoded, [start] * len(encoded), [len(s) for s in encoded]
    elif spec.task_type == "schema":
        suffix = min(common_suffix_length(encoded), min(len(s) for s in encoded) - 1)
        suffix = max(suffix, 1)
        seqs, starts, ends = encoded, [len(s) - suffix for s in encoded], [len(s) for s in encoded]
    else:
        without, with_ = encoded
        if len(without) < len(with_) and with_[:len(without)] == without:
            seq = with_
        else:
            # BPE merged across the boundary: encode the continuation on its own instead
            remainder = prompts[1][len(prompts[0]):]
            seq = without + tokenizer.encode(remainder)
        seqs, starts, ends = [seq], [len(without)], [len(seq)]
    truncated = False
    if max_len is not None:
        cropped = []
        for i, seq in enumerate(seqs):
            crop = len(seq) - max_len
            if crop > 0:
                truncated = True
                cropped.append(seq[crop:])
                starts[i] = max(starts[i] - crop, 1)
                ends[i] -= crop
            else:
                cropped.append(seq)
        seqs = cropped
    return Prepared(index, seqs, starts, ends, gold, truncated, shot_indices)
