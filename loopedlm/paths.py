"""Where loopedlm keeps its caches: the one rule for `LOOPEDLM_HOME`."""

from __future__ import annotations

import os
from pathlib import Path


def loopedlm_home() -> Path:
    """Root of loopedlm's caches (corpora, trained tokenizers, task data):
    `$LOOPEDLM_HOME`, or `~/.cache/loopedlm` when it is unset or empty."""
    return Path(os.environ.get("LOOPEDLM_HOME") or Path.home() / ".cache" / "loopedlm")
