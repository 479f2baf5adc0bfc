"""An independent statement of Huginn's published computation (tomg-group-umd's
`raven_modeling_minimal.py`, `RavenForCausalLM`, huginn-0125), the oracle that loopedlm's
`huginn` backbone is checked against; and the published checkpoint format (`RavenConfig`
field names, weight names) to build random test folders in. Written plainly from their
code's arithmetic, sharing nothing with loopedlm's model. A helper module, not a test file.

The embedding is scaled by sqrt(n_embd) and goes through the prelude's SandwichBlocks; a
latent state (zeros here, or one passed in) enters every recurrence through the adapter,
adapter(cat[state, embedding]), then the core blocks; the read-out of a state is
lm_head(ln_f(coda(ln_f(state)))). A SandwichBlock is x = n2(attn(n1(x)) + x), then
x = n4(mlp(n3(x)) + x), with RMSNorm computed in fp32 and scaled after the cast back. The
attention projects q, k, v with one fused Wqkv, adds qk_bias to q and k, and rotates
interleaved pairs (x[2i], x[2i+1]) in fp32; the MLP is silu(first half of fc) * second half.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file


def tiny_huginn_config(**overrides) -> dict:
    """A small config.json in Huginn's field names (2 prelude, 2 recurrent, 1 coda layers).
    `state_init` "zero" keeps the tests deterministic (their code draws a random state)."""
    config = {
        "architectures": ["RavenForCausalLM"], "model_type": "huginn_raven", "n_embd": 32,
        "n_heads": 4, "n_layers": 5, "block_size": 64, "vocab_size": 61, "padding_multiple": 1,
        "tie_embeddings": True, "intermediate_size": 48, "bias": False,
        "architecture_class_name": "RecurrentGPT", "block_class_name": "SandwichBlock",
        "norm_class_name": "RMSNorm_llama", "norm_eps": 1e-6, "mlp_class_name": "GatedMLP",
        "nonlin_name": "SiLU", "init_strategy": "takase", "init_orthogonal": False,
        "state_init": "zero", "injection_type": "linear", "n_layers_in_recurrent_block": 2,
        "mean_recurrence": 4, "sampling_scheme": "poisson-lognormal-filling",
        "mean_backprop_depth": 2, "n_layers_in_prelude": 2, "n_layers_in_coda": 1,
        "qk_bias": True, "activation_checkpoint_impl": "per-iteration", "rope_base": 50000,
        "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }
    config.update(overrides)
    return config


def _groups(config: dict) -> list[tuple[str, int]]:
    return [("prelude", config["n_layers_in_prelude"]),
            ("core_block", config["n_layers_in_recurrent_block"]),
            ("coda", config["n_layers_in_coda"])]


def huginn_weights(config: dict, seed: int = 0, std: float = 0.3, *, lm_head: bool = False,
                   freqs_cis: bool = True) -> dict[str, torch.Tensor]:
    """Random weights under Huginn's names and shapes (norm weights around 1). `lm_head`:
    store the head (always when embeddings are untied); `freqs_cis`: their saved RoPE buffer."""
    gen = torch.Generator().manual_seed(seed)
    d, ff, v, n_head = (config["n_embd"], config["intermediate_size"], config["vocab_size"],
                        config["n_heads"])
    hd = d // n_head
    n_kv = config.get("num_key_value_heads", n_head)

    def rand(*shape, scale=std):
        return torch.randn(*shape, generator=gen) * scale
    state = {"transformer.wte.weight": rand(v, d, scale=std / math.sqrt(d)),
             "transformer.adapter.weight": rand(d, 2 * d),
             "transformer.ln_f.weight": 1 + rand(d, scale=0.2)}
    if lm_head or not config["tie_embeddings"]:
        state["lm_head.weight"] = rand(v, d)
    if freqs_cis:
        state["freqs_cis"] = torch.zeros(1, config["block_size"], 1, hd // 2, 2)
    for group, count in _groups(config):
        for i in range(count):
            p = f"transformer.{group}.{i}."
            state.update({f"{p}norm_{j}.weight": 1 + rand(d, scale=0.2) for j in range(1, 5)})
            state.update({p + "attn.Wqkv.weight": rand((n_head + 2 * n_kv) * hd, d),
                          p + "attn.proj.weight": rand(d, d), p + "mlp.fc.weight": rand(2 * ff, d),
                          p + "mlp.proj.weight": rand(d, ff)})
            if config["qk_bias"]:
                state[p + "attn.qk_bias"] = rand(2, 1, n_head, hd)
    return state


def write_huginn_folder(folder: Path, config: dict, state: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: t.contiguous() for k, t in state.items()}, str(folder / "model.safetensors"))
    return folder


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def _rotate_pairs(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x (B, T, H, D) at positions 0 .. T-1, pairs (x[2i], x[2i+1]) rotated, in fp32."""
    length, dim = x.shape[1], x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)[None, :, None, :]
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * angles.cos() - odd * angles.sin(),
                           odd * angles.cos() + even * angles.sin()], dim=-1)
    return rotated.flatten(-2).type_as(x)


