"""distributed.strategy=data_parallel: every rank holds the whole model (DDP).

Each rank trains on its own slice of the global batch (SequenceSampler gives rank r
the r-th slice of the same seeded draw), DDP averages the gradients in buckets of
distributed.bucket_cap_mb while the backward pass runs, and every rank applies the
same update.  Options: bf16 gradient compression (a DDP communication hook) and
ZeRO stage 1 (distributed.zero_optimizer: each rank keeps 1/world of the optimizer state).
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from vishwamai.config import VishwamaiConfig
from vishwamai.distributed.group import ProcessGroupParallelism, choose_backend
from vishwamai.errors import ConfigError


class DataParallel(ProcessGroupParallelism):
    def __init__(self, cfg: VishwamaiConfig):
        d = cfg.distributed
        if d.bf16_grad_compression and choose_backend(cfg) != "nccl":
            # torch's bf16 hook runs on NCCL only (Gloo has no bf16 all-reduce path for it).
            raise ConfigError("distributed.bf16_grad_compression", "needs the nccl backend (GPUs); "
                                                                   "set it false for a CPU/gloo run")
        super().__init__(cfg)
        self.bucket_cap_mb = d.bucket_cap_mb
        self.bf16_grad_compression = d.bf16_grad_compression
        self.shards_optimizer = d.zero_optimizer

    def describe(self) -> str:
        extras = [name for name, on in (("bf16 gradient compression", self.bf16_grad_compression),
                                        ("ZeRO optimizer", self.shards_optimizer)) if on]
        return super().describe() + "".join(f", {e}" for e in extras)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        device_ids = [self.local_rank] if self.backend == "nccl" else None
        ddp = DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=self.bucket_cap_mb)
        if self.bf16_grad_compression:
            # Gradients travel as bf16 (half the bytes) and are cast back to fp32.
            ddp.register_comm_hook(state=None, hook=default_hooks.bf16_compress_hook)
        return ddp

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        if not self.shards_optimizer:
            return optimizer
        # The same optimizer class, groups and hyper-parameters; each rank keeps the
        # state of (and updates) only its share of the parameters, then broadcasts them.
        cls = type(optimizer)
        accepted = inspect.signature(cls.__init__).parameters
        # `defaults` may hold derived entries the constructor does not take.
        kwargs = {k: v for k, v in optimizer.defaults.items() if k in accepted}
        groups = [dict(g) for g in optimizer.param_groups]
        return ZeroRedundancyOptimizer(groups, optimizer_class=cls, **kwargs)

    def accumulation_context(self, model: torch.nn.Module, is_last_micro_batch: bool):
        # Gradients of earlier micro-batches accumulate locally; only the last
        # backward of the step all-reduces them.
        return contextlib.nullcontext() if is_last_micro_batch else model.no_sync()
