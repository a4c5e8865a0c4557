"""One logging interface for the trainer; backends (sinks) behind it.

`MetricsLogger` is the callback: every `training.log_every_n_steps` steps (and on
every evaluation step) it writes one record to every sink.  Throughput in a record
is averaged over the steps since the previous record.  Only rank 0 logs: sinks are
started in on_train_start on rank 0 only, so other ranks never import a backend.

Slow backends run off the training thread, which only puts records on a queue: TensorBoard
in a `BackgroundSink` (a thread), MLflow (seconds of imports and database set-up, tens of ms
per commit, all holding the GIL) in a `ProcessSink` (a low-priority child process, raised to
normal priority when training ends and waited for at most its close timeout).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np

from vishwamai.train.events import Callback

# Keys the trainer sets on every step; anything else seen on an unlogged step (e.g. a
# checkpoint's checkpoint_save_s) is carried to the next record so it is not lost.
STEP_KEYS = frozenset({"step", "loss", "lr", "grad_norm", "micro_batch_size", "batch_size", "global_batch_size",
                       "tokens", "step_time_s", "tokens_per_s"})
# Every logged record's wall-clock time (Unix seconds), in metrics.jsonl and as the backends' timestamp.
TIME_KEY = "time"


class MetricSink(Protocol):
    # Whether log_histograms does anything: parameter copies (a model's worth each time) are
    # made, queued and pickled only for the sinks that take them.
    takes_histograms: bool

    def start(self, trainer) -> None: ...

    def log(self, step: int, metrics: dict[str, Any]) -> None: ...

    def log_histograms(self, step: int, arrays: dict[str, np.ndarray]) -> None: ...

    def close(self, summary: Optional[dict[str, Any]] = None, failed: bool = False) -> None: ...

    def summary(self) -> dict[str, Any]: ...


class SinkBase:
    """No-op defaults for the optional parts of MetricSink."""

    takes_histograms = False

    def start(self, trainer) -> None: ...

    def log_histograms(self, step: int, arrays: dict[str, np.ndarray]) -> None: ...

    def close(self, summary: Optional[dict[str, Any]] = None, failed: bool = False) -> None: ...

    def summary(self) -> dict[str, Any]:
        return {}


class JsonlSink(SinkBase):
    """RUN_DIR/metrics.jsonl: one JSON object per logged step (the run-directory contract)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", buffering=1)  # line-buffered: a killed run keeps its records

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._fh.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self, summary: Optional[dict[str, Any]] = None, failed: bool = False) -> None:
        self._fh.close()


class BackgroundSink(SinkBase):
    """Runs another sink's start/log/close on a worker thread, in order.

    An error in the worker stops that sink and is raised in the training thread at the
    next call (a broken backend fails the run loudly instead of logging nothing).
    """

    def __init__(self, inner: MetricSink, name: Optional[str] = None):
        self.inner = inner
        self.takes_histograms = inner.takes_histograms
        self.name = name or type(inner).__name__  # the backend, in error messages
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def start(self, trainer) -> None:
        self._thread = threading.Thread(target=self._work, args=(trainer,), daemon=True,
                                        name=f"vishwamai-{type(self.inner).__name__}")
        self._thread.start()

    def _work(self, trainer) -> None:
        try:
            self.inner.start(trainer)
            while (item := self._queue.get()) is not None:
                method, args = item
                getattr(self.inner, method)(*args)
        except BaseException as error:  # noqa: BLE001 - re-raised in the training thread
            self._error = error

    def _put(self, method: str, *args) -> None:
        self._raise_error()
        self._queue.put((method, args))

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"monitoring backend {self.name} failed: {error}") from error

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._put("log", step, metrics)

    def log_histograms(self, step: int, arrays: dict[str, np.ndarray]) -> None:
        self._put("log_histograms", step, arrays)

    def close(self, summary: Optional[dict[str, Any]] = None, failed: bool = False) -> None:
        if self._thread is None:
            return
        self._queue.put(("close", (summary, failed)))
        self._queue.put(None)
        self._join()
        self._thread = None
        if not failed:  # while failing, the original error matters more
            self._raise_error()

    def _join(self) -> None:
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        return self.inner.summary()


