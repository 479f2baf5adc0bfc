"""Attention (docs/design.md#backbone, #attention-variants): full/GQA and MLA projections,
RoPE, QK-norm, sliding windows, and the attention plan that every layer of one pass shares.

Every attention call goes through `F.scaled_dot_product_attention`. The choice of SDPA
path (`is_causal` fast path vs. an explicit boolean mask) mirrors the FLT authors' nanochat
fork so that logits agree with theirs as closely as the kernels allow. `attention_masks` is
the one mask builder: the full forward and every pass of the decode engine ask it.

The model holds no KV cache. A decoding pass brings one in its plan: a `CacheWriter` (the
decode engine's static cache, `loopedlm.infer.cache`), which every attention layer hands its
new keys and values and gets back all the keys and values to attend over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from loopedlm.model.config import ModelConfig

# window size (None = full context) -> (mask (B|1, 1, Tq, Tk) or None, is_causal); a mask is
# boolean (True = attend) or additive (0 / -inf, in the queries' dtype)
Masks = dict[int | None, tuple[torch.Tensor | None, bool]]


def norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dimension (docs/design.md#backbone)."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len: int, head_dim: int, base: float, device=None, style: str = "nanochat"):
    """cos/sin tables of shape (seq_len, head_dim/2) for `apply_rotary_emb`.

    style "nanochat": kept in bf16, as nanochat does. "hf": Hugging Face's RoPE (Llama,
    Qwen, Ouro: `q * cos + rotate_half(q) * sin`), which rotates the other way, so the sine
    table is negated; kept in fp32 (docs/public_models.md)."""
    channel = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
    inv_freq = 1.0 / (base ** (channel / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    if style == "hf":
        return freqs.cos(), -freqs.sin()
    return freqs.cos().bfloat16(), freqs.sin().bfloat16()


def rotation(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-width rotation tables (..., D) of half-width RoPE tables (..., D/2):
    (cos, cos) and (sin, -sin), what `apply_rotary_emb` multiplies by. Built once per pass."""
    return torch.cat([cos, cos], -1), torch.cat([sin, -sin], -1)


