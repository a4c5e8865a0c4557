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
  on_train_end               (end products: final checkpoint, pruned/quantized model, sample, logs)
  on_exception(error)        (instead of on_train_end when fit() raises: release resources)
  close()                    (Trainer.close(), once, whatever happened: release what on_init/on_train_start took)

Order: callbacks run sorted by their `order` (a phase, ORDER_*; equal orders keep the order they were
given in), so what a callback relies on is declared, not implied by its list position: features change
the step (and write their metrics) before the checkpoint saves it, and the checkpoint saves before the
loggers write the step's record (checkpoint_save_s).  Releases run in reverse (on_exception, close), as
context managers unwind: what was set up last is released first.  on_train_end runs forwards: it is
where the end products are made, each from the previous ones (pruned model -> quantized model -> logs).

Callbacks change the run through the Trainer's services (save_checkpoint, add_param_group, scale_lr),
never by editing the optimizer's or scheduler's fields themselves.
State hooks: state_dict() / load_state_dict() let each feature save and restore its
own state with every checkpoint, so exact resume covers it without the checkpoint
module knowing about it.
"""

from __future__ import annotations

from typing import Any

# The phases (Callback.order).  Unlabelled callbacks (loggers, reports, a caller's own) come last.
ORDER_FEATURE = 0  # change the step or the model: dynamic batch, distillation, pruning, quantization
ORDER_CHECKPOINT = 10  # saves the state the features left
ORDER_DEFAULT = 20  # observe: loggers, reports, tuning, samples, callers' callbacks
REVERSED_EVENTS = frozenset({"on_exception"})  # releases: last set up, first released

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

Trainer = Any  # the loop's Trainer (vishwamai.train.loop); not imported here: events stays free of the loop


class Callback:
    """Base class: every event is a no-op. `state_key` names the callback's saved state; `order` its phase."""

    state_key: str | None = None
    order: int = ORDER_DEFAULT

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

    def close(self) -> None:
        """Release what the callback holds (threads, files, handlers); called once by Trainer.close()."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
