"""A run directory belongs to one run: re-running a finished run's command must not replace it.

  holds checkpoints, training.resume set     continue it (resume.py)
  holds checkpoints, training.overwrite=true  the earlier run's outputs are removed first
  holds checkpoints, neither                  refused before compute, naming both options
  no checkpoints (killed before the first)    its leftover metrics.jsonl is dropped: nothing
                                              to resume, so the fresh start's records stand alone
"""

from __future__ import annotations

import logging
from pathlib import Path

from vishwamai.checkpoint.atomic import remove_tree
from vishwamai.checkpoint.layout import (ABANDONED_DIR, BEST, CHECKPOINTS_DIR, FINAL, LATEST, checkpoints_root,
                                         step_dirs)
from vishwamai.errors import ConfigError
from vishwamai.run_files import METRICS_FILE, REPORT_MD, REPORT_PNG, SUMMARY_FILE

log = logging.getLogger(__name__)

# What a run writes into its directory (besides config.yaml, rewritten at every start, Hydra's own
# .hydra/ and log, and mlflow.db, which keeps each run apart).  training.overwrite removes these.
RUN_OUTPUTS = (CHECKPOINTS_DIR, ABANDONED_DIR, METRICS_FILE, SUMMARY_FILE, REPORT_PNG, REPORT_MD,
               "tensorboard", "wandb", "pruned", "quantized")


def existing_checkpoints(run_dir: Path) -> list[str]:
    """Names of the checkpoints in RUN_DIR/checkpoints (step-N, best, final, the latest pointer)."""
    root = checkpoints_root(run_dir)
    return [p.name for _, p in step_dirs(root)] + [name for name in (BEST, FINAL, LATEST) if (root / name).exists()]


def claim_run_dir(cfg, run_dir: Path, is_main: bool) -> None:
    """Decide, before compute, what this run does with what an earlier run left in `run_dir`.

    Every rank checks (they read the same directory); only the main rank removes anything.
    """
    t = cfg.training
    if t.overwrite and t.resume:
        raise ConfigError("training.overwrite", f"true contradicts training.resume={t.resume} "
                                                "(resume continues the earlier run, overwrite replaces it): set one")
    if t.resume:
        return
    found = existing_checkpoints(run_dir)
    if found and not t.overwrite:
        shown = ", ".join(found[-4:]) + (" ..." if len(found) > 4 else "")
        raise ConfigError("training.resume", f"run directory {run_dir} already holds checkpoints of an earlier run "
                                             f"({shown}): set training.resume=auto to continue that run, or "
                                             "training.overwrite=true to replace it")
    if not is_main:
        return
    if found:
        removed = remove_outputs(run_dir)
        log.warning("training.overwrite=true: removed the earlier run's %s from %s", ", ".join(removed), run_dir)
    elif (run_dir / METRICS_FILE).is_file():
        (run_dir / METRICS_FILE).unlink()  # a run killed before its first checkpoint: nothing to continue
        log.info("dropped %s of an earlier run that saved no checkpoint", run_dir / METRICS_FILE)


def remove_outputs(run_dir: Path) -> list[str]:
    """Remove RUN_OUTPUTS from `run_dir`; returns the names removed."""
    removed = []
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if not (path.exists() or path.is_symlink()):
            continue
        if path.is_dir() and not path.is_symlink():
            remove_tree(path, "overwritten")
        else:
            path.unlink()
        removed.append(name)
    return removed
