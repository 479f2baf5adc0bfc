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

# window size (None = full context) -> (boolean mask (B|1, 1, Tq, Tk) or None, is_causal)
Masks = dict[int | None, tuple[torch.Tensor | None, bool]]


def norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dimension (docs/design.md#backbone)."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len: int, head_dim: int, base: float, device=None):
    """cos/sin tables of shape (seq_len, head_dim/2), kept in bf16 as nanochat does."""
    channel = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
    inv_freq = 1.0 / (base ** (channel / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    return freqs.cos().bfloat16(), freqs.sin().bfloat16()


def rotary_at(cos_table: torch.Tensor, sin_table: torch.Tensor, positions: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The RoPE tables at `positions` (B|1, T), shaped (B|1, T, 1, D/2)."""
    return cos_table[positions][:, :, None, :], sin_table[positions][:, :, None, :]


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head vector; x is (B, T, H, D), cos/sin (B|1, T, 1, D/2)."""
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], 3)


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
    """What every layer needs for one pass: RoPE tables at the queries' positions, the
    masks per window size (`attention_masks`) and, when decoding, the cache writer.

    Built once per pass (not per layer or per loop)."""

    cos: torch.Tensor
    sin: torch.Tensor
    masks: Masks
    cache: CacheWriter | None = None


def attention_masks(config: ModelConfig, q_slot: torch.Tensor, n_keys: int, *,
                    q_pos: torch.Tensor | None = None, k_pos: torch.Tensor | None = None,
                    k_valid: torch.Tensor | None = None, from_start: bool = False) -> Masks:
    """The masks of a pass, one per window size of the model's layers.

    q_slot (B|1, Tq): each query's index among the keys 0 .. n_keys-1; a query sees the keys
    at or before its own slot (causality). q_pos / k_pos (B|1, T): the RoPE positions that
    sliding windows measure (default: the slots; under left padding they count real tokens
    only). k_valid (B, Tk): False marks padding keys, never attended (a padding query then
    sees itself alone, so that it gives no NaN). from_start: the queries are the keys
    0 .. n_keys-1 themselves, with no padding, so full-context layers take SDPA's is_causal
    path with no mask, as nanochat and the authors' code do (bit-identical logits).
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
        masks[window] = (mask[:, None], False)
    return masks


def sequence_plan(config: ModelConfig, cos_table: torch.Tensor, sin_table: torch.Tensor,
                  length: int, attention_mask: torch.Tensor | None = None) -> AttentionPlan:
    """The plan of a pass over whole sequences from position 0 (training and scoring). With
    `attention_mask` (B, T) (False = padding, on the left of ragged rows) positions count
    real tokens only and padding is never attended to."""
    slots = torch.arange(length, device=cos_table.device)[None]
    # a mask with no padding in it takes the unpadded paths (one host sync, scoring only)
    if attention_mask is None or bool(attention_mask.all()):
        cos, sin = cos_table[None, :length, None, :], sin_table[None, :length, None, :]
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
        self.is_mla = config.attn_type == "mla"
        d, kv_dim = config.d_model, config.n_kv_head * config.head_dim
        self.c_q = nn.Linear(d, config.n_head * config.head_dim, bias=False)
        if self.is_mla:
            self.c_kv_down = nn.Linear(d, config.kv_rank, bias=False)
            self.c_k_up = nn.Linear(config.kv_rank, kv_dim, bias=False)
            self.c_v_up = nn.Linear(config.kv_rank, kv_dim, bias=False)
        else:
            self.c_k = nn.Linear(d, kv_dim, bias=False)
            self.c_v = nn.Linear(d, kv_dim, bias=False)
        self.c_proj = nn.Linear(config.n_head * config.head_dim, d, bias=False)

    def _keys_values(self, kv_in: torch.Tensor):
        if self.is_mla:
            # a parameter-free norm on the latent (docs/design.md#attention-variants)
            latent = norm(self.c_kv_down(kv_in))
            return self.c_k_up(latent), self.c_v_up(latent)
        return self.c_k(kv_in), self.c_v(kv_in)

    def keys_values(self, kv_in: torch.Tensor, plan: AttentionPlan
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (RoPE + QK-norm) and values of `kv_in` (B, T, d), as (B, H_kv, T, D)."""
        B, T, _ = kv_in.shape
        k, v = self._keys_values(kv_in)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        k = norm(apply_rotary_emb(k, plan.cos, plan.sin))  # QK-norm after RoPE, as nanochat
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, q_in: torch.Tensor, kv_in: torch.Tensor | None, plan: AttentionPlan,
                loop: int, kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Attend from queries of `q_in` to keys/values of `kv_in`, or to the precomputed
        `kv` (`keys_values` output: the loop-invariant first layer of `flt`/`ltai`)."""
        B, T, _ = q_in.shape
        k, v = self.keys_values(kv_in, plan) if kv is None else kv
        q = self.c_q(q_in).view(B, T, self.n_head, self.head_dim)
        q = norm(apply_rotary_emb(q, plan.cos, plan.sin)).transpose(1, 2)
        if plan.cache is not None:
            k, v = plan.cache.insert(loop, self.layer_idx, k, v)
        attn_mask, is_causal = plan.masks[self.window]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           enable_gqa=self.n_head != self.n_kv_head)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, 4 * config.d_model, bias=False)
        self.c_proj = nn.Linear(4 * config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())