def rotary_at(cos_table: torch.Tensor, sin_table: torch.Tensor, positions: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation tables (`rotation`) at `positions` (B|1, T), shaped (B|1, T, 1, D)."""
    return rotation(cos_table[positions][:, :, None, :], sin_table[positions][:, :, None, :])


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves (x1, x2) of each head vector into (x1 cos + x2 sin,
    x2 cos - x1 sin); x is (B, T, H, D), cos/sin the full-width tables of `rotation`
    (B|1, T, 1, D). Swapping the halves is one roll, so this is four kernels; every product
    and sum is the one of the half-by-half form (nanochat's), so the bits are the same."""
    return x * cos + x.roll(x.size(-1) // 2, -1) * sin


class CacheWriter(Protocol):
    """Where a decoding pass keeps keys and values (docs/design.md#kv-cache): one entry per
    (loop, layer), since a looped model recomputes every layer at every loop. The writers of
    `loopedlm.infer.cache` implement it."""

    def insert(self, loop: int, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the pass's new keys and values (B, H_kv, T, D) of `layer` at `loop`
        (0-based); return every key and value its queries attend over."""
        ...


@dataclass
class AttentionPlan:
    """What every layer needs for one pass: the RoPE rotation tables at the queries'
    positions (`rotary_at`), the masks per window size (`attention_masks`) and, when
    decoding, the cache writer and the fused projection weights (per layer, the q, k and v
    weights stacked into one matrix: `CausalSelfAttention.fused_weight`; None: the layers'
    own projections). rows: the pass's rows are these rows of the batch that the masks and
    the cache writer's keys cover (decoding rows still looping while others have stopped);
    None: all of them, in order.

    Built once per pass (not per layer or per loop)."""

    cos: torch.Tensor
    sin: torch.Tensor
    masks: Masks
    cache: CacheWriter | None = None
    fused: list[torch.Tensor | None] | None = None
    rows: torch.Tensor | None = None


def attention_masks(config: ModelConfig, q_slot: torch.Tensor, n_keys: int, *,
                    q_pos: torch.Tensor | None = None, k_pos: torch.Tensor | None = None,
                    k_valid: torch.Tensor | None = None, from_start: bool = False,
                    dtype: torch.dtype | None = None) -> Masks:
    """The masks of a pass, one per window size of the model's layers.

    q_slot (B|1, Tq): each query's index among the keys 0 .. n_keys-1; a query sees the keys
    at or before its own slot (causality). q_pos / k_pos (B|1, T): the RoPE positions that
    sliding windows measure (default: the slots; under left padding they count real tokens
    only). k_valid (B, Tk): False marks padding keys, never attended (a padding query then
    sees itself alone, so that it gives no NaN). from_start: the queries are the keys
    0 .. n_keys-1 themselves, with no padding, so full-context layers take SDPA's is_causal
    path with no mask, as nanochat and the authors' code do (bit-identical logits).
    dtype: additive masks (0 where attended, -inf elsewhere) in this dtype, the form SDPA
    adds to the scores; built once per pass, where a boolean mask is converted by every
    layer's SDPA call (same values, so the same logits).
    """
    k_slot = torch.arange(n_keys, device=q_slot.device)
    masks: Masks = {}
    for window in set(config.window_sizes()):
        if window is None and from_start:
            masks[window] = (None, True)
            continue
        mask = k_slot <= q_slot[:, :, None]  # (B|1, Tq, Tk)
        if window is not None:
            q = q_slot if q_pos is None else q_pos
            k = k_slot[None] if k_pos is None else k_pos
            mask = mask & ((q[:, :, None] - k[:, None, :]) < window)
        if k_valid is not None:
            mask = (mask & k_valid[:, None, :]) | (k_slot == q_slot[:, :, None])
        if dtype is not None:
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
                ~mask, float("-inf"))
        masks[window] = (mask[:, None], False)
    return masks


def sequence_plan(config: ModelConfig, cos_table: torch.Tensor, sin_table: torch.Tensor,
                  length: int, attention_mask: torch.Tensor | None = None) -> AttentionPlan:
    """The plan of a pass over whole sequences from position 0 (training and scoring). With
    `attention_mask` (B, T) (False = padding, on the left of ragged rows) positions count
    real tokens only and padding is never attended to (a mask is taken as given, with no
    host sync to look for padding in it: a caller without padding passes None)."""
    slots = torch.arange(length, device=cos_table.device)[None]
    if attention_mask is None:
        cos, sin = rotation(cos_table[None, :length, None, :], sin_table[None, :length, None, :])
        return AttentionPlan(cos, sin, attention_masks(config, slots, length, from_start=True))
    positions = (attention_mask.long().cumsum(1) - 1).clamp_min(0)
    cos, sin = rotary_at(cos_table, sin_table, positions)
    return AttentionPlan(cos, sin, attention_masks(config, slots, length, q_pos=positions,
                                                   k_pos=positions, k_valid=attention_mask))


class CausalSelfAttention(nn.Module):
    """Multi-head attention with GQA; `attn_type="mla"` compresses keys/values
    (docs/design.md#attention-variants).

    The query input and the key/value input are separate arguments: Attention
    Injection (docs/design.md#attention-injection) feeds the previous loop's state as the query source.
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.window = config.window_sizes()[layer_idx]
        self.qk_norm = config.backbone_spec.qk_norm
        self.is_mla = config.attn_type == "mla"
        d, kv_dim = config.d_model, config.n_kv_head * config.head_dim
        self.c_q = nn.Linear(d, config.n_head * config.head_dim, bias=config.qk_bias)
        if self.is_mla:
            self.c_kv_down = nn.Linear(d, config.kv_rank, bias=False)
            self.c_k_up = nn.Linear(config.kv_rank, kv_dim, bias=False)
            self.c_v_up = nn.Linear(config.kv_rank, kv_dim, bias=False)
        else:
            self.c_k = nn.Linear(d, kv_dim, bias=config.qk_bias)
            self.c_v = nn.Linear(d, kv_dim, bias=False)
        self.c_proj = nn.Linear(config.n_head * config.head_dim, d, bias=False)

    def fused_weight(self) -> torch.Tensor | None:
        """The q, k and v projection weights stacked into one matrix (rows q, then k, then
        v), so that decoding computes all three in one matmul, or the queries and the
        keys/values in two when they read different inputs (None for MLA). A new tensor:
        the parameters and their state-dict keys stay as they are; whoever keeps it (the
        decode engine) refreshes it when the weights change."""
        if self.is_mla or self.c_q.bias is not None:  # biased projections stay unfused
            return None
        return torch.cat([self.c_q.weight, self.c_k.weight, self.c_v.weight]).detach()

    def _rotate_norm(self, x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        """RoPE, then QK-norm where the backbone has it (after RoPE, as nanochat)."""
        x = apply_rotary_emb(x, plan.cos, plan.sin)
        return norm(x) if self.qk_norm else x

    def _queries(self, q_in: torch.Tensor, fused: torch.Tensor | None) -> torch.Tensor:
        """Raw queries (B, T, H, D), before RoPE and QK-norm."""
        q = self.c_q(q_in) if fused is None else F.linear(q_in, fused[: self.n_head * self.head_dim])
        return q.view(*q_in.shape[:2], self.n_head, self.head_dim)

    def _keys_values(self, kv_in: torch.Tensor, fused: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw keys and values (B, T, H_kv, D), before RoPE and QK-norm."""
        if self.is_mla:
            # a parameter-free norm on the latent (docs/design.md#attention-variants)
            latent = norm(self.c_kv_down(kv_in))
            k, v = self.c_k_up(latent), self.c_v_up(latent)
        elif fused is None:
            k, v = self.c_k(kv_in), self.c_v(kv_in)
        else:
            n_q, n_kv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
            k, v = F.linear(kv_in, fused[n_q:]).split(n_kv, -1)
        shape = (*kv_in.shape[:2], self.n_kv_head, self.head_dim)
        return k.view(shape), v.view(shape)

    def keys_values(self, kv_in: torch.Tensor, plan: AttentionPlan
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (RoPE + QK-norm) and values of `kv_in` (B, T, d), as (B, H_kv, T, D)."""
        k, v = self._keys_values(kv_in, None if plan.fused is None else plan.fused[self.layer_idx])
        k = self._rotate_norm(k, plan)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, q_in: torch.Tensor, kv_in: torch.Tensor | None, plan: AttentionPlan,
                loop: int, kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Attend from queries of `q_in` to keys/values of `kv_in`, or to the precomputed
        `kv` (`keys_values` output: the loop-invariant first layer of `flt`/`ltai`)."""
        B, T, _ = q_in.shape
        fused = None if plan.fused is None else plan.fused[self.layer_idx]
        if kv is None:
            if fused is not None and q_in is kv_in:  # q, k and v in one matmul, q and k adjacent
                qkv = F.linear(q_in, fused).view(B, T, -1, self.head_dim)
                qk, v = qkv[:, :, : self.n_head + self.n_kv_head], qkv[:, :, -self.n_kv_head:]
            else:
                k, v = self._keys_values(kv_in, fused)
                qk = torch.cat([self._queries(q_in, fused), k], 2)
            # RoPE and QK-norm of queries and keys at once: both act on each head vector alone
            qk = self._rotate_norm(qk, plan).transpose(1, 2)
            q, k, v = qk[:, : self.n_head], qk[:, self.n_head:], v.transpose(1, 2)
        else:
            q = self._rotate_norm(self._queries(q_in, fused), plan)
            q, (k, v) = q.transpose(1, 2), kv
        if plan.cache is not None:
            k, v = plan.cache.insert(loop, self.layer_idx, k, v)
        attn_mask, is_causal = plan.masks[self.window]
        if plan.rows is not None:  # the pass's queries take their rows of the keys' batch
            q = q.new_zeros((k.size(0), *q.shape[1:])).index_copy_(0, plan.rows, q)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           enable_gqa=self.n_head != self.n_kv_head)
        if plan.rows is not None:
            y = y.index_select(0, plan.rows)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    """nanochat's MLP: c_proj(relu(c_fc(x))^2)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.c_proj = nn.Linear(config.mlp_hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class SwiGLU(nn.Module):
    """The gated MLP of Llama-style models: c_proj(silu(c_gate(x)) * c_up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_gate = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.c_up = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.c_proj = nn.Linear(config.mlp_hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.silu(self.c_gate(x)) * self.c_up(x))


MLPS = {"relu2": MLP, "swiglu": SwiGLU}
