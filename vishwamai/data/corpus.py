"""Where text comes from: the embedded default corpus, a file, a folder, or JSONL."""

from __future__ import annotations

import codecs
import json
import logging
import sysconfig
import threading
from pathlib import Path
from typing import Iterator

from vishwamai.errors import ConfigError, DataError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".jsonl"}
# Text is read, decoded and tokenized this many bytes at a time, straight into the token file: memory
# stays bounded whatever the size of the largest file (a whole-file read held 8-16 bytes of RAM per byte).
CHUNK_BYTES = 1 << 20
# A text file whose invalid UTF-8 bytes exceed this share of it is refused (another encoding, e.g.
# latin-1 or cp1252, or not text); below it, stray bytes are replaced by U+FFFD with a warning.
MAX_INVALID_SHARE = 0.001

log = logging.getLogger(__name__)


def embedded_corpus_files(max_bytes: int) -> list[Path]:
    """The default corpus: Python standard-library sources, present wherever Python is.

    Files are taken in sorted order until `max_bytes`, so the corpus is the same on
    every machine with the same Python version and needs no download.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for f in sorted(stdlib.glob("*.py")):
        size = f.stat().st_size
        if total + size > max_bytes:
            break
        files.append(f)
        total += size
    if not files:
        raise DataError(f"no standard-library sources found under {stdlib} for the embedded corpus")
    return files


def resolve_sources(path: str | None, embedded_max_bytes: int) -> list[Path]:
    """The list of files a `data.path` names, checked to exist and be non-empty."""
    if path is None:
        return embedded_corpus_files(embedded_max_bytes)
    p = Path(path).expanduser()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise ConfigError("data.path", f"folder {p} holds no {sorted(TEXT_SUFFIXES)} files")
    else:
        raise ConfigError("data.path", f"no such file or folder: {p}")
    for f in files:
        if f.stat().st_size == 0:
            raise ConfigError("data.path", f"empty file: {f}")
    return files


def iter_documents(files: list[Path], chunk_bytes: int = CHUNK_BYTES) -> Iterator[Iterator[str]]:
    """One document per text file or JSONL record, each as its text in pieces of at most about
    `chunk_bytes` (consume a document's pieces before asking for the next document).

    A text file is read, checked and decoded `chunk_bytes` at a time, so memory does not grow with
    the largest file. A JSONL record is one piece.
    """
    for f in files:
        if f.suffix == ".jsonl":
            yield from ([text] for text in _jsonl_texts(f))
        else:
            yield _text_pieces(f, chunk_bytes)


def _text_pieces(f: Path, chunk_bytes: int) -> Iterator[str]:
    """The text of `f`, decoded incrementally (a character cut by a chunk boundary is decoded whole).

    Refused: a file with a NUL byte (a binary: text never has one), or one whose invalid UTF-8 bytes
    exceed MAX_INVALID_SHARE of its size (another encoding).  Fewer invalid bytes become U+FFFD, and a
    warning gives their count.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors=_REPLACE_AND_COUNT)
    size = f.stat().st_size
    allowed, invalid, offset = int(MAX_INVALID_SHARE * size), 0, 0
    with f.open("rb") as fh:
        while chunk := fh.read(chunk_bytes):
            nul = chunk.find(b"\0")
            if nul >= 0:
                raise DataError(f"{f}: a binary file, not text (NUL byte at offset {offset + nul})")
            text, bad = _decode(decoder, chunk)
            invalid, offset = invalid + bad, offset + len(chunk)
            if invalid > allowed:
                raise DataError(
                    f"{f}: not UTF-8 text: {invalid} invalid UTF-8 bytes in its first {offset:,} bytes (more than "
                    f"{MAX_INVALID_SHARE:.1%} of the file); convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)")
            if text:
                yield text
        text, bad = _decode(decoder, b"", final=True)
        invalid += bad
        if text:
            yield text
    if invalid:
        log.warning("%s: %d bytes (%.3f%%) are not valid UTF-8 and were replaced by U+FFFD", f, invalid,
                    100 * invalid / size)


def _jsonl_texts(f: Path) -> Iterator[str]:
    """Each record's "text"; any bad line is an error naming the file and line (JSON Lines is UTF-8)."""
    with f.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{f}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 (byte {e.start} of the line is {raw[e.start:e.start + 1]!r}); "
                                "JSON Lines files must be UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or "text" not in record:
                raise DataError(f"{where}: expected a JSON object with a 'text' field")
            if not isinstance(record["text"], str):
                raise DataError(f"{where}: 'text' must be a string, got {type(record['text']).__name__}")
            yield record["text"]


# Invalid UTF-8 is replaced exactly as errors="replace" does (one U+FFFD per invalid sequence) while
# the invalid bytes are counted; the count is per thread, read as a difference around each decode.
_REPLACE_AND_COUNT = "vishwamai-replace-and-count"
_tally = threading.local()


def _replace_and_count(err: UnicodeError) -> tuple[str, int]:
    _tally.invalid = getattr(_tally, "invalid", 0) + (err.end - err.start)
    return "\ufffd", err.end


codecs.register_error(_REPLACE_AND_COUNT, _replace_and_count)


def _decode(decoder: codecs.IncrementalDecoder, data: bytes, final: bool = False) -> tuple[str, int]:
    """(decoded text, invalid bytes met) for one incremental decode step."""
    before = getattr(_tally, "invalid", 0)
    text = decoder.decode(data, final)
    return text, getattr(_tally, "invalid", 0) - before
