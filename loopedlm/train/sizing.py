"""How big a run is: its horizon in steps and FLOPs (docs/design.md#training-recipe), the
gradient accumulation that lays the global batch out over devices, and what to shrink after running out of
memory."""

from __future__ import annotations

import re

from loopedlm.common.validation import ConfigError
from loopedlm.model.config import ModelConfig
from loopedlm.model.gpt import LoopedGPT
from loopedlm.train.config import TrainConfig


def horizon(cfg: TrainConfig, model: LoopedGPT) -> int:
    """Number of optimizer steps (docs/design.md#training-recipe: the horizon)."""
    if cfg.steps is not None:
        return cfg.steps
    if cfg.flops_budget is not None:
        tokens = cfg.flops_budget / expected_flops_per_token(cfg, model)
    else:
        params = model.num_params(exclude_embedding=cfg.param_basis == "non_embedding")
        tokens = cfg.target_param_data_ratio * params
    return max(1, round(tokens / cfg.total_batch_tokens))


def expected_flops_per_token(cfg: TrainConfig, model: LoopedGPT) -> float:
    """Training FLOPs per token averaged over the loop-count distribution (the loops
    actually run, backward only through the last `backprop_loops`)."""
    sampler = cfg.loop_sampler(model.config.n_loops)
    return sum(p * model.estimate_flops(n, cfg.backprop_loops)
               for n, p in sampler.distribution().items())


def check_batch(cfg: TrainConfig, seq_len: int, world_size: int) -> int:
    """Gradient-accumulation steps; a clear error when the batch does not divide."""
    per_pass = cfg.device_batch_size * seq_len * world_size
    if cfg.total_batch_tokens % per_pass:
        fits = batch_sizes_that_fit(cfg.total_batch_tokens, seq_len, world_size,
                                    below=cfg.device_batch_size)
        fix = (f"pass --device_batch_size={fits[0]}" if fits else
               f"pass --total_batch_tokens={per_pass} (or a multiple)")
        raise ConfigError(
            f"total_batch_tokens={cfg.total_batch_tokens} is not divisible by device_batch_size "
            f"x sequence_len x world_size = {cfg.device_batch_size} x {seq_len} x {world_size} "
            f"= {per_pass}: {fix}")
    return cfg.total_batch_tokens // per_pass


def batch_sizes_that_fit(total_batch_tokens: int, seq_len: int, world_size: int, *,
                         below: int) -> list[int]:
    """Device batch sizes < `below` (largest first) whose pass divides the global batch."""
    return [b for b in range(below - 1, 0, -1)
            if total_batch_tokens % (b * seq_len * world_size) == 0]


def out_of_memory_message(exc: BaseException, cfg: TrainConfig, model_cfg: ModelConfig,
                          step: int, last_saved: int | None, world_size: int = 1) -> str:
    """One line for an out-of-memory error: what was asked for (when known), what to change."""
    asked = re.search(r"(?:[Tt]ried to allocate|[Uu]nable to allocate) ([\d.]+ ?[KMGTP]?i?B)",
                      str(exc))
    fits = batch_sizes_that_fit(cfg.total_batch_tokens, cfg.sequence_len or
                                model_cfg.sequence_len, world_size, below=cfg.device_batch_size)
    fixes = [f"--device_batch_size={fits[0]}" if fits else "a smaller --device_batch_size"]
    if not cfg.activation_checkpointing:
        fixes.append("--activation_checkpointing=true")
    if model_cfg.loss_loops != "last":
        fixes.append("--model.loss_loops=last")
    kept = f"step_{last_saved:06d}" if last_saved is not None else "none"
    return (f"out of memory at step {step}" + (f" (tried to allocate {asked.group(1)})"
                                               if asked else "")
            + f": try {', '.join(fixes)} (device_batch_size is now {cfg.device_batch_size}; "
            f"gradient accumulation keeps total_batch_tokens); the last checkpoint "
            f"({kept}) is intact")


__all__ = ["horizon", "expected_flops_per_token", "check_batch", "batch_sizes_that_fit",
           "out_of_memory_message"]
