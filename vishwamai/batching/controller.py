"""The dynamic batch size callback: grow while stable, shrink on out-of-memory or gradient trouble.

The controlled size is the batch of one forward/backward on one rank (what training.batch_size
is without the feature), starting at `initial_batch_size`:

* plain mode (constant_global_batch=false, the default, as in the seed config): the batch itself
  changes: trainer.micro_batch_size = size, trainer.batch_size = size * gradient_accumulation_steps.
  The learning rate may follow it (lr_scaling linear | sqrt, relative to initial_batch_size).
* constant global batch (constant_global_batch=true): the step's batch stays at
  training.batch_size * gradient_accumulation_steps and only the micro-batch changes, trading
  memory for more accumulation (as Composer's auto micro-batching and accelerate's
  find_executable_batch_size do). The loop weights each micro-batch by its share of the step,
  so the gradient, and hence the run, does not depend on the split.

Events (each logged to trainer.metrics, printed, and listed in summary.json):
  oom         out-of-memory in forward/backward: memory is released, the micro-batch shrinks
              and the same samples are trained again; the agreed size shrinks from the next step.
              At min_batch_size a further OOM saves a checkpoint (when one can be saved) and stops
              with BatchSizeMemoryError saying how much the failed allocation asked for.
  non_finite  the loop skipped a step for a non-finite loss/gradient: plain mode shrinks.
  grad_spike  gradient norm above grad_spike_factor x the median of recent norms: the update is
              skipped and plain mode shrinks. (In constant-global-batch mode both only reset the
              stability counter: the gradient does not depend on the micro-batch, so shrinking
              it cannot help.)
  growth      stable_steps trouble-free steps: the size grows by growth_factor up to
              target_batch_size. Growing back to a size at or above one that ran out of memory
              needs 2**failures times as many stable steps, so a size that keeps failing is
              retried ever more rarely instead of costing a redone step every stable_steps.
  eval_oom    out-of-memory during evaluation halves trainer.eval_batch_size only; the training
              sizes are untouched.

Distributed runs: every size change is decided at on_step_end, a point every rank reaches once
per step, from agreed facts only, with no collective of its own: the non-finite flag (the loop's,
from the agreed loss and the global gradient norm), the spike flag (judged from the global
gradient norm, the same on every rank, and a history built from it) and the number of OOM shrinks
(a vote in the step's one agreement, vishwamai/train/agreement.py), so all ranks apply the same
sizes and the sampler stays in step. An OOM is
caught and the step redone locally. When every rank runs out of memory at the same point - the
usual case, as every rank runs the same shapes - the redone steps' collectives pair up and all
ranks recover together (tests/test_dynamic_batch_ddp.py, 2 gloo processes).
Limitation: an OOM on one rank only cannot be recovered in place. The other ranks are by then
inside a collective (DDP's gradient all-reduce in backward, or the loss all-reduce) that the
redone step does not match (it starts with DDP's buffer broadcast), and no rank can be told
without a collective of its own. The run then fails at the process group's timeout; the
launcher can restart it (distributed.max_restarts) and training.resume=auto continues from the
last checkpoint's batch state (if that rank runs out of memory there again, lower the sizes). An OOM during
evaluation on one rank is recovered: evaluation's only collectives are DDP's buffer broadcast
at its first forward (not repeated by the redo, see oom.skip_repeated_buffer_sync) and the
all-reduce after all its forwards.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import TYPE_CHECKING, Any, Optional

from vishwamai.batching.oom import is_out_of_memory, release_memory, requested_memory, skip_repeated_buffer_sync
from vishwamai.config import DynamicBatchConfig
from vishwamai.errors import ConfigError, InsufficientMemoryError
from vishwamai.train.events import ORDER_FEATURE, Callback

if TYPE_CHECKING:
    from vishwamai.train.loop import Trainer

GRAD_NORM_WINDOW = 100  # recent trouble-free gradient norms kept for the spike median
MIN_GRAD_HISTORY = 10  # spikes are judged only once this many norms are known
MAX_SPIKES_IN_A_ROW = 3  # a higher norm that lasts longer is the new normal, not a spike
MAX_EVENTS = 200  # size changes kept for summary.json


class BatchSizeMemoryError(InsufficientMemoryError):
    """Out of memory with the batch already at its lower bound."""


def _shrunk(size: int, factor: float, floor: int) -> int:
    return max(floor, min(size - 1, int(size * factor)))


def _grown(size: int, factor: float, ceiling: int) -> int:
    return min(ceiling, max(size + 1, int(size * factor)))


class DynamicBatchSize(Callback):
    state_key = "dynamic_batch_size"
    order = ORDER_FEATURE  # sizes and metrics settled before the checkpoint and the loggers see the step

    def __init__(self, cfg: DynamicBatchConfig, accumulation_steps: int = 1):
        self.cfg = cfg
        self.constant = bool(cfg.constant_global_batch)
        self.accumulation = accumulation_steps
        self.size = int(cfg.initial_batch_size)  # agreed by all ranks
        self.stable = 0
        self.grad_norms: deque[float] = deque(maxlen=GRAD_NORM_WINDOW)
        self.lr_factor = 1.0
        self.failures: dict[int, int] = {}  # size -> times it ran out of memory
        self.spikes_in_a_row = 0
        self.events: list[dict[str, Any]] = []
        self._restored = False
        self._local_shrinks = 0  # OOM shrinks on this rank during the current step
        self._trouble: Optional[str] = None

    # ------------------------------------------------------------------ events
    def on_init(self, trainer: "Trainer") -> None:
        # Ranks redo OOM'd micro-batches locally; the step's agreement gives every rank the most shrinks.
        trainer.agreement.register("oom_shrinks", lambda: self._local_shrinks, kind="max")

    def on_train_start(self, trainer: "Trainer") -> None:
        if not self._restored:  # a restored run keeps the sizes Trainer.load_state_dict set
            self._apply(trainer)

    def on_step_start(self, trainer: "Trainer") -> None:
        self._local_shrinks = 0
        self._trouble = None

    def on_step_error(self, trainer: "Trainer", *, error: BaseException) -> bool:
        if not is_out_of_memory(error):
            return False
        release_memory(error, trainer.device)
        micro = trainer.micro_batch_size
        if micro <= self.cfg.min_batch_size:
            self._give_up(trainer, error, f"training step {trainer.state.step + 1}, micro-batch of {micro}")
        trainer.micro_batch_size = _shrunk(micro, self.cfg.shrink_factor, self.cfg.min_batch_size)
        self._local_shrinks += 1
        self._print(trainer, f"out of memory at micro-batch {micro} (step {trainer.state.step + 1}); "
                             f"redoing the step's samples with micro-batch {trainer.micro_batch_size}")
        return True

    def on_eval_error(self, trainer: "Trainer", *, error: BaseException) -> bool:
        if not is_out_of_memory(error):
            return False
        release_memory(error, trainer.device)
        skip_repeated_buffer_sync(trainer.model)
        old = trainer.eval_batch_size
        if old <= 1:
            self._give_up(trainer, error, "evaluation with one sequence per forward")
        trainer.eval_batch_size = _shrunk(old, self.cfg.shrink_factor, 1)
        self._record(trainer, "eval_oom", {"eval_batch_size": trainer.eval_batch_size},
                     f"eval batch {old} -> {trainer.eval_batch_size} (training sizes unchanged)")
        return True

    def on_before_optimizer_step(self, trainer: "Trainer") -> None:
        if trainer.metrics.get("skipped_non_finite"):  # agreed across ranks by the loop
            self._trouble = "non_finite"
            return
        norm = trainer.grad_norm
        factor = self.cfg.grad_spike_factor
        # A non-finite norm here is an fp16 loss-scale overflow: the scaler's business, not ours.
        # The norm is global and the history is built from it: every rank makes the same call.
        spike = (factor > 0 and math.isfinite(norm) and len(self.grad_norms) >= MIN_GRAD_HISTORY
                 and norm > factor * statistics.median(self.grad_norms))
        self.spikes_in_a_row = self.spikes_in_a_row + 1 if spike else 0
        if self.spikes_in_a_row > MAX_SPIKES_IN_A_ROW:
            # Never skip forever: the norm has moved to a new level; learn it afresh.
            self.grad_norms.clear()
            self.spikes_in_a_row, spike = 0, False
        if spike:
            trainer.skip_update = True
            trainer.metrics["skipped_grad_spike"] = 1
            self._trouble = "grad_spike"
        elif math.isfinite(norm):
            self.grad_norms.append(float(norm))  # plain data for the checkpoint

    def on_step_end(self, trainer: "Trainer") -> None:
        shrinks = trainer.agreement.agreed["oom_shrinks"]
        c = self.cfg
        if shrinks:
            self.failures[self.size] = self.failures.get(self.size, 0) + 1
            new = self.size
            for _ in range(shrinks):
                new = _shrunk(new, c.shrink_factor, c.min_batch_size)
            self._change(trainer, new, "oom")
        elif self._trouble:
            self.stable = 0
            if not self.constant and self.size > c.min_batch_size:
                self._change(trainer, _shrunk(self.size, c.shrink_factor, c.min_batch_size), self._trouble)
        else:
            self.stable += 1
            grown = _grown(self.size, c.growth_factor, c.target_batch_size)
            if self.size < c.target_batch_size and self.stable >= self._stable_steps_before(grown):
                self._change(trainer, grown, "growth")
        trainer.metrics["batch_size_changes"] = len(self.events)

    def on_train_end(self, trainer: "Trainer") -> None:
        trainer.summary["dynamic_batch_size"] = {
            "final_batch_size": trainer.batch_size, "final_micro_batch_size": trainer.micro_batch_size,
            "eval_batch_size": trainer.eval_batch_size, "lr_factor": self.lr_factor,
            "changes": list(self.events),
        }

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "stable": self.stable, "grad_norms": list(self.grad_norms),
                "lr_factor": self.lr_factor, "failures": dict(self.failures), "events": list(self.events),
                "spikes_in_a_row": self.spikes_in_a_row, "constant_global_batch": self.constant}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if bool(state["constant_global_batch"]) != self.constant:
            raise ConfigError("dynamic_batch_size.constant_global_batch",
                              f"the checkpoint being resumed was trained with constant_global_batch="
                              f"{str(bool(state['constant_global_batch'])).lower()}: resume with the same setting "
                              "(the saved sizes mean different things in the two modes)")
        self.size, self.stable = int(state["size"]), int(state["stable"])
        self.spikes_in_a_row = int(state["spikes_in_a_row"])
        self.grad_norms = deque(state["grad_norms"], maxlen=GRAD_NORM_WINDOW)
        self.lr_factor = float(state["lr_factor"])
        self.failures = {int(k): int(v) for k, v in state["failures"].items()}  # JSON keys are str
        self.events = list(state["events"])
        self._restored = True

    # ----------------------------------------------------------------- helpers
    def _stable_steps_before(self, size: int) -> int:
        failed = sum(count for s, count in self.failures.items() if s <= size)
        return self.cfg.stable_steps * 2 ** min(failed, 20)

    def _apply(self, trainer: "Trainer") -> None:
        trainer.micro_batch_size = self.size
        if not self.constant:
            trainer.batch_size = self.size * self.accumulation

    def _change(self, trainer: "Trainer", new: int, reason: str) -> None:
        old_batch, old = trainer.batch_size, self.size
        self.size, self.stable = new, 0
        self._apply(trainer)
        if not self.constant:
            self._set_lr_factor(trainer, self._lr_factor_for(new))
        sizes = {"batch_size": trainer.batch_size, "micro_batch_size": trainer.micro_batch_size,
                 "lr_factor": self.lr_factor}
        what = (f"micro-batch {old} -> {new} (step batch {trainer.batch_size} unchanged)" if self.constant
                else f"batch {old_batch} -> {trainer.batch_size} (micro-batch {new})"
                + (f", lr x{self.lr_factor:.3g}" if self.cfg.lr_scaling != "none" else ""))
        self._record(trainer, reason, sizes, what)

    def _record(self, trainer: "Trainer", reason: str, sizes: dict[str, Any], what: str) -> None:
        step = trainer.state.step
        trainer.metrics.update(batch_size_change=1, batch_size_change_reason=reason,
                               **{f"dynamic_{k}": v for k, v in sizes.items()})
        self.events.append({"step": step, "reason": reason, **sizes})
        del self.events[:-MAX_EVENTS]
        self._print(trainer, f"step {step}: {reason}: {what}")

    def _lr_factor_for(self, size: int) -> float:
        ratio = size / self.cfg.initial_batch_size
        return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[self.cfg.lr_scaling]

    def _set_lr_factor(self, trainer: "Trainer", factor: float) -> None:
        trainer.scale_lr(factor / self.lr_factor)
        self.lr_factor = factor

    def _give_up(self, trainer: "Trainer", error: BaseException, where: str) -> None:
        needed = requested_memory(error)
        saved = _save_checkpoint(trainer)
        raise BatchSizeMemoryError(
            f"out of memory in {where}, already at the lower bound "
            f"(dynamic_batch_size.min_batch_size={self.cfg.min_batch_size} for training, 1 for evaluation)"
            + (f"; the failed allocation asked for {needed}" if needed else "")
            + f". {type(error).__name__}: {str(error).strip()[:300]}. "
            + f"Checkpoint: {saved or 'none saved (no checkpoint callback in this run)'}. "
            + "Lower data.seq_len or the model size, enable amp, or use a device with more memory."
        ) from error

    @staticmethod
    def _print(trainer: "Trainer", message: str) -> None:
        if trainer.is_main:
            print(f"[dynamic batch] {message}", flush=True)


def build_dynamic_batch(cfg) -> list[Callback]:
    """The callbacks dynamic_batch_size.* asks for (none when disabled)."""
    if not cfg.dynamic_batch_size.enabled:
        return []
    return [DynamicBatchSize(cfg.dynamic_batch_size, cfg.training.gradient_accumulation_steps)]


def _save_checkpoint(trainer: "Trainer") -> Optional[str]:
    """Save a resumable checkpoint (Trainer.save_checkpoint); what to tell the user, None without checkpointing.

    The state is that of the last completed step; the failed step's samples were already drawn,
    so a resume continues after them.
    """
    try:
        where = trainer.save_checkpoint()
    except Exception as error:  # noqa: BLE001 - the OOM error is the one to report
        return f"not saved, the save failed too ({type(error).__name__}: {error})"
    return None if where is None else f"saved in {where} (resume with training.resume)"
