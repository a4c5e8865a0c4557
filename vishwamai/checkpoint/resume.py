"""training.resume: restore a trainer from the newest valid checkpoint before training starts.

  null      start fresh
  "auto"    the newest valid checkpoint in this run's checkpoints/ (none yet: start fresh)
  a path    a run directory (newest valid checkpoint in it) or one checkpoint directory

A checkpoint that fails its manifest (truncated, corrupt) or whose trainer state is not
plain data is reported with its path and skipped in favour of the next older one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from vishwamai.checkpoint.atomic import read_pointer, write_pointer
from vishwamai.checkpoint.layout import (ABANDONED_DIR, BEST, CHECKPOINTS_DIR, LATEST, checkpoints_after,
                                         checkpoints_root, resume_candidates)
from vishwamai.checkpoint.manifest import MANIFEST_FILE, verify
from vishwamai.checkpoint.state import TRAINER_STATE_FILE, load_checkpoint
from vishwamai.errors import CheckpointError
from vishwamai.run_files import METRICS_FILE

log = logging.getLogger(__name__)


def candidates_for(spec: str, run_dir: Path) -> tuple[list[Path], bool]:
    """(checkpoints to try in order, whether an older one may replace a bad one)."""
    if spec == "auto":
        return resume_candidates(checkpoints_root(run_dir)), True
    path = Path(spec).expanduser()
    if (path / CHECKPOINTS_DIR).is_dir():
        return resume_candidates(path / CHECKPOINTS_DIR), True
    if (path / MANIFEST_FILE).is_file() or (path / TRAINER_STATE_FILE).is_file():
        return [path], False
    if path.is_dir() and not (path / TRAINER_STATE_FILE).exists() and (path / "model.safetensors").is_file():
        raise CheckpointError(f"training.resume={spec} is a model-only checkpoint (no {TRAINER_STATE_FILE}); "
                              "use training.init_from to start from its weights")
    raise CheckpointError(f"training.resume={spec}: no such checkpoint or run directory")


def resume(trainer, spec: str, run_dir: str | Path) -> Path | None:
    """Load the first valid candidate into `trainer`; returns its directory (None = fresh start)."""
    run_dir = Path(run_dir)
    candidates, may_fall_back = candidates_for(spec, run_dir)
    if not candidates:
        if trainer.is_main:
            log.info("training.resume=%s: no checkpoint in %s yet, starting from step 0", spec,
                     checkpoints_root(run_dir))
            truncate_metrics(run_dir / METRICS_FILE, 0)  # rows of a run killed before its first checkpoint
        trainer.summary["resumed_from"] = None
        return None
    problems = []
    for directory in candidates:
        try:
            verify(directory)
            state = load_checkpoint(directory, trainer)
        except CheckpointError as e:
            if not may_fall_back:
                raise
            log.warning("skipping invalid checkpoint %s: %s", directory, e)
            problems.append(str(e))
            continue
        step = state["step"]
        if trainer.is_main:
            log.info("resumed from %s at step %d", directory, step)
            truncate_metrics(run_dir / METRICS_FILE, step)
            retire_newer(checkpoints_root(run_dir), directory, step)
        trainer.summary["resumed_from"] = str(directory)
        return directory
    raise CheckpointError(f"training.resume={spec}: no valid checkpoint among {[str(c) for c in candidates]}: "
                          + "; ".join(problems))


def retire_newer(root: Path, resumed: Path, step: int) -> None:
    """Resuming this run from step S makes S its newest state: later checkpoints in its own
    checkpoints/ (invalid ones skipped above, or an abandoned continuation when an older one
    was named) are moved to RUN_DIR/checkpoints_abandoned/, as later metrics rows are dropped,
    so resume=auto never returns to them. Moved, not deleted: nothing a user trained is lost."""
    if resumed.parent.resolve() != root.resolve():
        return
    for newer in checkpoints_after(root, step):
        target = unused_path(root.parent / ABANDONED_DIR / f"{newer.name}-after-resume-from-{resumed.name}")
        log.warning("moving %s to %s: newer than the checkpoint resumed from (%s)", newer, target, resumed)
        target.parent.mkdir(exist_ok=True)
        os.replace(newer, target)
    if read_pointer(root / LATEST) != resumed.name and resumed.name != BEST:
        write_pointer(root / LATEST, resumed.name)


def unused_path(path: Path) -> Path:
    """`path`, or `path.1`, `path.2`... whichever does not exist yet."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records after `step` (written by the interrupted run), so the file stays one record per step.

    Truncated in place: the metrics sink already holds the file open in append mode.
    """
    if not path.is_file():
        return
    keep = 0
    with open(path, "rb") as fh:
        for line in fh:
            try:
                record_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                break  # a half-written last line
            if not line.endswith(b"\n") or record_step > step:
                break
            keep += len(line)
    if keep < os.path.getsize(path):
        os.truncate(path, keep)
