"""Eval bundles on disk: ours (`tasks.json` + one JSONL file of items per task) and DCLM /
nanochat's layout (`core.yaml` + `eval_data/*.jsonl` + `eval_meta_data.csv`)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from loopedlm.evaluate.items import TaskSpec, validate_item

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
