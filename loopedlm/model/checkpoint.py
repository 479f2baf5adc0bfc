"""Saving and loading model weights: safetensors for tensors, JSON for everything else.

A *model folder* holds `model.safetensors` and `config.json` (`{"model": {...}, ...}`),
and `manifest.json`, written last: the size and sha256 of every other file. Loading
verifies the manifest, so a truncated or altered file is one clear `CheckpointError`
naming the file, and a run folder falls back to its newest intact checkpoint.
A run folder (see `loopedlm.train.trainer`) holds `checkpoints/step_XXXXXX/` model folders,
a `tokenizer/` folder and the resolved `config.json`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from loopedlm.common.files import atomic_write_json, fsync_dir, sha256_file
from loopedlm.model.config import ModelConfig
from loopedlm.model.gpt import LoopedGPT, tied_keys
from loopedlm.model.hf_folder import MODEL_TYPE, exported_meta
from loopedlm.model.public import load_public_model, public_config, public_model_type

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"  # {"files": {name: {"size", "sha256"}}}, written last
MODEL_FILES = (MODEL_FILE, CONFIG_FILE)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (damaged, incomplete, or not a checkpoint);
    the message is one line naming the file and the fault."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (e.g. a full disk); the previous one is intact."""


def write_manifest(folder: str | Path, names: tuple[str, ...] | list[str]) -> None:
    """Record the size and sha256 of `names` in `folder/manifest.json` (call it last)."""
    folder = Path(folder)
    files = {name: {"size": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
             for name in names}
    atomic_write_json(folder / MANIFEST_FILE, {"format": 1, "files": files})


def verify_checkpoint(folder: str | Path, required: tuple[str, ...] = MODEL_FILES) -> None:
    """Check that `required` files exist and match the manifest (sizes, then hashes).

    Raises CheckpointError with one line naming the file and the fault. A folder without
    a manifest (written before loopedlm had them) is accepted unverified.
    """
    folder = Path(folder)
    for name in required:
        if not (folder / name).is_file():
            raise CheckpointError(f"checkpoint {folder} is damaged: {name} is missing")
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.exists():
        log.debug("%s has no %s (saved by an older loopedlm): loaded without verifying",
                  folder, MANIFEST_FILE)
        return
    try:
        files = json.loads(manifest_path.read_text())["files"]
        entries = {name: (int(e["size"]), str(e["sha256"])) for name, e in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {folder} is damaged: {MANIFEST_FILE} is unreadable "
                              f"({type(exc).__name__}: {exc})") from None
    for name in required:
        if name not in entries:
            raise CheckpointError(f"checkpoint {folder} is damaged: {name} is not in its "
                                  f"{MANIFEST_FILE}")
    for name, (size, sha) in entries.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is damaged: {name} is missing")
        actual = path.stat().st_size
        if actual != size:
            fault = "truncated" if actual < size else "longer than saved"
            raise CheckpointError(f"checkpoint {folder} is damaged: {name} has {actual} bytes, "
                                  f"its manifest says {size} ({fault})")
        if sha256_file(path) != sha:
            raise CheckpointError(f"checkpoint {folder} is damaged: {name} does not match its "
                                  f"sha256 in {MANIFEST_FILE} (the file changed after saving)")


_warned: set[str] = set()  # each fallback is reported once per process


def _newest_intact(folders: list[Path], required: tuple[str, ...]) -> Path | None:
    """The newest of `folders` that passes `verify_checkpoint`; a warning names each damaged
    one skipped. Raises the newest's error when all are damaged."""
    damaged: list[CheckpointError] = []
    for folder in reversed(folders):
        try:
            verify_checkpoint(folder, required)
        except CheckpointError as exc:
            damaged.append(exc)
            continue
        for exc in damaged:
            line = f"{exc}: using {folder.name}, the newest intact checkpoint"
            if line not in _warned:
                _warned.add(line)
                log.warning("%s", line)
        return folder
    if damaged:
        raise CheckpointError(f"no intact checkpoint in {folders[0].parent}: {damaged[0]}")
    return None



def save_model(folder: str | Path, model: LoopedGPT, meta: dict[str, Any] | None = None, *,
               manifest: bool = True) -> Path:
    """Write `model.safetensors` and `config.json` into `folder` (created if needed), then
    (unless `manifest=False`, for a caller that adds files first) `manifest.json`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST_FILE).unlink(missing_ok=True)  # the files are about to change
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if k not in tied_keys(model.config)}
    tmp = folder / (MODEL_FILE + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, folder / MODEL_FILE)
    atomic_write_json(folder / CONFIG_FILE, {"model": model.config.to_dict(), **(meta or {})})
    if manifest:
        write_manifest(folder, MODEL_FILES)
    return folder


def _step_folders(run_dir: str | Path) -> list[Path]:
    return sorted(p for p in (Path(run_dir) / "checkpoints").glob("step_*") if p.is_dir())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest intact `checkpoints/step_*` folder of a run (damaged ones are skipped with
    a warning), or None when there is none at all."""
    return _newest_intact(_step_folders(run_dir), MODEL_FILES)


def resolve_model_folder(path: str | Path) -> Path:
    """A model folder (verified), or a run folder (its newest intact checkpoint), or a
    public looped model's Hugging Face folder (`loopedlm.model.public`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if public_model_type(path, others=(MODEL_TYPE,)) is not None:
        return path
    if (path / MODEL_FILE).exists() or (path / MANIFEST_FILE).exists():
        verify_checkpoint(path)
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise ValueError(f"{path} is not a loopedlm run or checkpoint: it has no {MODEL_FILE} "
                         f"and no checkpoints/step_*/{MODEL_FILE}")
    return latest


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path.parent} is damaged: {path.name} is not "
                              f"readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path.parent} is damaged: {path.name} is not a "
                              "JSON object")
    return data


def _read_safetensors(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"checkpoint {path.parent} is damaged: {path.name} cannot be "
                              f"read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                              ) from None


def saved_model_config(folder: str | Path) -> dict[str, Any]:
    """The ModelConfig fields of a resolved model folder: a loopedlm checkpoint's, an
    exported folder's or a public looped model's (translated from its own config.json)."""
    folder = Path(folder)
    if public_model_type(folder) is not None:
        return public_config(folder)[0].to_dict()
    meta = exported_meta(folder) or _read_json(folder / CONFIG_FILE)
    if "model" not in meta:
        raise ValueError(f"{folder / CONFIG_FILE} has no 'model' section: not a loopedlm checkpoint")
    return meta["model"]


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[LoopedGPT, dict[str, Any]]:
    """Load a model from a model folder, a run folder or a public looped model's Hugging
    Face folder; returns (model, config.json dict: `{"model": ModelConfig fields, ...}`)."""
    folder = resolve_model_folder(path)
    if public_model_type(folder) is not None:
        return load_public_model(folder, device, dtype)
    meta = exported_meta(folder) or _read_json(folder / CONFIG_FILE)  # a `loopedlm export` folder
    if "model" not in meta:
        raise ValueError(f"{folder / CONFIG_FILE} has no 'model' section: not a loopedlm checkpoint")
    config = ModelConfig.from_dict(meta["model"])
    with torch.device("meta"):
        model = LoopedGPT(config)
    state = _read_safetensors(folder / MODEL_FILE, device)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    for key, source in tied_keys(config).items():
        state.setdefault(key, state.get(source))
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
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


# ---- training checkpoints (loopedlm.train.trainer) -------------------------------------------
TRAIN_STATE_FILE = "train_state.pt"  # optimizer + RNG tensors (torch.save; weights_only load)
TRAIN_META_FILE = "train_state.json"  # step, data-loader states, collapse detector
# tests: "SECONDS" or "SECONDS@STEP": sleep mid-save (of that step) so a test can kill -9 it
SAVE_SLEEP_ENV = "LOOPEDLM_TEST_SAVE_SLEEP"


TRAIN_FILES = (MODEL_FILE, CONFIG_FILE, TRAIN_STATE_FILE, TRAIN_META_FILE)


def save_training_checkpoint(run_dir: str | Path, step: int, model: LoopedGPT, *,
                             meta: dict[str, Any], tensor_state: dict[str, Any],
                             json_state: dict[str, Any], keep_last: int | None = None) -> Path:
    """Write `RUN/checkpoints/step_XXXXXX/` atomically: everything (the manifest last) goes
    into a hidden temporary folder that is renamed into place only when complete, so a
    crash or a full disk while saving never damages the previous checkpoint. Then keep
    only the newest `keep_last`. A failed write raises CheckpointSaveError."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step_{step:06d}"
    if final.exists():
        try:
            verify_checkpoint(final, TRAIN_FILES)
            return final
        except CheckpointError as exc:  # e.g. resumed from an older one: replace it
            log.warning("%s; replacing it", exc)
            shutil.rmtree(final)
    tmp = ckpt_dir / f".tmp_step_{step:06d}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        save_model(tmp, model, meta, manifest=False)
        torch.save(tensor_state, tmp / TRAIN_STATE_FILE)
        seconds, _, at_step = os.environ.get(SAVE_SLEEP_ENV, "").partition("@")
        if seconds and (not at_step or int(at_step) == step):
            time.sleep(float(seconds))
        atomic_write_json(tmp / TRAIN_META_FILE, json_state)
        write_manifest(tmp, TRAIN_FILES)
        os.rename(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = _step_folders(run_dir)
        raise CheckpointSaveError(
            f"could not save checkpoint {final.name} in {ckpt_dir} "
            f"({exc.strerror or exc}); the previous checkpoint "
            f"{previous[-1].name if previous else '(none)'} is intact") from None
    fsync_dir(ckpt_dir)
    if keep_last is not None and keep_last > 0:
        for old in _step_folders(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_training_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest intact checkpoint of a run that holds the full training state (damaged
    ones are skipped with a warning), or None when there is none at all."""
    return _newest_intact(_step_folders(run_dir), TRAIN_FILES)


def load_training_state(folder: str | Path, device: str | torch.device = "cpu"
                        ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model state dict, tensor state, JSON state) of a training checkpoint."""
    folder = Path(folder)
    verify_checkpoint(folder, TRAIN_FILES)
    state = _read_safetensors(folder / MODEL_FILE, device)
    try:
        tensors = torch.load(folder / TRAIN_STATE_FILE, map_location=device, weights_only=True)
    except Exception as exc:  # torch.load raises many types for a damaged file
        raise CheckpointError(f"checkpoint {folder} is damaged: {TRAIN_STATE_FILE} cannot be "
                              f"read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                              ) from None
    meta = _read_json(folder / TRAIN_META_FILE)
    return state, tensors, meta
