"""Checkpoint writes off the training thread.

A save takes a snapshot of the state on the training thread (a copy to CPU memory, before
the next optimizer step changes anything), then the files are written, checked into the
manifest and published by one background thread, in submission order, while training
goes on.  Atomicity is unchanged: a process killed mid-write leaves the previous checkpoint
valid.  The training thread waits (`wait`, `flush`) only where it needs a write done: before the
next snapshot (so at most one snapshot is held in memory), before the final save, and at
the end of training; an error in a background write is raised there.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable


class BackgroundWriter:
    def __init__(self, name: str = "checkpoint-writer"):
        self._name = name
        self._jobs: queue.Queue[Callable[[], None]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, job: Callable[[], None]) -> None:
        """Run `job` after every job submitted before it (jobs after a failed one are dropped)."""
        if self._thread is None:
            # A daemon: a process that dies leaves at most an unpublished .tmp-* directory behind.
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def wait(self) -> BaseException | None:
        """Wait until every submitted job has run; the first failed job's error (then cleared), if any."""
        self._jobs.join()
        error, self._error = self._error, None
        return error

    def flush(self) -> None:
        """wait(), raising the first failed job's error."""
        error = self.wait()
        if error is not None:
            raise error

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if self._error is None:
                    job()
            except BaseException as e:  # noqa: BLE001 - handed to the training thread by flush()
                self._error = e
            finally:
                self._jobs.task_done()
