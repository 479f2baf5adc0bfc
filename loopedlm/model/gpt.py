"""The looped GPT (docs/design.md#backbone, #loop-modes): a nanochat-style backbone whose
`depth` blocks run `n_loops` times, in one of five loop modes.

`LoopedGPT.forward` is the paper's loop: h^t = norm(loop_t(h^{t-1})) for t = 1 .. N, and the
loss of the supervised loops. A loop mode is data (`LoopMode`): where loop t > 1 starts its
stream, and which layers receive the previous loop's state h^{t-1} and how
(loopedlm.model.loop_modes); `LoopedGPT.loop` reads that table and runs every mode. Adding a
mode is one line in `LOOP_MODES`.

The per-loop API (`prepare`, `loop`, `logits`) is what the forward is made of, and what the
decode engine (`loopedlm.infer.engine`) and the bpb evaluator run themselves.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from loopedlm.common.validation import is_int
from loopedlm.model.attention import (
    MLPS,
    AttentionPlan,
    CausalSelfAttention,
    norm,
    rotary_tables,
    sequence_plan,
)
from loopedlm.model.config import ModelConfig, check_token_ids
from loopedlm.model.head_loss import head_loss
from loopedlm.model.loop_modes import LOOP_MODES


@dataclass
class LoopInputs:
    """What the loops of one pass share (`LoopedGPT.prepare`).

    x0: raw embedding wte(idx); embedded: e = norm(x0) (the backbone's embedding); plan:
    RoPE, masks and (decoding) the cache writer; first_kv: the first layer's keys and values
    when they are loop-invariant; initial_state: h^0 where loops enter through an adapter
    (Huginn).
    """

    x0: torch.Tensor
    embedded: torch.Tensor
    plan: AttentionPlan
    first_kv: tuple[torch.Tensor, torch.Tensor] | None = None
    initial_state: torch.Tensor | None = None

    def select_rows(self, rows: torch.Tensor, plan: AttentionPlan) -> LoopInputs:
        """These inputs for batch `rows` only, under `plan` (built for those rows): adaptive
        decoding drops the rows that converged."""
        first_kv = None if self.first_kv is None else (self.first_kv[0][rows],
                                                       self.first_kv[1][rows])
        initial = None if self.initial_state is None else self.initial_state[rows]
        return LoopInputs(self.x0[rows], self.embedded[rows], plan, first_kv, initial)


class Block(nn.Module):
    """One layer. nanochat's is a pre-norm block: with a normalised query source norm(s)
    (Attention Injection, docs/design.md#attention-injection) the queries read it while keys
    and values read the stream; `s` never enters the stream. A public backbone's is a
    sandwich block (`sandwich_step`, docs/public_models.md)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        spec = config.backbone_spec
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLPS[spec.mlp](config)
        self.sandwich = spec.block != "pre_norm"
        if self.sandwich:  # learned RMSNorms before and after each sublayer
            self.norm_sum = spec.block == "sandwich_sum"
            for name in ("attn_norm", "attn_out_norm", "mlp_norm", "mlp_out_norm"):
                setattr(self, name, nn.RMSNorm(config.d_model, eps=config.norm_eps))
        self._compiled: Callable | None = None  # compile_forward

    def compile_forward(self, **compile_kwargs) -> None:
        """Compile the block's math (`torch.compile` kwargs) for calls without a KV cache;
        with one, the loop index picks the cache entry and would specialise the graph per
        loop, so decoding stays eager. Hooks and state-dict keys are unchanged. The compiled
        function takes the block as an argument (it is `Block.step`, not this block's bound
        method), so a deepcopy of the model runs its own weights."""
        self._compiled = torch.compile(Block.step, **compile_kwargs)

    def forward(self, x, query_normed, plan: AttentionPlan, loop: int, eps: float, kv=None):
        if self._compiled is not None and plan.cache is None:
            return self._compiled(self, x, query_normed, plan, loop, eps, kv)
        return self.step(x, query_normed, plan, loop, eps, kv)

    def step(self, x, query_normed, plan: AttentionPlan, loop: int, eps: float, kv=None):
        """x -> x + attn(...) -> x + mlp(norm(x)) (see the class docstring)."""
        if self.sandwich:
            return self.sandwich_step(x, plan, loop)
        x_normed = norm(x) if query_normed is None or kv is None else None
        q_in = x_normed if query_normed is None else query_normed
        x = _residual(x, self.attn(q_in, x_normed, plan, loop, kv=kv), eps)
        return _residual(x, self.mlp(norm(x)), eps)

    def sandwich_step(self, x, plan: AttentionPlan, loop: int):
        """Ouro ("sandwich"): x + norm(f(norm(x))) per sublayer; Huginn ("sandwich_sum"):
        norm(x + f(norm(x))). The loop modes these backbones run inject nothing."""
        x_normed = self.attn_norm(x)
        x = self._sandwich_add(x, self.attn(x_normed, x_normed, plan, loop), self.attn_out_norm)
        return self._sandwich_add(x, self.mlp(self.mlp_norm(x)), self.mlp_out_norm)

    def _sandwich_add(self, x, branch, out_norm):
        return out_norm(x + branch) if self.norm_sum else x + out_norm(branch)


def _residual(x: torch.Tensor, branch: torch.Tensor, eps: float) -> torch.Tensor:
    # docs/design.md#residual-scaling; eps == 1 is kept multiplication-free so the default is
    # bit-identical to nanochat
    return x + branch if eps == 1.0 else x + eps * branch


def tied_keys(config: ModelConfig) -> dict[str, str]:
    """Weights stored once because they are another's (`tie_embeddings`): key -> its source."""
    return {"lm_head.weight": "transformer.wte.weight"} if config.tie_embeddings else {}


def _residual_norm(x: torch.Tensor) -> torch.Tensor:
    """sqrt(mean(x**2)) over batch, sequence and features (docs/design.md#diagnostics)."""
    return x.detach().float().pow(2).mean().sqrt()


class LoopedGPT(nn.Module):
    """A looped nanochat GPT. State-dict keys follow nanochat (and the FLT authors' fork).

    `forward(idx)` returns logits (B, T, vocab_size); `forward(idx, targets)` the mean
    cross-entropy (targets == -1 are ignored). `n_loops=` runs the same weights at any
    loop count.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.mode = LOOP_MODES[config.loop_mode]
        self.spec = config.backbone_spec  # the backbone family (loopedlm.model.backbones)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.padded_vocab_size, config.d_model),
            "h": nn.ModuleList([Block(config, i) for i in range(config.depth)]),
        })
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        spec, d = self.spec, config.d_model
        if spec.learned_norms:  # each loop's final norm (Ouro), the read-out's norm (Huginn)
            self.transformer["ln_f"] = nn.RMSNorm(d, eps=config.norm_eps)
        if spec.adapter:  # Huginn: layers around the loops, numbered after the looped ones
            first_coda = config.depth + config.n_prelude
            self.transformer["prelude"] = nn.ModuleList(
                [Block(config, config.depth + i) for i in range(config.n_prelude)])
            self.transformer["adapter"] = nn.Linear(2 * d, d, bias=False)
            self.transformer["coda"] = nn.ModuleList(
                [Block(config, first_coda + i) for i in range(config.n_coda)])
        # a public model's per-loop exit probability (docs/public_models.md)
        self.exit_gate = nn.Linear(d, 1) if spec.exit_gate else None
        self.tie_weights()
        cos, sin = self._rotary_tables()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        # set by wrap_loops (activation checkpointing, from outside: loopedlm.train.parallel)
        self._loop_wrapper: Callable[[Callable], Callable] | None = None
        self.head_options: dict = {}  # head_loss(backend=, compile=) for `loss`; {}: defaults

    # ---- initialisation (docs/design.md#backbone) --------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """wte ~ N(0,1); lm_head ~ N(0, 0.001); q,k,v,c_fc (c_gate, c_up) ~ U(-a,a) with
        a = sqrt(3/d); MLA up-projections ~ U(-b,b) with b = sqrt(3/kv_rank); output
        projections = 0; learned norms = 1; the exit gate = 0 (exit probability 1/2)."""
        cfg = self.config
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        a = 3**0.5 * cfg.d_model**-0.5
        b = 3**0.5 * cfg.kv_rank**-0.5
        for block in self.blocks():
            attn, mlp = block.attn, block.mlp
            if attn.is_mla:
                inputs = [(attn.c_q, a), (attn.c_kv_down, a), (attn.c_k_up, b), (attn.c_v_up, b)]
            else:
                inputs = [(attn.c_q, a), (attn.c_k, a), (attn.c_v, a)]
            mlp_inputs = [mlp.c_fc] if hasattr(mlp, "c_fc") else [mlp.c_gate, mlp.c_up]
            for linear, bound in [*inputs, *((m, a) for m in mlp_inputs)]:
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.zeros_(attn.c_proj.weight)
            nn.init.zeros_(mlp.c_proj.weight)
        for module in self.modules():
            if isinstance(module, nn.RMSNorm) and module.weight is not None:
                nn.init.ones_(module.weight)
            elif isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        if self.exit_gate is not None:
            nn.init.zeros_(self.exit_gate.weight)
        if "adapter" in self.transformer:
            nn.init.uniform_(self.transformer.adapter.weight, -a / 2**0.5, a / 2**0.5)
        self.reset_rotary()

    def tie_weights(self) -> None:
        """With `tie_embeddings`, the LM head is the embedding matrix (one parameter)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def blocks(self) -> list[Block]:
        """Every layer: the looped ones, then the prelude's and the coda's (Huginn)."""
        outer = [*self.transformer["prelude"], *self.transformer["coda"]] \
            if "prelude" in self.transformer else []
        return [*self.transformer.h, *outer]

    def _rotary_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        style = cfg.backbone_spec.rope
        cos, sin = rotary_tables(cfg.rotary_len, cfg.head_dim, cfg.rope_base,
                                 device=self.lm_head.weight.device, style=style)
        if style == "hf":  # as Hugging Face's models: computed in fp32, used in the weights' dtype
            dtype = self.lm_head.weight.dtype
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos, sin

    def reset_rotary(self) -> None:
        """Recompute the RoPE tables (needed after building on the meta device)."""
        self.cos, self.sin = self._rotary_tables()

    # ---- bookkeeping ---------------------------------------------------------
    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wte.weight.numel() if exclude_embedding else n

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """2-D block matrices (Muon), the embedding and the LM head (AdamW)
        (docs/design.md#training-recipe)."""
        return {
            "matrix": list(self.transformer.h.parameters()),
            "embedding": list(self.transformer.wte.parameters()),
            "lm_head": list(self.lm_head.parameters()),
        }

    def estimate_flops(self, n_loops: int | None = None, backprop_loops: int = 0) -> float:
        """Training FLOPs per token (forward + backward), counting every loop.
        With `backprop_loops=k` (truncated backprop: `forward(backprop_loops=)`) the first
        N - k loops count their forward pass only (a third of forward + backward)."""
        cfg = self.config
        n_loops = cfg.loops(n_loops)
        backward = min(backprop_loops, n_loops) if backprop_loops else n_loops
        block_params = sum(p.numel() for p in self.transformer.h.parameters())
        head_evals = len(self.supervised_loops(n_loops, backprop_loops))
        # forward 2 FLOPs per parameter per token, backward 4
        block = (2 * n_loops + 4 * backward) * block_params
        matmul = block + 6 * self.lm_head.weight.numel() * head_evals
        attn = sum(4 * cfg.n_head * cfg.head_dim * min(w or cfg.sequence_len, cfg.sequence_len)
                   for w in cfg.window_sizes()) * (n_loops + 2 * backward)
        return float(matmul + attn)

    def supervised_loops(self, n_loops: int, backprop_loops: int = 0) -> range:
        """The 0-based loops whose output enters the loss: the config's `loss_loops` ("last",
        "all", "last_third"; docs/design.md#loss-over-loops) of `n_loops`, and, when
        gradients flow through the last `backprop_loops` loops only, those inside that
        window (the earlier ones run without a graph, so their loss could teach nothing).
        Never empty: every `loss_loops` option supervises the last loop."""
        loops = {
            "last": range(n_loops - 1, n_loops),
            "all": range(n_loops),
            "last_third": range(2 * n_loops // 3, n_loops),
        }[self.config.loss_loops]
        if not backprop_loops or backprop_loops >= n_loops:
            return loops
        return range(max(loops.start, n_loops - backprop_loops), loops.stop)

    # ---- the per-loop API (forward, decoding and checkpointing all use it) -------
    def prepare(self, idx: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                plan: AttentionPlan | None = None) -> LoopInputs:
        """What every loop of one pass shares: the embedding, the attention plan (RoPE,
        masks) and, where loop-invariant, the first layer's keys and values. `plan` replaces
        the plan of whole sequences (the decode engine brings its own: per-row positions and
        its cache writer)."""
        if plan is None:
            plan = sequence_plan(self.config, self.cos, self.sin, idx.size(1), attention_mask)
        x0 = self.transformer.wte(idx)
        embedding = self.spec.embedding
        if embedding == "norm":
            embedded = norm(x0)
        elif embedding == "plain":
            embedded = x0
        else:  # "sqrt_d", then the prelude's layers (Huginn; docs/public_models.md)
            embedded = x0 * math.sqrt(self.config.d_model)
            for block in self.transformer.prelude:
                embedded = block(embedded, None, plan, 0, 1.0)
        first_kv = initial_state = None
        if self.mode.first_layer_kv_invariant:
            first_kv = self.transformer.h[0].attn.keys_values(norm(embedded), plan)
        if self.spec.adapter:
            initial_state = self.initial_state(embedded)
        return LoopInputs(x0=x0, embedded=embedded, plan=plan, first_kv=first_kv,
                          initial_state=initial_state)

    def initial_state(self, embedded: torch.Tensor) -> torch.Tensor:
        """h^0 of a model whose loops enter through an adapter (Huginn): zeros, or (state_init
        "random", theirs) a normal draw of std sqrt(2 / 5d) truncated at 3 std, times sqrt(d),
        from torch's global generator (so not reproducible across calls unless seeded)."""
        state = torch.zeros_like(embedded)
        if self.config.state_init == "random":
            std = math.sqrt(2 / (5 * self.config.d_model))
            nn.init.trunc_normal_(state, std=std, a=-3 * std, b=3 * std)
            state = state * math.sqrt(self.config.d_model)
        return state

    def loop(self, inputs: LoopInputs, previous: torch.Tensor | None, loop: int
             ) -> torch.Tensor:
        """One loop of the paper (`loop` 0-based; it matters only to a cache writer): where
        the stream starts (x_0^t) and where the previous loop's state h^{t-1} (`previous`,
        None in the first loop) enters are the mode's (docs/design.md#loop-modes). Returns
        x_L^t, before the loop's final norm. The one place that reads the loop-mode table."""
        mode, eps = self.mode, self.config.residual_eps()
        if self.spec.adapter:  # Huginn: x_0^t = adapter([h^{t-1}, e]), h^0 the initial state
            state = inputs.initial_state if previous is None else previous
            x = self.transformer.adapter(torch.cat([state, inputs.embedded], dim=-1))
        elif previous is None or mode.start == "embedding":  # the first loop starts at e
            x = inputs.embedded
        elif mode.start == "previous":
            x = previous
        else:  # "embedding_plus_previous"
            x = norm(inputs.x0 + previous)
        # AI's query input is norm(h^{t-1}) (h is already normalised; nanochat normalises
        # it again, and so do we, for identical bits), computed once per loop
        query = norm(previous) if previous is not None and mode.injection == "attention" \
            else None
        for layer, block in enumerate(self.transformer.h):
            query_normed = None
            if mode.injects_at(layer):
                if previous is None:
                    # loop 1 has no h^{t-1}: its queries read the stream, as a plain block's;
                    # passing norm(x) explicitly (same bits) gives loop 1 the block signature
                    # of later loops, so compile_blocks compiles one graph for every loop
                    query_normed = norm(x) if mode.injection == "attention" else None
                elif mode.injection == "residual":
                    x = norm(x + previous)
                else:
                    query_normed = query
            kv = inputs.first_kv if layer == 0 else None
            x = block(x, query_normed, inputs.plan, loop, eps, kv=kv)
        return x

    def loop_state(self, x: torch.Tensor) -> torch.Tensor:
        """h^t, the state loop t hands to the next loop and to the read-out, from its output
        x_L^t (`Backbone.carry`): the final norm (parameter-free in nanochat, learned in
        Ouro), or x_L^t itself (Huginn)."""
        if self.spec.carry == "raw":
            return x
        return self.transformer.ln_f(x) if self.spec.learned_norms else norm(x)

    def read_out(self, h: torch.Tensor, plan: AttentionPlan | None = None) -> torch.Tensor:
        """What the LM head reads from loop states h: h itself, or (Huginn, `carry` "raw")
        norm(coda(norm(h))), whose coda layers attend under `plan` (the pass's: needed when
        there is a coda)."""
        if self.spec.carry != "raw":
            return h
        ln_f, coda = self.transformer.ln_f, self.transformer.coda
        x = ln_f(h)
        if len(coda):
            if plan is None:
                raise ValueError("a model with coda layers reads out under the pass's "
                                 "attention plan: pass plan=")
            for block in coda:
                x = block(x, None, plan, 0, 1.0)
        return ln_f(x)

    def logits(self, h: torch.Tensor, plan: AttentionPlan | None = None) -> torch.Tensor:
        """Logits of loop states h (`read_out`; `plan` for a model with a coda), cropped to
        the real vocabulary: soft-capped (docs/design.md#backbone), or plain where `softcap`
        is None (public models)."""
        cap = self.config.softcap
        logits = self.lm_head(self.read_out(h, plan))[..., : self.config.vocab_size].float()
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def exit_probability(self, h: torch.Tensor) -> torch.Tensor:
        """sigmoid(exit_gate(h)) in fp32, shape h.shape[:-1]: a gated model's (Ouro's)
        probability of exiting at the loop whose state is h (docs/public_models.md)."""
        if self.exit_gate is None:
            raise ValueError(f"backbone {self.config.backbone!r} has no exit gate")
        return torch.sigmoid(self.exit_gate(h).float().squeeze(-1))

    def loss(self, h: torch.Tensor, targets: torch.Tensor,
             plan: AttentionPlan | None = None) -> torch.Tensor:
        """Mean cross-entropy of `logits(h, plan)` against `targets` (-1 = ignored), fused and
        chunked so the (rows x vocabulary) logits are never held (`loopedlm.model.head_loss`)."""
        h = self.read_out(h, plan)
        if self.config.softcap is None:
            return self._plain_loss(h, targets)
        weight = self.lm_head.weight[: self.config.vocab_size]
        return head_loss(h, weight, targets, self.config.softcap, **self.head_options)

    def _plain_loss(self, read: torch.Tensor, targets: torch.Tensor,
                    chunk_rows: int = 1024) -> torch.Tensor:
        """`loss` without a soft cap (public models: their head is a plain linear layer) of
        read-out states, in chunks of rows so the (rows x vocabulary) logits are never held
        whole."""
        read, targets = read.reshape(-1, read.size(-1)), targets.reshape(-1)
        vocab = self.config.vocab_size
        total = sum(F.cross_entropy(self.lm_head(read[i:i + chunk_rows])[:, :vocab].float(),
                                    targets[i:i + chunk_rows], ignore_index=-1,
                                    reduction="sum") for i in range(0, read.size(0), chunk_rows))
        return total / (targets >= 0).sum()

    # ---- applied from outside: activation checkpointing, regional compilation -----------
    def wrap_loops(self, wrapper: Callable[[Callable], Callable] | None) -> None:
        """Run the loops of forward passes that record gradients through `wrapper(loop_fn)`
        (activation checkpointing, applied from outside the model's math:
        loopedlm.train.parallel); None removes it. Passes without gradients (evaluation,
        decoding, the no-grad loops of truncated backprop) never go through it: they save
        nothing to recompute, and a checkpoint would read the RNG state inside a CUDA-graph
        capture. The wrapper is applied to each forward's own `loop`, so a copy of the model
        wraps its own."""
        self._loop_wrapper = wrapper

    @property
    def loops_wrapped(self) -> bool:
        return self._loop_wrapper is not None

    def compile_blocks(self, **compile_kwargs) -> LoopedGPT:
        """Regional compilation: compile the repeated unit (each Block's math, in place;
        state-dict keys and hooks unchanged) instead of the whole unrolled model, so compile
        time does not grow with the loop count. There is one compiled graph per call
        signature (with or without precomputed first-layer keys, with or without a query
        source), whatever the loop: the loop index matters only with a KV cache and the
        residual scale is fixed per model, so no loop value triggers a recompile; decoding
        with a KV cache runs the blocks eagerly. Returns the model (`torch.compile(model)`
        still compiles the whole unrolled model)."""
        for block in self.transformer.h:
            block.compile_forward(**compile_kwargs)
        return self

    # ---- forward -------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                n_loops: int | None = None, attention_mask: torch.Tensor | None = None,
                return_residual_norms: bool = False, return_loop_logits: bool = False,
                backprop_loops: int = 0):
        """Logits (B, T, vocab_size), or the mean loss when `targets` is given.

        n_loops:        loop count for this call (default: the config's).
        attention_mask: (B, T) bool, False marks padding (left padding for ragged prompts).
        return_residual_norms: also return a (n_loops,) tensor of each loop's residual
                        state norm before its final norm (docs/design.md#diagnostics).
        return_loop_logits: also return (n_loops, B, T, vocab_size), the logits after every
                        loop (the per-loop view, docs/design.md#diagnostics); loop t's
                        equal `forward(idx, n_loops=t)`, since no loop reads a later one.
                        Without targets only. With both flags: (logits, loop_logits, norms).
        backprop_loops: truncated backprop through loops (TrainConfig.backprop_loops):
                        gradients flow through the last `backprop_loops` loops only; the
                        earlier ones run under no_grad (no activations saved), as if
                        h^{N-k} were detached. Only supervised loops inside the window enter
                        the loss (`supervised_loops`). 0 (or >= n_loops): every loop.
        """
        n_loops = self.config.loops(n_loops)  # the default, filled (and checked) here
        self._check_inputs(idx, targets, attention_mask, backprop_loops)
        inputs = self.prepare(idx, attention_mask=attention_mask)
        if return_loop_logits and targets is not None:
            raise ValueError("return_loop_logits=True is for logits, not for a loss: pass no "
                             "targets")
        supervised = (self.supervised_loops(n_loops, backprop_loops) if targets is not None
                      else range(n_loops) if return_loop_logits else [n_loops - 1])
        no_grad_loops = max(0, n_loops - backprop_loops) if backprop_loops else 0
        wrapped = self.loop if self._loop_wrapper is None else self._loop_wrapper(self.loop)
        previous, outputs, norms = None, [], []
        for loop in range(n_loops):  # h^t = norm(x_L^t), loop t starting from h^{t-1}
            with torch.no_grad() if loop < no_grad_loops else contextlib.nullcontext():
                x = (wrapped if torch.is_grad_enabled() else self.loop)(inputs, previous, loop)
            if return_residual_norms:
                norms.append(_residual_norm(x))
            previous = self.loop_state(x)  # h^t
            if loop in supervised:  # each loop's head + loss is done before the next loop
                outputs.append(previous if targets is None
                               else self.loss(previous, targets, inputs.plan))
        extra = []
        if targets is None:
            result = self.logits(outputs[-1], inputs.plan)
            if return_loop_logits:
                extra.append(torch.stack([self.logits(h, inputs.plan) for h in outputs[:-1]]
                                         + [result]))
        else:
            result = outputs[0] if len(outputs) == 1 else torch.stack(outputs).mean()
        if return_residual_norms:
            extra.append(torch.stack(norms))
        return (result, *extra) if extra else result

    def _check_inputs(self, idx, targets, attention_mask, backprop_loops) -> None:
        """Shapes and types always; token-id ranges only where they cost no host-device
        sync (CPU tensors, eager): on an accelerator, ids are checked where they enter
        (the decode engine, the server, the evaluators) before the transfer."""
        cfg = self.config
        if not is_int(backprop_loops) or backprop_loops < 0:
            raise ValueError(f"backprop_loops={backprop_loops!r} is not allowed: an integer >= 0 "
                             "(0 = every loop)")
        if not isinstance(idx, torch.Tensor):
            raise ValueError(f"idx must be a torch.Tensor of token ids, got {type(idx).__name__}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx has dtype {idx.dtype}; token ids must be torch.long or int32")
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"idx has shape {tuple(idx.shape)}; expected (batch, time) with time >= 1")
        # training (targets) stays within sequence_len; inference reaches the RoPE table's end
        limit, what = ((cfg.sequence_len, f"sequence_len={cfg.sequence_len}") if targets is not None
                       else (cfg.rotary_len, f"the RoPE table ({cfg.rotary_len} positions)"))
        if idx.size(1) > limit:
            raise ValueError(f"sequence of {idx.size(1)} tokens is longer than {what}")
        if attention_mask is not None and (attention_mask.shape != idx.shape
                                           or attention_mask.dtype != torch.bool):
            raise ValueError(f"attention_mask must be a bool tensor of shape {tuple(idx.shape)}, "
                             f"got {attention_mask.dtype} {tuple(attention_mask.shape)}")
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} != idx shape "
                             f"{tuple(idx.shape)}")
        if idx.device.type == "cpu" and not torch.compiler.is_compiling():
            check_token_ids(idx, cfg.vocab_size)
            if targets is not None:
                check_token_ids(targets, cfg.vocab_size, "target id", ignore=-1)

    # ---- construction helpers -----------------------------------------------
    @classmethod
    def from_config(cls, config: ModelConfig, *, device="cpu", seed: int | None = None) -> LoopedGPT:
        """Build on the meta device, materialise on `device`, and initialise
        (docs/design.md#backbone)."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        if seed is not None:
            torch.manual_seed(seed)
        model.init_weights()
        return model
