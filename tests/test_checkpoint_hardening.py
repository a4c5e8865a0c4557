"""Hostile and unlucky checkpoint directories (issue 16): crafted metadata, re-run commands,
resume bookkeeping, unverified weights, messages.  Real files and real processes throughout."""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from vishwamai.checkpoint.io import WEIGHTS_FILE, as_model_config, load_model, save_model
from vishwamai.checkpoint.manifest import MANIFEST_FILE, sha256_of
from vishwamai.distributed.checkpoint import METADATA_FILE, shards_path
from vishwamai.errors import CheckpointError

CKPT = ["training.num_threads=1", "training.device=cpu", "training.eval_every_n_steps=4"]


class Payload:
    """Unpickling this runs `touch marker`: what a crafted checkpoint file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def rewrite_manifest(directory: Path, *names: str) -> None:
    """An attacker rewrites the checksum list too: the files are consistent, just hostile."""
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    for name in names:
        manifest["files"][name] = {"size": (directory / name).stat().st_size, "sha256": sha256_of(directory / name)}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


def sharded_checkpoint(directory: Path, model_cfg) -> torch.nn.Module:
    """A checkpoint directory as a sharded save leaves it: model_config.json + shards/ (DCP)."""
    import torch.distributed.checkpoint as dcp

    from vishwamai.model import build_model

    model = build_model(as_model_config(model_cfg), "cpu")
    save_model(directory, model, model_cfg)
    (directory / WEIGHTS_FILE).unlink()
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore")
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(shards_path(directory)), no_dist=True)
    return model


# ------------------------------------------------------- 1. crafted DCP metadata
def test_consolidate_reads_a_genuine_sharded_checkpoint(tmp_path, tiny_cfg, run_module):
    model = sharded_checkpoint(tmp_path / "ckpt", tiny_cfg.model)
    proc = run_module("vishwamai.distributed.consolidate", str(tmp_path / "ckpt"), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    loaded = load_model(tmp_path / "out")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_crafted_sharded_metadata_is_refused_without_running_it(tmp_path, tiny_cfg, run_module):
    ckpt, marker = tmp_path / "ckpt", tmp_path / "pwned"
    sharded_checkpoint(ckpt, tiny_cfg.model)
    metadata = shards_path(ckpt) / METADATA_FILE
    metadata.write_bytes(pickle.dumps(Payload(marker)))

    proc = run_module("vishwamai.distributed.consolidate", str(ckpt), str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert str(metadata) in proc.stderr and "refusing" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()

    # Proof the file is hostile: torch's own reader runs it.
    import torch.distributed.checkpoint as dcp

    with pytest.raises(AttributeError):  # the payload ran, then torch trips over its result
        dcp.FileSystemReader(str(shards_path(ckpt))).read_metadata()
    assert marker.exists()


def test_metadata_naming_a_shard_file_outside_its_directory_is_refused(tmp_path, tiny_cfg):
    from vishwamai.distributed.checkpoint import read_dcp_metadata

    ckpt = tmp_path / "ckpt"
    sharded_checkpoint(ckpt, tiny_cfg.model)
    path = shards_path(ckpt) / METADATA_FILE
    metadata = read_dcp_metadata(path)  # the genuine file passes
    info = next(iter(metadata.storage_data.values()))
    info.relative_path = "../../../etc/passwd"
    path.write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="outside"):
        read_dcp_metadata(path)


def _free_port() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"distributed.master_port={sock.getsockname()[1]}"


@pytest.mark.slow
def test_resume_under_model_parallel_skips_crafted_metadata_for_an_older_checkpoint(tmp_path, tiny_overrides,
                                                                                   run_module):
    overrides = tiny_overrides + CKPT + ["checkpointing.every_n_steps=2", "distributed.strategy=model_parallel",
                                         "distributed.nproc_per_node=2"]
    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = run_module("vishwamai.training_v2", *overrides, "training.max_steps=4", _free_port(),
                       f"hydra.run.dir={run_dir}", env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    step4 = run_dir / "checkpoints" / "step-4"
    (shards_path(step4) / METADATA_FILE).write_bytes(pickle.dumps(Payload(marker)))
    rewrite_manifest(step4, f"shards/{METADATA_FILE}")

    resumed = run_module("vishwamai.training_v2", *overrides, "training.max_steps=5", "training.resume=auto",
                         _free_port(), f"hydra.run.dir={run_dir}", env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not marker.exists()
    output = resumed.stdout + resumed.stderr
    assert "refusing to read" in output and str(step4 / "shards" / METADATA_FILE) in output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == str(run_dir / "checkpoints" / "step-2") and summary["steps"] == 5


# ------------------------------------------ 2. re-running a finished run's command
def test_rerunning_a_finished_runs_command_is_refused_and_loses_nothing(tmp_path, tiny_overrides, run_module):
    overrides = tiny_overrides + CKPT + ["training.max_steps=4", "checkpointing.every_n_steps=2",
                                         f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert run_module("vishwamai.training_v2", *overrides, env=env).returncode == 0
    run_dir = tmp_path / "run"
    before = {p: sha256_of(p) for p in sorted(run_dir.rglob("*")) if p.is_file() and ".hydra" not in p.parts
              and p.suffix != ".log" and p.name != "config.yaml"}

    again = run_module("vishwamai.training_v2", *overrides, "training.max_steps=2", env=env)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "training.resume=auto" in again.stderr and "training.overwrite=true" in again.stderr
    assert str(run_dir) in again.stderr
    assert {p: sha256_of(p) for p in before} == before  # every checkpoint and metrics row as it was


def test_overwrite_replaces_the_earlier_run_without_mixing_the_two(tmp_path, tiny_overrides):
    from vishwamai.training_v2 import compose_config, run

    overrides = tiny_overrides + CKPT + ["checkpointing.every_n_steps=2"]
    run_dir = tmp_path / "run"
    run(compose_config(overrides + ["training.max_steps=6"], run_dir=str(run_dir)))
    summary = run(compose_config(overrides + ["training.max_steps=2", "training.overwrite=true"],
                                 run_dir=str(run_dir)))
    assert summary["steps"] == 2
    root = run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["best", "final", "latest", "step-2"]
    assert (root / "latest").read_text().strip() == "step-2"
    assert json.loads((root / "final" / MANIFEST_FILE).read_text())["step"] == 2
    assert json.loads((root / "best" / MANIFEST_FILE).read_text())["step"] == 2
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_overwrite_and_resume_together_are_a_config_error(tmp_path, tiny_overrides):
    from vishwamai.errors import ConfigError
    from vishwamai.training_v2 import compose_config, run

    with pytest.raises(ConfigError, match="training.overwrite"):
        run(compose_config(tiny_overrides + CKPT + ["training.overwrite=true", "training.resume=auto"],
                           run_dir=str(tmp_path / "run")))


# ------------------------------------------------------ 10. resume bookkeeping
@pytest.mark.parametrize("resume", ["auto", pytest.param(None, marks=pytest.mark.slow)])
def test_a_fresh_start_after_a_kill_before_the_first_checkpoint_keeps_no_old_rows(tmp_path, tiny_overrides, resume):
    import signal
    import subprocess
    import sys
    import time

    from vishwamai.training_v2 import compose_config, run

    overrides = tiny_overrides + CKPT + ["training.eval_every_n_steps=0", "checkpointing.save_best=false"]
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "vishwamai.training_v2", *overrides, "training.max_steps=100000",
                             f"hydra.run.dir={run_dir}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 60
        while not ((run_dir / "metrics.jsonl").is_file()
                   and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert not list((run_dir / "checkpoints").glob("step-*"))

    extra = [f"training.resume={resume}"] if resume else []
    run(compose_config(overrides + extra + ["training.max_steps=2"], run_dir=str(run_dir)))
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_resume_takes_the_newest_complete_checkpoint_when_latest_lags(tmp_path, tiny_overrides):
    from vishwamai.training_v2 import compose_config, run

    overrides = tiny_overrides + CKPT + ["checkpointing.every_n_steps=2", "checkpointing.keep_last_n=5"]
    run_dir = tmp_path / "run"
    run(compose_config(overrides + ["training.max_steps=6"], run_dir=str(run_dir)))
    root = run_dir / "checkpoints"
    # A rank stopped after rank 0 published step-6 but before the pointer moved.
    (root / "latest").write_text("step-4\n")
    summary = run(compose_config(overrides + ["training.max_steps=8", "training.resume=auto"], run_dir=str(run_dir)))
    assert summary["resumed_from"] == str(root / "step-6")


@pytest.mark.slow
def test_resuming_an_older_checkpoint_of_the_same_run_abandons_the_newer_ones(tmp_path, tiny_overrides):
    from vishwamai.training_v2 import compose_config, run

    overrides = tiny_overrides + CKPT + ["checkpointing.every_n_steps=2", "checkpointing.keep_last_n=5",
                                         "checkpointing.save_best=false"]
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    run(compose_config(overrides + ["training.max_steps=8"], run_dir=str(run_dir)))
    # Continue from step 4 with another schedule, stopped (max_steps) at step 6: step-8 is the old path.
    run(compose_config(overrides + ["training.max_steps=6", f"training.resume={root / 'step-4'}",
                                    "training.optimizer.lr=1e-4"], run_dir=str(run_dir)))
    assert not (root / "step-8").exists()
    assert (run_dir / "checkpoints_abandoned" / "step-8-after-resume-from-step-4" / "model.safetensors").is_file()
    summary = run(compose_config(overrides + ["training.max_steps=7", "training.resume=auto"], run_dir=str(run_dir)))
    assert summary["resumed_from"] == str(root / "step-6")


# ------------------------------------------------ 4. weights read by init_from / teachers
def _flip_last_byte(path: Path) -> None:
    """A bit flip in the tensor data (same size, still a valid safetensors file), written as a new
    file so the hard-linked copies in other checkpoints keep the good bytes."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    tmp = path.with_suffix(".flipped")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, path)


