"""The process group every multi-process strategy shares: join it, talk over it, leave it.

Ranks come from the environment torchrun (and Kubeflow's PyTorchJob) sets:
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.  The backend is NCCL when
the run is on GPUs and Gloo on CPUs unless distributed.backend says otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

from vishwamai.config import VishwamaiConfig
from vishwamai.distributed.base import Parallelism, bounded_teardown
from vishwamai.errors import ConfigError

log = logging.getLogger(__name__)

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """True inside a process started by torchrun / the elastic agent / a PyTorchJob pod."""
    return all(key in os.environ for key in LAUNCHER_ENV)


def single_process_note(strategy: str) -> str:
    return (f"distributed.strategy={strategy} in a single process: a world of one runs the same code path but "
            "gains nothing over distributed.strategy=none. For several processes set distributed.nproc_per_node=N "
            "(vishwamai starts them) or run `torchrun --nproc_per_node=N -m vishwamai.training_v2 ...`")


def uses_cuda(cfg: VishwamaiConfig) -> bool:
    requested = cfg.training.device
    return requested == "cuda" or (requested == "auto" and torch.cuda.is_available())


def choose_backend(cfg: VishwamaiConfig) -> str:
    backend = cfg.distributed.backend or ("nccl" if uses_cuda(cfg) else "gloo")
    if backend == "nccl" and not uses_cuda(cfg):
        raise ConfigError("distributed.backend", "nccl needs GPUs; use gloo on CPU (or leave it null: automatic)")
    return backend


class ProcessGroupParallelism(Parallelism):
    """Joins the default process group; collectives for agreement and metrics."""

    def __init__(self, cfg: VishwamaiConfig):
        d = cfg.distributed
        # No launcher around us (a laptop, one GPU, a first try): a world of one, the same code
        # path (DDP/FSDP over one rank), so what works here works on a cluster.
        alone = not launched()
        if alone:
            log.warning(single_process_note(d.strategy))
        self.rank = 0 if alone else int(os.environ["RANK"])
        self.world_size = 1 if alone else int(os.environ["WORLD_SIZE"])
        self.local_rank = 0 if alone else int(os.environ.get("LOCAL_RANK", 0))
        if d.world_size is not None and d.world_size != self.world_size:
            raise ConfigError("distributed.world_size",
                              f"{d.world_size} but the launcher started {self.world_size} processes")
        self.backend = choose_backend(cfg)
        self.strategy = d.strategy
        self._timeout = timedelta(seconds=d.timeout_s)
        self._background_group: dist.ProcessGroup | None = None
        self._comm_device = torch.device("cpu")
        kwargs: dict[str, Any] = {}
        if self.backend == "nccl":
            self._comm_device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self._comm_device)
            kwargs["device_id"] = self._comm_device
        # A finite timeout: a rank stuck in a collective (its peer died without the
        # launcher noticing) raises instead of hanging the job forever.
        if alone:  # an in-process store: no port, no rendezvous
            kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group(self.backend, timeout=self._timeout, **kwargs)
        self._agree_on_run_dir(cfg)

    def _agree_on_run_dir(self, cfg: VishwamaiConfig) -> None:
        # Hydra's default run dir carries a timestamp that may differ by a second
        # between ranks: every rank uses rank 0's.
        holder = [str(cfg.run_dir)]
        dist.broadcast_object_list(holder, src=0)
        cfg.run_dir = holder[0]

    def describe(self) -> str:
        return f"{self.strategy} over {self.world_size} processes ({self.backend})"

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        total = value.detach().clone()
        dist.all_reduce(total)
        return total / self.world_size

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        total = value.detach().clone().to(self._comm_device)
        dist.all_reduce(total)
        return total

    def any(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def background_group(self) -> dist.ProcessGroup:
        # Collectives issued from another thread on the group the training step uses could interleave
        # with the step's own (a deadlock, or a mismatch); torch's advice for async checkpoints is a
        # Gloo group of their own. Created at the first call, which every rank makes at the same point.
        if self._background_group is None:
            self._background_group = dist.new_group(backend="gloo", timeout=self._timeout)
        return self._background_group

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def barrier(self) -> None:
        dist.barrier()

    def shutdown(self, failed: bool = False) -> None:
        if not dist.is_initialized():
            return
        if not failed:  # after an error a peer may never come: no barrier, the group goes now
            self.barrier()  # leave together: no rank tears down while a peer still talks to it
        with bounded_teardown():  # Gloo drains, and a stuck teardown fails instead of hanging
            dist.destroy_process_group()
