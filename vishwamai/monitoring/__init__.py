"""Metrics: one logger interface (metrics.jsonl always; TensorBoard / MLflow / W&B backends),
throughput/memory/gradient figures, histograms, profiling and the end-of-run report.

Backends are imported only inside their sinks, on rank 0, when enabled.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from vishwamai.config import VishwamaiConfig
from vishwamai.errors import ConfigError
from vishwamai.monitoring.logger import (BackgroundSink, JsonlSink, MetricsLogger, MetricSink, ProcessSink,
                                        SinkBase)
from vishwamai.monitoring.progress import ProgressBar
from vishwamai.run_files import METRICS_FILE

__all__ = ["BackgroundSink", "JsonlSink", "MetricSink", "MetricsLogger", "ProcessSink", "ProgressBar", "SinkBase",
           "build_monitoring", "build_sinks", "check_backends", "finish_monitoring"]


def check_backends(cfg: VishwamaiConfig) -> None:
    """Every enabled backend can be used (package installed; W&B: key and server, or offline).
    Called before anything is written: by each run, and once by a study before its first trial."""
    mon = cfg.monitoring
    if not mon.enabled:
        return
    if mon.wandb.enabled:
        from vishwamai.monitoring.wandb_sink import check_wandb

        check_wandb()
    for enabled, module, key, extra in ((mon.mlflow.enabled, "mlflow", "monitoring.mlflow.enabled", "monitoring"),
                                        (mon.tensorboard.enabled, "tensorboard", "monitoring.tensorboard.enabled",
                                         "monitoring")):
        if enabled and importlib.util.find_spec(module) is None:
            raise ConfigError(key, f"{module} is not installed: pip install 'vishwamai[{extra}]' or set {key}=false")


def build_sinks(cfg: VishwamaiConfig, run_dir: Path) -> list[MetricSink]:
    mon = cfg.monitoring
    wandb = mon.enabled and mon.wandb.enabled
    check_backends(cfg)  # first: a missing package or W&B key fails before anything is written
    sinks: list[MetricSink] = [JsonlSink(run_dir / METRICS_FILE)]
    if not mon.enabled:
        return sinks
    if wandb:
        from vishwamai.monitoring.wandb_sink import WandbSink

        sinks.append(WandbSink(cfg, run_dir))
    if mon.tensorboard.enabled:
        from vishwamai.monitoring.tensorboard import TensorBoardSink

        sinks.append(BackgroundSink(TensorBoardSink(run_dir / "tensorboard")))
    if mon.mlflow.enabled:
        from vishwamai.monitoring.mlflow_sink import MlflowSink

        sinks.append(ProcessSink(MlflowSink(cfg, run_dir), close_timeout_s=mon.mlflow.close_timeout_s))
    return sinks


def build_monitoring(cfg: VishwamaiConfig, run_dir: Path) -> list:
    from vishwamai.monitoring.stats import GradGroupNorms, Histograms, Memory, Throughput

    mon, every = cfg.monitoring, cfg.training.log_every_n_steps
    figures = [Throughput(mon.peak_flops_per_s), Memory()] if mon.enabled else []
    logger = MetricsLogger(build_sinks(cfg, run_dir), every, figures)
    callbacks: list = []
    if mon.enabled:
        callbacks.append(GradGroupNorms())
        if mon.histogram_every_n_steps:
            callbacks.append(Histograms(logger, mon.histogram_every_n_steps))
        if mon.profile:
            from vishwamai.monitoring.profiler import Profiler

            callbacks.append(Profiler(run_dir / "tensorboard" / "profiler", mon.profile_start, mon.profile_steps))
    callbacks.append(logger)
    if cfg.training.progress_bar:
        callbacks.append(ProgressBar())
    return callbacks


def finish_monitoring(cfg: VishwamaiConfig, run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """After training, on rank 0: the report, then summary + report into the MLflow run.
    Returns the summary entries to add ("report")."""
    if not cfg.monitoring.enabled:
        return {}
    added: dict[str, Any] = {}
    files: list[Path] = []
    if cfg.monitoring.report:
        from vishwamai.report import write_report

        paths = write_report(run_dir, summary)
        files = list(paths.values())
        added["report"] = str(paths["markdown"])
    if summary.get("mlflow_run_id"):
        from vishwamai.monitoring.mlflow_sink import log_run_outputs

        log_run_outputs(summary["mlflow_tracking_uri"], summary["mlflow_run_id"], {**summary, **added}, files)
    if cfg.monitoring.wandb.enabled:
        from vishwamai.monitoring.wandb_sink import finish_run

        finish_run({**summary, **added}, [f for f in files if f.suffix == ".png"])
    return added
