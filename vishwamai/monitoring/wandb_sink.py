"""Weights & Biases (optional): used only when installed and monitoring.wandb.enabled=true.
WANDB_MODE=offline writes under RUN_DIR/wandb with no network."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from vishwamai.errors import ConfigError
from vishwamai.monitoring.logger import SinkBase, scalars


def require_wandb() -> None:
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("monitoring.wandb.enabled",
                          "wandb is not installed: pip install 'vishwamai[wandb]' or set monitoring.wandb.enabled=false")


class WandbSink(SinkBase):
    def __init__(self, cfg: DictConfig, run_dir: Path):
        require_wandb()
        self.project = cfg.monitoring.wandb.project
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.run_dir = Path(run_dir)
        self.run = None

    def start(self, trainer) -> None:
        import wandb

        self.run = wandb.init(project=self.project, dir=str(self.run_dir), config=self.config,
                              name=self.run_dir.name)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log(scalars(metrics), step=step)

    def close(self, summary: Optional[dict[str, Any]] = None, failed: bool = False) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)

    def summary(self) -> dict[str, Any]:
        return {"wandb_run": self.run.url or self.run.dir} if self.run is not None else {}
