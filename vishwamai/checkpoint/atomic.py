"""Crash-safe file-system primitives: a checkpoint directory appears whole or not at all.

A checkpoint is written into a hidden temporary directory next to its final place,
every file and the directory are fsync'ed, and only then is it renamed into place
(rename is atomic on POSIX file systems).  Pointers ('latest') are small files
replaced with os.replace.  A process killed at any instant therefore leaves either
the previous state or the new one, plus at most a stale '.tmp-*' / '.old-*'
directory that `clean_stale` removes at the next start.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's data and metadata to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """fsync every file in `directory` (recursively), then the directories themselves."""
    for root, _dirs, files in os.walk(directory, topdown=False):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def temporary_dir(final: Path) -> Path:
    """A fresh, empty hidden directory beside `final` (same file system, so rename is atomic).

    The name is deterministic so every rank of a sharded save writes into the same one.
    """
    tmp = final.parent / f"{TMP_PREFIX}{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish_dir(tmp: Path, final: Path) -> None:
    """Move a complete, fsync'ed directory into place, replacing `final` if it exists.

    rename() cannot replace a non-empty directory, so an existing one is first renamed
    aside; `recover_aside` undoes that if the process dies between the two renames.
    """
    fsync_tree(tmp)
    aside = final.parent / f"{OLD_PREFIX}{final.name}"
    if final.exists():
        if aside.exists():
            shutil.rmtree(aside)
        os.rename(final, aside)
    os.rename(tmp, final)
    fsync_path(final.parent)
    if aside.exists():
        shutil.rmtree(aside)


def write_pointer(path: Path, target: str) -> None:
    """Atomically make the small file `path` contain `target` (e.g. 'latest' -> 'step-40')."""
    tmp = path.parent / f"{TMP_PREFIX}{path.name}"
    with open(tmp, "w") as fh:
        fh.write(target + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def read_pointer(path: Path) -> str | None:
    try:
        name = path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, UnicodeDecodeError):
        return None
    # A pointer names a sibling directory, never a path elsewhere.
    return name if name and "/" not in name and name not in (".", "..") else None


def remove_tree(path: Path, label: str = "delete") -> None:
    """Remove a directory, renamed to a hidden name first: a kill mid-removal leaves a leftover
    that clean_stale removes, never a half-deleted checkpoint that still looks like one."""
    doomed = path.parent / f"{TMP_PREFIX}{label}-{path.name}"
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def recover_aside(parent: Path) -> None:
    """A directory renamed aside whose replacement never arrived goes back into place."""
    for aside in parent.glob(f"{OLD_PREFIX}*"):
        final = parent / aside.name[len(OLD_PREFIX):]
        if aside.is_dir() and not final.exists():
            os.rename(aside, final)


def clean_stale(parent: Path) -> list[Path]:
    """Remove leftovers of interrupted saves; returns what was removed."""
    recover_aside(parent)
    removed = []
    for stale in list(parent.glob(f"{TMP_PREFIX}*")) + list(parent.glob(f"{OLD_PREFIX}*")):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed
