"""Sharded checkpoints (torch.distributed.checkpoint): each rank writes its own shard.

Contract used by vishwamai/checkpoint (the checkpoint manager calls these when
`trainer.parallel.sharded` or checkpointing.save_zero_redundancy is set):
  save_sharded(directory, trainer, include_optimizer) -> None   (all ranks call it)
  load_sharded(directory, trainer) -> None                      (all ranks call it)

Layout: DIRECTORY/shards/ is a DCP checkpoint (.metadata + one __R_0.distcp file per
rank) holding
  model.*       the weights (FSDP: each rank writes its shard; DDP: replicated
                tensors are written once, by rank 0)
  optimizer.*   the optimizer state in the same layout (FSDP / plain DDP), or, with the
                ZeRO optimizer, `zero_rank{r}.*`: rank r's own partition.
Resume needs the same world size with ZeRO; an FSDP model's shards are re-split by
DCP if the layout changed.  `python -m vishwamai.distributed.consolidate DIR OUT`
turns DIR into a single-file model (model.safetensors + model_config.json).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (_init_optim_state, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.optim import ZeroRedundancyOptimizer

from vishwamai.errors import CheckpointError

SHARDS_DIR = "shards"


def shards_path(directory: str | Path) -> Path:
    return Path(directory) / SHARDS_DIR


def _zero_key(trainer) -> str:
    return f"zero_rank{trainer.parallel.rank}"


def _state_to_save(trainer, include_optimizer: bool) -> dict[str, Any]:
    model, optimizer = trainer.raw_model, trainer.optimizer
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if include_optimizer:
        if isinstance(optimizer, ZeroRedundancyOptimizer):
            # This rank's partition only. Its moments must exist to serve as a load
            # template: torch's helper creates them with an lr=0 step (weights unchanged).
            _init_optim_state(optimizer.optim)
            _copy_hyperparameters(optimizer.param_groups, optimizer.optim.param_groups)
            state[_zero_key(trainer)] = optimizer.optim.state_dict()
        else:
            state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def _copy_hyperparameters(source: list[dict], target: list[dict]) -> None:
    """lr, betas... group by group. ZeRO copies its own groups (where the scheduler sets
    lr) onto the local optimizer only when it steps, so the local copy lags a step:
    it is refreshed before saving, and the saved values go back to ZeRO's groups on load."""
    for src, dst in zip(source, target):
        dst.update({k: v for k, v in src.items() if k != "params"})


def save_sharded(directory: str | Path, trainer, include_optimizer: bool = True) -> None:
    """Every rank writes its part of the weights (and optimizer state) into DIRECTORY/shards."""
    path = shards_path(directory)
    path.mkdir(parents=True, exist_ok=True)
    dcp.save(_state_to_save(trainer, include_optimizer), checkpoint_id=str(path))


def saved_keys(directory: str | Path) -> set[str]:
    """Top-level entries of a sharded checkpoint ('model', 'optimizer', 'zero_rank0', ...)."""
    path = shards_path(directory)
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{directory} has no sharded checkpoint ({path}/.metadata missing)")
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    return {key.split(".", 1)[0] for key in metadata.state_dict_metadata}


def load_sharded(directory: str | Path, trainer) -> None:
    """Restore weights (and optimizer state if saved) from DIRECTORY/shards on every rank."""
    keys = saved_keys(directory)
    has_optimizer = "optimizer" in keys or any(k.startswith("zero_rank") for k in keys)
    state = _state_to_save(trainer, include_optimizer=has_optimizer)  # templates, filled in place
    if has_optimizer and not set(state) - {"model"} <= keys:
        raise CheckpointError(
            f"{directory} holds optimizer state for another layout ({sorted(keys - {'model'})[:4]}); "
            f"resume with the distributed settings it was saved with (distributed.zero_optimizer, world size)")
    try:
        dcp.load(state, checkpoint_id=str(shards_path(directory)))
    except Exception as e:  # DCP wraps per-rank failures (missing/corrupt shard files, shape mismatch)
        raise CheckpointError(f"could not load the sharded checkpoint {directory}: {e}") from e
    model, optimizer = trainer.raw_model, trainer.optimizer
    set_model_state_dict(model, state["model"])
    if not has_optimizer:
        return
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.optim.load_state_dict(state[_zero_key(trainer)])
        _copy_hyperparameters(optimizer.optim.param_groups, optimizer.param_groups)
    else:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def load_full_model_state(directory: str | Path, model: torch.nn.Module) -> None:
    """Fill an ordinary (unsharded) `model` from a sharded checkpoint, in one process."""
    keys = saved_keys(directory)
    if "model" not in keys:
        raise CheckpointError(f"{directory} holds no model weights")
    state = {"model": model.state_dict()}
    # Without a process group DCP reads every shard into this process.
    dcp.load(state, checkpoint_id=str(shards_path(directory)), no_dist=True)
    model.load_state_dict(state["model"])
