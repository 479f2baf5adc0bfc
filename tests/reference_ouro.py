"""An independent statement of Ouro's published computation (ByteDance's `modeling_ouro.py`,
`OuroForCausalLM`), the oracle that loopedlm's `ouro` backbone is checked against; and the
published checkpoint format (config.json field names, weight names) to build random test
folders in. Written plainly from the paper's description and their code's arithmetic, sharing
nothing with loopedlm's model. A helper module, not a test file.

Per layer: x = x + n2(attn(n1(x))); x = x + n4(mlp(n3(x))), RMSNorms with weights (computed
in fp32, cast back, then scaled); SwiGLU; RoPE as `q * cos + rotate_half(q) * sin`; GQA by
repeating key/value heads. After each of the `total_ut_steps` loops the final norm is applied
and the normalised stream is what the next loop starts from; loop t's logits are
lm_head(h_t) and its exit gate sigmoid(early_exit_gate(h_t)).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file


def tiny_ouro_config(**overrides) -> dict:
    """A small config.json in Ouro's field names (GQA: 4 query heads, 2 key/value heads)."""
    config = {
        "architectures": ["OuroForCausalLM"], "model_type": "ouro", "vocab_size": 61,
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "hidden_act": "silu", "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": 2,
        "total_ut_steps": 4, "early_exit_threshold": 1.0, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }
    config.update(overrides)
    return config


def ouro_weights(config: dict, seed: int = 0, std: float = 0.3) -> dict[str, torch.Tensor]:
    """Random weights under Ouro's names and shapes (norm weights around 1)."""
    gen = torch.Generator().manual_seed(seed)
    d, ff, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config["hidden_size"] // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * std

    def norm_weight():
        return 1 + 0.2 * torch.randn(d, generator=gen)
    state = {"model.embed_tokens.weight": rand(v, d), "model.norm.weight": norm_weight(),
             "model.early_exit_gate.weight": rand(1, d), "model.early_exit_gate.bias": rand(1),
             "lm_head.weight": rand(v, d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state.update({
            p + "self_attn.q_proj.weight": rand(q, d), p + "self_attn.k_proj.weight": rand(kv, d),
            p + "self_attn.v_proj.weight": rand(kv, d), p + "self_attn.o_proj.weight": rand(d, q),
            p + "mlp.gate_proj.weight": rand(ff, d), p + "mlp.up_proj.weight": rand(ff, d),
            p + "mlp.down_proj.weight": rand(d, ff),
            p + "input_layernorm.weight": norm_weight(), p + "input_layernorm_2.weight": norm_weight(),
            p + "post_attention_layernorm.weight": norm_weight(),
            p + "post_attention_layernorm_2.weight": norm_weight(),
        })
    return state


def write_ouro_folder(folder: Path, config: dict, state: dict[str, torch.Tensor],
                      shards: int = 1) -> Path:
    """config.json and the weights (one model.safetensors, or `shards` files and an index)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    names = sorted(state)
    if shards == 1:
        save_file({k: state[k].contiguous() for k in names}, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({k: state[k].contiguous() for k in part}, str(folder / file))
        weight_map.update({k: file for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def _rotate(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x (B, H, T, D) at positions 0 .. T-1: x * cos + rotate_half(x) * sin."""
    dim, length = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
    angles = torch.arange(length).float()[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    half = dim // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * emb.cos().to(x.dtype) + rotated * emb.sin().to(x.dtype)


def _attention(x: torch.Tensor, w: dict, p: str, config: dict) -> torch.Tensor:
    batch, length, _ = x.shape
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config["hidden_size"] // n_head

    def heads(t, n):
        return t.view(batch, length, n, hd).transpose(1, 2)
    q = _rotate(heads(x @ w[p + "self_attn.q_proj.weight"].T, n_head), config["rope_theta"])
    k = _rotate(heads(x @ w[p + "self_attn.k_proj.weight"].T, n_kv), config["rope_theta"])
    v = heads(x @ w[p + "self_attn.v_proj.weight"].T, n_kv)
    k = k.repeat_interleave(n_head // n_kv, dim=1)
    v = v.repeat_interleave(n_head // n_kv, dim=1)
    scores = (q @ k.transpose(2, 3)) / math.sqrt(hd)
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    out = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
    return out.transpose(1, 2).reshape(batch, length, -1) @ w[p + "self_attn.o_proj.weight"].T


def _mlp(x: torch.Tensor, w: dict, p: str) -> torch.Tensor:
    gate = torch.nn.functional.silu(x @ w[p + "mlp.gate_proj.weight"].T)
    return (gate * (x @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T


@torch.no_grad()
def ouro_forward(w: dict[str, torch.Tensor], config: dict, idx: torch.Tensor, n_loops: int
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(logits per loop, exit-gate probability per loop) for token ids `idx` (B, T)."""
    eps = config["rms_norm_eps"]
    h = w["model.embed_tokens.weight"][idx]
    logits, gates = [], []
    for _ in range(n_loops):
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}."
            branch = _attention(_rms_norm(h, w[p + "input_layernorm.weight"], eps), w, p, config)
            h = h + _rms_norm(branch, w[p + "input_layernorm_2.weight"], eps)
            branch = _mlp(_rms_norm(h, w[p + "post_attention_layernorm.weight"], eps), w, p)
            h = h + _rms_norm(branch, w[p + "post_attention_layernorm_2.weight"], eps)
        h = _rms_norm(h, w["model.norm.weight"], eps)  # and the next loop starts from it
        logits.append((h @ w["lm_head.weight"].T).float())
        gate = h @ w["model.early_exit_gate.weight"].T + w["model.early_exit_gate.bias"]
        gates.append(torch.sigmoid(gate.squeeze(-1)))
    return logits, gates


def ouro_exit_loops(gates: list[torch.Tensor], threshold: float) -> torch.Tensor:
    """Ouro's published exit rule (`OuroForCausalLM.forward(exit_threshold=q)`): exit
    probabilities p_t = lambda_t * prod_{j<t} (1 - lambda_j), the last loop taking what is
    left; exit at the first loop whose cumulative probability reaches q, else the last.
    Returns the 1-based exit loop of every position."""
    remaining = torch.ones_like(gates[0])
    pdf = []
    for t, lam in enumerate(gates):
        if t < len(gates) - 1:
            pdf.append(lam * remaining)
            remaining = remaining * (1 - lam)
        else:
            pdf.append(remaining)
    cdf = torch.cumsum(torch.stack(pdf, dim=-1), dim=-1)
    reached = cdf >= threshold
    first = torch.argmax(reached.float(), dim=-1)
    first[~reached.any(-1)] = len(gates) - 1
    return first + 1


def write_tokenizer(folder: Path, vocab_size: int = 290) -> None:
    """A byte-level BPE `tokenizer.json` (ids 0-2: <|endoftext|>, <|im_start|>, <|im_end|>, as
    Ouro's SmolLM-style vocabulary) and a `tokenizer_config.json`, as a model folder holds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat", "a looped model thinks again"] * 20,
                            trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "model_max_length": 64}))
