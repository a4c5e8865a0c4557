"""TensorBoard: RUN_DIR/tensorboard/ event files (scalars and histograms)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from vishwamai.monitoring.logger import SinkBase, logged_at, scalars


def tag(key: str) -> str:
    """Group the flat metric names into TensorBoard sections: train/, val/, or the key's own prefix."""
    if "/" in key:
        return key
    if key.startswith("val_"):
        return "val/" + key[len("val_"):]
    return "train/" + key


class TensorBoardSink(SinkBase):
    takes_histograms = True

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.writer = None

    def start(self, trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when enabled

        self.writer = SummaryWriter(str(self.log_dir))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        walltime = logged_at(metrics)
        for key, value in scalars(metrics).items():
            if math.isfinite(value):
                self.writer.add_scalar(tag(key), value, step, walltime=walltime)

    def log_histograms(self, step: int, arrays: dict[str, np.ndarray]) -> None:
        for name, values in arrays.items():
            if values.size and np.isfinite(values).all():
                self.writer.add_histogram(name, values, step)

    def close(self, summary: Optional[dict[str, Any]] = None, failed: bool = False) -> None:
        if self.writer is not None:
            self.writer.close()

    def summary(self) -> dict[str, Any]:
        return {"tensorboard_dir": str(self.log_dir)}
