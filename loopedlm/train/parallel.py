"""Parallelism, memory and compilation for training, applied to a model from outside its
math (torchtitan's separation): DDP around the model, per-loop activation checkpointing
and regional compilation with a recompile limit that covers the variants training
needs. Device choice, torchrun set-up and the collectives are
`loopedlm.common.distributed`."""

from __future__ import annotations

from functools import partial

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from loopedlm.common.compiling import recompile_limit_kwargs
from loopedlm.common.distributed import DistInfo

# Compiled variants of the block. Every block of every model in the process shares one
# code object (`Block.step`), so they share dynamo's cache and its limit (default 8):
#   call signatures: 2 (the first layer with precomputed keys and values, or a layer
#     with a query source, and the others)
#   grad states: 4 (grad on; grad on with a no-grad query or stream, the first loop
#     after a `backprop_loops` prefix; no_grad, for that prefix and for evaluation)
#   autocast states: 2 (bf16 training and evaluation, fp32 elsewhere in the process)
# = 16, doubled for a dynamic-shape version of each (a later call with another batch or
# length). A CPU sequence of bf16 training with evaluation and a prefix, then an fp32 run,
# reached the default 8 and ran the rest eagerly (issue 24).
BLOCK_RECOMPILE_LIMIT = 32


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


def compile_blocks(model: nn.Module) -> nn.Module:
    """Regional compilation (`LoopedGPT.compile_blocks`) allowing `BLOCK_RECOMPILE_LIMIT`
    compiled variants of the block; returns the model."""
    return model.compile_blocks(**recompile_limit_kwargs(BLOCK_RECOMPILE_LIMIT))


def remove_activation_checkpointing(model: nn.Module) -> nn.Module:
    model.wrap_loops(None)
    return model
