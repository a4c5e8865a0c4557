"""Read ahead: the next steps' windows are read from the token file while the current step runs.

`PrefetchingSampler` wraps a SequenceSampler and keeps its interface (`window_ids`, `gather`,
`state_dict`...), so the training loop does not change.  When the loop takes a step's window ids,
the wrapper predicts the next `depth` steps (same batch size, from the sampler's seeded order
without moving it: `peek_window_ids`) and a background thread reads their windows; `gather`
then hands out the rows already read.  The GIL is no obstacle: `os.pread` and the numpy copies
release it, as does the model's compute.

Exact resume is untouched: the wrapped sampler moves only when the loop takes a step's ids, so
its state (saved in checkpoints) names the next unread window; windows read ahead but never used
are simply read again after a resume.  A prediction that no longer holds (the batch size changed:
dynamic batch sizing; the state was loaded) is dropped and the windows are read in the loop.

On CUDA the rows are put in pinned memory, so the loop's `.to(device, non_blocking=True)` is a
real asynchronous copy.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import torch

from vishwamai.config import DataConfig
from vishwamai.data.dataset import SequenceSampler, Tokens


@dataclass
class _ReadAhead:
    start: tuple[int, int]  # the sampler's position the prediction was made from
    end: tuple[int, int]  # and the position after it
    batch_size: int
    ids: torch.Tensor
    rows: Future  # -> (inputs, targets), each (len(ids), seq_len), contiguous


class PrefetchingSampler:
    """A SequenceSampler whose next `depth` steps of windows are read in a background thread."""

    def __init__(self, sampler: SequenceSampler, depth: int = 1, pin_memory: bool = False):
        if depth < 1:
            raise ValueError(f"read-ahead depth must be >= 1, got {depth}")
        self.sampler, self.depth, self.pin_memory = sampler, depth, pin_memory
        self._pending: deque[_ReadAhead] = deque()
        self._current: Optional[_ReadAhead] = None  # the step the loop is gathering now
        self._pool: Optional[ThreadPoolExecutor] = ThreadPoolExecutor(1, thread_name_prefix="vishwamai-read-ahead")
        self.hits = self.misses = 0  # steps served from read-ahead / read in the loop (for tests and benches)

    def __getattr__(self, name: str) -> Any:  # seq_len, epoch, num_windows...: the wrapped sampler's
        if name == "sampler":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.sampler, name)

    # ------------------------------------------------------------------ stepping
    def window_ids(self, batch_size: int) -> torch.Tensor:
        head = self._pending.popleft() if self._pending else None
        if head is not None and head.start == self.sampler.position and head.batch_size == batch_size:
            self._current, self.hits = head, self.hits + 1
        else:
            self._drop()
            self._current, self.misses = None, self.misses + 1
        ids = self.sampler.window_ids(batch_size)
        self._read_ahead(batch_size)
        return ids

    def gather(self, window_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of `window_ids`: from the read-ahead when they are a contiguous run of this step's ids
        (the loop's micro-batches, also after a redo with a smaller micro-batch), else read now."""
        cur = self._current
        if cur is not None:
            start = _find_run(cur.ids, window_ids)
            if start is not None:
                inputs, targets = cur.rows.result()
                stop = start + len(window_ids)
                return inputs[start:stop], targets[start:stop]  # row slices: still contiguous (and pinned)
        return self.sampler.gather(window_ids)

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gather(self.window_ids(batch_size))

    def _read_ahead(self, batch_size: int) -> None:
        position = self._pending[-1].end if self._pending else self.sampler.position
        while len(self._pending) < self.depth and self._pool is not None:
            ids, end = self.sampler.peek_window_ids(batch_size, position)
            self._pending.append(_ReadAhead(position, end, batch_size, ids, self._pool.submit(self._read, ids)))
            position = end

    def _read(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.sampler.gather(ids)
        inputs, targets = inputs.contiguous(), targets.contiguous()
        if self.pin_memory:
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        return inputs, targets

    def _drop(self) -> None:
        for ahead in self._pending:
            ahead.rows.cancel()  # one already running finishes in the background; its rows are unused
        self._pending.clear()

    # --------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return self.sampler.state_dict()  # the next unread window: read-ahead rows are not consumed

    def load_state_dict(self, state: dict) -> None:
        self._drop()
        self._current = None
        self.sampler.load_state_dict(state)

    def close(self) -> None:
        """Stop reading ahead and join the reader thread."""
        self._drop()
        self._current = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _find_run(ids: torch.Tensor, run: torch.Tensor) -> Optional[int]:
    """Where `run` occurs as a contiguous slice of `ids` (None if it does not)."""
    n = len(run)
    if n == 0 or n > len(ids):
        return None
    for start in (ids == run[0]).nonzero().flatten().tolist():
        if start + n <= len(ids) and torch.equal(ids[start:start + n], run):
            return start
    return None


def train_sampler(tokens: Tokens, cfg: DataConfig, seed: int, rank: int, world_size: int,
                  device: torch.device) -> SequenceSampler | PrefetchingSampler:
    """The training loop's sampler: seeded and rank-aware, reading `data.prefetch` steps ahead (0 = none)."""
    sampler = SequenceSampler(tokens, cfg.seq_len, seed, rank, world_size)
    if cfg.prefetch <= 0:
        return sampler
    return PrefetchingSampler(sampler, cfg.prefetch, pin_memory=torch.device(device).type == "cuda")
