"""`python -m vishwamai.tune --worker CONFIG.yaml`: one extra worker on a shared study.

The main process writes CONFIG.yaml (its resolved config, storage made explicit) and
starts tuning.n_jobs-1 of these; each takes trials from the study until its budget is
spent.  To add workers on other machines, point them at the same tuning.storage and
tuning.study_name instead (any `python -m vishwamai.training_v2 tuning.enabled=true ...`).
"""

from __future__ import annotations

import argparse
import sys

from omegaconf import OmegaConf

from vishwamai.config import VishwamaiConfig
from vishwamai.errors import EXIT_NON_RETRYABLE, VishwamaiError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vishwamai.tune")
    parser.add_argument("--worker", required=True, metavar="CONFIG", help="resolved config written by the main process")
    args = parser.parse_args(argv)
    from vishwamai.training_v2 import run  # an entry point, like training_v2's own: it hands the recipe down
    from vishwamai.tune import run_tuning

    cfg = OmegaConf.merge(OmegaConf.structured(VishwamaiConfig), OmegaConf.load(args.worker))
    try:
        run_tuning(cfg, run, role="worker")
    except VishwamaiError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NON_RETRYABLE
    return 0


if __name__ == "__main__":
    sys.exit(main())
