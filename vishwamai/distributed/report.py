"""Distributed layout in summary.json (rank, strategy, parameters held by each rank)."""

from __future__ import annotations

import torch

from vishwamai.train.events import Callback


def local_numel(tensor: torch.Tensor) -> int:
    """Elements this rank stores (a DTensor shard's local part; else the whole tensor)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local().numel() if to_local else tensor.numel()


class DistributedReport(Callback):
    """summary: rank, parallel (how), parameters_per_rank (elements each rank stores)."""

    def on_train_start(self, trainer) -> None:
        p = trainer.parallel
        local = sum(local_numel(t) for t in trainer.raw_model.parameters())
        trainer.summary.update(rank=p.rank, parallel=p.describe(), parameters_per_rank=p.gather_object(local))
