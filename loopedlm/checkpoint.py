"""Saving and loading model weights: safetensors for tensors, JSON for everything else.

A *model folder* holds `model.safetensors` and `config.json` (`{"model": {...}, ...}`).
A run folder (see `loopedlm.train`) holds `checkpoints/step_XXXXXX/` model folders,
a `tokenizer/` folder and the resolved `config.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from loopedlm.config import ModelConfig
from loopedlm.model import LoopedGPT

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON so that a crash mid-write never leaves a truncated file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_model(folder: str | Path, model: LoopedGPT, meta: dict[str, Any] | None = None) -> Path:
    """Write `model.safetensors` and `config.json` into `folder` (created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = folder / (MODEL_FILE + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, folder / MODEL_FILE)
    atomic_write_json(folder / CONFIG_FILE, {"model": model.config.to_dict(), **(meta or {})})
    return folder


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete `checkpoints/step_*` folder of a run, or None."""
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step_*"))
    complete = [c for c in ckpts if (c / MODEL_FILE).exists() and (c / CONFIG_FILE).exists()]
    return complete[-1] if complete else None


def resolve_model_folder(path: str | Path) -> Path:
    """A model folder, or a run folder (its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if (path / MODEL_FILE).exists():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise ValueError(f"{path} is not a loopedlm run or checkpoint: it has no {MODEL_FILE} "
                         f"and no checkpoints/step_*/{MODEL_FILE}")
    return latest


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[LoopedGPT, dict[str, Any]]:
    """Load a model from a model folder or a run folder; returns (model, config.json dict)."""
    folder = resolve_model_folder(path)
    meta = json.loads((folder / CONFIG_FILE).read_text())
    if "model" not in meta:
        raise ValueError(f"{folder / CONFIG_FILE} has no 'model' section: not a loopedlm checkpoint")
    config = ModelConfig.from_dict(meta["model"])
    with torch.device("meta"):
        model = LoopedGPT(config)
    state = load_file(str(folder / MODEL_FILE), device=str(device))
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_rotary()
    model.eval()
    return model, meta


def find_tokenizer_dir(path: str | Path) -> Path | None:
    """The `tokenizer/` folder saved with a run (searched upwards from a checkpoint)."""
    path = Path(path).resolve()
    for candidate in [path, *path.parents][:4]:
        if (candidate / "tokenizer").is_dir():
            return candidate / "tokenizer"
    return None


# ---- training checkpoints (loopedlm.train) -------------------------------------------
TRAIN_STATE_FILE = "train_state.pt"  # optimizer + RNG tensors (torch.save; weights_only load)
TRAIN_META_FILE = "train_state.json"  # step, data-loader states, collapse detector
# tests: "SECONDS" or "SECONDS@STEP": sleep mid-save (of that step) so a test can kill -9 it
SAVE_SLEEP_ENV = "LOOPEDLM_TEST_SAVE_SLEEP"


def save_training_checkpoint(run_dir: str | Path, step: int, model: LoopedGPT, *,
                             meta: dict[str, Any], tensor_state: dict[str, Any],
                             json_state: dict[str, Any], keep_last: int | None = None) -> Path:
    """Write `RUN/checkpoints/step_XXXXXX/` atomically: everything goes into a hidden
    temporary folder that is renamed into place only when complete, so a crash while
    saving never damages the previous checkpoint. Then keep only the newest `keep_last`."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step_{step:06d}"
    if final.exists():
        return final
    tmp = ckpt_dir / f".tmp_step_{step:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(tmp, model, meta)
    torch.save(tensor_state, tmp / TRAIN_STATE_FILE)
    seconds, _, at_step = os.environ.get(SAVE_SLEEP_ENV, "").partition("@")
    if seconds and (not at_step or int(at_step) == step):
        time.sleep(float(seconds))
    atomic_write_json(tmp / TRAIN_META_FILE, json_state)
    os.rename(tmp, final)
    _fsync_dir(ckpt_dir)
    if keep_last is not None and keep_last > 0:
        for old in sorted(ckpt_dir.glob("step_*"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def latest_training_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run that holds the full training state, or None."""
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step_*"))
    complete = [c for c in ckpts if all((c / f).exists() for f in
                                        (MODEL_FILE, CONFIG_FILE, TRAIN_STATE_FILE, TRAIN_META_FILE))]
    return complete[-1] if complete else None


def load_training_state(folder: str | Path, device: str | torch.device = "cpu"
                        ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model state dict, tensor state, JSON state) of a training checkpoint."""
    folder = Path(folder)
    state = load_file(str(folder / MODEL_FILE), device=str(device))
    tensors = torch.load(folder / TRAIN_STATE_FILE, map_location=device, weights_only=True)
    meta = json.loads((folder / TRAIN_META_FILE).read_text())
    return state, tensors, meta
