"""Where loopedlm keeps its caches (the one rule for `LOOPEDLM_HOME`) and finds recipes."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent
# recipes/NAME.toml of a source checkout first, then recipes shipped inside the package
RECIPE_DIRS = [PACKAGE_DIR.parent / "recipes", PACKAGE_DIR / "recipes"]


def loopedlm_home() -> Path:
    """Root of loopedlm's caches (corpora, trained tokenizers, task data):
    `$LOOPEDLM_HOME`, or `~/.cache/loopedlm` when it is unset or empty."""
    return Path(os.environ.get("LOOPEDLM_HOME") or Path.home() / ".cache" / "loopedlm")
