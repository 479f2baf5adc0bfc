"""The one `--key=value` syntax of `loopedlm train`, `info` and `sweep`.

    --steps=200            TOML value: 200 (an int); "lt" or lt: the string 'lt'
    --model.n_loops=6      dotted key: the [model] section of the settings
    --resume               a bare flag is true
    --resume=yes           booleans also take True/False, yes/no, on/off, 1/0
    --run-dir=x            dashes in a key are underscores
    --n-loops 6            a shorthand (`shorthands`): its value may also follow it, and it
                           stands for a field (train's --n-loops is --model.n_loops)

`parse_overrides` turns the arguments into a nested dict; `coerce` then gives each value
its field's type where that is unambiguous (an int for a float field, "none" for an
optional one), so the configs' own validation names anything still wrong.
"""

from __future__ import annotations

import tomllib
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from loopedlm.common.validation import ConfigError, is_int

BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True,
              "false": False, "no": False, "off": False, "0": False}
BOOL_SPELLINGS = "also True/False, yes/no, on/off, 1/0"


def parse_value(text: str) -> Any:
    """A command-line value as TOML (`6`, `2.5`, `true`, `"a b"`, `[1, 2]`), else the
    text itself (so `--loop_mode=lt` needs no quotes)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def coerce(value: Any, hint: Any, name: str) -> Any:
    """Command-line/TOML value to the field's type (`hint`) where that is unambiguous."""
    args = typing.get_args(hint)
    allowed = set(args) if args else {hint}
    if bool in allowed and isinstance(value, str | int) and not isinstance(value, bool):
        word = str(value).strip().lower()
        if word in BOOL_WORDS:
            return BOOL_WORDS[word]
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")
                         and type(None) in allowed):
        return None
    if float in allowed and is_int(value):
        return float(value)
    if str in allowed and not isinstance(value, str) and not isinstance(value, bool):
        return str(value)
    if int in allowed and isinstance(value, float) and value.is_integer() and float not in allowed:
        return int(value)
    return value


def coerce_fields(cls: type, data: dict[str, Any], section: str | None = None) -> dict[str, Any]:
    """`coerce` every value of `data` that names a field of the dataclass `cls` (other
    keys pass unchanged, for the config to reject by name)."""
    hints = typing.get_type_hints(cls)
    prefix = f"{section}." if section else ""
    return {k: coerce(v, hints[k], prefix + k) if k in hints else v for k, v in data.items()}


def _set_dotted(data: dict[str, Any], key: str, value: Any, sections: Sequence[str]) -> None:
    """`data[key] = value`, or `data[section][leaf]` for `section.leaf` (one of `sections`)."""
    section, _, leaf = key.rpartition(".")
    if section and section not in sections:
        if not sections:
            raise ConfigError(f"unknown setting {key!r}: these settings have no sections "
                              "(give the field name alone)")
        raise ConfigError(f"unknown setting {key!r}: sections are "
                          + ", ".join(f"{s}." for s in sections))
    target = data.setdefault(section, {}) if section else data
    target[leaf] = value


def _parse_setting(arg: str) -> tuple[str, Any]:
    """`--key=value` -> (key, value); `--flag` -> (flag, True)."""
    key, eq, text = arg.removeprefix("--").partition("=")
    return key.replace("-", "_"), parse_value(text) if eq else True


def parse_overrides(args: Sequence[str], *, sections: Sequence[str] = (),
                    positional: str | None = None, shorthands: Mapping[str, str] | None = None
                    ) -> tuple[str | None, dict[str, Any]]:
    """`[POSITIONAL] [--key=value | --flag ...]` -> (positional, nested overrides).

    `positional` names the one bare argument allowed (train's "recipe", also given as
    `--recipe=NAME`); with None every argument must be a setting. `shorthands` maps a key
    (`n_loops`) to the setting it stands for (`model.n_loops`); a shorthand takes its value
    as `--n-loops=6` or as the next argument, `--n-loops 6`."""
    found, overrides = None, {}
    shorthands = shorthands or {}
    rest = iter(args)
    for arg in rest:
        if not arg.startswith("--"):
            if positional is None or found is not None:
                wanted = f"one {positional} and " if positional else ""
                raise ValueError(f"unexpected argument {arg!r}: give {wanted}--key=value settings")
            found = arg
            continue
        key, value = _parse_setting(arg)
        if positional is not None and key == positional:
            found = arg.partition("=")[2]  # the text as given, as a bare argument would be
            continue
        if key in shorthands:
            if "=" not in arg:
                text = next(rest, None)
                if text is None or text.startswith("--"):
                    raise ConfigError(f"{arg} needs a value: {arg} N or {arg}=N")
                value = parse_value(text)
            key = shorthands[key]
        _set_dotted(overrides, key, value, sections)
    return found, overrides


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` updated by `extra`, one level of sections deep."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def flatten(overrides: dict[str, Any]) -> dict[str, Any]:
    """Nested overrides -> dotted keys (`{"model": {"n_loops": 6}}` -> `{"model.n_loops": 6}`),
    the form sweep files use."""
    flat = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{leaf}": v for leaf, v in value.items()})
        else:
            flat[key] = value
    return flat


__all__ = ["BOOL_WORDS", "BOOL_SPELLINGS", "parse_value", "coerce", "coerce_fields",
           "parse_overrides", "merge", "flatten"]
