"""The cost of each feature when on, as a ratio to the bare trainer (tokens/s), interleaved.

    python bench/features.py [--steps 30] [--rounds 3] [--only monitoring] [--model small --batch 4 --seq 128]

Checkpoint saves are asynchronous; with --steps 49 (10 warm-up steps before) the measured span,
steps 11-59, holds the background writes of the saves at steps 10-50 and ends before the next.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import interleave, median, record, spread  # noqa: E402
import throughput  # noqa: E402
from throughput import vishwamai_trainer  # noqa: E402

FEATURES = {
    "bare trainer": ["monitoring.enabled=false"],
    "monitoring (defaults: TensorBoard + MLflow)": ["monitoring.enabled=true"],
    # The parts of monitoring's cost: the in-process figures and metrics.jsonl, then each backend.
    "monitoring, no backend (figures + metrics.jsonl)": ["monitoring.enabled=true", "monitoring.tensorboard.enabled=false",
                                                         "monitoring.mlflow.enabled=false"],
    "monitoring, TensorBoard only": ["monitoring.enabled=true", "monitoring.mlflow.enabled=false"],
    "monitoring, MLflow only": ["monitoring.enabled=true", "monitoring.tensorboard.enabled=false"],
    "checkpointing every 10 steps": ["checkpointing.every_n_steps=10"],
    "dynamic batch (8 -> 16)": ["dynamic_batch_size.enabled=true", "dynamic_batch_size.initial_batch_size=8",
                                "dynamic_batch_size.target_batch_size=16", "dynamic_batch_size.min_batch_size=4",
                                "dynamic_batch_size.stable_steps=1000"],
    "AMP bf16 autocast (CPU)": ["amp.enabled=true"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="", help="only the features whose name contains this (and the bare trainer)")
    parser.add_argument("--model", default="tiny", help="model preset (e.g. small: 25.8M parameters)")
    parser.add_argument("--batch", type=int, default=throughput.BATCH)
    parser.add_argument("--seq", type=int, default=throughput.SEQ)
    args = parser.parse_args()
    # throughput's trainer and its tokens/s both read these module settings.
    throughput.BATCH, throughput.SEQ = args.batch, args.seq
    tmp = Path("/tmp/vishwamai_bench")
    variants = {name: (lambda extra=extra: vishwamai_trainer(args.steps, False, tmp, extra, model=args.model))
                for name, extra in FEATURES.items() if name == "bare trainer" or args.only in name}
    results = interleave(variants, args.rounds)
    base = median([r["tokens_per_s"] for r in results["bare trainer"]])
    lines = ["| feature on | tokens/s | ratio to bare trainer |", "|---|---|---|"]
    for name, rs in results.items():
        tps = [r["tokens_per_s"] for r in rs]
        lines.append(f"| {name} | {spread(tps)} | {median(tps) / base:.3f} |")
    record(f"feature costs, model={args.model}, batch {args.batch} x {args.seq}, {args.steps} steps x {args.rounds} "
           f"rounds", lines)


if __name__ == "__main__":
    main()
