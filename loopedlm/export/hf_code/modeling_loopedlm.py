"""A looped GPT exported by loopedlm, for `transformers` (load it with trust_remote_code=True).

The model is nanochat's GPT whose `depth` blocks run `n_loops` times. Loop 1 is a plain
transformer pass; how a later loop t reads the previous loop's output h^{t-1} is the loop
mode, a row of LOOP_MODES, and one loop (`run_loop`) runs every mode:

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    logits = model(ids, n_loops=6).logits               # the same weights at any loop count
    out = model.generate(ids, n_loops=6, max_new_tokens=50)

The KV cache is a `DynamicCache` with one layer per (loop, block), at index
loop * depth + block: a token's keys differ from loop to loop, so every loop keeps its own
(in flt and ltai the first block's are the same in every loop and are kept once).
`output_hidden_states=True` returns (e, h^1, ..., h^N): the input embedding and the output
of every loop. Needs only torch and transformers (>= 4.56, checked in
configuration_loopedlm.py); it uses transformers' public API only.
"""

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_loopedlm import LoopedLMConfig


class LoopMode(NamedTuple):
    """How loop t > 1 differs from loop 1.

    start:     where the stream starts: "embedding" (e = norm(wte(ids))), "previous"
               (h^{t-1}) or "embedding_plus_previous" (norm(wte(ids) + h^{t-1})).
    injection: how h^{t-1} reaches a layer: "none"; "attention" (it is the source of the
               queries; keys and values still read the stream); "residual" (the stream
               becomes norm(x + h^{t-1}) before the block).
    layers:    which layers inject: "all" or "first".
    """

    start: str
    injection: str = "none"
    layers: str = "all"

    def injects_at(self, layer):
        return self.injection != "none" and (self.layers == "all" or layer == 0)

    @property
    def first_layer_kv_invariant(self):
        """Every loop restarts from e and nothing enters the stream before layer 1, so the
        first layer's keys and values are the same in every loop (computed once)."""
        return self.start == "embedding" and self.injection != "residual"


LOOP_MODES = {
    "lt": LoopMode(start="previous"),  # Looped Transformer
    "lti": LoopMode(start="embedding_plus_previous"),  # + Input Injection
    "ltai": LoopMode(start="embedding", injection="attention", layers="first"),  # + Attention Inj.
    "flt_res": LoopMode(start="embedding", injection="residual"),  # Fully Looped, residual fusion
    "flt": LoopMode(start="embedding", injection="attention"),  # Fully Looped Transformer
}


