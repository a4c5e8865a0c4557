"""Where text comes from: the embedded default corpus, a file, a folder, or JSONL."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from typing import Iterator

from vishwamai.errors import ConfigError, DataError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".jsonl"}


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


def iter_documents(files: list[Path]) -> Iterator[str]:
    """One string per document: a whole text file, or one JSONL record's "text"."""
    for f in files:
        if f.suffix == ".jsonl":
            with f.open(encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        yield json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise DataError(f"{f}:{lineno}: expected a JSON object with a 'text' field ({e})") from e
        else:
            yield f.read_text(encoding="utf-8", errors="replace")
