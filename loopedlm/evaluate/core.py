"""The DCLM CORE evaluator (SPEC 7): in-context tasks of three types, scored from logits.

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
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

logger = logging.getLogger(__name__)

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
FEWSHOT_SEED = 1234  # nanochat: random.Random(1234 + position) picks an example's shots
SUBSAMPLE_SEED = 1337  # nanochat shuffles a task's items with 1337 before cutting them
# Logits held at once by one batch (floats); 2**27 floats = 512 MB of fp32.
DEFAULT_LOGITS_BUDGET = 2**27


@dataclass(frozen=True)
class TaskSpec:
    """How one CORE task is run: its type, shots, delimiter and random baseline (a fraction)."""

    name: str
    task_type: str
    num_fewshot: int = 0
    continuation_delimiter: str = " "
    random_baseline: float = 0.0
    source: str = ""
    baseline_source: str = ""

    def __post_init__(self) -> None:
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"task {self.name!r}: task_type={self.task_type!r} is not allowed: "
                             f"choose one of {list(TASK_TYPES)}")
        if not isinstance(self.num_fewshot, int) or self.num_fewshot < 0:
            raise ValueError(f"task {self.name!r}: num_fewshot={self.num_fewshot!r} must be an "
                             f"integer >= 0")
        if not 0.0 <= self.random_baseline < 1.0:
            raise ValueError(f"task {self.name!r}: random_baseline={self.random_baseline!r} must "
                             f"be a fraction in [0, 1)")


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


# ---- items ----------------------------------------------------------------------------------

def validate_item(item: Any, task_type: str, where: str = "") -> None:
    """Raise ValueError naming the task/line when `item` lacks what its task type needs."""
    def fail(msg: str) -> None:
        raise ValueError(f"{where or 'item'}: {msg} (item: {str(item)[:120]})")

    if not isinstance(item, dict):
        fail("an item must be a JSON object")
    if task_type == "multiple_choice":
        choices = item.get("choices")
        if not isinstance(item.get("query"), str):
            fail("multiple_choice needs a string 'query'")
        if not isinstance(choices, list) or len(choices) < 2 or not all(
                isinstance(c, str) for c in choices):
            fail("multiple_choice needs 'choices': a list of at least 2 strings")
        _check_gold(item, len(choices), fail)
    elif task_type == "schema":
        options = item.get("context_options")
        if not isinstance(options, list) or len(options) < 2 or not all(
                isinstance(c, str) for c in options):
            fail("schema needs 'context_options': a list of at least 2 strings")
        if not isinstance(item.get("continuation"), str):
            fail("schema needs a string 'continuation'")
        _check_gold(item, len(options), fail)
    elif task_type == "language_modeling":
        if not isinstance(item.get("context"), str) or not isinstance(
                item.get("continuation"), str) or not item["continuation"].strip():
            fail("language_modeling needs string 'context' and non-empty 'continuation'")
    else:
        raise ValueError(f"task_type={task_type!r} is not allowed: choose one of {list(TASK_TYPES)}")


def _check_gold(item: dict, n: int, fail: Callable[[str], None]) -> None:
    gold = item.get("gold")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < n:
        fail(f"'gold' must be an integer in [0, {n})")


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


# ---- scoring --------------------------------------------------------------------------------

@torch.no_grad()
def score_sequences(model: Any, sequences: Sequence[Sequence[int]], starts: Sequence[int],
                    ends: Sequence[int], *, n_loops: int | None = None,
                    device: str | torch.device = "cpu",
                    logits_budget: int = DEFAULT_LOGITS_BUDGET,
                    vocab_size: int | None = None) -> tuple[list[float], list[bool], list[float]]:
    """For each sequence: mean token loss over `[start, end)`, whether greedy argmax
    reproduces those tokens exactly, and their summed log-probability.

    Sequences are sorted by length and right-padded (padding never influences earlier
    positions in a causal model) into batches of at most `logits_budget` logits. The last
    token is never an input (nothing is predicted from it), so a sequence may hold one token
    more than the model takes (`config.rotary_len + 1` for a LoopedGPT).
    """
    n = len(sequences)
    if n == 0:
        return [], [], []
    for s, b, e in zip(sequences, starts, ends, strict=True):
        if not 1 <= b < e <= len(s):
            raise ValueError(f"scored span [{b}, {e}) is not inside a sequence of {len(s)} "
                             f"tokens (position 0 has no prediction)")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or vocab_size or 1
    order = sorted(range(n), key=lambda i: -len(sequences[i]))
    mean_loss, greedy, logprob = [0.0] * n, [False] * n, [0.0] * n
    pos = 0
    while pos < n:
        longest = len(sequences[order[pos]])
        per_batch = max(1, logits_budget // max(1, longest * vocab))
        batch = order[pos:pos + per_batch]
        pos += len(batch)
        idx = torch.zeros(len(batch), longest, dtype=torch.long)
        for row, i in enumerate(batch):
            idx[row, :len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
        idx = idx.to(device)
        kwargs = {} if n_loops is None else {"n_loops": n_loops}
        logits = model(idx[:, :-1], **kwargs).float()  # position t predicts token t + 1
        losses = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten(),
                                 reduction="none").view(len(batch), longest - 1)
        hits = logits.argmax(-1) == idx[:, 1:]
        for row, i in enumerate(batch):
            span = slice(starts[i] - 1, ends[i] - 1)
            row_losses = losses[row, span]
            mean_loss[i] = float(row_losses.mean())
            logprob[i] = -float(row_losses.sum())
            greedy[i] = bool(hits[row, span].all())
    return mean_loss, greedy, logprob


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def select_examples(n_items: int, max_examples: int | None) -> list[int]:
    """Indices of the items evaluated, in nanochat's order: all items shuffled with
    `random.Random(1337)`, then the first `max_examples` (all when None)."""
    indices = list(range(n_items))
    random.Random(SUBSAMPLE_SEED).shuffle(indices)
    return indices if max_examples is None else indices[:max_examples]


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
        config = getattr(model, "config", None)
        positions = getattr(config, "rotary_len", None) or getattr(config, "sequence_len", None)
        max_len = None if positions is None else positions + 1
    rank, world = _rank_world()
    order = select_examples(len(items), max_examples)
    evaluated = [items[i] for i in order]  # shots are drawn from this list, by position
    prepared = [prepare_example(evaluated, pos, spec, tokenizer, max_len)
                for pos in range(rank, len(order), world)]
    flat_seqs, flat_starts, flat_ends = [], [], []
    for p in prepared:
        flat_seqs += p.sequences
        flat_starts += p.starts
        flat_ends += p.ends
    losses, greedy, _ = score_sequences(model, flat_seqs, flat_starts, flat_ends, n_loops=n_loops,
                                        device=device, logits_budget=logits_budget,
                                        vocab_size=getattr(tokenizer, "vocab_size", None))
    correct, details, offset = 0, [], 0
    for p in prepared:
        k = len(p.sequences)
        scores = losses[offset:offset + k]
        if spec.task_type == "language_modeling":
            ok, pred = greedy[offset], None
        else:
            pred = min(range(k), key=lambda j: scores[j])  # first lowest mean loss wins ties
            ok = pred == p.gold
        offset += k
        correct += int(ok)
        if return_details:
            details.append({"index": order[p.index], "position": p.index,
                            "fewshot": [order[i] for i in p.fewshot], "gold": p.gold,
                            "pred": pred, "correct": bool(ok),
                            "scores": [round(s, 6) for s in scores],
                            "truncated": p.truncated})
    counts = torch.tensor([correct, len(prepared), sum(p.truncated for p in prepared)],
                          dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(counts)
    correct_all, total, truncated = (int(x) for x in counts.tolist())
    accuracy = correct_all / total
    result = {
        "task": spec.name, "task_type": spec.task_type, "num_fewshot": spec.num_fewshot,
        "n": total, "n_available": len(items), "correct": correct_all, "accuracy": accuracy,
        "random_baseline": spec.random_baseline,
        "centered": centered_accuracy(accuracy, spec.random_baseline),
        "truncated": truncated, "max_len": max_len,
    }
    if return_details:
        result["details"] = sorted(details, key=lambda d: d["index"])  # in the items' order
    return result


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
    """DCLM's centered accuracy: 0 at the random baseline, 1 at perfect accuracy."""
    return (accuracy - random_baseline) / (1.0 - random_baseline)


