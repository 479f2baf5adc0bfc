"""What a training step costs and how its gradients look (docs/design.md#diagnostics):
FLOPs utilisation (MFU), peak memory, gradient norms of the watched parameters, and
validation bits-per-byte."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn as nn

# Dense bf16 peak FLOP/s per device (vendor datasheets, no sparsity).
PEAK_FLOPS_BF16: dict[str, float] = {
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "A10G": 70e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def peak_flops(device: torch.device | str) -> float | None:
    """Peak bf16 FLOP/s of a known GPU, or None (CPU, unknown device)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    # longest key first so "GH200" wins over "H200"
    for key in sorted(PEAK_FLOPS_BF16, key=len, reverse=True):
        if key in name:
            return PEAK_FLOPS_BF16[key]
    return None


def mfu(flops_per_token: float, tokens_per_second: float, peak: float | None,
        world_size: int = 1) -> float | None:
    """Model FLOPs utilisation; `flops_per_token` must count every loop (docs/design.md#loop-modes)."""
    if peak is None:
        return None
    return flops_per_token * tokens_per_second / (peak * world_size)


def watched_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The gradient-norm probes of docs/design.md#diagnostics: the first block's MLP, the
    LM head, the middle block's MLP and the middle block's attention."""
    blocks = model.transformer.h
    middle = blocks[len(blocks) // 2]
    return {
        "first_mlp": list(blocks[0].mlp.parameters()),
        "lm_head": list(model.lm_head.parameters()),
        "middle_mlp": list(middle.mlp.parameters()),
        "middle_attn": list(middle.attn.parameters()),
    }


class PeakMemory:
    """Peak memory of the training steps from construction on (issue 14's figure).

    CUDA: `torch.cuda.max_memory_allocated` (reset here). CPU (Linux): the growth of the
    peak resident set size (VmHWM, reset here through /proc/self/clear_refs) over the
    resident size at construction: activations, gradients and optimizer state, plus
    whatever the allocator keeps (run with MALLOC_MMAP_THRESHOLD_=65536 so that freed
    tensors leave the resident set). None where neither is available.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.baseline: int | None = None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return
        self.method = "VmHWM growth over the resident size before the first step"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size
            self.baseline = _proc_status_bytes("VmRSS")
        except OSError:
            self.method = "unavailable"

    def peak_bytes(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.baseline is None:
            return None
        try:
            return _proc_status_bytes("VmHWM") - self.baseline
        except OSError:
            return None

    def summary(self) -> dict[str, Any]:
        return {"peak_memory_bytes": self.peak_bytes(), "peak_memory_method": self.method}


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in /proc/self/status")


@torch.no_grad()
def grad_norms(groups: dict[str, list[nn.Parameter]]) -> dict[str, torch.Tensor]:
    """L2 norm of each group's gradients (call before clipping), as 0-d fp32 tensors on the
    gradients' device: nothing is read back here, so a training step stays free of host
    syncs (the trainer reads every figure of a log interval in one transfer)."""
    out = {}
    for name, params in groups.items():
        grads = [p.grad.detach().float() for p in params if p.grad is not None]
        out[name] = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads])) if grads else \
            torch.zeros((), device=params[0].device if params else None)
    return out


@torch.no_grad()
def evaluate_bpb(model: nn.Module, loader, token_bytes: torch.Tensor, steps: int | None,
                 *, n_loops: int | None = None, autocast=None, details: bool = False):
    """Bits-per-byte (docs/design.md#evaluation) of `model` over at most `steps` batches
    of `loader` (None: until it stops), through `loopedlm.evaluate.bpb` (special tokens
    and ignored targets count in neither sum; all-reduced under DDP, so every rank
    returns the same value). With `details`, the whole result dict (bpb, ppl, tokens,
    bytes, batches)."""
    from loopedlm.evaluate.bpb import evaluate_bpb as bpb_of_batches

    with autocast if autocast is not None else contextlib.nullcontext():
        result = bpb_of_batches(model, loader, token_bytes, n_loops=n_loops, max_batches=steps)
    return result if details else result["bpb"]


__all__ = ["PEAK_FLOPS_BF16", "peak_flops", "mfu", "PeakMemory", "watched_parameters", "grad_norms",
           "evaluate_bpb"]