def test_init_from_and_teachers_refuse_bit_flipped_weights(tmp_path, tiny_overrides):
    from vishwamai.checkpoint import find_model_dir
    from vishwamai.errors import ConfigError
    from vishwamai.training_v2 import compose_config, run

    overrides = tiny_overrides + CKPT + ["training.max_steps=4", "checkpointing.every_n_steps=2"]
    source = tmp_path / "source"
    run(compose_config(overrides, run_dir=str(source)))
    final, best = source / "checkpoints" / "final", source / "checkpoints" / "best"
    _flip_last_byte(final / WEIGHTS_FILE)

    with pytest.raises(ConfigError, match=f"training.init_from.*{final / WEIGHTS_FILE}"):
        run(compose_config(overrides + [f"training.init_from={final}"], run_dir=str(tmp_path / "a")))
    with pytest.raises(ConfigError, match="distillation.teacher_model.path"):
        run(compose_config(overrides + ["distillation.enabled=true", f"distillation.teacher_model.path={final}"],
                           run_dir=str(tmp_path / "b")))
    assert not (tmp_path / "a" / "metrics.jsonl").exists() and not (tmp_path / "b" / "metrics.jsonl").exists()
    # From a run directory, a damaged best/ gives way to the next intact model.
    _flip_last_byte(best / WEIGHTS_FILE)
    assert find_model_dir(source) == source / "checkpoints" / "step-4"


