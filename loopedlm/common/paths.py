"""Where loopedlm keeps its caches (the one rule for `LOOPEDLM_HOME`) and finds recipes."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent
# recipes/NAME.toml of a source checkout first, then recipes shipped inside the package
RECIPE_DIRS = [PACKAGE_DIR.parent / "recipes", PACKAGE_DIR / "recipes"]
# whether the user chose torch.compile's cache folder: read as loopedlm is first imported,
# since torch sets TORCHINDUCTOR_CACHE_DIR itself (to its /tmp default) the first time it
# asks for the folder, which building a model does
INDUCTOR_DIR_CHOSEN = bool(os.environ.get("TORCHINDUCTOR_CACHE_DIR"))


def loopedlm_home() -> Path:
    """Root of loopedlm's caches (corpora, trained tokenizers, task data):
    `$LOOPEDLM_HOME`, or `~/.cache/loopedlm` when it is unset or empty."""
    return Path(os.environ.get("LOOPEDLM_HOME") or Path.home() / ".cache" / "loopedlm")


def use_compile_cache() -> Path:
    """Keep torch.compile's on-disk caches (Inductor's FX-graph and AOTAutograd caches) under
    $LOOPEDLM_HOME/torch_compile, unless the user set TORCHINDUCTOR_CACHE_DIR: the kernels a
    run compiles are reused by the next run, which then compiles in seconds. The folder."""
    if not INDUCTOR_DIR_CHOSEN:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(loopedlm_home() / "torch_compile")
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or loopedlm_home() / "torch_compile")
