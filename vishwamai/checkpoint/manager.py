"""The checkpointing callback: periodic, best, preemption (SIGTERM) and final saves.

Saves are asynchronous (writer.py): the step's state is copied on the training thread, then
written and published by a background thread while training goes on.  Sharded saves (FSDP,
ZeRO) too: every rank copies its shard and its background thread writes it, the collectives of
the write on a Gloo group of their own (Parallelism.background_group); the main rank publishes
once every rank's shard is written.

Its phase (ORDER_CHECKPOINT) puts it after the feature callbacks and before the loggers:
a checkpoint taken at on_step_end holds every feature's state as of the end of the step,
and the loggers see checkpoint_save_s.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path

from vishwamai.checkpoint.atomic import (TMP_PREFIX, clean_stale, fsync_path, publish_dir, remove_tree, temporary_dir,
                                         write_pointer)
from vishwamai.checkpoint.io import MODEL_CONFIG_FILE, WEIGHTS_FILE, save_model
from vishwamai.checkpoint.layout import BEST, FINAL, LATEST, checkpoints_root, latest_dir, step_dirs, step_name
from vishwamai.checkpoint.manifest import write_manifest
from vishwamai.checkpoint.messages import write_failure
from vishwamai.checkpoint.state import (assert_finite_weights, take_snapshot, trained_weights,
                                        uses_sharded_checkpoints, write_snapshot)
from vishwamai.checkpoint.writer import BackgroundWriter
from vishwamai.errors import CheckpointError, VishwamaiError
from vishwamai.train.events import ORDER_CHECKPOINT, Callback

log = logging.getLogger(__name__)


def prepare_checkpoint_dir(root: Path) -> None:
    """Fail before compute if checkpoints cannot be written; tidy up interrupted saves."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f"{TMP_PREFIX}write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        fsync_path(probe)
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"checkpoint directory {root} is not writable: {write_failure(e, root)}") from e
    for stale in clean_stale(root):
        log.info("removed leftover of an interrupted checkpoint save: %s", stale)


def _link_or_copy(src: Path, dst: Path) -> None:
    # Checkpoint files are never modified in place, so a hard link is as good as a copy.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def link_tree(src: Path, dst: Path) -> None:
    """Hard-link (else copy) every file of `src` into `dst`: best/ shares a step's bytes on disk."""
    for file in src.rglob("*"):
        if file.is_file():
            target = dst / file.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(file, target)


