"""The one error type for bad configuration, on the bottom floor so every module may raise it."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A bad config value: the message names the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        super().__init__(f"{key}={value!r} is not allowed: {allowed}")
        self.key, self.value, self.allowed = key, value, allowed
