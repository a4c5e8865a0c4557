"""torchrun with vishwamai's exit codes.

    python -m vishwamai.distributed.torchrun [torchrun options] -m vishwamai.training_v2 [overrides]

takes exactly torchrun's arguments and runs torchrun's own code in this process; only the exit code
differs.  torchrun exits 1 whatever happened: a worker's config error (2), a preemption (SIGTERM:
its workers save a checkpoint and exit 75) and a crash all look alike.  Here a SIGTERM to the
launcher gives 75 (retry with training.resume=auto), a worker's 2 stays 2, and another failure gives
the failing worker's code (vishwamai/distributed/launch.py: run_agent).

A Kubeflow PyTorchJob uses `python -m vishwamai.kubeflow.launch` instead: the Training Operator's
`restartPolicy: ExitCode` retries only 128-255, so there preemption leaves as 128 + its code.
"""

from __future__ import annotations

import sys
from typing import Optional

from vishwamai.distributed.launch import run_agent


def main(argv: Optional[list[str]] = None) -> int:
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_agent(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
