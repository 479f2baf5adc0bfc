"""The LM head and its loss, fused: projection -> soft-cap -> cross-entropy
(docs/design.md#backbone, #loss-over-loops), without ever holding the (rows x vocabulary)
logits.

With the Qwen3 vocabulary (151,669 ids) the logits of one loop are far larger than the
model's activations, and `loss_loops="all"` builds them N times. Two backends
(`HEAD_BACKENDS`) compute the same mean cross-entropy:

* "chunked" (the default): row chunks. The forward keeps only each row's log-sum-exp;
  the backward recomputes each chunk's logits (one extra head matmul), so memory is
  bounded by one chunk whatever the vocabulary, batch or loop count. Everything after
  the matmul is fp32, and the head's weight gradient is summed over chunks in fp32.
  `compile=True` compiles the per-chunk math (forward, and the backward's recompute and
  softmax gradient) with static shapes (the last chunk is padded with ignored rows):
  eager, that elementwise chain (cast, divide, tanh, scale, log-sum-exp, the softmax
  gradient) moves about 18 MiB per token per loop at this vocabulary, several times the
  matmuls' time on a GPU; fused, the chunk costs about its matmuls. Eager, when every
  row fits in one chunk (small vocabularies), the forward keeps that chunk's tanh and
  nothing is recomputed.
* "cce": the `cut-cross-entropy` kernel (Wijmans et al. 2024; the optional extra
  `loopedlm[cuda]`, CUDA only), opt-in. Version 25.1.1 accumulates the embedding-side
  gradient in bf16 (lock-added over about 1,185 vocabulary blocks, so it is not exact),
  calls `.nonzero()` on the targets in every call (a host sync per supervised loop: its
  public API always builds the index of counted rows), and keeps its own bf16 copy of
  the head weight per call for the backward (about 1.3 GiB for `small` at N=12 with the
  every-loop loss). Its gradients have not yet been compared with the chunked path's on
  a GPU (benchmarks/gpu_check.py does), so it runs only when asked for.

Both follow `LoopedGPT.logits` + `F.cross_entropy`: the matmul in the input (or autocast)
dtype, everything after it in fp32.
"""

from __future__ import annotations

import functools

import torch

from loopedlm.common.compiling import recompile_limit_kwargs

IGNORE_INDEX = -1
HEAD_BACKENDS = ("chunked", "cce")
# elements of one chunk's fp32 logits (x4 bytes; the backward holds about four such
# temporaries eager): 2**25 is 128 MiB, about 220 rows of the Qwen3 vocabulary
DEFAULT_CHUNK_ELEMENTS = 2**25
# compiled chunk variants: matmul dtype (fp32, bf16) x which gradients are needed (3) x
# chunk shape (one per distinct row count below a chunk: training, evaluation), doubled
_CHUNK_RECOMPILE_LIMIT = 24


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


