"""manifest.json: the size and sha256 of every file in a checkpoint, written last.

A checkpoint whose manifest is missing, unreadable or disagrees with a file (truncated,
bit-flipped, replaced) is invalid; resume then falls back to an older one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from vishwamai.errors import CheckpointError

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
_CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.is_file() and p.name != MANIFEST_FILE)


def write_manifest(directory: Path, step: int, required: list[str]) -> dict:
    files = _files(directory)
    missing = [name for name in required if name not in files]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is incomplete: {missing} were not written")
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "created_unix": time.time(),
        "required": required,
        "files": {name: {"size": os.path.getsize(directory / name), "sha256": sha256_of(directory / name)}
                  for name in files},
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    return manifest


def verify(directory: Path) -> dict:
    """The manifest of a complete, intact checkpoint; CheckpointError naming the path otherwise."""
    path = directory / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no {MANIFEST_FILE}: incomplete or not a checkpoint") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"unreadable manifest {path}: {e}") from e
    for name in manifest.get("required", []):
        if name not in files:
            raise CheckpointError(f"{path} does not list required file {name}")
    for name, expected in files.items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file missing: {file}")
        size = os.path.getsize(file)
        if size != expected["size"]:
            raise CheckpointError(f"checkpoint file truncated or changed: {file} has {size} bytes, "
                                  f"manifest says {expected['size']}")
        if sha256_of(file) != expected["sha256"]:
            raise CheckpointError(f"checkpoint file corrupt: {file} does not match its sha256 in {path}")
    return manifest


def verify_if_listed(directory: Path) -> dict | None:
    """verify() a directory that has a manifest (every checkpoint training writes); one saved
    without it (save_model, an export) cannot be checked and is taken as it is."""
    return verify(directory) if (directory / MANIFEST_FILE).exists() else None
