"""`loopedlm export`: a run as a Hugging Face folder that `transformers` (trust_remote_code),
its `generate()` and lm-evaluation-harness's `hf` model load, at any loop count.

The folder holds `config.json` (`model_type`, `auto_map` and every ModelConfig field),
`model.safetensors` (loopedlm's own state-dict names), the model code copied verbatim from
`loopedlm/export/hf_code/` (it needs only torch and transformers), the tokenizer files
(`loopedlm.export.hf_tokenizer`), `generation_config.json`, a `README.md` model card
(`loopedlm.export.model_card`), and what loopedlm needs to load the folder back
(`loopedlm.model.hf_folder`): its tokenizer in `tokenizer/` and the run's record in
`loopedlm.json`. Every file is deterministic (sorted keys, no timestamps), so
export -> load -> export gives the same bytes.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from loopedlm.data.tokenizer import Tokenizer, load_tokenizer
from loopedlm.export.hf_tokenizer import SpecialTokens, special_tokens, write_hf_tokenizer
from loopedlm.export.model_card import model_card
from loopedlm.export.run_record import run_record
from loopedlm.model.backbones import NANOCHAT
from loopedlm.model.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    find_tokenizer_dir,
    load_model,
    resolve_model_folder,
)
from loopedlm.model.gpt import LoopedGPT
from loopedlm.model.hf_folder import MODEL_TYPE, RECORD_FILE, is_exported_folder

log = logging.getLogger(__name__)

CODE_DIR = Path(__file__).resolve().parent / "hf_code"
CONFIG_CODE, MODEL_CODE = "configuration_loopedlm.py", "modeling_loopedlm.py"
CONFIG_CLASS, MODEL_CLASS = "LoopedLMConfig", "LoopedLMForCausalLM"
GENERATION_FILE = "generation_config.json"
TOKENIZER_DIR = "tokenizer"  # loopedlm's own tokenizer, found by find_tokenizer_dir


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Deterministic JSON: sorted keys, two-space indent, a final newline."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n",
                    encoding="utf-8")


def hf_config(model: LoopedGPT, special: SpecialTokens | None) -> dict[str, Any]:
    """config.json: every ModelConfig field plus what transformers reads."""
    data: dict[str, Any] = {
        **model.config.to_dict(),
        "model_type": MODEL_TYPE,
        "architectures": [MODEL_CLASS],
        "auto_map": {"AutoConfig": f"{Path(CONFIG_CODE).stem}.{CONFIG_CLASS}",
                     "AutoModelForCausalLM": f"{Path(MODEL_CODE).stem}.{MODEL_CLASS}"},
        "tie_word_embeddings": False,
        "trained_loops": model.config.n_loops,  # fixes the residual scale; n_loops may change
        "use_cache": True,
        "torch_dtype": str(model.lm_head.weight.dtype).removeprefix("torch."),
    }
    if special is not None:
        # the model reads ids beyond the vocabulary as BOS; end-of-text and padding live in
        # generation_config.json and the tokenizer (a BPE's are beyond the vocabulary)
        data["bos_token_id"] = special.bos_id
    return data


def generation_config(special: SpecialTokens) -> dict[str, Any]:
    """Greedy by default; a row ends at the end-of-text token or at BOS, which is how the
    model marks the end of a document (every training document starts with BOS)."""
    return {"bos_token_id": special.bos_id, "eos_token_id": [special.bos_id, special.eos_id],
            "pad_token_id": special.pad_id, "do_sample": False}


def write_hf_model(model: LoopedGPT, folder: str | Path, *, tokenizer: Tokenizer | None = None,
                   record: dict[str, Any] | None = None) -> Path:
    """Write `model` (and, when given, its tokenizer and the run's record) into `folder` as a
    Hugging Face folder. Without a tokenizer, no tokenizer files, generation config or BOS
    are written (enough for the logits)."""
    if model.config.backbone != NANOCHAT:  # the exported code is loopedlm's own model
        raise ValueError(f"loopedlm export writes loopedlm's own models; this one has backbone="
                         f"{model.config.backbone!r}, a public model whose own Hugging Face "
                         f"folder and code are the export")
    if model.config.window_size is not None or not model.config.full_last_layer:
        # the exported code windows 'S' layers by sequence_len // 4 and keeps the last full
        raise ValueError(f"window_size={model.config.window_size!r} / full_last_layer="
                         f"{model.config.full_last_layer!r} cannot be exported: the Hugging Face "
                         "code runs only the defaults (None / true)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    special = None
    if tokenizer is not None:
        special = special_tokens(tokenizer, model.config.vocab_size)
        write_hf_tokenizer(tokenizer, special, folder, model.config.rotary_len)
        tokenizer.save(folder / TOKENIZER_DIR)
        write_json(folder / GENERATION_FILE, generation_config(special))
    for name in (CONFIG_CODE, MODEL_CODE):
        shutil.copyfile(CODE_DIR / name, folder / name)
    write_json(folder / CONFIG_FILE, hf_config(model, special))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / MODEL_FILE), metadata={"format": "pt"})
    (folder / MODEL_FILE).chmod(0o644)  # as every other file (safetensors writes 0600)
    record = dict(record or {})
    write_json(folder / RECORD_FILE, record)
    (folder / "README.md").write_text(model_card(model, tokenizer, special, record),
                                      encoding="utf-8")
    return folder


def pick_checkpoint(run: Path, checkpoint: str | int | None) -> Path:
    """The model folder to export: `checkpoint` (a step number or a `step_XXXXXX` name) of a
    run, else the run's newest intact checkpoint (or the given checkpoint folder)."""
    if checkpoint is None:
        return resolve_model_folder(run)
    name = str(checkpoint)
    if name.isdigit():
        name = f"step_{int(name):06d}"
    folder = run / "checkpoints" / name
    if not folder.is_dir():
        steps = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
        raise ValueError(f"--checkpoint {checkpoint}: {run} has no checkpoint {name} (it has: "
                         f"{', '.join(steps) or 'none'})")
    return resolve_model_folder(folder)


def check_out(out: Path, source: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder: give a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"{out} exists and is not empty: give a new or empty folder, or "
                         f"--force to replace it")
    resolved = out.resolve()
    if resolved == source.resolve() or resolved in source.resolve().parents:
        raise ValueError(f"{out} holds the model being exported ({source}): give another folder")


def export_hf(run: str | Path, out: str | Path, *, checkpoint: str | int | None = None,
              force: bool = False) -> Path:
    """Export a run (its newest intact checkpoint, or `checkpoint`), a checkpoint folder or an
    exported folder to `out` (new or empty; `force` replaces it). Written into a hidden
    folder beside `out` and renamed into place, so a failure leaves no half folder."""
    run, out = Path(run), Path(out)
    if not run.exists():
        raise FileNotFoundError(f"{run} does not exist: give a loopedlm run or checkpoint folder")
    folder = pick_checkpoint(run, checkpoint)
    check_out(out, folder, force)
    model, meta = load_model(folder)
    tok_dir = find_tokenizer_dir(folder)
    if tok_dir is None:
        raise ValueError(f"{run} has no tokenizer/ folder beside its checkpoints: a Hugging Face "
                         f"folder needs the tokenizer")
    tokenizer = load_tokenizer(tok_dir)
    record = meta_record(folder, meta)
    tmp = out.resolve().with_name(f".{out.resolve().name}.export-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_hf_model(model, tmp, tokenizer=tokenizer, record=record)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("exported %s to %s", folder, out)
    return out


def meta_record(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The run's record: kept as it is from an exported folder, else read from the run."""
    if is_exported_folder(folder):
        return {k: v for k, v in meta.items() if k != "model"}
    return run_record(folder, meta)


__all__ = ["export_hf", "write_hf_model", "hf_config", "generation_config"]
