"""The one error a bad config gives: `ConfigError`, a line naming the key, the value and
what is allowed."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config problem, phrased for the user: key, value, what is allowed."""


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise `ConfigError` naming `key`, `value` and what is `allowed` unless `ok`."""
    if not ok:
        raise ConfigError(f"invalid config: {key}={value!r} (allowed: {allowed})")
