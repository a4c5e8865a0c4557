"""distributed.strategy=model_parallel: parameters, gradients and optimizer state sharded (FSDP2).

Mapping of model.parallel_factor (F) onto a world of W processes:
  F = 1 (default) or F = W   full sharding: one shard group of all W ranks
                             (each rank holds 1/W of every parameter);
  1 < F < W, W % F == 0      hybrid sharding: a 2-D device mesh (replicate=W/F, shard=F);
                             each parameter is split over the F ranks of a group
                             (consecutive ranks, so a group stays inside a node when
                             F <= nproc_per_node) and the W/F groups are replicas
                             whose gradients are all-reduced.
Each transformer block is its own FSDP unit (gathered just before it runs, freed
after); the root unit holds the embedding, which the tied lm_head shares, so the
tied weight is one sharded parameter.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from vishwamai.config import VishwamaiConfig
from vishwamai.distributed.group import ProcessGroupParallelism
from vishwamai.errors import ConfigError, NotImplementedYet


def shard_group_size(parallel_factor: int, world_size: int) -> int:
    """Ranks a parameter is split over (see the module docstring)."""
    if parallel_factor == 1:
        return world_size
    if parallel_factor > world_size or world_size % parallel_factor:
        raise ConfigError("model.parallel_factor",
                          f"{parallel_factor} must divide the number of processes ({world_size})")
    return parallel_factor


class FullyShardedParallel(ProcessGroupParallelism):
    sharded = True
    shards_optimizer = True
    keeps_master_weights = True

    def __init__(self, cfg: VishwamaiConfig):
        if cfg.amp.enabled and cfg.amp.dtype == "float16":
            # torch.amp.GradScaler decides on inf gradients per rank; with sharded
            # gradients the ranks would disagree (one skips, the others step).
            raise NotImplementedYet("amp.dtype=float16 with distributed.strategy=model_parallel",
                                    "use amp.dtype=bfloat16 (no loss scaling needed)")
        super().__init__(cfg)
        self.shard_size = shard_group_size(cfg.model.parallel_factor, self.world_size)
        self.replicas = self.world_size // self.shard_size
        self.mesh = self._build_mesh()
        # amp O2 under sharding is FSDP2's own mixed precision: the sharded float32 parameters are
        # the master weights the optimizer updates, each unit is gathered in amp.dtype for compute,
        # and gradients are reduced in float32 (train/precision.py then casts nothing itself).
        o2 = cfg.amp.enabled and cfg.amp.opt_level == "O2"
        self.mp_policy = (MixedPrecisionPolicy(param_dtype=getattr(torch, cfg.amp.dtype), reduce_dtype=torch.float32)
                          if o2 else MixedPrecisionPolicy())

    def _build_mesh(self) -> DeviceMesh:
        device_type = self._comm_device.type
        if self.replicas == 1:
            return init_device_mesh(device_type, (self.world_size,), mesh_dim_names=("shard",))
        return init_device_mesh(device_type, (self.replicas, self.shard_size), mesh_dim_names=("replicate", "shard"))

    def describe(self) -> str:
        layout = f"shard groups of {self.shard_size}" + (f" x {self.replicas} replicas" if self.replicas > 1 else "")
        return f"{super().describe()}, {layout}"

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        for block in getattr(model, "blocks", ()):
            fully_shard(block, mesh=self.mesh, mp_policy=self.mp_policy)
        # The rest: embeddings (tied with lm_head), final norm.
        fully_shard(model, mesh=self.mesh, mp_policy=self.mp_policy)
        return model

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model  # fully_shard changes the module in place: no wrapper

    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float) -> float:
        grads = [p.grad for p in params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads, foreach=True)
        if isinstance(total, DTensor):
            total = total.full_tensor()  # the norm over every shard, the same on all ranks
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
        return float(total)

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        # Every rank takes part in gathering; only rank 0 receives the CPU copy.
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
