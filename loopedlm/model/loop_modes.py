"""The loop modes (docs/design.md#loop-modes) as data: the one table that config validation, the model and
the importer of the authors' checkpoints all read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoopMode:
    """How loop t > 1 differs from loop 1 (which is a plain transformer pass in every mode).

    start:      "embedding" (e = norm(wte(idx))), "previous" (h^{t-1}) or
                "embedding_plus_previous" (norm(wte(idx) + h^{t-1})).
    injection:  "none"; "attention" (Attention Injection: h^{t-1} is the query source);
                "residual" (x = norm(x + h^{t-1}) before the block).
    layers:     "all" or "first": the layers that inject.
    """

    start: str
    injection: str = "none"
    layers: str = "all"
    nanochat_name: str = ""  # the FLT authors' `model_type` (loopedlm.model.interop)

    def injects_at(self, layer: int) -> bool:
        return self.injection != "none" and (self.layers == "all" or layer == 0)

    @property
    def first_layer_kv_invariant(self) -> bool:
        """Whether the first layer's keys and values are the same in every loop: every
        loop restarts from e and nothing is added to the stream before layer 1 (`flt`,
        `ltai`), so they can be computed once per forward (exact: same inputs, same ops)."""
        return self.start == "embedding" and not (self.injection == "residual"
                                                  and self.injects_at(0))


LOOP_MODES: dict[str, LoopMode] = {
    "lt": LoopMode(start="previous", nanochat_name="LT"),
    "lti": LoopMode(start="embedding_plus_previous", nanochat_name="LT_i"),
    "ltai": LoopMode(start="embedding", injection="attention", layers="first",
                     nanochat_name="LT_ia"),
    "flt_res": LoopMode(start="embedding", injection="residual", layers="all",
                        nanochat_name="FLT_res"),
    "flt": LoopMode(start="embedding", injection="attention", layers="all",
                    nanochat_name="FLT"),
}
