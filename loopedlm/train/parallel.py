"""Parallelism and memory for training, applied to a model from outside its math
(CONVENTIONS: torchtitan's separation): DDP around the model and per-loop activation
checkpointing, and the few collectives the trainer uses. Device choice and torchrun set-up
are `loopedlm.common.distributed`."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.distributed as dist
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


# ---- the collectives the trainer needs (no-ops in a single process) ----------------
def barrier() -> None:
    """Wait for every rank (when torch.distributed is initialised)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """`obj` of every rank, in rank order (`[obj]` in a single process)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's `obj` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True when `flag` is true on any rank (every rank gets the same answer)."""
    if not info.distributed:
        return flag
    value = torch.tensor([float(flag)], device=info.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
