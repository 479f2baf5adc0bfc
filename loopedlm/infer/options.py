"""The decoding options' defaults and choices, in a module that needs no torch: the CLI
builds `loopedlm sample --help` and `loopedlm serve --help` from them without importing
torch (start-up), and the engine, the cache and `generate` read the same values."""

# New tokens per prompt when none is asked for: OpenAI's completions default, so that the
# library, `loopedlm sample` and a server request without max_tokens all give the same.
DEFAULT_MAX_TOKENS = 16
# adaptive loops: the exit criteria (loopedlm.infer.engine.AdaptiveLoops); each one's rule is
# in loopedlm.infer.exits.EXIT_CRITERIA
CRITERIA = ("state", "kl", "kl_previous", "gate")
# how loops share cache slots when there are fewer slots than loops (loopedlm.infer.cache)
SLOT_POLICIES = ("block", "modulo")
# torch.compile of the decode step: where it pays (the default), off, the whole step, or one
# loop (loopedlm.infer.engine.DecodeEngine)
COMPILE_MODES = ("auto", False, True, "step", "loop", "background")
# self-speculative decoding: tokens drafted per verify pass (measured in bench_decode.py)
DEFAULT_DRAFT_TOKENS = 4
MAX_DRAFT_TOKENS = 16

__all__ = ["DEFAULT_MAX_TOKENS", "CRITERIA", "SLOT_POLICIES", "COMPILE_MODES",
           "DEFAULT_DRAFT_TOKENS", "MAX_DRAFT_TOKENS"]
