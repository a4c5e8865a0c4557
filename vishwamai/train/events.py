"""The loop's events and the Callback base class (Composer-style).

Features (monitoring, checkpointing, dynamic batch, distillation, pruning, tuning)
are callbacks: they subscribe to events instead of being wired through the loop.
A callback overrides only the methods it needs; each receives the Trainer, whose
attributes are the shared state (see Trainer's docstring for what may be changed).

Order of events in one run:
  on_init                    (once, when the Trainer is built, before any resume: a callback that
                              trains parameters of its own adds them to the optimizer here)
  on_train_start
  repeat:   on_step_start
            on_loss                  (once per micro-batch: add loss terms)
            on_after_backward
            on_before_optimizer_step (masks, grad checks; may set trainer.skip_update)
            on_step_error            (only if the step raised: return True if handled -> step is redone)
            on_eval_error            (only if evaluation raised: return True if handled -> redone)
            on_eval_end              (on evaluation steps)
            on_step_end              (logging, dynamic batch, periodic checkpoints)
  on_train_end
  on_exception(error)        (instead of on_train_end when fit() raises: release resources)
State hooks: state_dict() / load_state_dict() let each feature save and restore its
own state with every checkpoint, so exact resume covers it without the checkpoint
module knowing about it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vishwamai.train.loop import Trainer

EVENTS = (
    "on_init",
    "on_train_start",
    "on_step_start",
    "on_loss",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_step_error",
    "on_eval_error",
    "on_eval_end",
    "on_step_end",
    "on_train_end",
    "on_exception",
)


class Callback:
    """Base class: every event is a no-op. `state_key` names the callback's saved state."""

    state_key: str | None = None

    def on_init(self, trainer: "Trainer") -> None: ...

    def on_train_start(self, trainer: "Trainer") -> None: ...

    def on_step_start(self, trainer: "Trainer") -> None: ...

    def on_loss(self, trainer: "Trainer", *, inputs, targets, outputs, terms: dict) -> None: ...

    def on_after_backward(self, trainer: "Trainer") -> None: ...

    def on_before_optimizer_step(self, trainer: "Trainer") -> None: ...

    def on_step_error(self, trainer: "Trainer", *, error: BaseException) -> bool:
        return False

    def on_eval_error(self, trainer: "Trainer", *, error: BaseException) -> bool:
        return False

    def on_eval_end(self, trainer: "Trainer", *, val_loss: float) -> None: ...

    def on_step_end(self, trainer: "Trainer") -> None: ...

    def on_train_end(self, trainer: "Trainer") -> None: ...

    def on_exception(self, trainer: "Trainer", *, error: BaseException) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
