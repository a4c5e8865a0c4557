"""Saving and loading: model weights (safetensors), and the final-model callback."""

from __future__ import annotations

from pathlib import Path

from vishwamai.checkpoint.io import load_model, read_model_config, save_model
from vishwamai.errors import CheckpointError
from vishwamai.train.events import Callback

__all__ = ["FinalModelCheckpoint", "find_model_dir", "load_model", "read_model_config", "save_model"]


class FinalModelCheckpoint(Callback):
    """Saves RUN_DIR/checkpoints/final (weights + model config) when training ends."""

    def __init__(self, run_dir: str | Path):
        self.directory = Path(run_dir) / "checkpoints" / "final"

    def on_train_end(self, trainer) -> None:
        if trainer.is_main:
            save_model(self.directory, trainer.raw_model, trainer.cfg.model)
            trainer.summary["final_checkpoint"] = str(self.directory)


def find_model_dir(path: str | Path) -> Path:
    """A model directory from a run directory (best, else latest, else final) or a checkpoint dir."""
    path = Path(path).expanduser()
    if (path / "model_config.json").is_file():
        return path
    ckpts = path / "checkpoints"
    for candidate in (ckpts / "best", ckpts / "latest", ckpts / "final"):
        if (candidate / "model_config.json").is_file():
            return candidate
    if not path.exists():
        raise CheckpointError(f"no such checkpoint or run directory: {path}")
    raise CheckpointError(f"{path} is neither a model checkpoint nor a run directory with checkpoints/")
