"""Turn a sharded checkpoint into an ordinary single-file model, in one process.

    python -m vishwamai.distributed.consolidate SHARDED_CHECKPOINT_DIR OUT_DIR

SHARDED_CHECKPOINT_DIR is a checkpoint directory written with sharding
(distributed.strategy=model_parallel, or checkpointing.save_zero_redundancy=true):
it holds model_config.json and shards/.  OUT_DIR receives model.safetensors +
model_config.json, loadable with vishwamai.checkpoint.load_model (no GPUs, no
process group, any number of ranks at save time).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vishwamai.checkpoint.io import read_model_config, save_model
from vishwamai.distributed.checkpoint import load_full_model_state
from vishwamai.errors import VishwamaiError, report_user_error


def consolidate(sharded_dir: str | Path, out_dir: str | Path) -> Path:
    from vishwamai.model import build_model

    cfg = read_model_config(sharded_dir)
    model = build_model(cfg, "cpu")
    load_full_model_state(sharded_dir, model)
    return save_model(out_dir, model, cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sharded_dir", help="checkpoint directory with shards/ and model_config.json")
    parser.add_argument("out_dir", help="where model.safetensors + model_config.json are written")
    args = parser.parse_args(argv)
    try:
        out = consolidate(args.sharded_dir, args.out_dir)
    except VishwamaiError as e:
        return report_user_error(e)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