class ProcessSink(BackgroundSink):
    """Runs another sink in a child process at low CPU priority; order and errors as BackgroundSink.

    For backends whose start-up and writes are heavy Python (MLflow: ~2 s of imports and a database
    migration, then a commit per flush).  On a worker thread they hold the GIL and the cores the step
    needs: the demo's first step took 3.1 s instead of 0.9 s.  The child (Linux: SCHED_IDLE) only
    gets the CPU the trainer leaves idle.  The inner sink is pickled to the child (`python -m
    vishwamai.monitoring.sink_process`, a fresh interpreter: nothing of the user's script re-runs);
    its start() gets a picklable view of the trainer (`parallel.world_size`).  This class's own
    worker thread does the pipe writes, so a slow child never blocks the training thread.
    """

    def __init__(self, inner: MetricSink, close_timeout_s: Optional[float] = None):
        super().__init__(_RemoteSink(inner), name=type(inner).__name__)
        self.close_timeout_s = close_timeout_s

    def close(self, summary: Optional[dict[str, Any]] = None, failed: bool = False) -> None:
        if self._thread is not None:
            self.inner.hurry()  # training is over: the child no longer waits for idle time
        super().close(summary, failed)

    def _join(self) -> None:
        """Wait at most close_timeout_s; then stop the child and leave what it had not sent behind
        (the inner sink's `left_behind()`: e.g. how to upload the run later)."""
        self._thread.join(self.close_timeout_s)
        if not self._thread.is_alive():
            return
        self.inner.abandon()  # a writer blocked on the pipe gets BrokenPipe and ends
        self._thread.join()
        self._error = None  # the stop we caused is not the backend's failure
        left = getattr(self.inner.inner, "left_behind", None)
        self.inner.reply = left(self.close_timeout_s) if left else {}


# How far below the training process a ProcessSink's child runs (Unix nice levels).
NICENESS = 10


def run_in_idle_time(pid: int) -> None:
    """Process `pid` gets only the CPU time training leaves: Linux's SCHED_IDLE class (it runs when a
    core would idle and yields at once when a training thread wakes); elsewhere NICENESS levels lower."""
    if hasattr(os, "setpriority"):
        os.setpriority(os.PRIO_PROCESS, pid, os.getpriority(os.PRIO_PROCESS, 0) + NICENESS)
    if hasattr(os, "SCHED_IDLE"):
        with contextlib.suppress(OSError):  # e.g. a seccomp profile that forbids it: nice alone
            os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))


def run_at_normal_priority(pid: int) -> bool:
    """Undo run_in_idle_time: back to the normal class at this process's nice level.  Raising a
    priority needs CAP_SYS_NICE (or a high enough RLIMIT_NICE): returns False where refused."""
    try:
        if hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))
        if hasattr(os, "setpriority"):
            os.setpriority(os.PRIO_PROCESS, pid, os.getpriority(os.PRIO_PROCESS, 0))
    except (PermissionError, ProcessLookupError):
        return False
    return True


