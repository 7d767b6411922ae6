"""The building blocks of typed config sections, shared by ``dataio`` and ``trainer``."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A configuration mistake, reported before any work starts."""


def option(default: Any, doc: str, choices: tuple | None = None) -> Any:
    """A config field: its default, its one-line doc and (optionally) its allowed values."""
    meta = {"doc": doc, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    if dataclasses.is_dataclass(default):
        return field(default_factory=type(default), metadata=meta)
    return field(default=default, metadata=meta)


def check(condition: bool, key: str, message: str) -> None:
    """Raise a ConfigError about ``key`` unless ``condition`` holds (for __post_init__)."""
    if not condition:
        raise ConfigError(f"{key}: {message}")
