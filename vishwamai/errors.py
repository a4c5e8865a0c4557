"""Errors a user sees. Each names the config key or file that caused it."""

from __future__ import annotations


class VishwamaiError(Exception):
    """Base class: a problem with the user's input, reported before compute starts."""


class ConfigError(VishwamaiError):
    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config error at '{key}': {message}")


class NotImplementedYet(VishwamaiError):
    """A configured feature that this build does not provide yet: never silently ignored."""

    def __init__(self, key: str, detail: str = ""):
        self.key = key
        super().__init__(f"not implemented yet: {key}" + (f" ({detail})" if detail else ""))


class DataError(VishwamaiError):
    pass


class CheckpointError(VishwamaiError):
    pass


class InsufficientMemoryError(VishwamaiError):
    pass
