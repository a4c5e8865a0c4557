"""Process groups and model wrapping. The trainer talks to one `Parallelism` object.

The single-process implementation (distributed/base.py) is what a laptop run uses; DDP
(distributed/ddp.py) and FSDP (distributed/fsdp.py) implement the same small
interface, so the loop never branches on the strategy.  Processes are started by
torchrun (or by `python -m vishwamai.training_v2 distributed.world_size=N`, which
re-runs itself through torch's elastic launcher: distributed/launch.py).
"""

from __future__ import annotations

import os

from vishwamai.config import VishwamaiConfig
from vishwamai.distributed.base import (TEARDOWN_LIMIT_S, Parallelism, arm_teardown_watchdog, bound_failing_exit,
                                        bounded_teardown, prepare_teardown)
from vishwamai.errors import ConfigError


def build_parallelism(cfg: VishwamaiConfig) -> Parallelism:
    strategy = cfg.distributed.strategy
    if strategy == "none":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:  # N independent copies would train the same thing into one run directory
            raise ConfigError("distributed.strategy", f"none, but the launcher started {world} processes "
                                                      "(WORLD_SIZE); use data_parallel or model_parallel")
        return Parallelism()
    if strategy == "data_parallel":
        from vishwamai.distributed.ddp import DataParallel

        return DataParallel(cfg)
    from vishwamai.distributed.fsdp import FullyShardedParallel

    return FullyShardedParallel(cfg)


__all__ = ["TEARDOWN_LIMIT_S", "Parallelism", "arm_teardown_watchdog", "bound_failing_exit", "bounded_teardown",
           "build_parallelism", "prepare_teardown"]
