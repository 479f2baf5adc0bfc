"""Preparing a training run, before any compute: every check that needs none (sequence
length, batch layout, run folder, the checkpoint to resume and its model), then the data
source, the tokenizer and the final model config."""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loopedlm.common.distributed import DistInfo, barrier, broadcast_object
from loopedlm.common.validation import ConfigError
from loopedlm.model.checkpoint import latest_training_checkpoint
from loopedlm.model.config import ModelConfig
from loopedlm.model.head_loss import check_head_backend
from loopedlm.train.config import TrainConfig
from loopedlm.train.inputs import ParquetData, resolve_tokenizer
from loopedlm.train.sizing import check_batch


@dataclass
class PreparedRun:
    """A checked run: what the trainer needs besides the model it builds."""

    cfg: TrainConfig
    info: DistInfo
    run_dir: Path
    seq_len: int
    grad_accum: int  # micro-batches per optimizer step
    resume_from: Path | None  # the checkpoint to resume, None for a fresh run
    data: Any
    tokenizer: Any
    model_cfg: ModelConfig


def prepare_run(cfg: TrainConfig, info: DistInfo, data=None, tokenizer=None) -> PreparedRun:
    """Check `cfg` against the run folder and resolve the data and tokenizer (`data` and
    `tokenizer` replace the config's when given; see `train()`)."""
    draft = cfg.model_config()
    seq_len = cfg.sequence_len or draft.sequence_len
    if seq_len > draft.sequence_len:
        raise ConfigError(f"sequence_len={seq_len} is longer than the model's "
                          f"sequence_len={draft.sequence_len}: at most that")
    grad_accum = check_batch(cfg, seq_len, info.world_size)
    check_head_backend(cfg.head_loss, info.device)  # cce: CUDA and an importable package
    run_dir = _new_run_dir(cfg, info)
    resume_from = _resume_checkpoint(cfg, run_dir)
    if resume_from is not None:
        saved_model = json.loads((resume_from / "config.json").read_text())["model"]
        _check_same_model(run_dir, draft, saved_model, compare_vocab=False)
    if data is None:
        data = _default_data(cfg, info)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    if tokenizer is None:
        tokenizer = resolve_tokenizer(cfg.tokenizer, draft.vocab_size, data, run_dir, info)
    model_cfg = cfg.model_config(vocab_size=tokenizer.vocab_size)
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the "
                          f"tokenizer's {tokenizer.vocab_size}")
    if resume_from is not None:
        _check_same_model(run_dir, model_cfg, saved_model, compare_vocab=True)
    return PreparedRun(cfg=cfg, info=info, run_dir=run_dir, seq_len=seq_len,
                       grad_accum=grad_accum, resume_from=resume_from, data=data,
                       tokenizer=tokenizer, model_cfg=model_cfg)


def _new_run_dir(cfg: TrainConfig, info: DistInfo) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    return Path(broadcast_object(f"runs/{cfg.preset}-{datetime.datetime.now():%Y%m%d-%H%M%S}",
                                 info))


def _resume_checkpoint(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """The newest intact checkpoint with `resume` (an error when there is none); without
    `resume`, a run folder that already holds checkpoints is an error."""
    if not cfg.resume:
        if any((run_dir / "checkpoints").glob("step_*")):
            raise ValueError(f"run_dir={str(run_dir)!r} already holds checkpoints: pass "
                             "--resume to continue it or choose another run_dir")
        return None
    found = latest_training_checkpoint(run_dir)
    if found is None:
        raise FileNotFoundError(f"resume=true but {run_dir}/checkpoints holds no "
                                "complete training checkpoint")
    return found


def _default_data(cfg: TrainConfig, info: DistInfo) -> ParquetData:
    # rank 0 prepares the bundled corpus (if needed) before the others look at it
    data = ParquetData(cfg.data_dir) if info.is_main else None
    barrier()
    return data or ParquetData(cfg.data_dir)


def _check_same_model(run_dir: Path, model_cfg: ModelConfig, saved: dict[str, Any],
                      compare_vocab: bool) -> None:
    mine = model_cfg.to_dict()
    diff = [f"{k}: checkpoint {saved.get(k)!r} != config {mine[k]!r}" for k in mine
            if mine[k] != saved.get(k) and (compare_vocab or k != "vocab_size")]
    if diff:
        raise ConfigError(f"cannot resume {run_dir}: the model config differs from the "
                          f"checkpoint's ({'; '.join(diff)})")


__all__ = ["PreparedRun", "prepare_run"]
