"""The configuration of a looped GPT exported by loopedlm (`loopedlm export`).

It holds every field of loopedlm's `ModelConfig` under the same name; the names that
`transformers` looks for (`hidden_size`, `num_hidden_layers`, ...) are aliases of them.
This file and `modeling_loopedlm.py` need only `torch` and `transformers` (>= 4.56).
"""

import re

import transformers

MIN_TRANSFORMERS = (4, 56)
INSTALLED = tuple(int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
if INSTALLED < MIN_TRANSFORMERS:  # checked before anything else of transformers is used
    # the per-layer Cache API this model's KV cache uses took its present form in 4.56
    raise ImportError(f"this looped model needs transformers >= 4.56, found "
                      f"{transformers.__version__}: pip install -U 'transformers>=4.56'")

CHOICES = {
    "loop_mode": ("lt", "lti", "ltai", "flt_res", "flt"),
    "loss_loops": ("last", "all", "last_third"),
    "attn_type": ("full", "mla"),
    "residual_scale": ("none", "inv_sqrt_loops", "inv_loops", "lambda_loops_sqrt_depth"),
    "backbone": ("nanochat",),
}


class LoopedLMConfig(transformers.PretrainedConfig):
    """`depth` unique blocks run `n_loops` times (the default of a call) in one of five loop
    modes (see modeling_loopedlm.py). `vocab_size` is the real vocabulary (the logits' width); the
    embedding and LM head are padded up to a multiple of `pad_vocab_to`. `d_model`,
    `n_head` and `n_kv_head` default to the nanochat rule (64 * depth, ceil(d_model / 128),
    n_head)."""

    model_type = "loopedlm"
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_head",
        "num_key_value_heads": "n_kv_head",
        "num_hidden_layers": "depth",
        "max_position_embeddings": "sequence_len",
    }

    def __init__(self, vocab_size=151669, sequence_len=1024, depth=6, d_model=None, n_head=None,
                 n_kv_head=None, loop_mode="flt", n_loops=3, loss_loops="last", attn_type="full",
                 kv_rank=128, window_pattern="L", window_size=None, full_last_layer=True,
                 residual_scale="none", residual_lambda=1.0,
                 pad_vocab_to=64, rope_base=10000.0, softcap=15.0, backbone="nanochat",
                 mlp_hidden=None, norm_eps=None, tie_embeddings=False, qk_bias=False,
                 n_prelude=0, n_coda=0, state_init="zeros", use_cache=True,
                 bos_token_id=None, eos_token_id=None, pad_token_id=None, trained_loops=None,
                 **kwargs):
        self.vocab_size = vocab_size
        self.sequence_len = sequence_len
        self.depth = depth
        self.d_model = 64 * depth if d_model is None else d_model
        self.n_head = max(1, -(-self.d_model // 128)) if n_head is None else n_head
        self.n_kv_head = self.n_head if n_kv_head is None else n_kv_head
        self.loop_mode = loop_mode
        self.n_loops = n_loops
        self.loss_loops = loss_loops
        self.attn_type = attn_type
        self.kv_rank = kv_rank
        self.window_pattern = window_pattern
        # loopedlm exports only these defaults ('S' layers see sequence_len // 4 keys, the
        # last layer is full: window_sizes in modeling_loopedlm.py); kept for the record
        self.window_size = window_size
        self.full_last_layer = full_last_layer
        self.residual_scale = residual_scale
        self.residual_lambda = residual_lambda
        self.pad_vocab_to = pad_vocab_to
        self.rope_base = rope_base
        self.softcap = softcap
        self.backbone = backbone  # loopedlm's own: the only one this code runs
        self.mlp_hidden = 4 * self.d_model if mlp_hidden is None else mlp_hidden
        self.norm_eps = norm_eps
        # public models' fields (docs/public_models.md): loopedlm's own models leave them so
        self.tie_embeddings, self.qk_bias = tie_embeddings, qk_bias
        self.n_prelude, self.n_coda, self.state_init = n_prelude, n_coda, state_init
        self.use_cache = use_cache
        # the loop count the residual scale was fixed at: n_loops may be overridden (it is the
        # default loop count of a call, e.g. lm-eval's --model_args ...,n_loops=6), this not
        self.trained_loops = n_loops if trained_loops is None else trained_loops
        for field, allowed in CHOICES.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field}={getattr(self, field)!r} is not allowed: one of "
                                 f"{', '.join(allowed)}")
        if not isinstance(n_loops, int) or n_loops < 1:
            raise ValueError(f"n_loops={n_loops!r} is not allowed: an integer >= 1")
        kwargs.setdefault("tie_word_embeddings", False)  # the LM head has its own weights
        super().__init__(**kwargs)
        # set after PretrainedConfig.__init__, which sets them in some versions only
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.pad_token_id = pad_token_id
