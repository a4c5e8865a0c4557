"""One exit-code policy for every command: 2 for a config or input error (no traceback, the key or file
named), 75 after SIGTERM (checkpoint saved), whether the run is one process, vishwamai's own launcher
or torchrun through vishwamai's wrapper.  Real processes, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from vishwamai.checkpoint.manifest import verify
from vishwamai.distributed.launch import exit_code_of, signal_exit_code
from vishwamai.errors import EXIT_NON_RETRYABLE, EXIT_PREEMPTED

from test_distributed import REPO, free_port, summary, worker_env


# An unknown key: tests/test_config.py (test_cli_typo_fails_before_compute_naming_the_key).
@pytest.mark.parametrize("override, named", [
    ("training.max_steps=many", "training.max_steps"),  # Hydra: wrong type
    ("model=no_such_preset", "no_such_preset"),  # Hydra: missing config group option
])
def test_hydra_config_errors_exit_2_without_a_traceback(tmp_path, run_module, override, named):
    proc = run_module("vishwamai.training_v2", override, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert proc.returncode == EXIT_NON_RETRYABLE, proc.stderr[-2000:]
    assert named in proc.stderr and proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr


@pytest.mark.parametrize("where", ["a_file", "in_proc"])
def test_a_run_dir_that_cannot_be_created_exits_2_naming_it(tmp_path, run_module, where):
    (tmp_path / "a_file").write_text("not a directory")
    run_dir = {"a_file": tmp_path / "a_file",
               "in_proc": Path("/proc/vishwamai-run")}[where]  # /proc: not creatable even by root
    proc = run_module("vishwamai.training_v2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == EXIT_NON_RETRYABLE, proc.stderr[-2000:]
    assert f"error: hydra.run.dir: cannot create or write {run_dir}" in proc.stderr
    assert "Traceback" not in proc.stderr
    if where == "a_file":
        assert "exists and is not a directory" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA is not available")
def test_cuda_requested_without_cuda_exits_2_naming_the_key(tmp_path, run_module):
    proc = run_module("vishwamai.training_v2", "training.device=cuda", f"hydra.run.dir={tmp_path}/run",
                      cwd=tmp_path)
    assert proc.returncode == EXIT_NON_RETRYABLE, proc.stderr[-2000:]
    assert "config error at 'training.device': cuda requested but" in proc.stderr
    assert "Traceback" not in proc.stderr


def _failure(rank: int, exitcode: int, timestamp: int) -> ProcessFailure:
    failure = ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file="<N/A>")
    failure.timestamp = timestamp
    return failure


def test_launcher_exit_code_from_its_workers():
    assert exit_code_of([_failure(0, EXIT_PREEMPTED, 2), _failure(1, EXIT_PREEMPTED, 1)]) == EXIT_PREEMPTED
    # A config error wins over anything: a retry cannot fix it.
    assert exit_code_of([_failure(0, 1, 1), _failure(1, EXIT_NON_RETRYABLE, 2)]) == EXIT_NON_RETRYABLE
    # The root cause (first in time) wins over the ranks the agent then stopped (which saved and exited 75).
    assert exit_code_of([_failure(0, EXIT_PREEMPTED, 5), _failure(1, 1, 3)]) == 1
    assert exit_code_of([_failure(0, -signal.SIGKILL, 1)]) == 128 + signal.SIGKILL
    assert signal_exit_code(signal.SIGTERM) == EXIT_PREEMPTED
    assert signal_exit_code(signal.SIGINT) == 128 + signal.SIGINT


LONG_DDP = ["training.device=cpu", "training.max_steps=100000", "training.eval_every_n_steps=0",
            "distributed.strategy=data_parallel", "distributed.timeout_s=60"]


def _sigterm_once_training(cmd: list[str], run_dir: Path) -> tuple[int, str]:
    """Start `cmd`, SIGTERM the launcher (only it, as Kubernetes does) after 2 logged steps."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    try:
        deadline = time.time() + 180
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "training did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the session started above: only our processes
    return proc.returncode, stderr


def _assert_preempted_with_a_checkpoint(code: int, stderr: str, run_dir: Path) -> None:
    assert code == EXIT_PREEMPTED, stderr[-3000:]
    assert "rerun with training.resume=auto" in stderr and "Traceback" not in stderr
    s = summary(run_dir)
    assert s["preempted"] is True and s["world_size"] == 2
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{s['steps']}" and verify(run_dir / "checkpoints" / latest)["step"] == s["steps"]


@pytest.mark.slow
def test_sigterm_to_vishwamais_launcher_checkpoints_and_exits_75(tmp_path, tiny_overrides):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "vishwamai.training_v2", *tiny_overrides, *LONG_DDP,
           "distributed.nproc_per_node=2", f"distributed.master_port={free_port()}", f"hydra.run.dir={run_dir}"]
    _assert_preempted_with_a_checkpoint(*_sigterm_once_training(cmd, run_dir), run_dir)


@pytest.mark.slow
def test_sigterm_to_the_torchrun_wrapper_checkpoints_and_exits_75(tmp_path, tiny_overrides):
    # Plain torchrun exits 1 here (its SignalException escapes with a traceback; measured, see README).
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "vishwamai.distributed.torchrun", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "vishwamai.training_v2", *tiny_overrides, *LONG_DDP, f"hydra.run.dir={run_dir}"]
    _assert_preempted_with_a_checkpoint(*_sigterm_once_training(cmd, run_dir), run_dir)


@pytest.mark.slow
def test_the_torchrun_wrapper_keeps_a_workers_config_error_as_2(tmp_path, tiny_overrides):
    # Found after the ranks joined the group (the vocabulary check): torchrun itself would exit 1.
    cmd = [sys.executable, "-m", "vishwamai.distributed.torchrun", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "vishwamai.training_v2", *tiny_overrides, "training.device=cpu", "model.vocab_size=100",
           "distributed.strategy=data_parallel", "distributed.timeout_s=60", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=150)
    assert proc.returncode == EXIT_NON_RETRYABLE, proc.stderr[-3000:]
    assert "config error at 'model.vocab_size'" in proc.stderr
