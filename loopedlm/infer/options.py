"""The decoding options' defaults and choices, in a module that needs no torch: the CLI
builds `loopedlm sample --help` and `loopedlm serve --help` from them without importing
torch (start-up), and the engine, the cache and `generate` read the same values."""

# New tokens per prompt when none is asked for: OpenAI's completions default, so that the
# library, `loopedlm sample` and a server request without max_tokens all give the same.
DEFAULT_MAX_TOKENS = 16
# adaptive loops: what "converged" means (loopedlm.infer.engine.AdaptiveLoops)
CRITERIA = ("state", "kl")
# how loops share cache slots when there are fewer slots than loops (loopedlm.infer.cache)
SLOT_POLICIES = ("block", "modulo")
# torch.compile of the decode step: off, the whole step, or one loop
COMPILE_MODES = (False, True, "step", "loop")

__all__ = ["DEFAULT_MAX_TOKENS", "CRITERIA", "SLOT_POLICIES", "COMPILE_MODES"]
