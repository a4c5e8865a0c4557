"""Start the processes of a distributed run without torchrun, through torch's elastic launcher.

`python -m vishwamai.training_v2 distributed.strategy=data_parallel distributed.nproc_per_node=4`
(or distributed.world_size=16 distributed.node_rank=K on each of several nodes) runs the
elastic agent in this process; it starts nproc_per_node workers that re-run the same
module with the same overrides, with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* set, exactly as
`torchrun` would.  If a worker fails the agent stops the others and (up to
distributed.max_restarts times) restarts the group.
"""

from __future__ import annotations

import signal
import sys
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from vishwamai.config import VishwamaiConfig, check_device, validate
from vishwamai.distributed.group import launched, uses_cuda
from vishwamai.errors import EXIT_NON_RETRYABLE, EXIT_PREEMPTED, ConfigError


@dataclass
class Layout:
    nnodes: int
    nproc_per_node: int
    node_rank: int


def needs_launch(cfg: VishwamaiConfig) -> bool:
    """A distributed strategy, no launcher around us, and an explicit process count or several GPUs.

    Otherwise (one device or none, no count) the run is a world of one in this process (distributed/group.py)."""
    d = cfg.distributed
    if d.strategy == "none" or launched():
        return False
    several_gpus = uses_cuda(cfg) and torch.cuda.device_count() > 1  # one process per GPU
    return d.world_size is not None or d.nproc_per_node is not None or several_gpus


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


def exit_code_of(failures: Iterable) -> int:
    """The launcher's exit code from its failed workers' (torch's ProcessFailure records).

    2 (config / input error: a retry cannot fix it) wins; then the first other failure in time (the
    root cause: the agent stops the rest, which then save and exit 75); 75 if every worker was
    preempted.  A worker killed by signal N gives 128 + N, as a shell reports it.
    """
    codes = [f.exitcode for f in sorted(failures, key=lambda f: f.timestamp) if f.exitcode]
    if EXIT_NON_RETRYABLE in codes:
        return EXIT_NON_RETRYABLE
    root = next((c for c in codes if c != EXIT_PREEMPTED), EXIT_PREEMPTED if codes else 1)
    return 128 - root if root < 0 else root


def signal_exit_code(signum: int) -> int:
    """The launcher's exit code when it was told to stop: SIGTERM (what Kubernetes sends a pod, or a
    scheduler preempting a job) is preemption, 75, since the workers were forwarded the signal and
    checkpoint; any other signal is 128 + its number."""
    return EXIT_PREEMPTED if signum == signal.SIGTERM else 128 + signum


def run_agent(start: Callable[[], object]) -> int:
    """Run torch's elastic agent (`start`: elastic_launch or torchrun's run) -> the launcher's exit code.

    A failed worker gives exit_code_of() (2 stays non-retryable for Kubernetes restart policies).  On
    SIGTERM the agent forwards the signal to the workers and waits for them
    (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by default) while they save a checkpoint, then raises: the
    launcher exits 75 like a single-process run, not torch's 1.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        start()
    except ChildFailedError as e:
        code = exit_code_of(e.failures.values())
        print(f"error: a worker failed (exit code {code}): {e.get_first_failure()[1].message}", file=sys.stderr)
        return code
    except SignalException as e:
        print(f"stopped by {e.sigval.name}: the workers were told to save a checkpoint and stop; "
              f"rerun with training.resume=auto", file=sys.stderr)
        return signal_exit_code(e.sigval)
    return 0


def launch_workers(cfg: VishwamaiConfig) -> bool:
    """From the CLI: if this run needs its own workers, run them and return True; if they fail or are
    stopped, end this process with run_agent()'s exit code."""
    from hydra.core.hydra_config import HydraConfig

    validate(cfg)
    check_device(cfg)
    if not needs_launch(cfg):
        return False
    hydra_cfg = HydraConfig.get()
    overrides = worker_overrides(list(hydra_cfg.overrides.task), cfg.run_dir, hydra_cfg.runtime.output_dir)
    code = run_agent(lambda: launch(cfg, overrides))
    if code:
        sys.exit(code)
    return True
