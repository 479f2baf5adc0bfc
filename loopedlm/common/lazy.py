"""Package attributes imported on first use (PEP 562): a package's `__init__` names what it
exports and the submodule defining each, and importing the package (or any module in it)
imports none of them. This keeps torch out of what does not need it, such as
`loopedlm --help` and the task-data commands."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`(__getattr__, __dir__)` for `package`, whose name `n` is `exports[n]`'s attribute `n`
    (`exports[n]` relative to `package`, e.g. "gpt" or "model.gpt"), imported on first use
    and then kept in the package's namespace."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
