"""Saving and loading: model weights (safetensors), training checkpoints, exact resume.

  save_model / load_model       a model directory (weights + model config), io.py
  CheckpointManager             the callback: periodic / best / preemption / final saves
  resume(trainer, spec, run_dir)  training.resume (null | auto | path)
  find_model_dir(path)          the model directory to load from a run or checkpoint dir
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from vishwamai.checkpoint.io import MODEL_CONFIG_FILE, load_model, read_model_config, save_model
from vishwamai.checkpoint.layout import BEST, FINAL, checkpoints_root, latest_dir
from vishwamai.checkpoint.manager import CheckpointManager, prepare_checkpoint_dir
from vishwamai.checkpoint.manifest import verify_if_listed
from vishwamai.checkpoint.resume import resume
from vishwamai.errors import CheckpointError, ConfigError

__all__ = ["CheckpointManager", "build_checkpointing", "find_model_dir", "load_model", "read_model_config",
           "resume", "save_model"]

log = logging.getLogger(__name__)


def build_checkpointing(cfg, run_dir: str | Path) -> list:
    """The checkpoint callback; fails here, before compute, if checkpoints cannot be written.

    checkpointing.save_zero_redundancy needs nothing here: with one process a full checkpoint
    has no redundancy; with several, the manager writes through distributed/checkpoint.py.
    """
    spec = cfg.training.resume
    if spec and spec != "auto" and not Path(spec).expanduser().exists():
        raise ConfigError("training.resume", f"{spec}: no such checkpoint or run directory "
                                             "(expected null, auto, or a path)")
    if int(os.environ.get("RANK", "0")) == 0:  # torchrun's rank; the main rank owns the directory
        prepare_checkpoint_dir(checkpoints_root(run_dir))
    return [CheckpointManager(cfg, run_dir)]


def find_model_dir(path: str | Path) -> Path:
    """An intact model directory from a run directory (best, else latest, else final), a checkpoint
    dir, or a Hugging Face model directory (vishwamai/hf).

    A vishwamai checkpoint's manifest is checked (training.init_from, teachers, compression read
    through here): a bit-flipped file in a named checkpoint is an error naming it; in a run
    directory the next candidate is taken. A Hugging Face directory has no manifest: its
    safetensors headers and shapes are checked as it loads.
    """
    from vishwamai.hf import is_hf_model_dir

    path = Path(path).expanduser()
    if is_hf_model_dir(path):
        return path
    if (path / MODEL_CONFIG_FILE).is_file():
        verify_if_listed(path)
        return path
    root = checkpoints_root(path)
    problems = []
    for candidate in (root / BEST, latest_dir(root), root / FINAL):
        if candidate is None or not (candidate / MODEL_CONFIG_FILE).is_file():
            continue
        try:
            verify_if_listed(candidate)
        except CheckpointError as e:
            log.warning("skipping %s: %s", candidate, e)
            problems.append(str(e))
            continue
        return candidate
    if problems:
        raise CheckpointError(f"no intact model checkpoint in {path}: " + "; ".join(problems))
    if not path.exists():
        raise CheckpointError(f"no such checkpoint or run directory: {path}")
    raise CheckpointError(f"{path} is neither a model checkpoint nor a run directory with checkpoints/")
