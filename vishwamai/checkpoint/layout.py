"""Where checkpoints live in a run directory.

  RUN_DIR/checkpoints/step-N/   full training checkpoints (every checkpointing.every_n_steps,
                                at preemption, and at the end when every_n_steps > 0)
  RUN_DIR/checkpoints/latest    a small file naming the newest complete step-N directory
  RUN_DIR/checkpoints/best/     full checkpoint with the best checkpointing.metric so far
  RUN_DIR/checkpoints/final/    the trained model (weights + model config) at the end
  RUN_DIR/checkpoints_abandoned/ checkpoints newer than an older one the run was resumed from
                                (kept, never read by resume)
"""

from __future__ import annotations

import json
from pathlib import Path

from vishwamai.checkpoint.atomic import read_pointer

CHECKPOINTS_DIR = "checkpoints"
ABANDONED_DIR = "checkpoints_abandoned"
LATEST = "latest"
BEST = "best"
FINAL = "final"
STEP_PREFIX = "step-"


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step}"


def parse_step(name: str) -> int | None:
    digits = name[len(STEP_PREFIX):] if name.startswith(STEP_PREFIX) else ""
    return int(digits) if digits.isdigit() else None


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Published step-N directories, oldest first."""
    if not root.is_dir():
        return []
    found = [(parse_step(p.name), p) for p in root.iterdir() if p.is_dir()]
    return sorted((step, p) for step, p in found if step is not None)


def latest_dir(root: Path) -> Path | None:
    name = read_pointer(root / LATEST)
    return root / name if name and (root / name).is_dir() else None


def _best_step(root: Path) -> tuple[int, Path] | None:
    """best/ is a full checkpoint too; its step is in its manifest."""
    try:
        return int(json.loads((root / BEST / "manifest.json").read_text())["step"]), root / BEST
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _full_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every full checkpoint: the step-N directories and best/."""
    return step_dirs(root) + ([best] if (best := _best_step(root)) else [])


def resume_candidates(root: Path) -> list[Path]:
    """Checkpoints to try in order: step-N and best/ by step, newest first (step-N before best/ at a tie).

    Not the 'latest' pointer first: a process stopped between publishing step-N and moving the
    pointer leaves it one checkpoint behind a complete step-N.  best/ matters when
    checkpointing.every_n_steps=0: after a kill -9 it is the only full checkpoint.
    """
    return [p for _, p in sorted(_full_checkpoints(root), key=lambda sp: (sp[0], sp[1].name != BEST), reverse=True)]


def checkpoints_after(root: Path, step: int) -> list[Path]:
    """step-N (and best/) newer than `step`."""
    return [p for s, p in _full_checkpoints(root) if s > step]
