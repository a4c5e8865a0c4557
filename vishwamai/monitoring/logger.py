"""One logging interface for the trainer; backends (sinks) behind it.

`MetricsLogger` is the callback: every `training.log_every_n_steps` steps (and on
every evaluation step) it writes one record to every sink.  Throughput in a record
is averaged over the steps since the previous record.  Only rank 0 logs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from vishwamai.train.events import Callback


class MetricSink(Protocol):
    def log(self, step: int, metrics: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """RUN_DIR/metrics.jsonl: one JSON object per logged step (the run-directory contract)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", buffering=1)  # line-buffered: a killed run keeps its records

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._fh.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        self._fh.close()


class MetricsLogger(Callback):
    def __init__(self, sinks: list[MetricSink], every_n_steps: int):
        self.sinks = sinks
        self.every = every_n_steps
        self._tokens = 0
        self._seconds = 0.0
        self._steps = 0

    def on_step_end(self, trainer) -> None:
        m = trainer.metrics
        self._tokens += m.get("tokens", 0)
        self._seconds += m.get("step_time_s", 0.0)
        self._steps += 1
        step = trainer.state.step
        if step % self.every and "val_loss" not in m and step != trainer.cfg.training.max_steps:
            return
        record = dict(m)
        if self._seconds > 0:
            record["tokens_per_s"] = self._tokens / self._seconds
            record["step_time_s"] = self._seconds / self._steps
        self._tokens, self._seconds, self._steps = 0, 0.0, 0
        if trainer.is_main:
            self.log(step, record)

    def log(self, step: int, record: dict[str, Any]) -> None:
        record.pop("step", None)
        for sink in self.sinks:
            sink.log(step, record)

    def on_train_end(self, trainer) -> None:
        for sink in self.sinks:
            sink.close()
