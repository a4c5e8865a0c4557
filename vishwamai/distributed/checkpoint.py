"""Sharded checkpoints (torch.distributed.checkpoint): each rank writes its own shard.

Contract used by vishwamai/checkpoint (the checkpoint manager calls these when
`trainer.parallel.sharded` or checkpointing.save_zero_redundancy is set):
  stage_sharded(trainer, include_optimizer) -> staged   (all ranks, training thread: a CPU copy)
  write_sharded(directory, staged, group) -> [files]    (all ranks, any thread: collectives on `group`)
  load_sharded(directory, trainer) -> None              (all ranks call it)

Layout: DIRECTORY/shards/ is a DCP checkpoint (.metadata + one __R_0.distcp file per
rank) holding
  model.*       the weights (FSDP: each rank writes its shard; DDP: replicated
                tensors are written once, by rank 0)
  optimizer.*   the optimizer state in the same layout (FSDP / plain DDP), or, with the
                ZeRO optimizer, `zero_rank{r}.*`: rank r's own partition.
Resume needs the same world size with ZeRO; an FSDP model's shards are re-split by
DCP if the layout changed.  `python -m vishwamai.distributed.consolidate DIR OUT`
turns DIR into a single-file model (model.safetensors + model_config.json).

Trust model: a checkpoint directory is data, never code.  DCP's own reader unpickles
shards/.metadata with plain pickle (a crafted file would run code); every read here goes
through SafeFileSystemReader, whose unpickler admits only the classes DCP metadata is
made of.  Tensor data is read by DCP with torch.load(weights_only=True).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (_init_optim_state, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.optim import ZeroRedundancyOptimizer

from vishwamai.errors import CheckpointError

SHARDS_DIR = "shards"
METADATA_FILE = ".metadata"

# Everything a DCP .metadata file is made of (torch/distributed/checkpoint/metadata.py,
# filesystem.py's _StorageInfo; torch pickles a layout through _get_layout(name)).
# Constructing any of these from pickled arguments runs no user-chosen code.
_DCP = "torch.distributed.checkpoint"
_METADATA_GLOBALS = {
    (f"{_DCP}.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")
} | {(f"{_DCP}.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
      ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"),
      ("pathlib._local", "PosixPath"), ("pathlib._local", "PurePosixPath")}  # Python >= 3.13 names


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)  # dtypes are pickled by name
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def read_dcp_metadata(path: Path):
    """The DCP Metadata in file `path`, refusing anything but plain metadata (CheckpointError naming it)."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except FileNotFoundError:
        raise CheckpointError(f"sharded checkpoint metadata missing: {path}") from None
    except Exception as e:  # noqa: BLE001 - a corrupt pickle raises many types
        raise CheckpointError(f"refusing to read {path}: not plain checkpoint metadata ({e})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointError(f"refusing to read {path}: not a checkpoint's metadata")
    for info in (metadata.storage_data or {}).values():
        relative = PurePosixPath(str(getattr(info, "relative_path", "")))
        # Shard files sit beside .metadata: a crafted name must not read files elsewhere.
        if relative.is_absolute() or len(relative.parts) != 1 or relative.name in ("", ".", ".."):
            raise CheckpointError(f"refusing to read {path}: it names a shard file outside {path.parent}")
    return metadata


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file-system reader with the metadata read by read_dcp_metadata (no plain pickle)."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        rank = kwargs.get("rank")
        metadata = read_dcp_metadata(Path(self._get_metadata_path(rank)))
        if metadata.storage_meta is None:  # as FileSystemReader.read_metadata does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


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


def stage_sharded(trainer, include_optimizer: bool = True) -> dict[str, Any]:
    """This rank's part of the weights (and optimizer state), copied to CPU memory.

    The state dicts DCP works from hold the live parameters and moments (DTensors under FSDP,
    ZeRO's partition), which the next optimizer step updates in place: the background write
    gets a copy.  DCP's own stager makes it (what dcp.async_save stages with; it keeps DTensor
    layouts and tensors that share storage), a fresh one per save so the copy is freed once
    written rather than held for the whole run.
    """
    stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                          use_async_staging=False, use_non_blocking_copy=False))
    try:
        return stager.stage(_state_to_save(trainer, include_optimizer))
    finally:
        stager.close()


def write_sharded(directory: str | Path, staged: dict[str, Any], group=None) -> list[str]:
    """Every rank writes its staged part into DIRECTORY/shards; a collective over `group`.
    Returns the file (relative to DIRECTORY) a complete sharded checkpoint must have.

    When it returns (on any rank) every rank's shard file is written: DCP's coordinator writes
    shards/.metadata only after gathering every rank's write result, and a write that failed on
    any rank raises on all of them.
    """
    path = shards_path(directory)
    path.mkdir(parents=True, exist_ok=True)
    dcp.save(staged, checkpoint_id=str(path), process_group=group)
    return [f"{SHARDS_DIR}/{METADATA_FILE}"]


def saved_keys(directory: str | Path) -> set[str]:
    """Top-level entries of a sharded checkpoint ('model', 'optimizer', 'zero_rank0', ...)."""
    path = shards_path(directory)
    if not (path / METADATA_FILE).is_file():
        raise CheckpointError(f"{directory} has no sharded checkpoint ({path}/{METADATA_FILE} missing)")
    metadata = read_dcp_metadata(path / METADATA_FILE)
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
    _load(state, directory)
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
    _load(state, directory, no_dist=True)  # without a process group DCP reads every shard here
    model.load_state_dict(state["model"])


def _load(state: dict[str, Any], directory: str | Path, no_dist: bool = False) -> None:
    """dcp.load through SafeFileSystemReader; its failures become a CheckpointError naming `directory`."""
    from vishwamai.checkpoint.messages import load_failure

    path = shards_path(directory)
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), checkpoint_id=str(path), no_dist=no_dist)
    except CheckpointError:
        raise
    except Exception as e:  # DCP wraps per-rank failures (missing/corrupt shard files, shape mismatch)
        raise CheckpointError(f"could not load the sharded checkpoint {directory}: {load_failure(e)}") from e
