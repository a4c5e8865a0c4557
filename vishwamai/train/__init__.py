"""The training loop and its event/callback mechanism.

The loop (and torch) load on first use of Trainer / TrainState / NonFiniteLossError, so code that
only defines callbacks, e.g. a monitoring backend's child process, imports `events` cheaply.
"""

from typing import TYPE_CHECKING

from vishwamai.train.events import EVENTS, Callback

if TYPE_CHECKING:
    from vishwamai.train.loop import NonFiniteLossError, Trainer, TrainState

__all__ = ["EVENTS", "Callback", "NonFiniteLossError", "TrainState", "Trainer"]
_LAZY = {"NonFiniteLossError", "Trainer", "TrainState"}


def __getattr__(name: str):
    if name in _LAZY:
        from vishwamai.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'vishwamai.train' has no attribute {name!r}")