class CheckpointManager(Callback):
    state_key = "checkpointing"
    order = ORDER_CHECKPOINT  # saves the step the features left, before the loggers write it

    def __init__(self, cfg, run_dir: str | Path):
        c = cfg.checkpointing
        self.every, self.keep_last_n = c.every_n_steps, c.keep_last_n
        self.include_optimizer = c.save_optimizer_state
        self.save_best, self.metric, self.mode = c.save_best, c.metric, c.mode
        self.root = checkpoints_root(run_dir)
        self.best_value: float | None = None
        self._best_pending = False
        self._saved_step: int | None = None  # step of the newest step-N saved by this process
        self._sigterm = False
        self._previous_handler = None
        self.preempted = False
        self.writer = BackgroundWriter()
        self._parallel = None  # set in on_init: the ranks agree on a failed sharded write (_wait)
        self._sharded = False

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"best_value": self.best_value}

    def load_state_dict(self, state: dict) -> None:
        self.best_value = state.get("best_value")

    # ------------------------------------------------------------- events
    def on_init(self, trainer) -> None:
        trainer.checkpointer = self  # serves Trainer.save_checkpoint() (e.g. dynamic batch giving up)
        self._parallel, self._sharded = trainer.parallel, uses_sharded_checkpoints(trainer)
        # A SIGTERM on any rank (before the step's agreement) saves this step and stops every rank.
        trainer.agreement.register("sigterm", lambda: self._sigterm)

    def on_train_start(self, trainer) -> None:
        if trainer.is_main:
            self._check_free_space(trainer)
        if self._sharded:  # what a first sharded save would otherwise pay for inside a step (~1 s)
            import vishwamai.distributed.checkpoint  # noqa: F401 - torch DCP's import

            trainer.parallel.background_group()  # every rank is here
        self._install_sigterm_handler()

    def on_eval_end(self, trainer, *, val_loss: float) -> None:
        value = val_loss if self.metric == "validation_loss" else trainer.state.last_train_loss
        if not self.save_best or value is None or not math.isfinite(value):
            return
        if self.best_value is None or (value < self.best_value if self.mode == "min" else value > self.best_value):
            self.best_value = value
            self._best_pending = True

    def on_step_end(self, trainer) -> None:
        stop = trainer.agreement.agreed["sigterm"]
        step = trainer.state.step
        if stop or (self.every and step % self.every == 0):
            self.save_step(trainer)
        if self._best_pending:
            self.save_best_checkpoint(trainer)
        if stop:
            self.preempted = trainer.should_stop = True
            trainer.summary["preempted"] = True
            if trainer.is_main:
                    log.warning("SIGTERM received: saved %s at step %d and stopping; rerun with training.resume=auto",
                            self.root / step_name(step), step)

    def on_train_end(self, trainer) -> None:
        try:
            if not self.preempted:
                if self.every and self._saved_step != trainer.state.step:
                    self.save_step(trainer)  # the end state stays resumable (e.g. to train longer)
                if self._best_pending:  # the loop's closing evaluation may have found a new best
                    self.save_best_checkpoint(trainer)
                self.save_final(trainer)
            self._wait()  # e.g. the SIGTERM save: complete before the process exits
            latest = latest_dir(self.root)
            if latest is not None:
                trainer.summary["latest_checkpoint"] = str(latest)
            if (self.root / BEST).is_dir() and self.save_best:
                trainer.summary["best_checkpoint"] = str(self.root / BEST)
                trainer.summary["best_checkpoint_" + self.metric] = self.best_value
        finally:
            self._restore_sigterm_handler()

    def on_exception(self, trainer, *, error: BaseException) -> None:
        try:
            # A checkpoint taken before the failure is still worth completing. No agreement with the
            # other ranks here (they may not be failing); a sharded write still in flight completes,
            # its collectives being on their own group and threads.
            self.writer.flush()
        except Exception as e:  # noqa: BLE001 - the original error is the one to report
            log.error("a checkpoint write failed too: %s", e)
        finally:
            self._restore_sigterm_handler()

    def close(self) -> None:
        self._restore_sigterm_handler()  # e.g. a run that ended before training started

    def wait_until_written(self) -> None:
        """Every save submitted so far is written and published (serves Trainer.wait_for_checkpoints;
        with sharded saves every rank calls it)."""
        self._wait()

    def _wait(self) -> None:
        """Wait for the writes submitted so far; raise the first failed one's error.

        With sharded saves every rank waits here at the same point and they agree (one gather): a
        write that failed on one rank (the main rank's publication, say) fails every rank, with its
        message, so no rank goes on to a sharded write that its peers would not join, or hangs in one.
        """
        error = self.writer.wait()
        if self._sharded:
            messages = self._parallel.gather_object(None if error is None else str(error))
            failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
            if error is None and failed:
                rank, message = failed[0]
                raise CheckpointError(f"{message} (a checkpoint write failed on rank {rank})")
        if error is not None:
            raise error

    # -------------------------------------------------------------- saves
    def save_step(self, trainer) -> Path:
        """A resumable checkpoint of the last completed step (RUN_DIR/checkpoints/step-N); returns its path."""
        start = time.perf_counter()
        step = trainer.state.step
        name = step_name(step)

        def published() -> None:  # main rank, once the checkpoint is complete
            write_pointer(self.root / LATEST, name)
            self._prune()

        self._write(self.root / name, trainer, self.include_optimizer, then=published)
        self._saved_step = step
        trainer.metrics["checkpoint_save_s"] = trainer.metrics.get("checkpoint_save_s", 0.0) + (
            time.perf_counter() - start)
        return self.root / name

    def save_best_checkpoint(self, trainer) -> None:
        start = time.perf_counter()
        best = self.root / BEST
        if self._saved_step == trainer.state.step:
            if trainer.is_main:  # the same state was just saved: share its files, once they are written
                saved = self.root / step_name(self._saved_step)
                self.writer.submit(lambda: self._guarded(best, lambda tmp: (link_tree(saved, tmp),
                                                                           publish_dir(tmp, best))))
        else:
            self._write(best, trainer, self.include_optimizer)
        self._best_pending = False
        trainer.metrics["checkpoint_save_s"] = trainer.metrics.get("checkpoint_save_s", 0.0) + (
            time.perf_counter() - start)

    def save_final(self, trainer) -> None:
        """RUN_DIR/checkpoints/final: the trained model only (what inference and distillation load)."""
        final, step = self.root / FINAL, trainer.state.step
        self._wait()  # the step-N it may share files with is published
        assert_finite_weights(trainer, final)
        model_files = [WEIGHTS_FILE, MODEL_CONFIG_FILE]
        saved = self.root / step_name(step) if self._saved_step == step else None
        shared = saved is not None and all((saved / name).is_file() for name in model_files)
        # Sharded (FSDP) weights are gathered to rank 0 first: a collective, so every rank calls it.
        full_state = trainer.parallel.full_state_dict(trainer.raw_model) if trainer.parallel.sharded else None
        if not trainer.is_main:
            return

        def write(tmp: Path) -> None:
            if shared:
                for name in model_files:  # the same weights were just saved: share their bytes
                    _link_or_copy(saved / name, tmp / name)
            else:
                save_model(tmp, None, trainer.cfg.model, full_state or trained_weights(trainer))
            write_manifest(tmp, step, model_files)
            publish_dir(tmp, final)

        self._guarded(final, write)
        trainer.summary["final_checkpoint"] = str(final)

    def _write(self, final: Path, trainer, include_optimizer: bool, then=None) -> None:
        """Save a full checkpoint as `final`: the state is copied now, on the training thread; the files
        are written (sharded: by every rank), checked into the manifest and published (via a temporary
        dir, atomically), then `then()` runs on the main rank, all in the background."""
        assert_finite_weights(trainer, final)
        sharded, p = uses_sharded_checkpoints(trainer), trainer.parallel
        if not (sharded or trainer.is_main):
            p.barrier()  # the main rank has taken its snapshot
            return
        self._wait()  # one snapshot in memory at a time; an earlier write's error surfaces here
        shards = None
        if sharded:  # (torch DCP takes ~1 s to import: only runs that save sharded pay for it)
            from vishwamai.distributed.checkpoint import stage_sharded, write_sharded

            shards = stage_sharded(trainer, include_optimizer)  # this rank's part, copied
        snapshot = take_snapshot(trainer, include_optimizer) if trainer.is_main else None
        group = p.background_group() if sharded else None
        # Made by the main rank before any rank writes into it (the barrier below).
        tmp = temporary_dir(final) if trainer.is_main else final.parent / f"{TMP_PREFIX}{final.name}"

        def write(tmp: Path) -> None:
            # Sharded: returns once every rank's shard is on disk (its metadata file then required too).
            required = write_sharded(tmp, shards, group) if shards is not None else []
            if snapshot is not None:
                self._publish(tmp, final, write_snapshot(tmp, snapshot) + required, snapshot.step)

        def job() -> None:
            self._guarded(final, write, tmp)
            if snapshot is not None and then is not None:
                then()

        p.barrier()
        self.writer.submit(job)

    def _publish(self, tmp: Path, final: Path, required: list[str], step: int) -> None:
        write_manifest(tmp, step, required)
        publish_dir(tmp, final)

    def _guarded(self, final: Path, write, tmp: Path | None = None) -> None:
        """Run `write(tmp)`; an I/O failure (disk full...) removes the partial save and says where."""
        tmp = tmp if tmp is not None else temporary_dir(final)
        try:
            write(tmp)
        except (VishwamaiError, KeyboardInterrupt, SystemExit):
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except Exception as e:  # OSError, torch's and safetensors' own write errors (disk full...)
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"could not write checkpoint {final}: {write_failure(e, final.parent)}; "
                                  f"earlier checkpoints in {self.root} are unchanged") from e

    def _prune(self) -> None:
        """Keep the newest keep_last_n step-N directories (and always the one 'latest' names).

        best/ is its own directory (hard links), so pruning never touches it.
        """
        latest = latest_dir(self.root)
        steps = [p for _, p in step_dirs(self.root)]
        for old in steps[:-self.keep_last_n]:
            if old == latest:
                continue
            remove_tree(old)

    # ---------------------------------------------------------- preflight
    def _check_free_space(self, trainer) -> None:
        params = sum(p.numel() * p.element_size() for p in trainer.raw_model.parameters())
        # Weights, plus AdamW's two moments when the optimizer state is saved.
        needed = params * (3 if self.include_optimizer else 1)
        free = shutil.disk_usage(self.root).free
        if free < needed:
            raise CheckpointError(f"not enough space in {self.root}: one checkpoint needs about "
                                  f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free")

    # ------------------------------------------------------------ SIGTERM
    def _install_sigterm_handler(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.info("not in the main thread: SIGTERM will not trigger a checkpoint")
            return

        def on_sigterm(signum, frame):  # only sets a flag: the save happens at the end of the step
            self._sigterm = True

        self._previous_handler = signal.signal(signal.SIGTERM, on_sigterm)

    def _restore_sigterm_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
