"""torch.compile on/off (training.compile) for the vishwamai trainer, tiny and small models.

Compilation time is reported separately from the steady-state tokens/s it buys.

    python bench/compile.py [--steps 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import interleave, median, record  # noqa: E402
from throughput import vishwamai_trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    tmp = Path("/tmp/vishwamai_bench")
    lines = ["| model | eager tokens/s | compiled tokens/s | speed-up | first compiled run, wall s (compilation included) |",
             "|---|---|---|---|---|"]
    for model in ("tiny", "small"):
        start = time.perf_counter()
        vishwamai_trainer(2, True, tmp, model=model)  # pays the compilation once
        compile_wall = time.perf_counter() - start
        results = interleave({
            "eager": lambda: vishwamai_trainer(args.steps, False, tmp, model=model),
            "compiled": lambda: vishwamai_trainer(args.steps, True, tmp, model=model),
        }, args.rounds)
        eager = median([r["tokens_per_s"] for r in results["eager"]])
        compiled = median([r["tokens_per_s"] for r in results["compiled"]])
        lines.append(f"| {model} | {eager:,.0f} | {compiled:,.0f} | **{compiled / eager:.2f}x** | {compile_wall:.0f} |")
    record(f"torch.compile, {args.steps} steps x {args.rounds} rounds", lines)


if __name__ == "__main__":
    main()