# --------------------------------------------------------------------- 13. messages
def test_a_refused_trainer_state_never_suggests_weights_only_false(tmp_path, tiny_overrides):
    from vishwamai.training_v2 import compose_config, run

    overrides = tiny_overrides + CKPT + ["training.max_steps=2", "checkpointing.every_n_steps=2"]
    run(compose_config(overrides, run_dir=str(tmp_path / "run")))
    step = tmp_path / "run" / "checkpoints" / "step-2"
    torch.save({"format_version": 1, "evil": Payload(tmp_path / "pwned")}, step / "trainer_state.pt")
    rewrite_manifest(step, "trainer_state.pt")
    with pytest.raises(CheckpointError) as raised:
        run(compose_config(overrides + [f"training.resume={step}"], run_dir=str(tmp_path / "other")))
    message = str(raised.value)
    assert "refusing to load" in message and "system" in message  # the reason: the global it would call
    assert "weights_only" not in message and "Re-running" not in message
    assert not (tmp_path / "pwned").exists()


UNSHARE_TMPFS = """
set -e
mount -t tmpfs -o size=64m tmpfs "$DISK"
"$PYTHON" "$SLOW_DISK" 2 "$@" hydra.run.dir="$DISK/run" > "$DISK/../out.txt" 2> "$DISK/../err.txt" &
pid=$!
# Wait until the first save has written its files (it then pauses: tests/slow_disk.py),
# then fill the disk: the save's last writes fail with ENOSPC.
for i in $(seq 1 600); do
  if [ -n "$(ls -A "$DISK/run/checkpoints/.tmp-step-2" 2>/dev/null)" ]; then break; fi
  sleep 0.1
done
"$PYTHON" -c "
import sys
with open(sys.argv[1], 'wb', buffering=0) as fh:
    for size in (1 << 20, 4096, 1):
        try:
            while True:
                fh.write(bytes(size))
        except OSError:
            pass
" "$DISK/fill"
set +e
wait $pid
echo $? > "$DISK/../rc.txt"
"""


