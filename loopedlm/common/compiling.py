"""torch.compile's recompile limit, set per compiled region, and a warning of our own when
one is hit.

Dynamo keeps a bounded number of compiled variants per code object (`recompile_limit`,
default 8). Past it, the region runs eagerly for every new variant, with one line from
torch's own logger that is easy to miss in a long run. Regions whose variants we know
(the block, the head's chunk body) ask for a limit that covers them, and
`RecompileLimitWatch` turns a hit into a loopedlm warning that says what it costs.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def recompile_limit_kwargs(limit: int) -> dict[str, Any]:
    """`torch.compile` keyword arguments that allow `limit` compiled variants of a region:
    `recompile_limit=` where torch takes it per call (2.13 and later), else the process-wide
    `torch._dynamo.config.recompile_limit` is raised to at least `limit` and nothing is
    returned."""
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        return {"recompile_limit": limit}
    import torch._dynamo as dynamo  # older torch: the global setting is the only one

    dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, limit)
    return {}


class _LimitHandler(logging.Handler):
    def __init__(self, what: str):
        super().__init__(logging.WARNING)
        self.what, self.hits = what, 0

    def emit(self, record: logging.LogRecord) -> None:
        # dynamo's message: "torch._dynamo hit config.recompile_limit (8)\n function: ..."
        text = record.getMessage()
        if "hit config." not in text or "limit" not in text:
            return
        self.hits += 1
        if self.hits == 1:
            detail = text.splitlines()[1].strip() if "\n" in text else text
            log.warning("torch.compile reached its recompile limit during %s (%s): every "
                        "new variant of that function now runs eagerly, which is slower. "
                        "Run with TORCH_LOGS=recompiles to see why it recompiled.",
                        self.what, detail)


class RecompileLimitWatch:
    """While active, a hit of dynamo's recompile limit is logged as a loopedlm warning
    (once; `hits` counts them). Use as a context manager around compiled work."""

    def __init__(self, what: str = "this run"):
        self._handler = _LimitHandler(what)
        self._logger = logging.getLogger("torch._dynamo")

    @property
    def hits(self) -> int:
        return self._handler.hits

    def __enter__(self) -> RecompileLimitWatch:
        self._logger.addHandler(self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self._handler)


__all__ = ["recompile_limit_kwargs", "RecompileLimitWatch"]
