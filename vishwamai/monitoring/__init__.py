"""Metrics: one logger interface (metrics.jsonl always; TensorBoard / MLflow / W&B backends)."""

from __future__ import annotations

from pathlib import Path

from vishwamai.config import VishwamaiConfig
from vishwamai.errors import NotImplementedYet
from vishwamai.monitoring.logger import JsonlSink, MetricsLogger, MetricSink
from vishwamai.monitoring.progress import ProgressBar

__all__ = ["JsonlSink", "MetricSink", "MetricsLogger", "ProgressBar", "build_monitoring"]


def build_sinks(cfg: VishwamaiConfig, run_dir: Path) -> list[MetricSink]:
    sinks: list[MetricSink] = [JsonlSink(run_dir / "metrics.jsonl")]
    mon = cfg.monitoring
    if not mon.enabled:
        return sinks
    for key, enabled in (("tensorboard", mon.tensorboard.enabled), ("mlflow", mon.mlflow.enabled),
                         ("wandb", mon.wandb.enabled)):
        if enabled:
            raise NotImplementedYet(f"monitoring.{key}.enabled=true", f"set monitoring.{key}.enabled=false")
    return sinks


def build_monitoring(cfg: VishwamaiConfig, run_dir: Path) -> list:
    callbacks = [MetricsLogger(build_sinks(cfg, run_dir), cfg.training.log_every_n_steps)]
    if cfg.training.progress_bar:
        callbacks.append(ProgressBar())
    return callbacks
