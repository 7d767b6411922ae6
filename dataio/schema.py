"""Typed config sections, shared by ``dataio`` and ``trainer``: the field helper, the
check helper, and the builder that turns a nested dict into dataclasses, checking every
key and type and naming the key (and its nearest valid names) when one is wrong."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import field
from typing import Any

from dataio.errors import ConfigError


def option(default: Any, doc: str, choices: tuple | None = None) -> Any:
    """A config field: its default, its one-line doc and (optionally) its allowed values."""
    meta = {"doc": doc, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    if dataclasses.is_dataclass(default):
        return field(default_factory=type(default), metadata=meta)
    return field(default=default, metadata=meta)


def cli_number(kind: type, minimum: float, *, above: bool = False):
    """An argparse ``type=`` for a finite ``kind`` (int or float) >= ``minimum`` (or >
    with ``above``): a bad value is exit 2 and the option named, by argparse."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if not math.isfinite(value) or value < minimum or (above and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if above else '>='} {minimum:g}, not {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    parse.kind, parse.minimum, parse.above = kind, minimum, above  # what tests/trainer/test_fuzz.py tries
    return parse


def check(condition: bool, key: str, message: str) -> None:
    """Raise a ConfigError about ``key`` unless ``condition`` holds (for __post_init__)."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


INT64_MAX = 2**63 - 1
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the type ``hint`` and convert the harmless cases."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, item = typing.get_args(hint) or (Any, Any)
        return {str(k): coerce(v, item, f"{key}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > INT64_MAX:  # torch and numpy take 64-bit integers (a seed, a count)
                raise ConfigError(f"{key}: {value} is out of range (at most {INT64_MAX} in size)")
            return value
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            number = float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key}: must be a finite number, not {value!r}")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}: expected {getattr(hint, '__name__', hint)}, "
                      f"got {value!r} ({type(value).__name__})")


def build_section(cls: type, values: dict, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a nested dict, checking every key and type;
    ``prefix`` ("augment.rrc.") is how the keys are named in messages."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in values:
        if name not in fields:
            near = difflib.get_close_matches(str(name), list(fields), n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(prefix + n for n in near)}?)" if near else \
                f" (valid keys under {prefix.rstrip('.') or 'the top level'}: {', '.join(fields)})"
            raise ConfigError(f"unknown key '{prefix}{name}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name not in values:
            continue
        key, hint, value = prefix + name, hints[name], values[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_section(hint, value, key + ".")
            continue
        choices = f.metadata.get("choices")
        if isinstance(value, bool) and choices and {"on", "off"} <= set(choices):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on / off as a boolean
        value = coerce(value, hint, key)
        if choices and value not in choices:
            near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            maybe = f" (did you mean '{near[0]}'?)" if near else ""
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(map(str, choices))}{maybe}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{prefix}{err}") from None


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per key: ``name = default  # doc`` (for ``--help-config``)."""
    lines = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            lines += describe(hint, prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata.get("choices")
        extra = f" [{'|'.join(map(str, choices))}]" if choices else ""
        lines.append(f"{prefix}{f.name} = {default!r}{extra}  # {f.metadata.get('doc', '')}")
    return lines
