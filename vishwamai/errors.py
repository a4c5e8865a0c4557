"""Errors a user sees. Each names the config key or file that caused it."""

from __future__ import annotations

import sys

# The exit-code policy of every vishwamai command (the CLI, its own launcher, the torchrun wrapper):
# 0 done; 2 for an error a retry cannot fix (bad config, bad data, a NaN run), reported without a
# traceback and naming the key or file: Kubernetes restart policies key on it so such a pod is not
# restarted forever; 75 (EX_TEMPFAIL) after SIGTERM (preemption): a checkpoint was saved, rerun with
# training.resume=auto, and non-zero so a Kubernetes Job does not count the pod as completed;
# anything else (1, 128 + signal) is a crash.
EXIT_NON_RETRYABLE = 2
EXIT_PREEMPTED = 75


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


def report_user_error(error: BaseException) -> int:
    """A command-line tool's answer to a user's mistake: one line on stderr, no traceback; returns the
    exit code (EXIT_NON_RETRYABLE: running it again the same way fails the same way)."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    return EXIT_NON_RETRYABLE
