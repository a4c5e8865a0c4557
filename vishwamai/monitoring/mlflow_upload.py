"""Upload a finished run directory to MLflow: `python -m vishwamai.monitoring.mlflow_upload RUN_DIR
[--tracking-uri URI]` (what a run says to do when MLflow did not finish in time; see mlflow_sink)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vishwamai.run_files import CONFIG_FILE, METRICS_FILE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vishwamai.monitoring.mlflow_upload", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tracking-uri", help="default: the one the run used (RUN_DIR/mlflow_pending.json)")
    args = parser.parse_args(argv)
    for name in (CONFIG_FILE, METRICS_FILE):
        if not (args.run_dir / name).is_file():
            print(f"error: {args.run_dir / name} not found: not a run directory", file=sys.stderr)
            return 2
    from vishwamai.monitoring.mlflow_sink import upload

    run_id = upload(args.run_dir, args.tracking_uri)
    print(f"uploaded {args.run_dir} as MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
