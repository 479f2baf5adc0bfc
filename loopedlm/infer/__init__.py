"""Inference: the static-cache decode engine, device-side sampling and decoding options
(adaptive loops, shared cache slots); `loopedlm.infer.generate` is the public entry point.
Serving: `loopedlm serve` (an OpenAI-compatible HTTP server, `loopedlm.infer.server`), its
scheduler (queue, admission, timeouts, cancellation, streaming) and the engine adapter it
drives through the small protocol of `loopedlm.infer.protocol`."""

from loopedlm.infer.engine import DecodeEngine, StepOutput
from loopedlm.infer.graphs import batch_buckets
from loopedlm.infer.options import AdaptiveLoops, loop_slot_map
from loopedlm.infer.sampling import SamplingParams, sample_rows
from loopedlm.infer.static_cache import StaticKVCache

__all__ = ["DecodeEngine", "StaticKVCache", "StepOutput", "batch_buckets", "AdaptiveLoops",
           "loop_slot_map", "SamplingParams", "sample_rows"]
