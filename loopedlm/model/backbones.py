"""The backbone families (docs/design.md#backbone, docs/public_models.md) as data: how a layer,
the embedding, the loop's hand-over and the read-out are built. The loop modes
(`loopedlm.model.loop_modes`) say how loops are chained; a backbone says what one layer is.

- `nanochat`: loopedlm's own models (the paper's): pre-norm blocks with parameter-free
  RMSNorm, relu^2 MLP, QK-norm, nanochat's RoPE (bf16 tables), a normalised embedding and
  soft-capped logits.
- `ouro`: ByteDance's Ouro (Llama/Qwen-style): learned RMSNorms in a sandwich around each
  sublayer (x + norm(f(norm(x)))), SwiGLU, Hugging Face's RoPE (rotate_half, fp32 tables),
  a learned final norm after every loop (the stream carried to the next loop is that
  normalised state), plain logits and an exit gate Linear(d, 1) read at every loop.
- `huginn`: Huginn-0125 (tomg-group-umd): learned RMSNorms applied to each residual sum
  (norm(x + f(norm(x)))), SwiGLU, a scaled embedding, a prelude and a coda of plain layers
  around the looped core, which each loop enters through an adapter Linear(2d, d) over
  [state, embedding]; the raw state is carried and read out through norm, coda, norm.

`LoopedGPT` reads this table (and `ModelConfig`'s per-model values: widths, eps, theta,
prelude/coda depths); the Hugging Face importer (`loopedlm.model.public`) maps a folder's
`model_type` to a backbone through `hf_model_type`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backbone:
    """What a backbone family fixes.

    block:          "pre_norm" (x + f(norm(x))), "sandwich" (x + norm(f(norm(x)))) or
                    "sandwich_sum" (norm(x + f(norm(x)))).
    mlp:            "relu2" (c_proj(relu(c_fc(x))^2)) or "swiglu" (c_proj(silu(c_gate(x)) * c_up(x))).
    learned_norms:  RMSNorms carry a weight and use `ModelConfig.norm_eps` (else parameter-free,
                    torch's default eps).
    qk_norm:        RMSNorm on queries and keys after RoPE.
    rope:           "nanochat" (its rotation sign, bf16 tables) or "hf" (rotate_half's sign,
                    fp32 tables cast to the weights' dtype).
    embedding:      the loops' input e: "norm" (norm(wte(idx))), "plain" (wte(idx)) or
                    "sqrt_d" (wte(idx) * sqrt(d), then the prelude's layers).
    carry:          how loop t's output x_L^t becomes the state h^t that the next loop and the
                    read-out take: "norm" (the final norm) or "raw" (x_L^t itself; the read-out
                    is norm, the coda's layers, norm).
    adapter:        every loop starts at adapter([h^{t-1}, e]), a Linear(2d, d), from an
                    initial state h^0 (`ModelConfig.state_init`); else the loop mode says.
    exit_gate:      a Linear(d, 1) whose sigmoid on h^t is the probability of exiting at loop t.
    rotary_length_factor: RoPE tables cover this many times `sequence_len`.
    hf_model_type:  the `model_type` of the family's Hugging Face folders ("" = none).
    loop_modes:     the loop modes the family runs.
    """

    block: str
    mlp: str
    learned_norms: bool
    qk_norm: bool
    rope: str
    embedding: str
    carry: str = "norm"
    adapter: bool = False
    exit_gate: bool = False
    rotary_length_factor: int = 1
    hf_model_type: str = ""
    loop_modes: tuple[str, ...] = ()


NANOCHAT = "nanochat"
# The FLT authors' model precomputes RoPE for 10x sequence_len and never crops an evaluation prompt
ROTARY_LENGTH_FACTOR = 10

BACKBONES: dict[str, Backbone] = {
    NANOCHAT: Backbone(block="pre_norm", mlp="relu2", learned_norms=False, qk_norm=True,
                       rope="nanochat", embedding="norm",
                       rotary_length_factor=ROTARY_LENGTH_FACTOR,
                       loop_modes=("lt", "lti", "ltai", "flt_res", "flt")),
    "ouro": Backbone(block="sandwich", mlp="swiglu", learned_norms=True, qk_norm=False,
                     rope="hf", embedding="plain", exit_gate=True, hf_model_type="ouro",
                     loop_modes=("lt",)),
    # Huginn's interleaved RoPE pairs become rotate_half's halves by permuting each head's
    # query/key rows at import (loopedlm.model.public), which leaves q.k unchanged
    "huginn": Backbone(block="sandwich_sum", mlp="swiglu", learned_norms=True, qk_norm=False,
                       rope="hf", embedding="sqrt_d", carry="raw", adapter=True,
                       hf_model_type="huginn_raven", loop_modes=("lt",)),
}


__all__ = ["Backbone", "BACKBONES", "NANOCHAT", "ROTARY_LENGTH_FACTOR"]
