"""The single-process Parallelism (the interface every strategy implements) and the bounded teardown.

Its own module so that the strategies (group.py, ddp.py, fsdp.py) import it without importing the
package that chooses between them (no import cycle).
"""

from __future__ import annotations

import contextlib
import faulthandler
import time
from typing import Any, Iterator

import torch


class Parallelism:
    """One process, no communication. Subclasses override what they need."""

    rank = 0
    local_rank = 0
    world_size = 1
    # Parameters (and so gradients and optimizer state) are split over ranks: saving
    # goes through distributed/checkpoint.py (stage_sharded / write_sharded / load_sharded).
    sharded = False
    # Only the optimizer state is split over ranks (ZeRO): optimizer.state_dict() is
    # not available locally, checkpoints with optimizer state must be sharded too.
    shards_optimizer = False
    # Ranks one copy of the parameters is split over (FSDP's shard group; 1 = full copy).
    shard_size = 1
    # The strategy keeps amp O2's float32 master weights itself (FSDP's mixed-precision policy).
    keeps_master_weights = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> torch.device:
        if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return getattr(model, "module", model)

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The optimizer the trainer steps (ZeRO replaces it by a sharded one)."""
        return optimizer

    def accumulation_context(self, model: torch.nn.Module, is_last_micro_batch: bool):
        """Context for one micro-batch's forward+backward (DDP: no_sync until the last)."""
        return contextlib.nullcontext()

    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float) -> float:
        """Clip gradients to `max_norm` (inf = measure only); returns the global norm."""
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (the step's one agreement: vishwamai/train/agreement.py)."""
        return value

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank (one-off agreements; per step: StepAgreement)."""
        return flag

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        return [obj]

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's weights (collective under sharding: call it on every rank)."""
        return model.state_dict()

    def background_group(self) -> Any:
        """The process group for collectives issued off the training thread (background sharded
        checkpoint writes), never the one the training step talks over; None: no group."""
        return None

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. builds a cache), then the others."""
        yield

    def describe(self) -> str:
        return "single process"

    def barrier(self) -> None: ...

    def shutdown(self, failed: bool = False) -> None:
        """Leave the process group (Trainer.close); `failed`: without waiting for the peers."""


# How long a multi-process run's teardown (after its last collective) may take.
TEARDOWN_LIMIT_S = 120
# Seconds without the GIL before teardown, for Gloo's worker threads to free their last work.
GLOO_DRAIN_S = 0.2


def arm_teardown_watchdog(limit_s: float = TEARDOWN_LIMIT_S) -> None:
    """From here on, the process must disarm the watchdog (or exit) within `limit_s`.

    faulthandler's timer is a C thread that needs no GIL: if teardown deadlocks in
    C++ while holding the GIL, it still prints every thread's stack to stderr and
    exits with code 1, so a pod or torchrun fails instead of hanging forever."""
    faulthandler.dump_traceback_later(limit_s, exit=True)


def prepare_teardown(limit_s: float = TEARDOWN_LIMIT_S) -> None:
    """Before a process group is torn down: let Gloo's workers drain, then bound the teardown.

    Gloo's worker threads free finished work objects after the collective has returned; a
    tensor made in Python needs the GIL for that.  The group's teardown joins those threads
    while holding the GIL: if a worker had not freed its work yet, both wait forever (seen about
    once in 30 runs on 2 cores, before this drain).  Tearing down explicitly and in order
    (Trainer.close: model, callbacks, then the group) decides *when* that join happens, not
    whether it can meet an unfinished worker, so the drain stays: sleeping releases the GIL and
    the workers finish first.  The watchdog stays too: the race is inside torch, no test can
    show it gone at that rate, and a hung pod costs far more than the armed timer."""
    time.sleep(GLOO_DRAIN_S)
    arm_teardown_watchdog(limit_s)


@contextlib.contextmanager
def bounded_teardown(limit_s: float = TEARDOWN_LIMIT_S) -> Iterator[None]:
    """The block tears a process group down: drained first, and bounded by the watchdog."""
    prepare_teardown(limit_s)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def bound_failing_exit() -> None:
    """A process leaving on an error while still in a process group (the CLI, before a Trainer
    owned the run or when its close() did not get to the group).

    The group is then destroyed at interpreter exit, with the same hazard as a normal shutdown,
    or while a peer still waits in a collective; the watchdog stays armed until exit, so the
    launcher sees the failure within TEARDOWN_LIMIT_S."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        prepare_teardown()