def norm(x):
    """Parameter-free RMSNorm over the last dimension."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(length, head_dim, base, device):
    """RoPE cos/sin of shape (length, head_dim / 2), kept in bf16 as nanochat does."""
    channel = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
    inv_freq = 1.0 / (base ** (channel / head_dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    return freqs.cos().bfloat16(), freqs.sin().bfloat16()


def apply_rotary(x, cos, sin):
    """Rotate the two halves of each head vector; x is (B, T, H, D)."""
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], 3)


class Plan(NamedTuple):
    """What every layer of one forward shares: RoPE slices, a mask per window size
    (window -> (boolean mask or None, is_causal)) and the cache."""

    cos: torch.Tensor
    sin: torch.Tensor
    masks: dict
    cache: Cache = None


def window_sizes(config):
    """Per-layer sliding window ('S' in window_pattern: sequence_len // 4 keys; None = full
    context); the last layer is always full."""
    pattern = config.window_pattern.upper()
    short = max(config.sequence_len // 4, 1)
    sizes = [short if pattern[i % len(pattern)] == "S" else None for i in range(config.depth)]
    sizes[-1] = None
    return sizes


def build_plan(config, tables, attention_mask, n_past, n_new, batch, cache, device):
    """Positions count real tokens only (attention_mask covers the cached and the new
    tokens, 1 = real); padded keys are never attended to; a padding query sees itself."""
    cos_table, sin_table = tables
    if attention_mask is None and n_past == 0:
        cos, sin = cos_table[None, :n_new, None, :], sin_table[None, :n_new, None, :]
        padded, q_pos, k_pos, real = False, None, None, None
    else:
        real = (torch.ones(batch, n_past + n_new, dtype=torch.bool, device=device)
                if attention_mask is None else attention_mask.to(device=device, dtype=torch.bool))
        if real.shape != (batch, n_past + n_new):
            raise ValueError(f"attention_mask has shape {tuple(real.shape)}; expected "
                             f"{(batch, n_past + n_new)} (the cached and the new tokens)")
        k_pos = (real.long().cumsum(1) - 1).clamp_min(0)
        q_pos = k_pos[:, n_past:]
        cos, sin = cos_table[q_pos][:, :, None, :], sin_table[q_pos][:, :, None, :]
        padded = not bool(real.all())
    n_keys = n_past + n_new
    masks = {}
    for window in set(window_sizes(config)):
        if window is None and not padded and (n_past == 0 or n_new == 1):
            masks[window] = (None, n_past == 0)  # plain causal, or one query that sees all
            continue
        q_slot = torch.arange(n_past, n_keys, device=device)
        k_slot = torch.arange(n_keys, device=device)
        mask = k_slot[None, :] <= q_slot[:, None]
        if window is not None:
            if k_pos is None:
                mask = mask & ((q_slot[:, None] - k_slot[None, :]) < window)
            else:
                mask = mask[None] & ((q_pos[:, :, None] - k_pos[:, None, :]) < window)
        if padded:
            mask = (mask if mask.dim() == 3 else mask[None]) & real[:, None, :]
            mask = mask | (k_slot[None, None, :] == q_slot[None, :, None])
        masks[window] = (mask[:, None] if mask.dim() == 3 else mask, False)
    return Plan(cos, sin, masks, cache)


class Attention(nn.Module):
    """Causal self-attention with RoPE, QK-norm and GQA; `attn_type="mla"` compresses the
    keys' and values' input through a shared low-rank latent. The query input and the
    key/value input are separate: Attention Injection reads its queries from h^{t-1}."""

    def __init__(self, config, layer):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.d_model // config.n_head
        self.window = window_sizes(config)[layer]
        self.is_mla = config.attn_type == "mla"
        d, kv_dim = config.d_model, config.n_kv_head * self.head_dim
        self.c_q = nn.Linear(d, config.n_head * self.head_dim, bias=False)
        if self.is_mla:
            self.c_kv_down = nn.Linear(d, config.kv_rank, bias=False)
            self.c_k_up = nn.Linear(config.kv_rank, kv_dim, bias=False)
            self.c_v_up = nn.Linear(config.kv_rank, kv_dim, bias=False)
        else:
            self.c_k = nn.Linear(d, kv_dim, bias=False)
            self.c_v = nn.Linear(d, kv_dim, bias=False)
        self.c_proj = nn.Linear(config.n_head * self.head_dim, d, bias=False)

    def keys_values(self, kv_in, plan):
        """Keys (RoPE, then QK-norm) and values of kv_in (B, T, d), as (B, H_kv, T, D)."""
        B, T, _ = kv_in.shape
        if self.is_mla:
            latent = norm(self.c_kv_down(kv_in))
            k, v = self.c_k_up(latent), self.c_v_up(latent)
        else:
            k, v = self.c_k(kv_in), self.c_v(kv_in)
        k = norm(apply_rotary(k.view(B, T, self.n_kv_head, self.head_dim), plan.cos, plan.sin))
        return k.transpose(1, 2), v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)

    def forward(self, q_in, kv_in, plan, slot, kv=None):
        """Queries of q_in attend to the keys and values of kv_in, appended to cache layer
        `slot`; or to `kv`, all keys and values already (the loop-invariant first layer)."""
        B, T, _ = q_in.shape
        k, v = self.keys_values(kv_in, plan) if kv is None else kv
        q = self.c_q(q_in).view(B, T, self.n_head, self.head_dim)
        q = norm(apply_rotary(q, plan.cos, plan.sin)).transpose(1, 2)
        if plan.cache is not None and kv is None:
            k, v = plan.cache.update(k, v, slot)
        mask, is_causal = plan.masks[self.window]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           enable_gqa=self.n_head != self.n_kv_head)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.c_proj = nn.Linear(config.mlp_hidden, config.d_model, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


def residual(x, branch, eps):
    return x + branch if eps == 1.0 else x + eps * branch


class Block(nn.Module):
    """Pre-norm block; with a query source (Attention Injection) the queries read it while
    keys and values read the stream, and the source never enters the stream."""

    def __init__(self, config, layer):
        super().__init__()
        self.attn = Attention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, query_normed, plan, slot, eps, kv=None):
        x_normed = norm(x) if query_normed is None or kv is None else None
        q_in = x_normed if query_normed is None else query_normed
        x = residual(x, self.attn(q_in, x_normed, plan, slot, kv=kv), eps)
        return residual(x, self.mlp(norm(x)), eps)


def residual_eps(config):
    """The scale on every residual branch, fixed by the loop count the model was trained at."""
    n, depth = config.trained_loops, config.depth
    return {"none": 1.0, "inv_sqrt_loops": 1.0 / math.sqrt(n), "inv_loops": 1.0 / n,
            "lambda_loops_sqrt_depth": config.residual_lambda / (n * math.sqrt(depth)),
            }[config.residual_scale]


class LoopedLMForCausalLM(PreTrainedModel, GenerationMixin):
    """A looped causal LM. `forward` and `generate` take `n_loops=` (default: the loop count
    it was trained at, config.n_loops)."""

    config_class = LoopedLMConfig

    def __init__(self, config):
        super().__init__(config)
        self.mode = LOOP_MODES[config.loop_mode]
        padded_vocab = -(-config.vocab_size // config.pad_vocab_to) * config.pad_vocab_to
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(padded_vocab, config.d_model),
            "h": nn.ModuleList([Block(config, i) for i in range(config.depth)]),
        })
        self.lm_head = nn.Linear(config.d_model, padded_vocab, bias=False)
        self.rope = {}  # device -> RoPE tables, made on first use (nothing to load or save)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def get_output_embeddings(self):
        return self.lm_head

    def rope_tables(self, device):
        if device not in self.rope:
            head_dim = self.config.d_model // self.config.n_head
            # 10 x sequence_len positions, as loopedlm and the FLT authors' model
            self.rope[device] = rotary_tables(10 * self.config.sequence_len, head_dim,
                                              self.config.rope_base, device)
        return self.rope[device]

    def cache_slot(self, loop, layer):
        """The cache layer of (loop, block): loop * depth + block. In flt and ltai the first
        block's keys and values are the same in every loop: they are kept once, in layer 0,
        and the other blocks follow (1 + loop * (depth - 1) + block - 1), so that every
        layer of the cache holds every token, as generate's cache handling expects."""
        if self.mode.first_layer_kv_invariant:
            return 0 if layer == 0 else 1 + loop * (self.config.depth - 1) + layer - 1
        return loop * self.config.depth + layer

    def cache_slots(self, n_loops):
        """How many cache layers n_loops loops use."""
        return self.cache_slot(n_loops - 1, self.config.depth - 1) + 1

    def loop_cache(self, cache, n_loops):
        """The cache for n_loops loops: a DynamicCache with `cache_slots(n_loops)` layers.
        One made by generate from the config has a layer per block: the rest are added."""
        slots = self.cache_slots(n_loops)
        if cache is None:
            cache = DynamicCache()
        if not isinstance(cache, DynamicCache):
            raise ValueError(f"past_key_values is a {type(cache).__name__}; a looped model needs "
                             f"a DynamicCache (one layer per loop and block)")
        if cache.get_seq_length() > 0 and len(cache.layers) != slots:
            raise ValueError(f"past_key_values has {len(cache.layers)} layers, n_loops={n_loops} "
                             f"needs {slots}: a cache serves one loop count")
        while len(cache.layers) < slots:
            cache.layers.append(DynamicLayer())
        return cache

    def start_stream(self, x0, embedded, previous):
        """Where loop t starts; loop 1 always starts at e."""
        if previous is None or self.mode.start == "embedding":
            return embedded
        if self.mode.start == "previous":
            return previous
        return norm(x0 + previous)  # embedding_plus_previous

    def run_loop(self, x, previous, loop, plan, first_kv):
        """The `depth` blocks once on stream x; previous is h^{t-1} (None in loop 1)."""
        eps = residual_eps(self.config)
        query = norm(previous) if previous is not None and self.mode.injection == "attention" \
            else None
        for layer, block in enumerate(self.transformer.h):
            query_normed = None
            if previous is not None and self.mode.injects_at(layer):
                if self.mode.injection == "residual":
                    x = norm(x + previous)
                else:
                    query_normed = query
            elif self.mode.injection == "attention" and self.mode.injects_at(layer):
                query_normed = norm(x)  # loop 1: the queries read the stream (same bits)
            kv = first_kv if layer == 0 else None
            x = block(x, query_normed, plan, self.cache_slot(loop, layer), eps, kv=kv)
        return x

    def logits(self, h):
        """Soft-capped logits, cropped to the real vocabulary."""
        cap = self.config.softcap
        return cap * torch.tanh(self.lm_head(h)[..., : self.config.vocab_size].float() / cap)

    def supervised_loops(self, n_loops):
        """0-based loops whose output enters the loss (config.loss_loops)."""
        return {"last": range(n_loops - 1, n_loops), "all": range(n_loops),
                "last_third": range(2 * n_loops // 3, n_loops)}[self.config.loss_loops]

    def loss(self, states, labels, n_loops):
        """Mean next-token cross-entropy (labels == -100 ignored) over the supervised loops."""
        targets = labels[:, 1:].reshape(-1).to(states[-1].device)
        losses = [F.cross_entropy(self.logits(states[t + 1][:, :-1]).flatten(0, 1), targets,
                                  ignore_index=-100) for t in self.supervised_loops(n_loops)]
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

    def loops(self, n_loops):
        """The loop count of a call: n_loops, or config.n_loops when None."""
        n_loops = self.config.n_loops if n_loops is None else n_loops
        if isinstance(n_loops, bool) or not isinstance(n_loops, int) or n_loops < 1:
            raise ValueError(f"n_loops={n_loops!r} is not allowed: an integer >= 1")
        return n_loops

    def check_length(self, input_ids, n_past):
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("input_ids of shape (batch, time) are needed (inputs_embeds is not "
                             "supported)")
        limit = 10 * self.config.sequence_len
        if n_past + input_ids.size(1) > limit:
            raise ValueError(f"sequence of {n_past + input_ids.size(1)} tokens is longer than "
                             f"the RoPE table ({limit} positions)")

    def embed(self, input_ids):
        """wte(ids). Ids at or beyond vocab_size (the end-of-text and padding tokens that
        loopedlm adds to a tokenizer that has none) are read as BOS, the token that
        separates documents in training; padding positions are masked anyway."""
        bos = self.config.bos_token_id
        if bos is not None:
            input_ids = input_ids.masked_fill(input_ids >= self.config.vocab_size, bos)
        return self.transformer.wte(input_ids)

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, labels=None,
                use_cache=None, output_hidden_states=None, logits_to_keep=0, n_loops=None,
                **kwargs):
        """Logits (B, T, vocab_size) of input_ids at `n_loops` loops; with `labels`, the mean
        cross-entropy of the supervised loops too. `attention_mask` (B, cached + new tokens)
        marks padding with 0 (left padding for batched prompts); positions count real
        tokens only. Other keyword arguments of the transformers API are accepted and unused."""
        n_loops = self.loops(n_loops)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = self.loop_cache(past_key_values, n_loops) \
            if use_cache or past_key_values is not None else None
        n_past = 0 if cache is None else cache.get_seq_length()
        self.check_length(input_ids, n_past)
        B, T = input_ids.shape
        plan = build_plan(self.config, self.rope_tables(input_ids.device), attention_mask,
                          n_past, T, B, cache, input_ids.device)
        x0 = self.embed(input_ids)
        embedded = norm(x0)
        first_kv = None
        if self.mode.first_layer_kv_invariant:  # computed and cached once for every loop
            first_kv = self.transformer.h[0].attn.keys_values(norm(embedded), plan)
            if cache is not None:
                first_kv = cache.update(*first_kv, self.cache_slot(0, 0))
        previous, states = None, [embedded]
        for loop in range(n_loops):
            x = self.run_loop(self.start_stream(x0, embedded, previous), previous, loop, plan,
                              first_kv)
            previous = norm(x)  # h^t
            states.append(previous)
        loss = None if labels is None else self.loss(states, labels, n_loops)
        h = previous[:, -logits_to_keep:] if logits_to_keep else previous
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return CausalLMOutputWithPast(loss=loss, logits=self.logits(h), past_key_values=cache,
                                      hidden_states=tuple(states) if output_hidden_states else None)
