"""What one training checkpoint holds, and how it is written into / read from a directory.

  DIR/model.safetensors   weights (io.save_model; no pickle)
  DIR/model_config.json   the architecture
  DIR/trainer_state.pt    Trainer.state_dict() (optimizer, scheduler, loss scaler, data
                          position, batch sizes, counters, callbacks' state) + RNG states;
                          torch.save'd plain data, read back with torch.load(weights_only=True)
                          so a tampered file cannot run code
  DIR/manifest.json       sizes and sha256 of the above (manifest.py), written last

With sharded training (FSDP / ZeRO) the weights and optimizer state are in DIR/shards/
instead, one shard per rank (vishwamai.distributed.checkpoint: stage_sharded, write_sharded).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import random
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vishwamai.checkpoint.io import (MODEL_CONFIG_FILE, WEIGHTS_FILE, apply_weights, as_model_config,
                                     model_state_for_saving, read_model_config, read_weights, save_model)
from vishwamai.checkpoint.messages import load_failure
from vishwamai.errors import CheckpointError

log = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer_state.pt"
STATE_FORMAT_VERSION = 1


# ------------------------------------------------------------------------ RNG
def capture_rng() -> dict[str, Any]:
    """Python, NumPy and torch generator states as plain data (no numpy arrays: weights_only)."""
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------- save
_PLAIN_LEAVES = (str, int, float, bool, complex, bytes, type(None), torch.dtype, torch.device)
_PLAIN_SEQUENCES = (list, tuple, set, torch.Size)


def check_plain_data(value: Any, where: str = "trainer state") -> None:
    """What torch.load(weights_only=True) will read back; else CheckpointError naming the entry.

    Checked at save time, so a callback whose state_dict() holds e.g. a numpy scalar fails at
    its first checkpoint instead of making every later resume impossible.
    """
    kind = type(value)
    if kind in _PLAIN_LEAVES or isinstance(value, torch.Tensor):
        return
    if kind in (dict, OrderedDict):
        for key, item in value.items():
            check_plain_data(key, f"{where} (a key)")
            check_plain_data(item, f"{where}.{key}")
    elif kind in _PLAIN_SEQUENCES:
        for i, item in enumerate(value):
            check_plain_data(item, f"{where}[{i}]")
    else:
        raise CheckpointError(f"cannot checkpoint {where}: {kind.__module__}.{kind.__qualname__} is not plain data "
                              "(use Python numbers/str, lists, dicts, tensors; e.g. float(x) for numpy scalars)")


def uses_sharded_checkpoints(trainer) -> bool:
    """FSDP, or several processes with ZeRO (each rank holds only part of the optimizer state)."""
    cfg, p = trainer.cfg, trainer.parallel
    zero = cfg.checkpointing.save_zero_redundancy or cfg.distributed.zero_optimizer
    return bool(p.sharded or (zero and p.world_size > 1))


def assert_finite_weights(trainer, directory: Path) -> None:
    """A NaN/inf must never be written into a checkpoint (it would poison every resume).

    Every rank calls it (CheckpointManager._write); a collective only for sharded saves.
    """
    # Sharded (DTensor) parameters: each rank checks its own shard, then the ranks agree.
    local = {name: p.to_local() if hasattr(p, "to_local") else p for name, p in trainer.raw_model.named_parameters()}
    bad = [name for name, p in local.items() if not bool(torch.isfinite(p).all())]
    # Agreed by all ranks only when all write (sharded); otherwise the main rank is alone here.
    if (trainer.parallel.any(bool(bad)) if uses_sharded_checkpoints(trainer) else bad):
        raise CheckpointError(f"refusing to write {directory}: non-finite weights in {bad[:5] or 'another rank'}")


@dataclasses.dataclass
class Snapshot:
    """A checkpoint's content copied out of the live training objects: writable later (in a
    background thread) while training goes on, and still exactly the state at `step`."""

    step: int
    sharded: bool
    model_cfg: Any
    weights: dict[str, torch.Tensor] | None  # None when the shards hold them (written by every rank)
    trainer_state: dict[str, Any]
    rng: dict[str, Any]


def clone_tree(value: Any) -> Any:
    """A copy of plain data whose tensors are new CPU tensors: the next optimizer step, which
    updates weights and moments in place, cannot reach it."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return type(value)((key, clone_tree(item)) for key, item in value.items())
    if type(value) in (list, tuple, set):
        return type(value)(clone_tree(item) for item in value)
    return value  # immutable leaves (check_plain_data admits nothing else), torch.Size


