"""What an exported model's card says about its run, read from the run folder: the training
settings, the step and tokens trained, the validation BPB and the budget table of
`loopedlm eval` (CHECKPOINT/eval/results.json) when the run has one. The record is kept in
the exported folder (`loopedlm.json`), so exporting that folder again writes the same card."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def run_folder(model_folder: Path) -> Path | None:
    """The run a checkpoint folder belongs to (RUN/checkpoints/step_X -> RUN), if any."""
    if model_folder.parent.name == "checkpoints":
        return model_folder.parent.parent
    return None


def last_val_bpb(run: Path | None, step: int | None) -> tuple[float | None, int | None]:
    """(val BPB, its step): the last validation of RUN/log.jsonl at or before `step`."""
    path = None if run is None else run / "log.jsonl"
    if path is None or not path.is_file():
        return None, None
    found: tuple[float | None, int | None] = (None, None)
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        value, at = entry.get("val_bpb"), entry.get("step")
        if isinstance(value, int | float) and math.isfinite(value) and isinstance(at, int) \
                and (step is None or at <= step):
            found = (float(value), at)
    return found


def budget_results(model_folder: Path) -> dict[str, Any] | None:
    """`loopedlm eval`'s results.json for this checkpoint (its default output folder)."""
    path = model_folder / "eval" / "results.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        log.warning("%s is not readable JSON: the model card has no budget table", path)
        return None


def run_record(model_folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The record of the checkpoint in `model_folder` (`meta`: its config.json)."""
    train = meta.get("train") if isinstance(meta.get("train"), dict) else {}
    step = meta.get("step") if isinstance(meta.get("step"), int) else None
    batch = train.get("total_batch_tokens")
    val_bpb, val_step = last_val_bpb(run_folder(model_folder), step)
    return {
        "step": step,
        "tokens": step * batch if step is not None and isinstance(batch, int) else None,
        "train": train,
        "val_bpb": val_bpb,
        "val_bpb_step": val_step,
        "budget": budget_results(model_folder),
    }


__all__ = ["run_record"]
