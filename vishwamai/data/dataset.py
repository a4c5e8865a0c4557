"""Text -> one token file on disk (built once, cached) -> packed, seeded batches.

Documents are concatenated with an end-of-document token and cut into windows of
`seq_len + 1` tokens (sequence packing: no padding is ever trained on).  The last
`val_fraction` of the token stream is the validation split.  Memory use follows the
batch, not the corpus: only the windows of the current batch are read from the token
file (TokenFile), nothing else of it is ever held by the process.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from vishwamai.config import DataConfig
from vishwamai.data.corpus import CHUNK_BYTES, iter_documents, resolve_sources
from vishwamai.data.tokenizer import Tokenizer, build_tokenizer
from vishwamai.errors import DataError

DEFAULT_CACHE = Path.home() / ".cache" / "vishwamai" / "data"


def _cache_key(files: list[Path], tokenizer: Tokenizer) -> str:
    h = hashlib.sha256(tokenizer.identity.encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _entropy_nats(counts: np.ndarray) -> float:
    counts = counts.astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def build_token_file(files: list[Path], tokenizer: Tokenizer, out_dir: Path,
                     chunk_bytes: int = CHUNK_BYTES) -> Path:
    """Tokenise `files` into out_dir/tokens.bin (+ meta.json), atomically; reuse if present.

    Text is tokenized piece by piece (at most about `chunk_bytes` of it at a time) straight into the
    file, so peak memory does not depend on the size of the largest file (Tokenizer.encode_stream:
    exact piece by piece for the byte tokenizer and for BPE tokenizers that cut at spaces).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    bin_path, meta_path = out_dir / "tokens.bin", out_dir / "meta.json"
    if bin_path.exists() and meta_path.exists():
        return bin_path
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.uint32
    eos = np.asarray([tokenizer.eos_id], dtype=dtype).tobytes()
    # Unique temporary names: several ranks may build the same cache at once;
    # the rename is atomic, so readers only ever see a complete file.
    suffix = f".tmp{os.getpid()}"
    tmp_bin = bin_path.with_name(bin_path.name + suffix)
    n_tokens, n_docs = 0, 0
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)  # unigram counts, as the file is written
    try:
        with open(tmp_bin, "wb") as fh:
            for doc in iter_documents(files, chunk_bytes):
                for part in tokenizer.encode_stream(doc):
                    ids = np.asarray(part).astype(dtype, copy=False)
                    fh.write(ids.tobytes())
                    counts += np.bincount(ids, minlength=tokenizer.vocab_size)
                    n_tokens += len(ids)
                fh.write(eos)
                counts[tokenizer.eos_id] += 1
                n_tokens, n_docs = n_tokens + 1, n_docs + 1
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp_bin.unlink(missing_ok=True)  # a refused file (binary, not UTF-8) leaves no partial token file
        raise
    meta = {
        "dtype": np.dtype(dtype).name,
        "num_tokens": n_tokens,
        "num_documents": n_docs,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer": tokenizer.identity,
        "unigram_entropy_nats": _entropy_nats(counts),
        "sources": [str(f) for f in files[:50]] + ([f"... {len(files) - 50} more"] if len(files) > 50 else []),
    }
    tmp_meta = meta_path.with_name(meta_path.name + suffix)
    tmp_meta.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_bin, bin_path)
    os.replace(tmp_meta, meta_path)
    return bin_path


class TokenFile:
    """A read-only span of a token file on disk, sliced like a 1-D array: `f[a:b]` reads those tokens.

    Windows are read with pread, not through a memory map: a mapping's touched pages count as the
    process's resident memory, a whole readahead chunk or large folio (1-2 MB) per randomly placed
    window, so a mapped corpus made RSS grow with its size (110 MB of a 200 MB token file after 96
    windows, measured).  The operating system's page cache still caches the file for every reader.
    """

    def __init__(self, path: Path, dtype: str, start: int = 0, stop: Optional[int] = None, _file=None):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self._file = _file or open(path, "rb", buffering=0)  # shared by the spans of one file
        if _file is None and hasattr(os, "posix_fadvise"):  # shuffled windows: no readahead
            os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        total = os.fstat(self._file.fileno()).st_size // self.dtype.itemsize
        self.start, self.stop = start, total if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def span(self, start: int, stop: int) -> "TokenFile":
        """The tokens [start, stop) of this span, as a span (nothing read)."""
        return TokenFile(self.path, self.dtype.name, self.start + start, self.start + stop, self._file)

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("TokenFile supports contiguous slices only")
        start, stop, _ = key.indices(len(self))
        count = max(0, stop - start)
        data = os.pread(self._file.fileno(), count * self.dtype.itemsize,
                        (self.start + start) * self.dtype.itemsize)
        return np.frombuffer(data, dtype=self.dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)


