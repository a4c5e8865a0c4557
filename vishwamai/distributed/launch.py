"""Start the processes of a distributed run without torchrun, through torch's elastic launcher.

`python -m vishwamai.training_v2 distributed.strategy=data_parallel distributed.nproc_per_node=4`
(or distributed.world_size=16 distributed.node_rank=K on each of several nodes) runs the
elastic agent in this process; it starts nproc_per_node workers that re-run the same
module with the same overrides, with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* set, exactly as
`torchrun` would.  If a worker fails the agent stops the others and (up to
distributed.max_restarts times) restarts the group.
"""

from __future__ import annotations

import sys
import uuid
from dataclasses import dataclass

import torch
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from vishwamai.config import VishwamaiConfig, validate
from vishwamai.distributed.group import launched, uses_cuda
from vishwamai.errors import ConfigError


@dataclass
class Layout:
    nnodes: int
    nproc_per_node: int
    node_rank: int


def needs_launch(cfg: VishwamaiConfig) -> bool:
    """A distributed strategy, no launcher around us, and an explicit process count."""
    d = cfg.distributed
    return d.strategy != "none" and not launched() and (d.world_size is not None or d.nproc_per_node is not None)


def layout(cfg: VishwamaiConfig) -> Layout:
    d = cfg.distributed
    nproc = d.nproc_per_node
    if nproc is None:
        # One process per GPU on GPU nodes; on CPU a single node runs them all.
        nproc = torch.cuda.device_count() if uses_cuda(cfg) else d.world_size
    world = d.world_size if d.world_size is not None else nproc
    if nproc < 1 or world % nproc:
        raise ConfigError("distributed.nproc_per_node",
                          f"{nproc} processes per node cannot make distributed.world_size={world}")
    nnodes = world // nproc
    if not 0 <= d.node_rank < nnodes:
        raise ConfigError("distributed.node_rank", f"{d.node_rank} is not in [0, {nnodes}) "
                                                   f"(world_size={world}, nproc_per_node={nproc})")
    return Layout(nnodes, nproc, d.node_rank)


def launch(cfg: VishwamaiConfig, overrides: list[str]) -> None:
    """Run `python -m vishwamai.training_v2 *overrides` on this node's workers; raises if one fails."""
    lay = layout(cfg)
    d = cfg.distributed
    config = LaunchConfig(
        min_nodes=lay.nnodes,
        max_nodes=lay.nnodes,
        nproc_per_node=lay.nproc_per_node,
        # Static rendezvous, as `torchrun --nnodes --node_rank --master_addr`: node 0 hosts the store.
        rdzv_backend="static",
        rdzv_endpoint=f"{d.master_addr}:{d.master_port}",
        rdzv_configs={"rank": lay.node_rank},
        run_id=f"vishwamai-{uuid.uuid4().hex[:8]}" if lay.nnodes == 1 else "vishwamai",
        max_restarts=d.max_restarts,
        start_method="spawn",
    )
    elastic_launch(config, entrypoint=sys.executable)("-m", "vishwamai.training_v2", *overrides)


def worker_overrides(task_overrides: list[str], run_dir: str, hydra_dir: str) -> list[str]:
    """The parent's overrides, pinned to the parent's run directory (one for all workers)."""
    kept = [o for o in task_overrides if not o.lstrip("+~").startswith(("run_dir=", "hydra.run.dir="))]
    return kept + [f"run_dir={run_dir}", f"hydra.run.dir={hydra_dir}"]


def launch_workers(cfg: VishwamaiConfig) -> bool:
    """From the CLI: if this run needs its own workers, run them and return True.

    A failed worker ends this process with the worker's exit code (2 stays
    non-retryable for Kubernetes restart policies).
    """
    from hydra.core.hydra_config import HydraConfig
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    validate(cfg)
    if not needs_launch(cfg):
        return False
    hydra_cfg = HydraConfig.get()
    try:
        launch(cfg, worker_overrides(list(hydra_cfg.overrides.task), cfg.run_dir, hydra_cfg.runtime.output_dir))
    except ChildFailedError as e:
        exit_code = next((f.exitcode for f in e.failures.values() if f.exitcode), 1)
        print(f"error: a worker failed (exit code {exit_code}): {e.get_first_failure()[1].message}",
              file=sys.stderr)
        sys.exit(exit_code if exit_code > 0 else 1)
    return True
