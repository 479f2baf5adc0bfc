"""Attention (SPEC 1, 3): full/GQA and MLA projections, RoPE, QK-norm, sliding windows,
and the KV cache with one entry per (loop, layer).

Every attention call goes through `F.scaled_dot_product_attention`. The choice of
SDPA path (`is_causal` fast path vs. an explicit boolean mask) mirrors the FLT authors'
nanochat fork so that logits agree with theirs as closely as the kernels allow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from loopedlm.model.config import ModelConfig


def norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dimension (SPEC 1)."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len: int, head_dim: int, base: float, device=None):
    """cos/sin tables of shape (seq_len, head_dim/2), kept in bf16 as nanochat does."""
    channel = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
    inv_freq = 1.0 / (base ** (channel / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    return freqs.cos().bfloat16(), freqs.sin().bfloat16()


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head vector; x is (B, T, H, D), cos/sin (B|1, T, 1, D/2)."""
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], 3)


class KVCache:
    """Keys and values for incremental decoding, one entry per (loop slot, layer).

    Looped models recompute every layer at every loop, so a token's keys at loop t
    differ from its keys at loop t'. SPEC 2 requires one entry per (loop, layer); the
    authors' code caches only the last loop, which makes earlier loops see a single
    token while decoding. `loop_slots` maps each loop (0-based) to a storage slot:
    the identity (default) is exact; mapping several loops to one slot bounds memory
    (the Huginn-style shared cache) at a quality cost.

    Rows may be left-padded: `attention_mask` marks real tokens, positions count real
    tokens only, and padded keys are never attended to.
    """

    def __init__(self, batch_size: int, max_len: int, n_layers: int, n_kv_head: int,
                 head_dim: int, n_loops: int, *, loop_slots: list[int] | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if loop_slots is None:
            loop_slots = list(range(n_loops))
        if len(loop_slots) != n_loops or min(loop_slots) < 0:
            raise ValueError(f"loop_slots={loop_slots!r} must give a slot >= 0 for each of the "
                             f"{n_loops} loops")
        self.loop_slots = list(loop_slots)
        self.n_loops = n_loops
        self.max_len = max_len
        n_slots = max(loop_slots) + 1
        shape = (n_slots, n_layers, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.key_pos = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.n_real = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.pos = 0  # slots filled so far (shared by the whole batch)

    @classmethod
    def for_model(cls, config: ModelConfig, batch_size: int, *, n_loops: int | None = None,
                  max_len: int | None = None, loop_slots: list[int] | None = None,
                  dtype: torch.dtype = torch.float32, device="cpu") -> KVCache:
        n_loops = config.loops(n_loops)
        max_len = config.sequence_len if max_len is None else max_len
        return cls(batch_size, max_len, config.depth, config.n_kv_head, config.head_dim, n_loops,
                   loop_slots=loop_slots, dtype=dtype, device=device)

    @property
    def batch_size(self) -> int:
        return self.valid.size(0)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def insert(self, loop: int, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, T, D) at the current slots; return all keys/values so far."""
        slot = self.loop_slots[loop]
        t0, t1 = self.pos, self.pos + k.size(2)
        self.k[slot, layer, :, :, t0:t1] = k
        self.v[slot, layer, :, :, t0:t1] = v
        return self.k[slot, layer, :, :, :t1], self.v[slot, layer, :, :, :t1]

    def rows(self, rows: torch.Tensor) -> _CacheRows:
        """A view of this cache restricted to batch `rows` (adaptive decoding: the rows
        still looping); its `insert` writes into this cache."""
        return _CacheRows(self, rows)

    def fill_loops_from(self, last_loop: int, rows: torch.Tensor) -> None:
        """Give the loops after `last_loop` the keys/values that `last_loop` wrote at the
        current position, for batch `rows` (the loops an adaptive row skipped)."""
        src = self.loop_slots[last_loop]
        for loop in range(last_loop + 1, self.n_loops):
            dst = self.loop_slots[loop]
            if dst != src:
                self.k[dst, :, rows, :, self.pos] = self.k[src, :, rows, :, self.pos]
                self.v[dst, :, rows, :, self.pos] = self.v[src, :, rows, :, self.pos]

    def reserve(self, real: torch.Tensor) -> torch.Tensor:
        """Record which new tokens are real (B, T); return their RoPE positions (B, T)."""
        t0, t1 = self.pos, self.pos + real.size(1)
        positions = (self.n_real[:, None] + real.long().cumsum(1) - 1).clamp_min(0)
        self.valid[:, t0:t1] = real
        self.key_pos[:, t0:t1] = positions
        return positions

    def advance(self, n_tokens: int, real: torch.Tensor) -> None:
        self.pos += n_tokens
        self.n_real += real.long().sum(1)


class _CacheRows:
    """`KVCache.rows`: the cache as seen by a subset of the batch rows."""

    def __init__(self, cache: KVCache, rows: torch.Tensor):
        self.cache, self.rows = cache, rows

    def insert(self, loop: int, layer: int, k: torch.Tensor, v: torch.Tensor):
        c, slot = self.cache, self.cache.loop_slots[loop]
        t0, t1 = c.pos, c.pos + k.size(2)
        c.k[slot, layer, self.rows, :, t0:t1] = k
        c.v[slot, layer, self.rows, :, t0:t1] = v
        return c.k[slot, layer, self.rows, :, :t1], c.v[slot, layer, self.rows, :, :t1]


@dataclass
class AttentionPlan:
    """What every layer needs for one forward: RoPE tables and, per window size, the mask.

    Built once per forward (not per layer or per loop).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    masks: dict  # window (None = full) -> (attn_mask or None, is_causal)
    cache: KVCache | _CacheRows | None = None

    def select_rows(self, rows: torch.Tensor, batch: int) -> AttentionPlan:
        """This plan for batch `rows` only (per-row RoPE slices, (B, 1, Tq, Tk) masks and
        the cache rows)."""
        def pick(t):
            return t[rows] if t is not None and t.dim() == 4 and t.size(0) == batch else t
        masks = {w: (pick(m), causal) for w, (m, causal) in self.masks.items()}
        cache = self.cache.rows(rows) if isinstance(self.cache, KVCache) else self.cache
        return AttentionPlan(cos=pick(self.cos), sin=pick(self.sin), masks=masks, cache=cache)


def build_plan(config: ModelConfig, cos_table: torch.Tensor, sin_table: torch.Tensor,
               batch: int, n_new: int, *, cache: KVCache | None,
               attention_mask: torch.Tensor | None, device) -> AttentionPlan:
    """Positions, RoPE slices and masks for `n_new` tokens appended after the cache."""
    pos0 = 0 if cache is None else cache.pos
    if cache is None and attention_mask is None:
        cos, sin = cos_table[None, :n_new, None, :], sin_table[None, :n_new, None, :]
        q_pos, k_pos, k_valid = None, None, None
    else:
        real = (attention_mask if attention_mask is not None
                else torch.ones(batch, n_new, dtype=torch.bool, device=device))
        if cache is not None:
            q_pos = cache.reserve(real)
            k_pos, k_valid = cache.key_pos[:, : pos0 + n_new], cache.valid[:, : pos0 + n_new]
        else:
            q_pos = (real.long().cumsum(1) - 1).clamp_min(0)
            k_pos, k_valid = q_pos, real
        cos, sin = cos_table[q_pos][:, :, None, :], sin_table[q_pos][:, :, None, :]

    # any padded key, new or cached, rules out the unmasked fast paths
    padded = k_valid is not None and not bool(k_valid.all())
    n_keys = pos0 + n_new
    masks = {}
    for window in set(config.window_sizes()):
        if window is None and not padded and (pos0 == 0 or n_new == 1):
            # fast paths, as in nanochat: plain causal, or one query that sees everything
            masks[window] = (None, pos0 == 0)
            continue
        q_slot = torch.arange(pos0, n_keys, device=device)
        k_slot = torch.arange(n_keys, device=device)
        mask = k_slot[None, :] <= q_slot[:, None]  # (Tq, Tk) causal
        if window is not None:
            if k_pos is None:
                mask = mask & ((q_slot[:, None] - k_slot[None, :]) < window)
            else:
                mask = mask[None] & ((q_pos[:, :, None] - k_pos[:, None, :]) < window)
        if padded:
            mask = (mask if mask.dim() == 3 else mask[None]) & k_valid[:, None, :]
            # a padding query would see nothing and produce NaN; let it see itself
            mask = mask | (k_slot[None, None, :] == q_slot[None, :, None])
        masks[window] = (mask[:, None] if mask.dim() == 3 else mask, False)
    return AttentionPlan(cos=cos, sin=sin, masks=masks, cache=cache)


class CausalSelfAttention(nn.Module):
    """Multi-head attention with GQA; `attn_type="mla"` compresses keys/values (SPEC 3).

    The query input and the key/value input are separate arguments: Attention
    Injection (SPEC 2) feeds the previous loop's state as the query source.
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
            latent = norm(self.c_kv_down(kv_in))  # SPEC 3: parameter-free norm on the latent
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