def _block(x: torch.Tensor, w: dict, p: str, config: dict) -> torch.Tensor:
    eps, n_head = config["norm_eps"], config["n_heads"]
    n_kv = config.get("num_key_value_heads", n_head)
    batch, length, d = x.shape
    hd = d // n_head
    h = _rms_norm(x, w[p + "norm_1.weight"], eps)
    q, k, v = (h @ w[p + "attn.Wqkv.weight"].T).split([n_head * hd, n_kv * hd, n_kv * hd], -1)
    q, k, v = (t.view(batch, length, -1, hd) for t in (q, k, v))
    if config["qk_bias"]:
        q, k = q + w[p + "attn.qk_bias"][0], k + w[p + "attn.qk_bias"][1]
    q, k = _rotate_pairs(q, config["rope_base"]), _rotate_pairs(k, config["rope_base"])
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    k = k.repeat_interleave(n_head // n_kv, dim=1)
    v = v.repeat_interleave(n_head // n_kv, dim=1)
    scores = (q @ k.transpose(2, 3)) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), -math.inf)
    y = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(batch, length, d)
    x = _rms_norm(y @ w[p + "attn.proj.weight"].T + x, w[p + "norm_2.weight"], eps)
    gate, up = (_rms_norm(x, w[p + "norm_3.weight"], eps) @ w[p + "mlp.fc.weight"].T).chunk(2, -1)
    mlp = (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.proj.weight"].T
    return _rms_norm(mlp + x, w[p + "norm_4.weight"], eps)


@torch.no_grad()
def huginn_read_out(w: dict[str, torch.Tensor], config: dict, state: torch.Tensor
                    ) -> torch.Tensor:
    """Logits of latent states (B, T, d): lm_head(ln_f(coda(ln_f(state)))), the coda
    attending causally over the positions' read-out states."""
    eps = config["norm_eps"]
    head = w["transformer.wte.weight"] if config["tie_embeddings"] else w["lm_head.weight"]
    out = _rms_norm(state, w["transformer.ln_f.weight"], eps)
    for i in range(config["n_layers_in_coda"]):
        out = _block(out, w, f"transformer.coda.{i}.", config)
    return (_rms_norm(out, w["transformer.ln_f.weight"], eps) @ head.T).float()


@torch.no_grad()
def huginn_forward(w: dict[str, torch.Tensor], config: dict, idx: torch.Tensor, n_loops: int,
                   state: torch.Tensor | None = None
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(logits per recurrence, latent state per recurrence) for token ids `idx` (B, T),
    starting from `state` (default: zeros)."""
    embeds = w["transformer.wte.weight"][idx] * math.sqrt(config["n_embd"])
    for i in range(config["n_layers_in_prelude"]):
        embeds = _block(embeds, w, f"transformer.prelude.{i}.", config)
    x = torch.zeros_like(embeds) if state is None else state
    logits, latents = [], []
    for _ in range(n_loops):
        x = torch.cat([x, embeds], dim=-1) @ w["transformer.adapter.weight"].T
        for i in range(config["n_layers_in_recurrent_block"]):
            x = _block(x, w, f"transformer.core_block.{i}.", config)
        logits.append(huginn_read_out(w, config, x))
        latents.append(x)
    return logits, latents
