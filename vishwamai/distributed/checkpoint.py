"""Sharded checkpoints (torch.distributed.checkpoint): each rank writes its own shard.

Contract used by vishwamai/checkpoint (the checkpoint manager calls these when
`trainer.parallel.sharded` or checkpointing.save_zero_redundancy is set):
  save_sharded(directory, trainer, include_optimizer) -> None   (all ranks call it)
  load_sharded(directory, trainer) -> None                      (all ranks call it)
"""

from __future__ import annotations

from pathlib import Path

from vishwamai.errors import NotImplementedYet


def save_sharded(directory: Path, trainer, include_optimizer: bool = True) -> None:
    raise NotImplementedYet("sharded checkpoints (checkpointing.save_zero_redundancy / model_parallel)")


def load_sharded(directory: Path, trainer) -> None:
    raise NotImplementedYet("sharded checkpoints (checkpointing.save_zero_redundancy / model_parallel)")
