"""Export a trained, pruned or quantized vishwamai model as a Hugging Face model directory.

    python -m vishwamai.export SRC --output DIR [--dtype float32|bfloat16|float16]
    vishwamai-export SRC --output DIR

SRC: a run directory (its best, else latest, else final checkpoint), a checkpoint directory,
RUN_DIR/pruned or RUN_DIR/quantized (int8 weights are written dequantized, in --dtype).
DIR then loads with transformers.AutoModelForCausalLM.from_pretrained(DIR).  See vishwamai/hf/export.py.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from vishwamai.errors import VishwamaiError, report_user_error


def main(argv: Optional[list[str]] = None) -> int:
    from vishwamai.hf.export import DTYPES, export

    parser = argparse.ArgumentParser(prog="python -m vishwamai.export", description=__doc__.split("\n")[0])
    parser.add_argument("source", metavar="SRC", help="run, checkpoint, pruned/ or quantized/ directory")
    parser.add_argument("--output", required=True, help="new directory for the Hugging Face model")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    args = parser.parse_args(argv)
    try:
        path = export(args.source, args.output, args.dtype)
    except VishwamaiError as e:
        return report_user_error(e)
    print(f"exported {args.source} -> {path} ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