def _chunk_forward(h_rows: torch.Tensor, w: torch.Tensor, targets: torch.Tensor,
                   softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's (log-sum-exp per row, summed loss of its counted rows)."""
    logits, _ = _softcapped(h_rows @ w.T, softcap)
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return lse, torch.where(targets != IGNORE_INDEX, lse - picked, 0.0).sum()


def _logits_grad(logits: torch.Tensor, t: torch.Tensor, targets: torch.Tensor,
                 lse: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """d loss / d (h @ w.T) of one chunk, in place on `logits`: (softmax - onehot(target))
    * scale on counted rows (0 on ignored ones), through the soft-cap (1 - tanh^2)."""
    grad = torch.exp_(logits.sub_(lse[:, None]))
    row_ids = torch.arange(grad.size(0), device=grad.device)
    grad[row_ids, targets.clamp(min=0)] -= 1.0
    grad.mul_(torch.where(targets != IGNORE_INDEX, scale, 0.0)[:, None])
    return grad.mul_(1.0 - t.square())


def _chunk_backward(h_rows: torch.Tensor, w: torch.Tensor, targets: torch.Tensor,
                    lse: torch.Tensor, scale: torch.Tensor, softcap: float, need_h: bool,
                    need_w: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One chunk's (gradient of its rows of h, its fp32 share of the weight gradient),
    recomputing its logits."""
    logits, t = _softcapped(h_rows @ w.T, softcap)
    grad = _logits_grad(logits, t, targets, lse, scale).to(w.dtype)
    return (grad @ w if need_h else None), ((grad.T @ h_rows).float() if need_w else None)


def _compiled_chunk_math():
    """The chunk functions, compiled with static shapes (dynamic=False). Dynamo caches
    the compiled code on the functions themselves, so a wrapper per call costs nothing
    after the first and always follows the current compiler settings."""
    kwargs = dict(dynamic=False, **recompile_limit_kwargs(_CHUNK_RECOMPILE_LIMIT))
    return torch.compile(_chunk_forward, **kwargs), torch.compile(_chunk_backward, **kwargs)


def _padded(x: torch.Tensor, rows: int, value: float) -> torch.Tensor:
    """`x` (a last, short chunk) padded to `rows` rows with `value`."""
    if x.size(0) == rows:
        return x
    pad = x.new_full((rows - x.size(0), *x.shape[1:]), value)
    return torch.cat([x, pad])


class _ChunkedHeadLoss(torch.autograd.Function):
    """Mean soft-capped cross-entropy of h @ weight.T, chunk by chunk over rows."""

    @staticmethod
    def forward(ctx, h, weight, targets, softcap, chunk_rows, mm_dtype, compiled):
        n = h.size(0)
        chunk_rows = max(1, min(chunk_rows, n))  # one static chunk shape per row count
        with torch.autocast(h.device.type, enabled=False):
            # detached: a view of an input that requires grad says so even here, and the
            # compiled chunk functions would compile a variant for each answer
            h, w = h.detach(), weight.detach().to(mm_dtype)
            # eager with all rows in one chunk: keep its tanh (less than the plain path
            # keeps) and skip the recomputation; otherwise the backward recomputes
            keep_tanh = (not compiled and n <= chunk_rows
                         and ctx.needs_input_grad[:2] != (False, False))
            kept_tanh = None
            if keep_tanh:
                logits, kept_tanh = _softcapped(h.to(mm_dtype) @ w.T, softcap)
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
                total = torch.where(targets != IGNORE_INDEX, lse - picked, 0.0).sum()
                del logits
            else:
                lse = torch.empty(n, dtype=torch.float32, device=h.device)
                total = torch.zeros((), dtype=torch.float32, device=h.device)
                forward = _compiled_chunk_math()[0] if compiled else _chunk_forward
                for start in range(0, n, chunk_rows):
                    rows = slice(start, start + chunk_rows)
                    h_rows, t_rows = h[rows].to(mm_dtype), targets[rows]
                    real = h_rows.size(0)
                    if compiled:  # a static shape: the short last chunk padded, ignored
                        h_rows, t_rows = (_padded(h_rows, chunk_rows, 0.0),
                                          _padded(t_rows, chunk_rows, IGNORE_INDEX))
                    chunk_lse, chunk_total = forward(h_rows, w, t_rows, softcap)
                    lse[rows] = chunk_lse[:real]
                    total += chunk_total
            count = (targets != IGNORE_INDEX).sum()
        ctx.save_for_backward(h, weight.detach(), targets, lse, count, kept_tanh)
        ctx.softcap, ctx.chunk_rows, ctx.mm_dtype = softcap, chunk_rows, mm_dtype
        ctx.compiled = compiled
        return total / count  # 0 / 0 = nan when every target is ignored, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss):
        h, weight, targets, lse, count, kept_tanh = ctx.saved_tensors
        softcap, chunk_rows, mm_dtype = ctx.softcap, ctx.chunk_rows, ctx.mm_dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(h.device.type, enabled=False):
            h, w = h.detach(), weight.detach().to(mm_dtype)
            scale = grad_loss.float() / count
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
                if need_w else None
            if kept_tanh is not None:  # the single eager chunk, its tanh kept by the forward
                grad = _logits_grad(softcap * kept_tanh, kept_tanh, targets, lse, scale)
                grad = grad.to(mm_dtype)
                if need_h:
                    grad_h.copy_(grad @ w)
                if need_w:
                    grad_w += (grad.T @ h.to(mm_dtype)).float()
            else:
                backward = _compiled_chunk_math()[1] if ctx.compiled else _chunk_backward
                for start in range(0, h.size(0), chunk_rows):
                    rows = slice(start, start + chunk_rows)
                    h_rows, t_rows, lse_rows = h[rows].to(mm_dtype), targets[rows], lse[rows]
                    n = h_rows.size(0)
                    if ctx.compiled:
                        h_rows, t_rows, lse_rows = (
                            _padded(h_rows, chunk_rows, 0.0),
                            _padded(t_rows, chunk_rows, IGNORE_INDEX),
                            _padded(lse_rows, chunk_rows, 0.0))
                    chunk_h, chunk_w = backward(h_rows, w, t_rows, lse_rows, scale, softcap,
                                                need_h, need_w)
                    if need_h:
                        grad_h[rows] = chunk_h[:n]
                    if need_w:
                        grad_w += chunk_w
            if need_w:
                grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None


def chunk_rows_for(vocab: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Rows per chunk so that one chunk's logits hold about `chunk_elements` values."""
    return max(1, chunk_elements // vocab)


def check_head_backend(backend: str, device: torch.device | str | None = None) -> None:
    """Raise ValueError unless `backend` is one of `HEAD_BACKENDS` and can run on `device`:
    "cce" needs CUDA and an importable `cut-cross-entropy` (the import error is named,
    not swallowed: a broken install must not pass for a missing one)."""
    if backend not in HEAD_BACKENDS:
        raise ValueError(f"head loss backend {backend!r} is not allowed: one of "
                         f"{list(HEAD_BACKENDS)}")
    if backend != "cce":
        return
    if device is not None and torch.device(device).type != "cuda":
        raise ValueError(f"head loss backend 'cce' (cut-cross-entropy) runs on CUDA only, "
                         f"not on {torch.device(device)}: use 'chunked'")
    _cce_function()


@functools.cache
def _cce_function():
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as exc:  # not installed, or installed but failing (e.g. triton)
        raise ValueError(f"head loss backend 'cce' needs the cut-cross-entropy package "
                         f"(pip install 'loopedlm[cuda]'), which failed to import: {exc}"
                         ) from exc
    return linear_cross_entropy


def describe_head_backend(backend: str, compile: bool = False) -> str:
    """One line naming what `head_loss(backend=, compile=)` runs (for the run's log)."""
    if backend == "cce":
        from importlib.metadata import PackageNotFoundError, version

        try:
            release = version("cut-cross-entropy")
        except PackageNotFoundError:
            release = "not installed"
        return (f"cut-cross-entropy {release} (opt-in: bf16 gradient accumulation, not yet "
                f"checked against the chunked path on a GPU)")
    return ("chunked, fp32 accumulation" + (", chunk body compiled" if compile else ", eager"))


def head_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
              *, backend: str = "chunked", compile: bool = False,
              chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """Mean cross-entropy of `softcap * tanh(h @ weight.T / softcap)` against `targets`
    (-1 = ignored), never materialising the full logits.

    h:        (..., d) loop outputs; targets: (...) ids in [0, weight.size(0)) or -1.
    weight:   (vocab, d): the LM head cropped to the real vocabulary.
    backend:  "chunked" (default) or "cce" (cut-cross-entropy, CUDA, opt-in): see the
              module docstring. compile: compile the chunked path's chunk body.
    "chunked" equals `F.cross_entropy(LoopedGPT.logits(h), targets, ignore_index=-1)` up
    to float rounding, value and gradients; "cce" up to its bf16 gradient accumulation.
    """
    check_head_backend(backend)
    if backend == "cce":
        mm_dtype = _matmul_dtype(h)
        if mm_dtype == torch.float32:  # its kernels take fp16/bf16 only
            mm_dtype = torch.bfloat16
        # filter_eps=None: no gradient filtering, so gradients follow the plain path
        return _cce_function()(h.to(mm_dtype), weight.to(mm_dtype), targets,
                               ignore_index=IGNORE_INDEX, softcap=float(softcap),
                               reduction="mean", filter_eps=None)
    flat_h = h.reshape(-1, h.size(-1))
    return _ChunkedHeadLoss.apply(flat_h, weight, targets.reshape(-1), float(softcap),
                                  chunk_rows_for(weight.size(0), chunk_elements),
                                  _matmul_dtype(h), bool(compile))


__all__ = ["head_loss", "chunk_rows_for", "check_head_backend", "describe_head_backend",
           "HEAD_BACKENDS", "IGNORE_INDEX", "DEFAULT_CHUNK_ELEMENTS"]
