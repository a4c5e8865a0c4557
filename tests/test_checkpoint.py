"""Checkpointing and exact resume: real processes killed with SIGKILL / SIGTERM, real files.

The reference for "exact" is an uninterrupted run with the same config: the resumed
run's loss at every step must be bitwise equal to it (CPU, one thread).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vishwamai.checkpoint import find_model_dir, load_model
from vishwamai.checkpoint.manifest import MANIFEST_FILE, sha256_of, verify
from vishwamai.errors import CheckpointError, ConfigError
from vishwamai.train.events import Callback
from vishwamai.train.loop import NonFiniteLossError
from vishwamai.training_v2 import EXIT_NON_RETRYABLE, EXIT_PREEMPTED, compose_config, run

CKPT = ["training.num_threads=1", "training.device=cpu", "training.eval_every_n_steps=4"]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> dict[int, float]:
    records = _records(run_dir)
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"duplicate step records in metrics.jsonl: {steps}"
    return {r["step"]: r["loss"] for r in records}


def _latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


SLOW_DISK = str(Path(__file__).parent / "slow_disk.py")


def _cli(overrides: list[str], run_dir: Path, save_delay_s: float = 0.0) -> subprocess.Popen:
    """The training CLI; with `save_delay_s`, on a slow disk (tests/slow_disk.py) so a kill lands mid-save."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(run_dir.parent / f"{run_dir.name}.log", "ab")
    entry = [SLOW_DISK, str(save_delay_s)] if save_delay_s else ["-m", "vishwamai.training_v2"]
    return subprocess.Popen([sys.executable, *entry, *overrides, f"hydra.run.dir={run_dir}"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"training exited early with {proc.returncode}"
        assert time.time() < deadline, "timed out waiting for the training process"
        time.sleep(0.01)


def _free_port() -> str:
    import socket

    with socket.socket() as sock:  # other test files may run process groups on the default port
        sock.bind(("127.0.0.1", 0))
        return f"distributed.master_port={sock.getsockname()[1]}"


def _weights_finite(directory: Path) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in load_model(directory).parameters())


# ------------------------------------------------------------------ exact resume
def test_kill_9_during_a_save_then_resume_is_bitwise_identical(tmp_path, tiny_overrides):
    overrides = tiny_overrides + CKPT + ["training.max_steps=12", "checkpointing.every_n_steps=4"]
    reference = tmp_path / "reference"
    run(compose_config(overrides, run_dir=str(reference)))

    run_dir = tmp_path / "killed"
    ckpts = run_dir / "checkpoints"
    # Every save pauses (files written, not yet published) so the kill lands inside the step-8 save.
    proc = _cli(overrides, run_dir, save_delay_s=1.0)
    try:
        _wait_for(lambda: (ckpts / "latest").is_file() and (ckpts / ".tmp-step-8").is_dir()
                  and any((ckpts / ".tmp-step-8").iterdir()), proc)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
    assert _latest(run_dir) == "step-4" and not (ckpts / "step-8").exists()
    verify(ckpts / "step-4")  # the previous checkpoint is complete and intact

    proc = _cli(overrides + ["training.resume=auto"], run_dir)
    assert proc.wait(timeout=120) == 0, (run_dir.parent / "killed.log").read_text()[-3000:]
    assert not (ckpts / ".tmp-step-8").exists(), "the interrupted save's leftovers are cleaned up"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == str(ckpts / "step-4") and summary["steps"] == 12
    expected, resumed = _losses(reference), _losses(run_dir)
    assert sorted(resumed) == list(range(1, 13))
    assert resumed == expected  # bitwise: float equality at every step


def test_sigterm_checkpoints_the_current_step_and_exits_for_a_retry(tmp_path, tiny_overrides):
    # Long enough that SIGTERM lands mid-training; checkpointing.every_n_steps=0: only SIGTERM saves.
    overrides = tiny_overrides + CKPT + ["training.max_steps=5000", "training.eval_every_n_steps=0"]
    run_dir = tmp_path / "preempted"
    handler_before = signal.getsignal(signal.SIGTERM)
    proc = _cli(overrides, run_dir)
    try:
        _wait_for(lambda: (run_dir / "metrics.jsonl").is_file()
                  and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 3, proc)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    assert code == EXIT_PREEMPTED
    summary = json.loads((run_dir / "summary.json").read_text())
    stopped_at = summary["steps"]
    assert summary["preempted"] is True and 3 <= stopped_at < 5000
    assert _latest(run_dir) == f"step-{stopped_at}"
    assert verify(run_dir / "checkpoints" / f"step-{stopped_at}")["step"] == stopped_at
    assert not (run_dir / "checkpoints" / "final").exists(), "a preempted run is not a finished model"

    cfg = compose_config(overrides + ["training.resume=auto", f"training.max_steps={stopped_at + 3}"],
                         run_dir=str(run_dir))
    resumed = run(cfg)
    assert resumed["resumed_from"].endswith(f"step-{stopped_at}") and resumed["steps"] == stopped_at + 3
    assert sorted(_losses(run_dir)) == list(range(1, stopped_at + 4))
    assert signal.getsignal(signal.SIGTERM) == handler_before  # the handler is removed after training


# ------------------------------------------------------------ corruption fallback
def test_corrupt_and_truncated_checkpoints_fall_back_to_the_previous_valid_one(tmp_path, tiny_overrides, caplog):
    overrides = tiny_overrides + CKPT + ["training.max_steps=8", "checkpointing.every_n_steps=2",
                                         "checkpointing.keep_last_n=3"]
    run_dir = tmp_path / "run"
    run(compose_config(overrides, run_dir=str(run_dir)))
    original = _losses(run_dir)
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-4", "step-6", "step-8"]

    weights = ckpts / "step-8" / "model.safetensors"  # a flipped byte, same size
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    state = ckpts / "step-6" / "trainer_state.pt"  # cut short
    state.write_bytes(state.read_bytes()[:100])

    caplog.set_level(logging.WARNING, logger="vishwamai.checkpoint")
    summary = run(compose_config(overrides + ["training.resume=auto"], run_dir=str(run_dir)))
    assert summary["resumed_from"] == str(ckpts / "step-4")
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert str(weights) in warnings and str(state) in warnings
    # Steps 5..8 were retrained from the step-4 state: the same losses, bit for bit.
    assert _losses(run_dir) == original


def test_an_explicit_corrupt_checkpoint_is_an_error_naming_it(tmp_path, tiny_overrides):
    overrides = tiny_overrides + CKPT + ["training.max_steps=2", "checkpointing.every_n_steps=2"]
    run(compose_config(overrides, run_dir=str(tmp_path / "a")))
    step = tmp_path / "a" / "checkpoints" / "step-2"
    (step / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match="step-2"):
        run(compose_config(overrides + [f"training.resume={step}"], run_dir=str(tmp_path / "b")))


# ------------------------------------------------------------------- NaN safety
class PoisonLoss(Callback):
    """Adds a NaN loss term on the given (1-based) steps."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_loss(self, trainer, *, inputs, targets, outputs, terms):
        if trainer.state.step + 1 in self.steps:
            terms["poison"] = torch.tensor(float("nan"))


def test_nan_steps_are_skipped_and_never_reach_the_weights(tmp_path, tiny_overrides):
    overrides = tiny_overrides + CKPT + ["training.max_steps=8", "checkpointing.every_n_steps=2",
                                         "training.max_consecutive_bad_steps=3"]
    run_dir = tmp_path / "run"
    summary = run(compose_config(overrides, run_dir=str(run_dir)), extra_callbacks=[PoisonLoss({3, 4})])
    assert summary["skipped_steps"] == 2
    records = {r["step"]: r for r in _records(run_dir)}
    assert [s for s, r in records.items() if r.get("skipped_non_finite")] == [3, 4]
    assert math.isfinite(records[8]["loss"])
    for directory in [run_dir / "checkpoints" / "final", *sorted((run_dir / "checkpoints").glob("step-*"))]:
        assert _weights_finite(directory), directory


def test_too_many_nan_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, tiny_overrides):
    overrides = tiny_overrides + CKPT + ["training.max_steps=20", "checkpointing.every_n_steps=2",
                                         "training.max_consecutive_bad_steps=3"]
    run_dir = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(NonFiniteLossError, match="3 consecutive"):
        run(compose_config(overrides, run_dir=str(run_dir)), extra_callbacks=[PoisonLoss(range(5, 21))])
    assert signal.getsignal(signal.SIGTERM) == before  # restored although training failed
    latest = run_dir / "checkpoints" / _latest(run_dir)
    assert latest.name == "step-6"  # step 7 (third bad one) raised before any save
    verify(latest)
    assert _weights_finite(latest)
    assert not (run_dir / "checkpoints" / "final").exists()


# ------------------------------------------------------------ retention and best
@pytest.mark.parametrize("mode", ["min", "max"])
def test_keep_last_n_prunes_old_steps_but_best_survives(tmp_path, tiny_overrides, mode):
    overrides = tiny_overrides + CKPT + ["training.max_steps=10", "training.eval_every_n_steps=2",
                                         "checkpointing.every_n_steps=2", "checkpointing.keep_last_n=2",
                                         f"checkpointing.mode={mode}"]
    run_dir = tmp_path / "run"
    summary = run(compose_config(overrides, run_dir=str(run_dir)))
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-10", "step-8"]
    assert _latest(run_dir) == "step-10"
    val = {r["step"]: r["val_loss"] for r in _records(run_dir) if "val_loss" in r}
    pick = min if mode == "min" else max
    best_step = pick(val, key=val.get)
    manifest = verify(ckpts / "best")
    assert manifest["step"] == best_step
    assert summary["best_checkpoint_validation_loss"] == val[best_step]
    if mode == "max":  # the loss falls, so the best is the first evaluation: its step-N dir was pruned
        assert best_step == 2 and not (ckpts / "step-2").exists()
    assert find_model_dir(run_dir) == ckpts / "best"
    timed = [r["step"] for r in _records(run_dir) if "checkpoint_save_s" in r]
    assert timed == [2, 4, 6, 8, 10]  # the save time is logged on the steps that save


def test_find_model_dir_follows_the_latest_pointer(tmp_path, tiny_overrides):
    overrides = tiny_overrides + CKPT + ["training.max_steps=4", "checkpointing.every_n_steps=2",
                                         "checkpointing.save_best=false"]
    run_dir = tmp_path / "run"
    run(compose_config(overrides, run_dir=str(run_dir)))
    assert not (run_dir / "checkpoints" / "best").exists()
    assert find_model_dir(run_dir) == run_dir / "checkpoints" / "step-4"


# ---------------------------------------------------------------- safe loading
class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_trainer_state_is_refused_without_running_it(tmp_path, tiny_overrides):
    overrides = tiny_overrides + CKPT + ["training.max_steps=4", "checkpointing.every_n_steps=2"]
    run_dir = tmp_path / "run"
    run(compose_config(overrides, run_dir=str(run_dir)))
    step = run_dir / "checkpoints" / "step-4"
    marker = tmp_path / "pwned"
    state = step / "trainer_state.pt"
    torch.save({"format_version": 1, "evil": Payload(marker)}, state)
    # A consistent manifest: the file is not "corrupt", it is hostile.
    manifest = json.loads((step / MANIFEST_FILE).read_text())
    manifest["files"]["trainer_state.pt"] = {"size": state.stat().st_size, "sha256": sha256_of(state)}
    (step / MANIFEST_FILE).write_text(json.dumps(manifest))
    hostile = state.read_bytes()

    with pytest.raises(CheckpointError, match="refusing to load"):
        run(compose_config(overrides + [f"training.resume={step}"], run_dir=str(tmp_path / "other")))
    assert not marker.exists()
    summary = run(compose_config(overrides + ["training.resume=auto", "training.max_steps=5"],
                                 run_dir=str(run_dir)))
    assert summary["resumed_from"].endswith("step-2") and not marker.exists()

    # Proof the file was hostile (the resumed run has since replaced step-4): an unsafe load runs it.
    (tmp_path / "hostile.pt").write_bytes(hostile)
    torch.load(tmp_path / "hostile.pt", weights_only=False)
    assert marker.exists()


# --------------------------------------------------------------- storage faults
def test_unwritable_checkpoint_dir_fails_before_training(tmp_path, tiny_overrides):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("not a directory")
    with pytest.raises(CheckpointError, match=str(run_dir / "checkpoints")):
        run(compose_config(tiny_overrides + CKPT, run_dir=str(run_dir)))
    assert not (run_dir / "metrics.jsonl").exists()


def test_a_missing_resume_path_is_a_config_error_before_training(tmp_path, tiny_overrides):
    with pytest.raises(ConfigError, match="training.resume"):
        run(compose_config(tiny_overrides + CKPT + [f"training.resume={tmp_path / 'nope'}"],
                           run_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resume_auto_without_checkpoints_starts_fresh(tmp_path, tiny_overrides, caplog):
    caplog.set_level(logging.INFO, logger="vishwamai.checkpoint")
    summary = run(compose_config(tiny_overrides + CKPT + ["training.max_steps=2", "training.resume=auto"],
                                 run_dir=str(tmp_path / "run")))
    assert summary["resumed_from"] is None and summary["steps"] == 2
    assert any("starting from step 0" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_disk_full_during_a_save_names_the_dir_and_keeps_the_previous_checkpoint(tmp_path, tiny_overrides,
                                                                                  run_module):
    overrides = tiny_overrides + CKPT + ["training.max_steps=6", "checkpointing.every_n_steps=2"]
    run_dir = tmp_path / "run"
    run(compose_config(overrides + ["training.max_steps=2"], run_dir=str(run_dir)))
    before = sha256_of(run_dir / "checkpoints" / "step-2" / "trainer_state.pt")

    def small_files():  # writes past 200 kB fail with EFBIG, like a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    proc = run_module("vishwamai.training_v2", *overrides, "training.resume=auto", f"hydra.run.dir={run_dir}",
                      preexec_fn=small_files, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == EXIT_NON_RETRYABLE, proc.stderr[-2000:]
    assert "could not write checkpoint" in proc.stderr and str(run_dir / "checkpoints" / "step-4") in proc.stderr
    assert _latest(run_dir) == "step-2" and not list((run_dir / "checkpoints").glob(".tmp-*"))
    verify(run_dir / "checkpoints" / "step-2")
    assert sha256_of(run_dir / "checkpoints" / "step-2" / "trainer_state.pt") == before


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["data_parallel", "model_parallel"])
def test_two_process_resume_is_bitwise_identical(tmp_path, tiny_overrides, strategy):
    """Real gloo process groups: DDP (rank 0 writes) and FSDP (every rank writes its shard)."""
    overrides = tiny_overrides + CKPT + ["training.max_steps=8", "checkpointing.every_n_steps=2",
                                         f"distributed.strategy={strategy}", "distributed.nproc_per_node=2"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert _cli(overrides + [_free_port()], full).wait(timeout=240) == 0, (tmp_path / "full.log").read_text()[-3000:]
    step4 = full / "checkpoints" / "step-4"
    assert _cli(overrides + [_free_port(), f"training.resume={step4}"], resumed).wait(timeout=240) == 0, \
        (tmp_path / "resumed.log").read_text()[-3000:]
    after = _losses(resumed)
    assert sorted(after) == [5, 6, 7, 8]
    assert after == {s: loss for s, loss in _losses(full).items() if s > 4}
    assert _weights_finite(full / "checkpoints" / "final")  # FSDP: gathered to one file


# ------------------------------------------------------------ file primitives
def test_publish_replaces_a_directory_and_an_interrupted_replace_is_recovered(tmp_path):
    from vishwamai.checkpoint.atomic import clean_stale, publish_dir, read_pointer, temporary_dir, write_pointer

    best = tmp_path / "best"
    for version in ("one", "two"):
        tmp = temporary_dir(best)
        (tmp / "f").write_text(version)
        publish_dir(tmp, best)
        assert (best / "f").read_text() == version and not list(tmp_path.glob(".*"))
    # Killed between "rename best aside" and "rename the new one in": the old one comes back.
    os.rename(best, tmp_path / ".old-best")
    (tmp_path / ".tmp-best").mkdir()
    (tmp_path / ".tmp-best" / "f").write_text("half")
    clean_stale(tmp_path)
    assert (best / "f").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    write_pointer(tmp_path / "latest", "step-7")
    assert read_pointer(tmp_path / "latest") == "step-7"
    (tmp_path / "latest").write_text("../../etc")  # a pointer never leaves the checkpoints dir
    assert read_pointer(tmp_path / "latest") is None


def test_metrics_after_the_resumed_step_and_half_lines_are_dropped(tmp_path):
    from vishwamai.checkpoint.resume import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    truncate_metrics(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_with_only_best_saved_a_failed_run_resumes_from_best(tmp_path, tiny_overrides):
    # checkpointing.every_n_steps=0 (the default): best/ is the only full checkpoint a crash leaves.
    overrides = tiny_overrides + CKPT + ["training.max_steps=8", "training.max_consecutive_bad_steps=2"]
    run(compose_config(overrides, run_dir=str(tmp_path / "clean")))
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError):
        run(compose_config(overrides, run_dir=str(run_dir)), extra_callbacks=[PoisonLoss({6, 7})])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best"]
    summary = run(compose_config(overrides + ["training.resume=auto"], run_dir=str(run_dir)))
    assert summary["resumed_from"] == str(run_dir / "checkpoints" / "best")
    assert _losses(run_dir) == _losses(tmp_path / "clean")


class NumpyState(Callback):
    state_key = "numpy_state"

    def state_dict(self):
        return {"ema": [1.0, np.float64(0.5)]}


def test_callback_state_that_could_not_be_loaded_back_fails_at_the_first_save(tmp_path, tiny_overrides):
    overrides = tiny_overrides + CKPT + ["training.max_steps=4", "checkpointing.every_n_steps=2"]
    with pytest.raises(CheckpointError, match=r"callbacks\.numpy_state\.ema\[1\].*numpy.float64"):
        run(compose_config(overrides, run_dir=str(tmp_path / "run")), extra_callbacks=[NumpyState()])
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))
