"""Interoperability with the FLT authors' nanochat fork (FuRuF-11/FullyLoopedTransformer).

Their checkpoints are a `model_<step>.pt` state dict beside `meta_<step>.json`, whose
`model_config` holds their GPTConfig. Our state-dict keys are nanochat's, so weights load
as they are. Files are read with `torch.load(..., weights_only=True)`: no code is
unpickled. Their tokenizer is Qwen3's with `<|im_start|>` as BOS (their `get_bos_token_id`),
which is loopedlm's `qwen3`; `loopedlm.data.tokenizer.nanochat_tokenizer` gives it for a
checkpoint of that vocabulary.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from loopedlm.model.config import ModelConfig
from loopedlm.model.gpt import LoopedGPT
from loopedlm.model.loop_modes import LOOP_MODES

log = logging.getLogger(__name__)

# the authors' model_type -> our loop mode, from the one table of modes
MODEL_TYPES = {mode.nanochat_name: name for name, mode in LOOP_MODES.items()}
LOSS_TYPES = {"END": "last", "STEP": "all", "FEW": "last_third"}


def config_from_nanochat(model_config: dict[str, Any]) -> ModelConfig:
    """Translate the authors' GPTConfig dict into a ModelConfig."""
    model_type = model_config.get("model_type", "FLT")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not supported: choose one of "
                         f"{sorted(MODEL_TYPES)}")
    loss_type = model_config.get("loss_type", "END")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not supported: choose one of "
                         f"{sorted(LOSS_TYPES)}")
    loss_loops = LOSS_TYPES[loss_type]
    if model_type in ("LT_i", "LT_ia") and loss_loops != "last":
        # Their LT_i/LT_ia branches supervise only the last loop whatever loss_type says;
        # importing as "last" keeps a continued run identical to theirs.
        log.warning("model_type=%s ignores loss_type=%s in the authors' code (only the last "
                    "loop is supervised): importing with loss_loops='last'", model_type, loss_type)
        loss_loops = "last"
    missing = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size") if k not in model_config]
    if missing:
        raise ValueError(f"model_config lacks required field(s) {missing}")
    return ModelConfig(
        vocab_size=model_config["vocab_size"],
        sequence_len=model_config.get("sequence_len", 1024),
        depth=model_config["n_layer"],
        d_model=model_config["n_embd"],
        n_head=model_config["n_head"],
        n_kv_head=model_config.get("n_kv_head", model_config["n_head"]),
        loop_mode=MODEL_TYPES[model_type],
        n_loops=model_config.get("K", 1),
        loss_loops=loss_loops,
        attn_type=model_config.get("attn_type", "full"),
        kv_rank=model_config.get("kv_lora_rank", 128),
        window_pattern=model_config.get("window_pattern", "L"),
    )


def config_to_nanochat(config: ModelConfig) -> dict[str, Any]:
    """The authors' GPTConfig dict for a ModelConfig (the inverse of config_from_nanochat)."""
    if config.backbone != "nanochat":
        raise ValueError(f"backbone={config.backbone!r} has no equivalent in the authors' code: "
                         "only loopedlm's own ('nanochat') can be exported")
    if config.residual_scale != "none":
        raise ValueError(f"residual_scale={config.residual_scale!r} has no equivalent in the "
                         "authors' code: only 'none' can be exported")
    if config.window_size is not None or not config.full_last_layer:
        raise ValueError(f"window_size={config.window_size!r} / full_last_layer="
                         f"{config.full_last_layer!r} have no equivalent in the authors' code: "
                         "only the defaults (None / true) can be exported")
    model_types = {v: k for k, v in MODEL_TYPES.items()}
    loss_types = {v: k for k, v in LOSS_TYPES.items()}
    return {
        "model_type": model_types[config.loop_mode], "K": config.n_loops,
        "sequence_len": config.sequence_len, "vocab_size": config.vocab_size,
        "n_layer": config.depth, "n_head": config.n_head, "n_kv_head": config.n_kv_head,
        "n_embd": config.d_model, "loss_type": loss_types[config.loss_loops],
        "attn_type": config.attn_type, "kv_lora_rank": config.kv_rank,
        "window_pattern": config.window_pattern,
    }


def _find_files(path: Path, step: int | None) -> tuple[Path, Path]:
    if path.is_file():
        match = re.fullmatch(r"model_(\d+)\.pt", path.name)
        if not match:
            raise ValueError(f"{path} is not a model_<step>.pt file")
        model_file = path
        meta_file = path.with_name(f"meta_{match.group(1)}.json")
    elif path.is_dir():
        found = sorted(path.glob("model_*.pt"))
        if step is not None:
            found = [f for f in found if int(f.stem.split("_")[1]) == step]
        if not found:
            which = f" for step {step}" if step is not None else ""
            raise FileNotFoundError(f"no model_<step>.pt{which} in {path}")
        model_file = max(found, key=lambda f: int(f.stem.split("_")[1]))
        meta_file = model_file.with_name(f"meta_{model_file.stem.split('_')[1]}.json")
    else:
        raise FileNotFoundError(f"{path} does not exist")
    if not meta_file.exists():
        raise FileNotFoundError(f"{meta_file} is missing: it holds the model_config")
    return model_file, meta_file


def import_nanochat_checkpoint(path: str | Path, step: int | None = None,
                               device: str | torch.device = "cpu"
                               ) -> tuple[LoopedGPT, dict[str, Any]]:
    """Load an authors'-format checkpoint (a folder, or a `model_<step>.pt` file).

    Returns the model in fp32 (eval mode) and the checkpoint's meta dict.
    """
    model_file, meta_file = _find_files(Path(path), step)
    meta = json.loads(meta_file.read_text())
    if "model_config" not in meta:
        raise ValueError(f"{meta_file} has no 'model_config'")
    config = config_from_nanochat(meta["model_config"])
    try:
        state = torch.load(model_file, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{model_file} is not a plain state dict (refused to unpickle code): "
                         f"{str(exc).splitlines()[0]}") from None
    # torch.compile prefixes keys with _orig_mod.; training may store wte in bf16
    state = {k.removeprefix("_orig_mod."): v.float() if v.is_floating_point() else v
             for k, v in state.items()}
    with torch.device("meta"):
        model = LoopedGPT(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"{model_file} does not match its model_config: {exc}") from None
    model.reset_rotary()
    return model.eval(), meta


def export_nanochat_checkpoint(model: LoopedGPT, folder: str | Path, step: int = 0,
                               meta: dict[str, Any] | None = None) -> Path:
    """Write `model_<step>.pt` and `meta_<step>.json` in the authors' format."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
               folder / f"model_{step:06d}.pt")
    full_meta = {"step": step, **(meta or {}), "model_config": config_to_nanochat(model.config)}
    (folder / f"meta_{step:06d}.json").write_text(json.dumps(full_meta, indent=2))
    return folder / f"model_{step:06d}.pt"
