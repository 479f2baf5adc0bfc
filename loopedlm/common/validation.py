"""The checks every config uses, and their messages (CONVENTIONS: a config validates
itself and fails naming the field, the bad value and what is allowed).

    check(n >= 1, "n_loops", n, "an integer >= 1")
        -> ConfigError: n_loops=0 is not allowed: an integer >= 1
    check_choice("loop_mode", "fltt", ("lt", "flt"))
        -> ConfigError: loop_mode='fltt' is not allowed: choose one of ['lt', 'flt']
           (did you mean 'flt'?)

docs/bad_inputs.md freezes these messages: change them there too.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any


class ConfigError(ValueError):
    """A configuration field holds a value that is not allowed."""


def not_allowed(name: str, value: Any, allowed: str) -> ConfigError:
    """The error for `name=value`: "NAME=VALUE is not allowed: ALLOWED"."""
    return ConfigError(f"{name}={value!r} is not allowed: {allowed}")


def check(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise `not_allowed(name, value, allowed)` unless `ok`."""
    if not ok:
        raise not_allowed(name, value, allowed)


def is_int(value: Any) -> bool:
    """An integer, not a bool (True is an int to Python, not to a config)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_positive(name: str, value: Any) -> None:
    """`value` is a number > 0."""
    check(is_number(value) and value > 0, name, value, "a number > 0")


def close_match(word: Any, choices: Iterable[str]) -> str | None:
    """The choice closest to `word` (difflib), or None when none is close."""
    hint = difflib.get_close_matches(str(word), list(choices), n=1)
    return hint[0] if hint else None


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """`value` is one of `choices`; the message suggests the closest one."""
    if value not in choices:
        hint = close_match(value, choices)
        extra = f" (did you mean {hint!r}?)" if hint else ""
        raise not_allowed(name, value, f"choose one of {list(choices)}{extra}")


def unknown_setting(key: str, known: Sequence[str], section: str | None = None) -> ConfigError:
    """The error for a setting `key` (in `section`) that is none of `known`: the closest
    name, else the whole list."""
    prefix = f"{section}." if section else ""
    hint = close_match(key, known)
    return ConfigError(f"unknown setting {prefix + key!r}" +
                       (f" (did you mean {prefix}{hint}?)" if hint
                        else f"; known: {', '.join(known)}"))


__all__ = ["ConfigError", "not_allowed", "check", "is_int", "is_number", "check_positive",
           "close_match", "check_choice", "unknown_setting"]
