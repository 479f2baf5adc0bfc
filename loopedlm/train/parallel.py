"""Parallelism and memory for training, applied to a model from outside its math
(CONVENTIONS: torchtitan's separation): DDP around the model and per-loop activation
checkpointing. Device choice, torchrun set-up and the collectives are
`loopedlm.common.distributed`."""

from __future__ import annotations

from functools import partial

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from loopedlm.common.distributed import DistInfo


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP around the model when running distributed (the model itself otherwise)."""
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each loop's activations in the backward pass instead of storing them:
    every loop runs as a checkpointed call (`LoopedGPT.wrap_loops`), so peak memory no
    longer grows with the loop count's activations (only the stream between loops is
    kept)."""
    model.wrap_loops(lambda loop_fn: partial(checkpoint, loop_fn, use_reentrant=False))
    return model


def remove_activation_checkpointing(model: nn.Module) -> nn.Module:
    model.wrap_loops(None)
    return model
