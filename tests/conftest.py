"""Shared fixtures: a very small configuration that trains in seconds on 2 CPU cores."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable

import pytest

# Keep each test process to one intra-op thread: tests run beside each other on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY_OVERRIDES = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.max_seq_len=64",
    "data.seq_len=32",
    "data.embedded_max_bytes=200000",
    "training.batch_size=4",
    "training.max_steps=10",
    "training.eval_every_n_steps=5",
    "training.eval_batches=2",
    "training.log_every_n_steps=1",
    "training.progress_bar=false",
    "training.scheduler.warmup_steps=2",
    "monitoring.enabled=false",
]


@pytest.fixture
def tiny_overrides() -> list[str]:
    """Overrides for a tiny, fast run (copy: tests may extend it)."""
    return list(TINY_OVERRIDES)


@pytest.fixture
def tiny_cfg(tmp_path, tiny_overrides):
    from vishwamai.training_v2 import compose_config

    return compose_config(tiny_overrides, run_dir=str(tmp_path / "run"))


@pytest.fixture(scope="session")
def trained_teacher(tmp_path_factory) -> str:
    """A run directory whose model (the tiny config above) was trained 60 steps: a distillation teacher."""
    from vishwamai.training_v2 import compose_config, run

    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    run(compose_config(TINY_OVERRIDES + ["training.max_steps=60", "training.eval_every_n_steps=0",
                                         "training.optimizer.lr=3e-3", "checkpointing.save_best=false"],
                       run_dir=str(run_dir)))
    return str(run_dir)


def _run_module(module: str, *args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          **kwargs)


@pytest.fixture
def run_module() -> Callable[..., subprocess.CompletedProcess]:
    """`run_module(module, *args, **subprocess_kwargs)`: `python -m module args` in a real child process,
    output captured as text (the CLI exactly as a user runs it: Hydra, exit codes, stderr)."""
    return _run_module


class MetricsSink:
    """Records KFP metrics (`log_metric`) as a dict: a stand-in for a component's Output[Metrics]."""

    def __init__(self):
        self.values = {}

    def log_metric(self, name, value):
        self.values[name] = value
