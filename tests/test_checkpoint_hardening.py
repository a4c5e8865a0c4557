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
