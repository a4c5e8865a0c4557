"""The command of a PyTorchJob / TrainJob pod: torchrun, with exit codes Kubernetes can act on.

    python -m vishwamai.kubeflow.launch [hydra overrides ...]

Runs `torchrun -m vishwamai.training_v2 [overrides]` with torchrun's settings taken from the
environment the operator sets (PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR,
PET_MASTER_PORT; PET_MAX_RESTARTS with an elastic policy), so the pod runs the same overrides
as a laptop run.  Two things differ from plain torchrun:

* The config is composed and validated once here, before any process starts: a misspelt key
  or a bad value ends the pod with EXIT_NON_RETRYABLE (2) instead of Hydra's 1.
* The exit code.  torchrun exits 1 whatever its workers returned, and the Training Operator's
  `restartPolicy: ExitCode` reads 1-127 as permanent and 128-255 as retryable.  Here a worker's
  2 (bad config, bad data, a NaN run: a retry cannot fix it) stays 2, and every other failure
  - a crash, a peer that died, preemption (the worker saved a checkpoint and exited
  EXIT_PREEMPTED), a signal - leaves with 128 + its code, so the operator restarts the pod and
  `training.resume=auto` continues from the last checkpoint.  A SIGTERM to the pod (node drain,
  preemption) is forwarded by torchrun to the workers, which checkpoint and stop.
"""

from __future__ import annotations

import sys
from typing import Iterable, Optional

from vishwamai.training_v2 import EXIT_NON_RETRYABLE

RETRYABLE_BASE = 128


def pod_exit_code(worker_codes: Iterable[int]) -> int:
    """One exit code for the pod from its workers' (negative = killed by that signal)."""
    codes = [c for c in worker_codes if c != 0]
    if not codes:
        return 0
    if EXIT_NON_RETRYABLE in codes:
        return EXIT_NON_RETRYABLE
    code = codes[0]
    return RETRYABLE_BASE + (-code if code < 0 else code % RETRYABLE_BASE)


def check_config(overrides: list[str]) -> Optional[str]:
    """The error a worker would hit while composing/validating the config, or None."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from vishwamai.config import validate
    from vishwamai.errors import VishwamaiError
    from vishwamai.training_v2 import compose_config

    try:
        validate(compose_config(overrides, run_dir="/tmp/vishwamai-config-check"))
    except (HydraException, OmegaConfBaseException, VishwamaiError) as e:
        return str(e)
    return None


def main(argv: Optional[list[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    overrides = list(sys.argv[1:] if argv is None else argv)
    error = check_config(overrides)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_NON_RETRYABLE
    try:
        run(parse_args(["--module", "vishwamai.training_v2", *overrides]))
    except ChildFailedError as e:
        code = pod_exit_code(f.exitcode for f in e.failures.values())
        print(f"error: workers failed ({e.get_first_failure()[1].message}); pod exit code {code} "
              f"({'permanent' if code < RETRYABLE_BASE else 'retryable'})", file=sys.stderr)
        return code
    except SignalException as e:  # the pod itself was told to stop: workers have checkpointed
        return RETRYABLE_BASE + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
