"""The image is reproducible: base image by digest, dependencies from the committed constraints file, in
their own layer before the source (checked on the Dockerfile's text: no Docker engine here)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import image_constraints  # noqa: E402


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_base_image_is_pinned_by_digest():
    bases = {line.split()[1] for line in dockerfile().splitlines() if line.startswith("FROM ")}
    assert len(bases) == 1, bases  # build and runtime stages on the same image
    assert re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}", bases.pop())


def test_dependencies_install_from_the_constraints_before_the_source_is_copied():
    lines = dockerfile().splitlines()
    constrained = next(i for i, line in enumerate(lines) if "pip install -c constraints/image.txt" in line)
    first_source = next(i for i, line in enumerate(lines) if line.startswith("COPY vishwamai"))
    assert constrained < first_source
    assert any("pip install --no-deps ." in line for line in lines[first_source:])
    assert "constraints/image.txt" in (ROOT / ".dockerignore").read_text()  # said to go in; not ignored
    assert "constraints" not in [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()]


def test_the_constraints_pin_every_dependency_of_the_image():
    """Fails when a dependency was added without regenerating (python scripts/image_constraints.py)."""
    extras = tuple(re.search(r"^ARG EXTRAS=(\S+)$", dockerfile(), re.M).group(1).split(","))
    text = (ROOT / "constraints" / "image.txt").read_text()
    assert f"--extras {','.join(extras)}" in text
    pinned = {image_constraints.canonical(l.split("==")[0]) for l in text.splitlines() if "==" in l}
    needed = set(image_constraints.closure(image_constraints.project_requirements(extras)))
    assert needed - image_constraints.UNPINNED <= pinned, sorted(needed - pinned - image_constraints.UNPINNED)
    assert "torch" not in pinned and all(re.fullmatch(r"[\w.-]+==[\w.+!-]+", l) for l in text.splitlines()
                                         if l and not l.startswith("#"))
