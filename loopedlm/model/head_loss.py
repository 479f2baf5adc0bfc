"""The LM head and its loss, fused: projection -> soft-cap -> cross-entropy
(docs/design.md#backbone, #loss-over-loops), without ever holding the (rows x vocabulary)
logits.

With the Qwen3 vocabulary (151,669 ids) the logits of one loop are far larger than the
model's activations, and `loss_loops="all"` builds them N times. `head_loss` computes
the same mean cross-entropy in row chunks: the forward keeps only each row's
log-sum-exp, and the backward recomputes each chunk's logits (one extra head matmul),
so memory is bounded by one chunk whatever the vocabulary, batch or loop count. When
every row fits in one chunk (small vocabularies) the forward keeps that chunk's tanh
instead, and nothing is recomputed.

On CUDA the maintained `cut-cross-entropy` kernel (Wijmans et al. 2024, the optional
extra `loopedlm[cuda]`) is used when it is installed: its `softcap` is the same
`softcap * tanh(z / softcap)`. The chunked PyTorch path is the CPU path and the fallback.
Math follows `LoopedGPT.logits` + `F.cross_entropy`: the matmul in the input (or
autocast) dtype, everything after it in fp32.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

try:  # optional: pip install cut-cross-entropy (CUDA + Triton only)
    from cut_cross_entropy import linear_cross_entropy as _cce_linear_cross_entropy
except ImportError:  # pragma: no cover - depends on the environment
    _cce_linear_cross_entropy = None

IGNORE_INDEX = -1
# elements of one chunk's fp32 logits (x4 bytes; the backward holds about four such
# temporaries): 2**25 is 128 MiB, about 220 rows of the Qwen3 vocabulary
DEFAULT_CHUNK_ELEMENTS = 2**25


def _matmul_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype the plain path's `lm_head(h)` multiplies in: autocast's, else h's."""
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return h.dtype


def _softcapped(z: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(softcap * tanh(z / softcap), tanh(z / softcap)) in fp32, as `LoopedGPT.logits`."""
    t = torch.tanh(z.float() / softcap)
    return softcap * t, t


class _ChunkedHeadLoss(torch.autograd.Function):
    """Mean soft-capped cross-entropy of h @ weight.T, chunk by chunk over rows."""

    @staticmethod
    def forward(ctx, h, weight, targets, softcap, chunk_rows, mm_dtype):
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(mm_dtype)
            valid = targets != IGNORE_INDEX
            safe_targets = targets.clamp(min=0)
            lse = torch.empty(h.size(0), dtype=torch.float32, device=h.device)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            # all rows in one chunk: keep its tanh (less than the plain path keeps) and
            # skip the recomputation; otherwise the backward recomputes chunk by chunk
            single_chunk = h.size(0) <= chunk_rows
            kept_tanh = None
            for start in range(0, h.size(0), chunk_rows):
                rows = slice(start, start + chunk_rows)
                logits, t = _softcapped(h[rows].to(mm_dtype) @ w.T, softcap)
                lse[rows] = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, safe_targets[rows, None]).squeeze(1)
                total += torch.where(valid[rows], lse[rows] - picked, 0.0).sum()
                kept_tanh = t if single_chunk and ctx.needs_input_grad[:2] != (False, False) \
                    else None
                del logits, t
            count = valid.sum()
        ctx.save_for_backward(h, weight, targets, lse, count, kept_tanh)
        ctx.softcap, ctx.chunk_rows, ctx.mm_dtype = softcap, chunk_rows, mm_dtype
        return total / count  # 0 / 0 = nan when every target is ignored, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss):
        h, weight, targets, lse, count, kept_tanh = ctx.saved_tensors
        softcap, chunk_rows, mm_dtype = ctx.softcap, ctx.chunk_rows, ctx.mm_dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(mm_dtype)
            valid = targets != IGNORE_INDEX
            scale = (grad_loss.float() / count)
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
                if need_w else None
            for start in range(0, h.size(0), chunk_rows):
                rows = slice(start, start + chunk_rows)
                h_rows = h[rows].to(mm_dtype)
                if kept_tanh is None:
                    logits, t = _softcapped(h_rows @ w.T, softcap)
                else:  # the single chunk's tanh, kept by the forward
                    t = kept_tanh
                    logits = softcap * t
                # d loss / d logits = (softmax - onehot(target)) / count on counted rows
                grad = torch.exp_(logits.sub_(lse[rows, None]))
                del logits
                row_ids = torch.arange(grad.size(0), device=grad.device)
                grad[row_ids, targets[rows].clamp(min=0)] -= 1.0
                grad.mul_(torch.where(valid[rows], scale, 0.0)[:, None])
                # through the soft-cap: d(c tanh(z/c))/dz = 1 - tanh^2
                grad.mul_(1.0 - t.square())
                del t
                grad = grad.to(mm_dtype)
                if need_h:
                    grad_h[rows] = (grad @ w).to(h.dtype)
                if need_w:
                    grad_w += (grad.T @ h_rows).float()
            if need_w:
                grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None


def chunk_rows_for(vocab: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Rows per chunk so that one chunk's logits hold about `chunk_elements` values."""
    return max(1, chunk_elements // vocab)


def cut_cross_entropy_available(device: torch.device | str) -> bool:
    """Whether `head_loss` uses `cut-cross-entropy` on `device` (CUDA and installed)."""
    return _cce_linear_cross_entropy is not None and torch.device(device).type == "cuda"


def head_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
              *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
              backend: str = "auto") -> torch.Tensor:
    """Mean cross-entropy of `softcap * tanh(h @ weight.T / softcap)` against `targets`
    (-1 = ignored), never materialising the full logits.

    h:        (..., d) loop outputs; targets: (...) ids in [0, weight.size(0)) or -1.
    weight:   (vocab, d): the LM head cropped to the real vocabulary.
    backend:  "auto" (cut-cross-entropy on CUDA when installed, else "chunked"),
              "chunked" or "cce".
    Equal to `F.cross_entropy(LoopedGPT.logits(h), targets, ignore_index=-1)` up to
    float rounding, value and gradients.
    """
    if backend not in ("auto", "chunked", "cce"):
        raise ValueError(f"backend={backend!r} is not allowed: 'auto', 'chunked' or 'cce'")
    if backend == "cce" and _cce_linear_cross_entropy is None:
        raise ValueError("backend='cce' needs the cut-cross-entropy package "
                         "(pip install 'loopedlm[cuda]')")
    if backend == "cce" or (backend == "auto" and cut_cross_entropy_available(h.device)):
        mm_dtype = _matmul_dtype(h)
        if mm_dtype == torch.float32:  # its kernels take fp16/bf16 only
            mm_dtype = torch.bfloat16
        # filter_eps=None: no gradient filtering, so gradients match the plain path
        return _cce_linear_cross_entropy(h.to(mm_dtype), weight.to(mm_dtype), targets,
                                         ignore_index=IGNORE_INDEX, softcap=float(softcap),
                                         reduction="mean", filter_eps=None)
    flat_h = h.reshape(-1, h.size(-1))
    return _ChunkedHeadLoss.apply(flat_h, weight, targets.reshape(-1), float(softcap),
                                  chunk_rows_for(weight.size(0), chunk_elements),
                                  _matmul_dtype(h))


__all__ = ["head_loss", "chunk_rows_for", "cut_cross_entropy_available", "IGNORE_INDEX",
           "DEFAULT_CHUNK_ELEMENTS"]