def core_metric(task_results: dict[str, dict[str, Any]]) -> float:
    """CORE: the mean centered accuracy over the tasks that produced a result."""
    centered = [r["centered"] for r in task_results.values() if "centered" in r]
    return float(sum(centered) / len(centered)) if centered else math.nan


# ---- eval bundles on disk ------------------------------------------------------------------

BUNDLE_INDEX = "tasks.json"


def read_jsonl(path: str | Path, task_type: str, task: str = "") -> list[dict]:
    """Items of one task from a JSONL file, each validated for `task_type`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task {task or path.stem!r}: data file {path} does not exist")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            validate_item(item, task_type, f"{path}:{lineno}")
            items.append(item)
    if not items:
        raise ValueError(f"task {task or path.stem!r}: {path} holds no items")
    return items


def write_bundle(directory: str | Path, tasks: Sequence[tuple[TaskSpec, Sequence[dict]]]) -> Path:
    """Write tasks as an eval bundle: `tasks.json` (the task list) + `data/<name>.jsonl`."""
    directory = Path(directory)
    (directory / "data").mkdir(parents=True, exist_ok=True)
    index = []
    for spec, items in tasks:
        rel = f"data/{spec.name}.jsonl"
        with open(directory / rel, "w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
        index.append({**asdict(spec), "dataset_uri": rel})
    (directory / BUNDLE_INDEX).write_text(json.dumps(index, indent=2))
    return directory


def load_bundle(directory: str | Path) -> list[tuple[TaskSpec, list[dict]]]:
    """Read an eval bundle: ours (`tasks.json` + JSONL) or DCLM/nanochat's layout
    (`core.yaml` + `eval_data/*.jsonl` + `eval_meta_data.csv` for the random baselines)."""
    directory = Path(directory)
    if (directory / BUNDLE_INDEX).is_file():
        entries = json.loads((directory / BUNDLE_INDEX).read_text())
        out = []
        for e in entries:
            spec = TaskSpec(**{k: v for k, v in e.items() if k != "dataset_uri"})
            out.append((spec, read_jsonl(directory / e["dataset_uri"], spec.task_type, spec.name)))
        return out
    if (directory / "core.yaml").is_file():
        return _load_dclm_bundle(directory)
    raise FileNotFoundError(f"{directory} is not an eval bundle: it has neither {BUNDLE_INDEX} "
                            f"nor core.yaml")


def _load_dclm_bundle(directory: Path) -> list[tuple[TaskSpec, list[dict]]]:
    import yaml  # only this layout needs it

    config = yaml.safe_load((directory / "core.yaml").read_text())
    baselines: dict[str, float] = {}
    meta = directory / "eval_meta_data.csv"
    if meta.is_file():
        with open(meta, encoding="utf-8") as f:
            for row in csv.DictReader(f):
                baselines[row["Eval Task"]] = float(row["Random baseline"]) / 100.0
    out = []
    for task in config["icl_tasks"]:
        shots = task.get("num_fewshot", [0])
        spec = TaskSpec(name=task["label"], task_type=task["icl_task_type"],
                        num_fewshot=int(shots[0] if isinstance(shots, list) else shots),
                        continuation_delimiter=task.get("continuation_delimiter", " "),
                        random_baseline=baselines.get(task["label"], 0.0),
                        source=f"{directory}/core.yaml", baseline_source=str(meta))
        data = directory / "eval_data" / task["dataset_uri"]
        out.append((spec, read_jsonl(data, spec.task_type, spec.name)))
    return out
