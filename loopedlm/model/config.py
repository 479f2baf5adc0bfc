"""Model configuration (docs/design.md#backbone): a validated dataclass, the named presets,
and the one token-id range check."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from loopedlm.common.validation import ConfigError, check, check_choice, close_match, is_int
from loopedlm.model.backbones import BACKBONES, NANOCHAT, ROTARY_LENGTH_FACTOR, Backbone
from loopedlm.model.loop_modes import LOOP_MODES

LOSS_LOOPS = ("last", "all", "last_third")
STATE_INITS = ("zeros", "random")
ATTN_TYPES = ("full", "mla")
RESIDUAL_SCALES = ("none", "inv_sqrt_loops", "inv_loops", "lambda_loops_sqrt_depth")

QWEN3_VOCAB_SIZE = 151_669


@dataclass
class ModelConfig:
    """Everything that defines a looped GPT's architecture.

    `d_model`, `n_head` and `n_kv_head` default to the nanochat rule
    (`64 * depth`, `ceil(d_model / 128)`, `n_head`), and `mlp_hidden` to `4 * d_model`;
    they are resolved on construction, so the stored config is always explicit.

    `backbone` names the layer family (`loopedlm.model.backbones`): `nanochat` is loopedlm's
    own; the others (public models, docs/public_models.md) take their per-model values from
    `mlp_hidden`, `norm_eps` (their RMSNorm epsilon), `rope_base`, `softcap` (None: plain
    logits), `tie_embeddings` (the LM head is the embedding), `qk_bias` (biases on the query
    and key projections) and, for Huginn, `n_prelude` / `n_coda` (plain layers before and
    after the looped `depth` ones) and `state_init` ("zeros" or "random": the state the
    first loop's adapter reads).

    Sliding windows (docs/design.md#attention-variants): `window_pattern` tiles `L` (full)
    and `S` (windowed) over the layers; an `S` layer sees the last `window_size` keys (None:
    `sequence_len // 4`), and the last layer is full unless `full_last_layer` is False (then
    it follows the pattern too, so no layer sees past its window: a task whose answers lie
    farther away must then be carried there loop by loop, docs/reasoning.md).
    """

    vocab_size: int = QWEN3_VOCAB_SIZE
    sequence_len: int = 1024
    depth: int = 6  # unique blocks L
    d_model: int | None = None
    n_head: int | None = None
    n_kv_head: int | None = None
    loop_mode: str = "flt"
    n_loops: int = 3
    loss_loops: str = "last"
    attn_type: str = "full"
    kv_rank: int = 128
    window_pattern: str = "L"
    window_size: int | None = None
    full_last_layer: bool = True
    residual_scale: str = "none"
    residual_lambda: float = 1.0
    pad_vocab_to: int = 64
    rope_base: float = 10000.0
    softcap: float | None = 15.0
    backbone: str = NANOCHAT
    mlp_hidden: int | None = None
    norm_eps: float | None = None
    tie_embeddings: bool = False
    qk_bias: bool = False
    n_prelude: int = 0
    n_coda: int = 0
    state_init: str = "zeros"

    def __post_init__(self) -> None:
        check(is_int(self.depth) and self.depth >= 1, "depth", self.depth, "an integer >= 1")
        if self.d_model is None:
            self.d_model = 64 * self.depth
        if self.n_head is None:
            self.n_head = max(1, math.ceil(self.d_model / 128))
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.mlp_hidden is None and is_int(self.d_model):
            self.mlp_hidden = 4 * self.d_model
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first field whose value is not allowed."""
        check(is_int(self.vocab_size) and self.vocab_size >= 2, "vocab_size", self.vocab_size,
               "an integer >= 2")
        check(is_int(self.sequence_len) and self.sequence_len >= 1, "sequence_len",
               self.sequence_len, "an integer >= 1")
        check(is_int(self.d_model) and self.d_model >= 2, "d_model", self.d_model,
               "an integer >= 2")
        check(is_int(self.n_head) and self.n_head >= 1, "n_head", self.n_head, "an integer >= 1")
        check(self.d_model % self.n_head == 0, "n_head", self.n_head,
               f"must divide d_model={self.d_model}")
        check(self.head_dim % 2 == 0, "n_head", self.n_head,
               f"head dim d_model/n_head={self.head_dim} must be even for RoPE")
        check(is_int(self.n_kv_head) and self.n_kv_head >= 1, "n_kv_head", self.n_kv_head,
               "an integer >= 1")
        check(self.n_head % self.n_kv_head == 0, "n_kv_head", self.n_kv_head,
               f"must divide n_head={self.n_head}")
        check_choice("loop_mode", self.loop_mode, tuple(LOOP_MODES))
        self.loops()  # the one check of a loop count
        check_choice("loss_loops", self.loss_loops, LOSS_LOOPS)
        check_choice("attn_type", self.attn_type, ATTN_TYPES)
        check(is_int(self.kv_rank) and self.kv_rank >= 1, "kv_rank", self.kv_rank,
               "an integer >= 1")
        check(isinstance(self.window_pattern, str) and len(self.window_pattern) > 0
               and set(self.window_pattern.upper()) <= {"L", "S"},
               "window_pattern", self.window_pattern, "a non-empty string of 'L' and 'S'")
        check(self.window_size is None or (is_int(self.window_size) and self.window_size >= 1),
              "window_size", self.window_size, "an integer >= 1 (or None: sequence_len // 4)")
        check(isinstance(self.full_last_layer, bool), "full_last_layer", self.full_last_layer,
              "true or false")
        check_choice("residual_scale", self.residual_scale, RESIDUAL_SCALES)
        check(isinstance(self.residual_lambda, int | float) and self.residual_lambda > 0,
               "residual_lambda", self.residual_lambda, "a number > 0")
        check(is_int(self.pad_vocab_to) and self.pad_vocab_to >= 1, "pad_vocab_to",
               self.pad_vocab_to, "an integer >= 1")
        check(isinstance(self.rope_base, int | float) and self.rope_base > 1, "rope_base",
               self.rope_base, "a number > 1")
        check(self.softcap is None or (isinstance(self.softcap, int | float)
                                       and self.softcap > 0), "softcap", self.softcap,
              "a number > 0 (or None: no cap)")
        check(is_int(self.mlp_hidden) and self.mlp_hidden >= 1, "mlp_hidden", self.mlp_hidden,
              "an integer >= 1")
        check_choice("backbone", self.backbone, tuple(BACKBONES))
        self._validate_backbone()

    def _validate_backbone(self) -> None:
        """What a backbone family allows (`Backbone.loop_modes`; public models run full
        attention with no residual scaling, and their norms need an epsilon)."""
        spec = self.backbone_spec
        check(self.loop_mode in spec.loop_modes, "loop_mode", self.loop_mode,
              f"backbone {self.backbone!r} runs {list(spec.loop_modes)}")
        if spec.learned_norms:
            check(isinstance(self.norm_eps, int | float) and self.norm_eps > 0, "norm_eps",
                  self.norm_eps, f"a number > 0 (backbone {self.backbone!r})")
        else:
            check(self.norm_eps is None, "norm_eps", self.norm_eps,
                  f"None: backbone {self.backbone!r} has parameter-free norms")
        for name in ("tie_embeddings", "qk_bias"):
            check(isinstance(getattr(self, name), bool), name, getattr(self, name), "true or false")
        check_choice("state_init", self.state_init, STATE_INITS)
        outer = spec.adapter  # only a backbone whose loops enter through an adapter has them
        for name in ("n_prelude", "n_coda"):
            value = getattr(self, name)
            check(is_int(value) and value >= 0 and (outer or value == 0), name, value,
                  "an integer >= 0" if outer else f"0 (backbone {self.backbone!r})")
        if self.backbone == NANOCHAT:
            for name, default in (("tie_embeddings", False), ("qk_bias", False)):
                check(getattr(self, name) == default, name, getattr(self, name),
                      f"{default} (backbone {self.backbone!r})")
        else:
            for name, ok, allowed in (
                    ("attn_type", self.attn_type == "full", "'full'"),
                    ("window_pattern", set(self.window_pattern.upper()) == {"L"}, "'L'"),
                    ("window_size", self.window_size is None, "None"),
                    ("full_last_layer", self.full_last_layer is True, "true"),
                    ("residual_scale", self.residual_scale == "none", "'none'")):
                check(ok, name, getattr(self, name), f"{allowed} (backbone {self.backbone!r})")

    def loops(self, n_loops: int | None = None) -> int:
        """The loop count of a call: `n_loops`, or this config's when None. The one code that
        fills the default and checks a count (this config's own too, in `validate`), called
        where a count enters: the model's forward and `estimate_flops`, the decode engine,
        the evaluators and the commands; a ValueError names a count that is not an integer
        >= 1."""
        n_loops = self.n_loops if n_loops is None else n_loops
        check(is_int(n_loops) and n_loops >= 1, "n_loops", n_loops, "an integer >= 1")
        return n_loops

    # ---- derived quantities -------------------------------------------------
    @property
    def backbone_spec(self) -> Backbone:
        """The backbone family's table entry (`loopedlm.model.backbones`)."""
        return BACKBONES[self.backbone]

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_to
        return ((self.vocab_size + m - 1) // m) * m

    @property
    def rotary_len(self) -> int:
        """Positions the RoPE tables cover (nanochat: 10 x sequence_len, as the authors' model;
        public models: sequence_len): the longest input a forward without targets takes.
        Training stays at `sequence_len`."""
        return self.backbone_spec.rotary_length_factor * self.sequence_len

    @property
    def short_window(self) -> int:
        """An 'S' layer sees the last `window_size` keys, by default `sequence_len // 4`
        (docs/design.md#attention-variants)."""
        if self.window_size is not None:
            return self.window_size
        return max(self.sequence_len // 4, 1)

    @property
    def n_layers(self) -> int:
        """Layers with attention: the looped `depth` ones (numbered first), then the prelude's
        and the coda's (Huginn), which run once per pass."""
        return self.depth + self.n_prelude + self.n_coda

    def window_sizes(self) -> list[int | None]:
        """Per-layer sliding window (None = full context), over all `n_layers`; the last
        layer is full unless `full_last_layer` is False."""
        pattern = self.window_pattern.upper()
        sizes = [self.short_window if pattern[i % len(pattern)] == "S" else None
                 for i in range(self.n_layers)]
        if self.full_last_layer:
            sizes[-1] = None
        return sizes

    def residual_eps(self) -> float:
        """The scale on every residual branch, fixed by the trained loop count
        (docs/design.md#residual-scaling)."""
        n, depth = self.n_loops, self.depth
        return {
            "none": 1.0,
            "inv_sqrt_loops": 1.0 / math.sqrt(n),
            "inv_loops": 1.0 / n,
            "lambda_loops_sqrt_depth": self.residual_lambda / (n * math.sqrt(depth)),
        }[self.residual_scale]

    # ---- (de)serialisation --------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            hints = {k: close_match(k, known) for k in unknown}
            msg = ", ".join(f"{k!r}" + (f" (did you mean {h!r}?)" if h else "")
                            for k, h in hints.items())
            raise ConfigError(f"unknown ModelConfig field(s): {msg}")
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (`tiny`, `small`, `base`), with field overrides."""
        check_choice("preset", name, tuple(PRESETS))
        data = dict(PRESETS[name])
        data.update(overrides)
        return cls.from_dict(data)


def check_token_ids(ids: torch.Tensor | Sequence[int], vocab_size: int, what: str = "token id",
                    *, ignore: int | None = None) -> None:
    """Raise ValueError naming the first id in `ids` (a tensor or a sequence of ints) outside
    [0, vocab_size) (`ignore`, e.g. -1 for ignored targets, is allowed too). It reads the
    values, so it runs where ids enter (the decode engine, the server, the model's forward on
    CPU), never on an accelerator's hot path."""
    if hasattr(ids, "numel"):  # a tensor (duck-typed: this module imports no torch, so that
        # the CLI reads configs and presets without it)
        values = ids[ids != ignore] if ignore is not None else ids
        if values.numel() == 0:
            return
        lo, hi = int(values.min()), int(values.max())
        bad = lo if lo < 0 else hi if hi >= vocab_size else None
    else:
        bad = next((t for t in ids if t != ignore and (not is_int(t) or not 0 <= t < vocab_size)),
                   None)
    if bad is not None:
        allowed = f" (or {ignore} = ignore)" if ignore is not None else ""
        raise ValueError(f"{what} {bad!r} is outside the vocabulary [0, {vocab_size}){allowed}")


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's sizes (A.3): Qwen3 vocabulary, nanochat width rule.
    "small": dict(depth=6, vocab_size=QWEN3_VOCAB_SIZE, sequence_len=1024),
    "base": dict(depth=12, vocab_size=QWEN3_VOCAB_SIZE, sequence_len=1024),
    # Trains on 2 CPU cores in minutes with a small trained BPE vocabulary.
    "tiny": dict(depth=2, d_model=128, n_head=2, vocab_size=4096, sequence_len=256, n_loops=3),
}


__all__ = ["ModelConfig", "PRESETS", "LOOP_MODES", "check_token_ids", "LOSS_LOOPS", "ATTN_TYPES",
           "RESIDUAL_SCALES", "ROTARY_LENGTH_FACTOR",
           "QWEN3_VOCAB_SIZE"]