def trained_weights(trainer, copy: bool = False, masters: dict[str, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """The model's weights as training holds them: under amp O2 the float32 masters in place of the
    model's bf16/fp16 copies, which lose every update below their resolution (export, int8 and
    distillation read these files); tied weights once.  `masters`: copies already made (a
    snapshot's), else the live ones."""
    masters = trainer.precision.masters() if masters is None else masters
    return model_state_for_saving(trainer.raw_model, copy=copy, replace=masters)


def take_snapshot(trainer, include_optimizer: bool) -> Snapshot:
    """The main rank's part of a checkpoint, copied (call assert_finite_weights first)."""
    sharded = uses_sharded_checkpoints(trainer)
    trainer_state = trainer.state_dict(include_optimizer=include_optimizer and not sharded)
    check_plain_data(trainer_state)
    weights = None
    if not sharded:  # amp O2: the masters state_dict() has just copied go into the weights file, not held twice
        weights = trained_weights(trainer, copy=True, masters=trainer_state["precision"].pop("master_weights", {}))
    return Snapshot(trainer.state.step, sharded, as_model_config(trainer.cfg.model), weights,
                    clone_tree(trainer_state), capture_rng())


def write_snapshot(directory: Path, snapshot: Snapshot) -> list[str]:
    """Write a snapshot's files into `directory` (a temporary dir); returns the required files."""
    required = [MODEL_CONFIG_FILE, TRAINER_STATE_FILE]
    if snapshot.weights is None:
        (directory / MODEL_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(snapshot.model_cfg), indent=1))
    else:
        save_model(directory, None, snapshot.model_cfg, full_state=snapshot.weights)
        required.append(WEIGHTS_FILE)
    state = {
        "format_version": STATE_FORMAT_VERSION,
        "step": snapshot.step,
        "sharded": snapshot.sharded,
        "trainer": snapshot.trainer_state,
        "rng": snapshot.rng,
    }
    torch.save(state, directory / TRAINER_STATE_FILE)
    return required


# ----------------------------------------------------------------------- load
def read_trainer_state(directory: Path) -> dict[str, Any]:
    """The trainer-state file as plain data; anything needing arbitrary code is refused."""
    path = directory / TRAINER_STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no {TRAINER_STATE_FILE} in {directory}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as e:
        # weights_only refuses globals outside torch's allow-list (e.g. os.system in a crafted
        # __reduce__) before calling anything, so the payload never runs.
        raise CheckpointError(f"refusing to load {path}: not a plain-data trainer state ({load_failure(e)})") from e
    if not isinstance(state, dict) or state.get("format_version") != STATE_FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a vishwamai trainer state (format_version "
                              f"{state.get('format_version') if isinstance(state, dict) else None!r})")
    return state


# Model settings a checkpoint may be resumed under a different value of: they shape no weight
# (population-based training changes dropout between a checkpoint and its resumed trial).
NOT_ARCHITECTURE = frozenset({"parallel_factor", "dropout_rate", "init_std"})


def check_architecture(directory: Path, trainer) -> None:
    saved = dataclasses.asdict(read_model_config(directory))
    current = dataclasses.asdict(as_model_config(trainer.cfg.model))
    diff = {k: (saved[k], current.get(k)) for k in saved if k not in NOT_ARCHITECTURE and saved[k] != current.get(k)}
    if diff:
        details = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"cannot resume from {directory}: the model differs ({details})")


def load_checkpoint(directory: Path, trainer) -> dict[str, Any]:
    """Restore the trainer from `directory` exactly; returns the trainer-state dict.

    Everything is read and checked before anything in the trainer changes, so a bad
    checkpoint leaves the trainer as it was (the caller may then try an older one).
    """
    state = read_trainer_state(directory)
    check_architecture(directory, trainer)
    if state["sharded"] != uses_sharded_checkpoints(trainer):
        raise CheckpointError(f"{directory} was saved {'sharded' if state['sharded'] else 'unsharded'}; "
                              "resume with the same distributed.strategy / checkpointing.save_zero_redundancy")
    if state["sharded"]:
        from vishwamai.distributed.checkpoint import load_sharded

        load_sharded(directory, trainer)
    else:
        weights = read_weights(directory)
        apply_weights(trainer.raw_model, weights, as_model_config(trainer.cfg.model), directory / WEIGHTS_FILE)
        precision = state["trainer"]["precision"]
        if "master_weights" not in precision:  # amp O2 masters are the file's float32 weights
            masters = trainer.precision.masters_from(weights)
            if masters is not None:
                precision["master_weights"] = masters
    if "optimizer" not in state["trainer"] and not state["sharded"]:
        log.warning("%s has no optimizer state (checkpointing.save_optimizer_state=false): the optimizer "
                    "restarts from zero moments, so the resumed run is not identical to an uninterrupted one",
                    directory)
    trainer.load_state_dict(state["trainer"])
    restore_rng(state["rng"])
    return state