# What samplers read windows from: a TokenFile, or any 1-D integer array (tests, small data).
Tokens = Union[TokenFile, np.ndarray]


@dataclass
class TokenData:
    train: TokenFile
    val: TokenFile
    vocab_size: int
    meta: dict
    tokenizer: Tokenizer


def load_token_data(cfg: DataConfig) -> TokenData:
    tokenizer = build_tokenizer(cfg.tokenizer)
    files = resolve_sources(cfg.path, cfg.embedded_max_bytes)
    cache_root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else DEFAULT_CACHE
    bin_path = build_token_file(files, tokenizer, cache_root / _cache_key(files, tokenizer))
    meta = json.loads((bin_path.parent / "meta.json").read_text())
    tokens = TokenFile(bin_path, meta["dtype"])
    n_val = int(len(tokens) * cfg.val_fraction)
    min_tokens = 2 * (cfg.seq_len + 1)
    if n_val < cfg.seq_len + 1 or len(tokens) - n_val < min_tokens:
        raise DataError(
            f"corpus too small: {len(tokens)} tokens cannot fill a train and a validation window of "
            f"data.seq_len={cfg.seq_len} with data.val_fraction={cfg.val_fraction}; add text or lower data.seq_len"
        )
    split = len(tokens) - n_val
    return TokenData(tokens.span(0, split), tokens.span(split, len(tokens)), tokenizer.vocab_size, meta,
                     tokenizer)


class SequenceSampler:
    """Seeded, resumable, rank-aware stream of packed (input, target) batches.

    Each epoch visits every window of the split once in an order drawn from
    `seed + epoch`.  A call to `next_batch(n)` consumes `n * world_size` windows:
    rank r takes the r-th slice, so ranks see disjoint data and the union over ranks
    is exactly what a single process with the same global batch would see.  The
    position (epoch, cursor) is the whole state: saving it resumes mid-epoch exactly,
    and the batch size may change between calls (dynamic batch sizing).
    """

    def __init__(self, tokens: Tokens, seq_len: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < world_size:
            raise DataError(f"{self.num_windows} windows of {seq_len} tokens cannot be split over {world_size} ranks")
        self.epoch, self.cursor = 0, 0
        self._orders: dict[int, torch.Tensor] = {}  # epoch -> window order (this epoch and a peeked next one)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(self.num_windows, generator=g)
            else:
                order = torch.arange(self.num_windows)
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}  # at most two kept
            self._orders[epoch] = order
        return self._orders[epoch]

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, cursor): the next unread window."""
        return self.epoch, self.cursor

    def _ids_from(self, position: tuple[int, int], count: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """The `count` window ids read from `position` on, and the position after them (nothing changes)."""
        epoch, cursor = position
        taken = []
        while count > 0:
            chunk = self._epoch_order(epoch)[cursor: cursor + count]
            taken.append(chunk)
            cursor += len(chunk)
            count -= len(chunk)
            if cursor >= self.num_windows:
                epoch, cursor = epoch + 1, 0
        return torch.cat(taken), (epoch, cursor)

    def peek_window_ids(self, batch_size: int, position: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        """What `window_ids(batch_size)` would return at `position`, and the position after it (read ahead)."""
        ids, after = self._ids_from(position, batch_size * self.world_size)
        return ids[self.rank * batch_size: (self.rank + 1) * batch_size], after

    def window_ids(self, batch_size: int) -> torch.Tensor:
        ids, (self.epoch, self.cursor) = self.peek_window_ids(batch_size, self.position)
        return ids

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gather(self.window_ids(batch_size))

    def gather(self, window_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        starts = window_ids.numpy() * self.seq_len
        rows = np.stack([self.tokens[s: s + self.seq_len + 1] for s in starts]).astype(np.int64)
        batch = torch.from_numpy(rows)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self.seed = int(state["epoch"]), int(state["cursor"]), int(state["seed"])
        self._orders = {}

    def close(self) -> None:
        """Nothing to release (the token file belongs to TokenData); PrefetchingSampler's joins its reader."""


def eval_batches(tokens: Tokens, seq_len: int, batch_size: int, max_batches: int,
                 rank: int = 0, world_size: int = 1):
    """The same validation windows, in order, at every evaluation (comparable val_loss)."""
    sampler = SequenceSampler(tokens, seq_len, seed=0, rank=rank, world_size=world_size, shuffle=False)
    n = min(max_batches, max(1, sampler.num_windows // (batch_size * world_size)))
    per_rank = min(batch_size, math.ceil(sampler.num_windows / world_size))
    for _ in range(n):
        yield sampler.next_batch(per_rank)
