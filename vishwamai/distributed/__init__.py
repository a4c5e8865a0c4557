"""Process groups and model wrapping. The trainer talks to one `Parallelism` object.

The single-process implementation below is what a laptop run uses; DDP and FSDP
implement the same small interface, so the loop never branches on the strategy.
"""

from __future__ import annotations

import contextlib

import torch

from vishwamai.config import VishwamaiConfig
from vishwamai.errors import NotImplementedYet


class Parallelism:
    """One process, no communication. Subclasses override what they need."""

    rank = 0
    local_rank = 0
    world_size = 1
    sharded = False

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

    def accumulation_context(self, model: torch.nn.Module, is_last_micro_batch: bool):
        """Context for one micro-batch's forward+backward (DDP: no_sync until the last)."""
        return contextlib.nullcontext()

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank (agreement on skip/stop)."""
        return flag

    def barrier(self) -> None: ...

    def shutdown(self) -> None: ...


def build_parallelism(cfg: VishwamaiConfig) -> Parallelism:
    if cfg.distributed.strategy == "none":
        return Parallelism()
    raise NotImplementedYet(f"distributed.strategy={cfg.distributed.strategy}")
