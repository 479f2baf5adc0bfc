"""Loading a run for evaluation: its training data and the validation settings its own
evaluation used (shared by `loopedlm eval`, the lm-eval adapter and the benchmarks); and
`load_eval_target`, what `loopedlm eval` evaluates: a run (`loopedlm.data.runs.load_run`),
a checkpoint or an external model, on the chosen device."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loopedlm.common.distributed import resolve_device
from loopedlm.data.runs import load_run
from loopedlm.evaluate.external import load_external, model_kind
from loopedlm.evaluate.tasks import EVAL_BATCH_SIZE, EVAL_VAL_BATCHES

logger = logging.getLogger(__name__)


def _find_key(data: Any, key: str) -> Any:
    """The first value stored under `key` anywhere in a nested JSON object."""
    if isinstance(data, dict):
        if key in data:
            return data[key]
        for value in data.values():
            found = _find_key(value, key)
            if found is not None:
                return found
    return None


def run_data_dir(model_folder: Path, meta: dict[str, Any]) -> Path | None:
    """The training data folder recorded with the run ("" means the bundled corpus)."""
    configs = [meta]
    for folder in [model_folder, *model_folder.parents][:3]:
        if (folder / "config.json").is_file():
            try:
                configs.append(json.loads((folder / "config.json").read_text()))
            except json.JSONDecodeError:
                continue
    for config in configs:
        value = _find_key(config, "data_dir")
        if value is not None:
            from loopedlm.data.synthetic import synthetic_spec_dir

            if value and synthetic_spec_dir(value) is not None:
                return synthetic_spec_dir(value)
            if value:
                return Path(value)
            from loopedlm.data.corpus import default_data_dir
            return default_data_dir()
    return None


def val_settings(meta: dict[str, Any], model: Any, batch_size: int | None,
                 val_batches: int | None) -> dict[str, Any]:
    """How to read the validation split: by default the batches that training measured
    (the run's device_batch_size x sequence_len, eval_tokens of them), so `eval` and
    `train` report the same val_bpb for a checkpoint; else EVAL_VAL_BATCHES batches of
    EVAL_BATCH_SIZE sequences."""
    train = meta.get("train") if isinstance(meta.get("train"), dict) else {}
    if batch_size is None and val_batches is None and train.get("eval_tokens"):
        size = int(train.get("device_batch_size") or EVAL_BATCH_SIZE)
        seq_len = int(train.get("sequence_len") or model.config.sequence_len)
        return {"val_batch_size": size, "val_seq_len": seq_len,
                "val_batches": max(1, int(train["eval_tokens"]) // (size * seq_len)),
                "batch_size": EVAL_BATCH_SIZE}
    batch_size = batch_size or EVAL_BATCH_SIZE
    return {"val_batch_size": batch_size, "val_seq_len": None,
            "val_batches": val_batches or EVAL_VAL_BATCHES, "batch_size": batch_size}


@dataclass
class EvalTarget:
    """A model ready for `loopedlm eval`: its loop counts, validation data and output folder."""

    model: Any
    tokenizer: Any
    folder: Path  # the model folder (or the external model's path)
    meta: dict[str, Any]
    loops: list[int]
    device: str
    data_dir: Path | None  # None: no validation split to measure
    default_out: Path


def load_eval_target(path: str | Path, loops: list[int], *, device: str = "auto",
                     tokenizer: str | None = None, data_dir: str | Path | None = None,
                     loops_given: bool = True) -> EvalTarget:
    """Load a run or checkpoint folder, or an external causal LM (a Hugging Face folder or a
    .gguf file: no loops, so evaluated once at N=1; warns when other loop counts were given,
    `loops_given`), on `device` ("auto": the GPU when there is one). The validation data is
    `data_dir`, else the run's; a folder that does not exist is skipped with a warning."""
    device = str(resolve_device(device))
    if model_kind(path) == "loopedlm":
        model, tok, folder, meta = load_run(path, device, tokenizer)
        data = Path(data_dir) if data_dir else run_data_dir(folder, meta)
        default_out = folder / "eval"
    else:  # a Hugging Face folder or a .gguf file: no loops, one column
        if loops_given and loops != [1]:
            logger.warning("%s is not a looped model: evaluating it once (N=1), not at N=%s",
                           path, loops)
        if tokenizer is not None:
            logger.warning("--tokenizer is ignored: %s brings its own tokenizer", path)
        loops = [1]
        model, tok = load_external(path, device)
        folder, meta = Path(path), {}
        data = Path(data_dir) if data_dir else None
        default_out = Path(f"eval_{folder.stem}")
    if data is not None and not data.exists():
        logger.warning("validation data %s not found: skipping val_bpb/val_ppl", data)
        data = None
    return EvalTarget(model, tok, folder, meta, loops, device, data, default_out)
