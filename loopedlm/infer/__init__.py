"""Inference serving: `loopedlm serve` (an OpenAI-compatible HTTP server), its scheduler
(queue, admission, timeouts, cancellation, streaming) and the decode engine adapter it
drives through the small protocol of `loopedlm.infer.protocol`."""