class _RemoteSink(SinkBase):
    """The parent's end of a ProcessSink: each call is one pickled message to the child."""

    def __init__(self, inner: MetricSink):
        self.inner = inner
        self.takes_histograms = inner.takes_histograms
        self.reply: dict[str, Any] = {}  # the child's summary, after close
        self._child = self._to_child = self._from_child = None
        self._hurry = False

    def start(self, trainer) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        child = subprocess.Popen(
            [sys.executable, "-m", "vishwamai.monitoring.sink_process", str(to_child_r), str(from_child_w)],
            pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL)
        run_in_idle_time(child.pid)  # as soon as it exists
        self._child = child
        if self._hurry:  # training ended while the child was starting
            run_at_normal_priority(child.pid)
        os.close(to_child_r)
        os.close(from_child_w)
        self._to_child, self._from_child = os.fdopen(to_child_w, "wb"), os.fdopen(from_child_r, "rb")
        view = SimpleNamespace(parallel=SimpleNamespace(world_size=trainer.parallel.world_size if trainer else 1))
        self._send("start", self.inner, view)

    def _send(self, method: str, *args) -> None:
        try:
            pickle.dump((method, args), self._to_child)
            self._to_child.flush()
        except BrokenPipeError:  # the child stopped: its own report says why
            self._receive()
            raise ChildProcessError(f"exited with code {self._child.wait()}") from None

    def _receive(self) -> None:
        try:
            kind, value = pickle.load(self._from_child)
        except EOFError:
            return
        if kind == "error":
            raise ChildProcessError(value)
        self.reply = value

    def summary(self) -> dict[str, Any]:
        return self.reply

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._send("log", step, metrics)

    def log_histograms(self, step: int, arrays: dict[str, np.ndarray]) -> None:
        self._send("log_histograms", step, arrays)

    def hurry(self) -> None:
        """Called from the training thread when training ends (the child may not exist yet)."""
        self._hurry = True
        if self._child is not None:
            run_at_normal_priority(self._child.pid)

    def abandon(self) -> None:
        if self._child is not None:
            self._child.kill()

    def close(self, summary: Optional[dict[str, Any]] = None, failed: bool = False) -> None:
        try:
            self._send("close", summary, failed)
            self._to_child.close()
            self._receive()
        finally:
            self._from_child.close()
            self._child.wait()


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics of a record, for backends that take only numbers (MFU may be None; `time` is when
    the step was logged, each backend's timestamp for the point, not a metric)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != TIME_KEY}


def logged_at(metrics: dict[str, Any]) -> float:
    """When the training process logged the record (a backend may write it later)."""
    return metrics.get(TIME_KEY, time.time())


def is_log_step(step: int, every: int, max_steps: int) -> bool:
    return step % every == 0 or step == max_steps


def will_be_logged(step: int, cfg) -> bool:
    """Whether the record of `step` will be written: a log step or an evaluation step."""
    t = cfg.training
    return is_log_step(step, t.log_every_n_steps, t.max_steps) or bool(
        t.eval_every_n_steps and step % t.eval_every_n_steps == 0)


# A figure source: (trainer, record so far) -> more figures for the record (perplexity, MFU, memory).
Figures = Callable[[Any, dict[str, Any]], dict[str, Any]]


class MetricsLogger(Callback):
    def __init__(self, sinks: list[MetricSink], every_n_steps: int, figures: Sequence[Figures] = ()):
        self.sinks = sinks
        self.every = every_n_steps
        self.figures = list(figures)
        self._started = False
        self._reset_window()
        self._carried: dict[str, Any] = {}

    def _reset_window(self) -> None:
        self._tokens, self._samples, self._seconds, self._steps = 0, 0, 0.0, 0

    def on_train_start(self, trainer) -> None:
        if trainer.is_main:
            for sink in self.sinks:
                sink.start(trainer)
            self._started = True

    def on_step_end(self, trainer) -> None:
        m = trainer.metrics
        self._tokens += m.get("tokens", 0)
        self._samples += m.get("global_batch_size", 0)
        self._seconds += m.get("step_time_s", 0.0)
        self._steps += 1
        step = trainer.state.step
        if not is_log_step(step, self.every, trainer.cfg.training.max_steps) and "val_loss" not in m:
            self._carried.update((k, v) for k, v in m.items() if k not in STEP_KEYS)
            return
        self._write(trainer, {**self._carried, **m})

    def _flush(self, trainer) -> None:
        """A run that stops between log steps (a callback's should_stop, early stopping) still logs its
        last steps, with the evaluation that runs after the loop.  (Once a step is logged it is never
        logged again: metrics.jsonl holds one record per step.)"""
        if self._steps:
            self._write(trainer, {**self._carried, **trainer.metrics})

    def _write(self, trainer, record: dict[str, Any]) -> None:
        step = trainer.state.step
        if self._seconds > 0:
            record["tokens_per_s"] = self._tokens / self._seconds
            record["samples_per_s"] = self._samples / self._seconds
            record["step_time_s"] = self._seconds / self._steps
        record[TIME_KEY] = time.time()
        self._reset_window()
        self._carried = {}
        if trainer.is_main:
            for figures in self.figures:
                record.update(figures(trainer, record))
            self.log(step, record)

    def log(self, step: int, record: dict[str, Any]) -> None:
        record.pop("step", None)
        for sink in self.sinks:
            sink.log(step, record)

    @property
    def takes_histograms(self) -> bool:
        return any(sink.takes_histograms for sink in self.sinks)

    def log_histograms(self, step: int, arrays: dict[str, np.ndarray]) -> None:
        for sink in self.sinks:
            if sink.takes_histograms:
                sink.log_histograms(step, arrays)

    def _close(self, trainer, failed: bool) -> None:
        if not self._started:
            for sink in self.sinks:
                if isinstance(sink, JsonlSink):
                    sink.close()
            return
        self._started = False
        for sink in self.sinks:
            sink.close(trainer.summary, failed)
            trainer.summary.update(sink.summary())

    def on_train_end(self, trainer) -> None:
        self._flush(trainer)
        self._close(trainer, failed=False)

    def on_exception(self, trainer, *, error: BaseException) -> None:
        self._close(trainer, failed=True)
