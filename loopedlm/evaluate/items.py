"""CORE task items (the DCLM / MosaicML eval-bundle JSONL format) and the `TaskSpec` that says
how a task runs. An item's fields depend on the task type:

- `multiple_choice`: `{"query", "choices": [...], "gold": int}`.
- `schema`: `{"context_options": [...], "continuation", "gold": int}`.
- `language_modeling`: `{"context", "continuation"}`.

`loopedlm.evaluate.core` says how each type is scored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loopedlm.common.validation import is_int

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")


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
    if not is_int(gold) or not 0 <= gold < n:
        fail(f"'gold' must be an integer in [0, {n})")
