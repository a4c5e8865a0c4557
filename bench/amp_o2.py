"""amp.opt_level O2 against O1 (same dtype): peak memory and tokens/s, side by side, with the ratio.

O2 keeps the model's matrices in amp.dtype and float32 master weights in the optimizer; O1
keeps float32 weights and autocasts.  Each run is a fresh subprocess (its peak memory is its
own: RSS on CPU, torch's peak allocated bytes on a GPU), O1 and O2 interleaved over rounds.

    python bench/amp_o2.py [--model small] [--steps 8] [--rounds 2] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import interleave, median, record, spread  # noqa: E402
from scaling import child  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="small")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    common = [f"model={args.model}", f"training.batch_size={args.batch_size}", "data.seq_len=256",
              "amp.enabled=true", f"amp.dtype={args.dtype}"]
    results = interleave({level: (lambda level=level: child(common + [f"amp.opt_level={level}"], args.steps))
                          for level in ("O1", "O2")}, args.rounds)
    memory_key = "peak_cuda_mb" if results["O1"][0].get("peak_cuda_mb") is not None else "peak_rss_mb"
    fig = {level: {"tps": median([r["tokens_per_s"] for r in runs]), "mem": median([r[memory_key] for r in runs])}
           for level, runs in results.items()}
    memory = "peak GPU memory allocated MB" if memory_key == "peak_cuda_mb" else "peak RSS MB (whole process)"
    lines = [f"model={args.model} ({results['O1'][0]['params'] / 1e6:.1f}M parameters), {args.dtype}, "
             f"batch {args.batch_size} x 256 tokens, {args.steps} steps, {args.rounds} rounds", "",
             f"| opt_level | tokens/s (median, ±half-range) | {memory} |", "|---|---|---|"]
    for level, runs in results.items():
        lines.append(f"| {level} | {spread([r['tokens_per_s'] for r in runs])} | {fig[level]['mem']:,.0f} |")
    lines += ["", f"- O2 / O1 tokens/s: **{fig['O2']['tps'] / fig['O1']['tps']:.3f}**",
              f"- O2 / O1 {memory}: **{fig['O2']['mem'] / fig['O1']['mem']:.3f}**"]
    record(f"amp O2 vs O1 ({args.model}, {args.dtype})", lines)


if __name__ == "__main__":
    main()
