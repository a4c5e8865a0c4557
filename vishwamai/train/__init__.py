"""The training loop and its event/callback mechanism."""

from vishwamai.train.events import EVENTS, Callback
from vishwamai.train.loop import NonFiniteLossError, Trainer, TrainState

__all__ = ["EVENTS", "Callback", "NonFiniteLossError", "TrainState", "Trainer"]
