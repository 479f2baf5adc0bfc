"""An independent, deliberately plain reference of the model (docs/design.md#backbone to
#residual-scaling) for equivalence tests.

It reads a LoopedGPT's state dict and spells out each loop mode separately, the way the
FLT authors' code does (one hand-written loop per mode), so that the library's single
data-driven loop can be checked against it. Nothing here imports loopedlm.model.gpt.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms(x):
    return F.rms_norm(x, (x.size(-1),))


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos + b * sin, a * (-sin) + b * cos], dim=-1)


class Reference:
    def __init__(self, config, state_dict):
        self.c = config
        self.w = {k: v for k, v in state_dict.items()}
        hd = config.d_model // config.n_head
        inv = 1.0 / (config.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        f = torch.outer(torch.arange(config.sequence_len, dtype=torch.float32), inv)
        self.cos, self.sin = f.cos().bfloat16(), f.sin().bfloat16()
        pattern = config.window_pattern.upper()
        self.windows = [pattern[i % len(pattern)] for i in range(config.depth)]
        self.windows[-1] = "L"

    def lin(self, name, x):
        return x @ self.w[name].t()

    def eps(self):
        c, n, L = self.c, self.c.n_loops, self.c.depth
        return {"none": 1.0, "inv_sqrt_loops": n**-0.5, "inv_loops": 1 / n,
                "lambda_loops_sqrt_depth": c.residual_lambda / (n * math.sqrt(L))}[c.residual_scale]

    def attn(self, i, q_src, kv_src):
        c = self.c
        B, T, _ = q_src.shape
        hd = c.d_model // c.n_head
        p = f"transformer.h.{i}.attn."
        q = self.lin(p + "c_q.weight", q_src).view(B, T, c.n_head, hd)
        if c.attn_type == "mla":
            lat = rms(self.lin(p + "c_kv_down.weight", kv_src))
            k = self.lin(p + "c_k_up.weight", lat)
            v = self.lin(p + "c_v_up.weight", lat)
        else:
            k = self.lin(p + "c_k.weight", kv_src)
            v = self.lin(p + "c_v.weight", kv_src)
        k, v = k.view(B, T, c.n_kv_head, hd), v.view(B, T, c.n_kv_head, hd)
        cos, sin = self.cos[None, :T, None], self.sin[None, :T, None]
        q, k = rms(rope(q, cos, sin)), rms(rope(k, cos, sin))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        gqa = c.n_head != c.n_kv_head
        if self.windows[i] == "S":
            w = max(c.sequence_len // 4, 1)
            pos = torch.arange(T)
            mask = (pos[None] <= pos[:, None]) & ((pos[:, None] - pos[None]) < w)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.lin(p + "c_proj.weight", y)

    def mlp(self, i, x):
        p = f"transformer.h.{i}.mlp."
        return self.lin(p + "c_proj.weight", F.relu(self.lin(p + "c_fc.weight", x)).square())

    def block(self, i, x, query_source=None):
        e = self.eps()
        q_src = rms(x) if query_source is None else rms(query_source)
        a = self.attn(i, q_src, rms(x))
        x = x + a if e == 1.0 else x + e * a
        m = self.mlp(i, rms(x))
        return x + m if e == 1.0 else x + e * m

    def plain_pass(self, x):
        for i in range(self.c.depth):
            x = self.block(i, x)
        return x

    def loops(self, idx, n_loops):
        """Returns the list h^1..h^N (each normalised loop output)."""
        mode = self.c.loop_mode
        x0 = self.w["transformer.wte.weight"][idx]
        e = rms(x0)
        hs = [rms(self.plain_pass(e))]  # loop 1: a plain transformer pass in every mode
        for _ in range(1, n_loops):
            h = hs[-1]
            if mode == "lt":
                x = self.plain_pass(h)
            elif mode == "lti":
                x = self.plain_pass(rms(x0 + h))
            elif mode == "ltai":
                x = self.block(0, e, query_source=h)
                for i in range(1, self.c.depth):
                    x = self.block(i, x)
            elif mode == "flt_res":
                x = e
                for i in range(self.c.depth):
                    x = self.block(i, rms(x + h))
            elif mode == "flt":
                x = e
                for i in range(self.c.depth):
                    x = self.block(i, x, query_source=h)
            else:
                raise AssertionError(mode)
            hs.append(rms(x))
        return hs

    def logits_of(self, h):
        z = (h @ self.w["lm_head.weight"].t())[..., : self.c.vocab_size].float()
        return self.c.softcap * torch.tanh(z / self.c.softcap)

    def logits(self, idx, n_loops=None):
        return self.logits_of(self.loops(idx, n_loops or self.c.n_loops)[-1])

    def loss(self, idx, targets, n_loops=None):
        n = n_loops or self.c.n_loops
        hs = self.loops(idx, n)
        chosen = {"last": hs[-1:], "all": hs, "last_third": hs[2 * n // 3:]}[self.c.loss_loops]
        losses = [F.cross_entropy(self.logits_of(h).flatten(0, 1), targets.flatten(),
                                  ignore_index=-1) for h in chosen]
        return torch.stack(losses).mean()
