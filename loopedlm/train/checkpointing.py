"""What a training checkpoint holds besides the weights, and how the trainer writes and
reads it: the optimiser, every rank's data position and RNG state, the collapse detector
and the time spent, so that a resumed run continues exactly where it stopped."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch

from loopedlm.common.distributed import DistInfo, barrier, gather_objects
from loopedlm.model.checkpoint import load_training_state, save_training_checkpoint
from loopedlm.model.gpt import LoopedGPT
from loopedlm.train.collapse import CollapseDetector
from loopedlm.train.config import TrainConfig
from loopedlm.train.optim import LoopedOptimizer

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """This process's torch (CPU and CUDA) and Python RNG states."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state()` returned."""
    torch.set_rng_state(state["torch"].cpu())
    random.setstate((3, tuple(int(x) for x in state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(run_dir: Path, step: int, cfg: TrainConfig, info: DistInfo,
                    model: LoopedGPT, optimizer: LoopedOptimizer, loader,
                    detector: CollapseDetector, elapsed: float) -> None:
    """Write RUN/checkpoints/step_XXXXXX (collective: call on every rank; rank 0 writes)."""
    optimizer.consolidate()
    loader_states = gather_objects(loader.state_dict(), info)
    rng_states = gather_objects(rng_state(), info) if info.distributed else [rng_state()]
    if info.is_main:
        save_training_checkpoint(
            run_dir, step, model,
            meta={"train": cfg.to_dict(), "step": step},
            tensor_state={"optimizer": optimizer.state_dict(), "rng": rng_states},
            json_state={"step": step, "loader": loader_states, "elapsed_s": elapsed,
                        "world_size": info.world_size,
                        "collapse": detector.state_dict()},
            keep_last=cfg.keep_last or None)
    barrier()


def restore_checkpoint(folder: Path, info: DistInfo, model: LoopedGPT,
                       optimizer: LoopedOptimizer, loader,
                       detector: CollapseDetector) -> tuple[int, float]:
    """Load a training checkpoint into the run's objects; returns (step, seconds spent)."""
    weights, tensors, meta = load_training_state(folder, device=info.device)
    if meta["world_size"] != info.world_size:
        raise ValueError(f"checkpoint {folder} was written by {meta['world_size']} "
                         f"process(es); resume with the same number (got "
                         f"{info.world_size}) so that every rank gets its data position")
    model.load_state_dict(weights, strict=True)
    optimizer.load_state_dict(tensors["optimizer"])
    loader.load_state_dict(meta["loader"][info.rank])
    set_rng_state(tensors["rng"][info.rank if len(tensors["rng"]) > 1 else 0])
    detector.load_state_dict(meta["collapse"])
    if info.is_main:
        log.info("resumed %s at step %d", folder, meta["step"])
    return int(meta["step"]), float(meta.get("elapsed_s", 0.0))


__all__ = ["rng_state", "set_rng_state", "save_checkpoint", "restore_checkpoint"]