@pytest.mark.slow
def test_a_full_disk_says_no_space_left_on_device_naming_the_checkpoint(tmp_path, tiny_overrides):
    import shutil
    import subprocess
    import sys

    SLOW_DISK = str(Path(__file__).parent / "slow_disk.py")  # the CLI on a slow disk

    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("needs unshare (user + mount namespaces) to mount a small tmpfs without root")
    disk = tmp_path / "disk"
    disk.mkdir()
    overrides = tiny_overrides + CKPT + ["training.max_steps=4", "checkpointing.every_n_steps=2",
                                         f"data.cache_dir={tmp_path / 'cache'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISK": str(disk), "PYTHON": sys.executable, "SLOW_DISK": SLOW_DISK}
    subprocess.run(["unshare", "-rm", "bash", "-c", UNSHARE_TMPFS, "bash", *overrides], env=env, timeout=300,
                   check=True)
    stderr = (tmp_path / "err.txt").read_text()
    assert (tmp_path / "rc.txt").read_text().strip() == "2", stderr[-3000:]
    assert "no space left on device" in stderr and str(disk / "run" / "checkpoints" / "step-2") in stderr
    assert "Traceback" not in stderr


# ------------------------------------------------ issue 20.1: saves off the training thread
def test_training_goes_on_during_a_background_save_and_a_kill_then_leaves_the_previous_one(tmp_path,
                                                                                        tiny_overrides):
    import signal
    import subprocess
    import sys
    import time

    SLOW_DISK = str(Path(__file__).parent / "slow_disk.py")  # the CLI on a slow disk
    from vishwamai.checkpoint.manifest import verify
    from vishwamai.training_v2 import compose_config, run

    overrides = tiny_overrides + CKPT + ["training.max_steps=12", "checkpointing.every_n_steps=4"]
    run(compose_config(overrides, run_dir=str(tmp_path / "reference")))
    run_dir, ckpts = tmp_path / "killed", tmp_path / "killed" / "checkpoints"

    def steps_logged() -> list[int]:
        path = run_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        return [json.loads(line)["step"] for line in lines if line.endswith("}")]

    # Every write pauses 3 s between its files and its publication (a slow disk).
    proc = subprocess.Popen([sys.executable, SLOW_DISK, "3", *overrides, f"hydra.run.dir={run_dir}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        # Kill while step-8 is being written and training has already moved past step 8.
        while not ((ckpts / ".tmp-step-8").is_dir() and any((ckpts / ".tmp-step-8").iterdir())
                   and max(steps_logged(), default=0) > 8):
            assert proc.poll() is None, "training ended before the background write was caught"
            assert time.time() < deadline, "training did not go on while step-8 was being written"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert (ckpts / "latest").read_text().strip() == "step-4" and not (ckpts / "step-8").exists()
    verify(ckpts / "step-4")

    summary = run(compose_config(overrides + ["training.resume=auto"], run_dir=str(run_dir)))
    assert summary["resumed_from"] == str(ckpts / "step-4")
    losses = {json.loads(line)["step"]: json.loads(line)["loss"]
              for line in (run_dir / "metrics.jsonl").read_text().splitlines()}
    reference = {json.loads(line)["step"]: json.loads(line)["loss"]
                 for line in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()}
    assert losses == reference  # bitwise: the snapshot held exactly step 4's state
