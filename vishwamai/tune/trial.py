"""One trial = one ordinary training run with overrides, plus callbacks that report its metric.

Backends differ only in how a value is reported and how a trial is stopped; the
run itself is always `recipe(trial_cfg, extra_callbacks=[reporter])` in
RUN_DIR/trials/trial-<n>, so a trial's directory looks like any other run's.  The recipe
(training_v2.run) is handed to the study by its caller: tuning sits above the recipe and
never imports the training entry point (which imports tuning to choose a study).
"""

from __future__ import annotations

import math
import os
from datetime import datetime, timezone
import socket
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig

from vishwamai.train.events import Callback
from vishwamai.tune.space import apply_overrides

# What a trial runs: `recipe(trial_cfg, extra_callbacks=[...])` trains one model and returns its
# summary (training_v2.run).
Recipe = Callable[..., dict[str, Any]]

# tuning.metric -> the trainer.metrics entry set at each evaluation.
METRICS = {"validation_loss": "val_loss", "validation_perplexity": "val_perplexity"}

# Identifies the process running a trial (several workers may share one study).
WORKER_ID = f"{socket.gethostname()}-{os.getpid()}"


def process_start_time(pid: int) -> Optional[float]:
    """When process `pid` started (None: no such process).  With the pid it names one process
    for good: a restarted container may reuse the pid (often 1), never the start time."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


WORKER_STARTED = process_start_time(os.getpid())


def worker_is_gone(worker: str, started: Optional[float]) -> bool:
    """Whether the process that ran a trial (its WORKER_ID and WORKER_STARTED) is known to be dead:
    only answerable on its own host; elsewhere the heartbeat decides."""
    host, _, pid = worker.rpartition("-")
    if host != socket.gethostname() or not pid.isdigit() or started is None:
        return False
    now = process_start_time(int(pid))
    return now is None or abs(now - started) > 0.5


class TrialFailed(Exception):
    """A trial ended without a usable objective value (e.g. a non-finite loss)."""


def trial_config(cfg: DictConfig, values: dict[str, Any], run_dir: Path,
                 tracking_uri: Optional[str] = None) -> DictConfig:
    """The training config of one trial: sampled overrides, its own run dir, tuning off."""
    trial = apply_overrides(cfg, values)
    trial.tuning.enabled = False
    trial.run_dir = str(run_dir)
    if tracking_uri:
        # Otherwise each trial would default to its own RUN_DIR/mlflow.db, away from the study's run.
        trial.monitoring.mlflow.tracking_uri = tracking_uri
    return trial


def objective_value(summary: dict[str, Any], metric: str) -> float:
    """The value a finished trial is judged by: the metric at its last evaluation."""
    value = summary["final_val_loss"]
    if value is not None and metric == "validation_perplexity":
        value = math.exp(min(value, 50.0))
    if value is None or not math.isfinite(value):
        raise TrialFailed(f"{metric} is {value} (non-finite)")
    return float(value)


def failure_reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:1000]


class Reporter(Callback):
    """Reports the metric at every evaluation; `report(step, value)` returning True stops the run.

    Stopping goes through trainer.should_stop rather than an exception, so the trial
    still closes its loggers and writes its final checkpoint and summary.
    """

    def __init__(self, metric: str, report: Callable[[int, float], bool]):
        self.key = METRICS[metric]
        self.report = report
        self.stopped_at: Optional[int] = None

    def on_eval_end(self, trainer, *, val_loss: float) -> None:
        step = trainer.state.step
        if self.report(step, float(trainer.metrics[self.key])) and self.stopped_at is None:
            self.stopped_at = step
            trainer.should_stop = True
            trainer.summary["tuning_stopped_at_step"] = step


class KatibStdout(Callback):
    """`2026-01-02T03:04:05.678901Z validation_loss=1.234567` lines for Katib's StdOut metrics collector.

    One `name=value` pair per line, matching Katib's default filter
    `([\\w|-]+)\\s*=\\s*([+-]?\\d*(\\.\\d+)?([Ee][+-]?\\d+)?)`, after an RFC 3339 timestamp: the
    collector takes a line's first word as its time when it parses as one, so the "latest" metric
    strategy follows time rather than row order.  Only rank 0 prints.
    """

    def on_eval_end(self, trainer, *, val_loss: float) -> None:
        if not trainer.is_main:
            return
        stamp = datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
        for name, key in METRICS.items():
            value = trainer.metrics.get(key)
            if value is not None and math.isfinite(value):
                print(f"{stamp} {name}={value:.6g}", flush=True)
