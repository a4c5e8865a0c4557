"""Tokens/s and memory as model size and sequence length grow; RSS vs corpus size.

Each configuration runs in a fresh subprocess so its peak RSS is its own.

    python bench/scaling.py [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import record  # noqa: E402

CHILD = r"""
import json, resource, sys, torch
from vishwamai.training_v2 import compose_config, run
overrides, run_dir = json.loads(sys.argv[1]), sys.argv[2]
s = run(compose_config(overrides, run_dir=run_dir))
cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
print(json.dumps({"tokens_per_s": s["tokens_per_s"], "params": s["num_parameters"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_cuda_mb": cuda}))
"""
COMMON = ["training.eval_every_n_steps=0", "training.eval_batches=1", "training.progress_bar=false",
          "monitoring.enabled=false"]


def child(overrides: list[str], steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(COMMON + [f"training.max_steps={steps}"]
                                                                       + overrides), tmp],
                             capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def corpus(path: Path, megabytes: int) -> Path:
    """A synthetic text corpus of the given size (no download)."""
    if not path.exists():
        words = [f"w{i}" for i in range(5000)]
        import random

        rng = random.Random(0)
        with path.open("w") as fh:
            while fh.tell() < megabytes * 2**20:
                fh.write(" ".join(rng.choices(words, k=2000)) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    lines = ["**Model size** (batch 4, sequence 256)", "", "| model | parameters | tokens/s | peak RSS MB |",
             "|---|---|---|---|"]
    for model in ("tiny", "small", "125M"):
        extra = [f"model={model}", "training.batch_size=4", "data.seq_len=256"]
        if model == "125M":
            extra.append("model.vocab_size=257")  # byte tokenizer; keeps the count about the blocks
        r = child(extra, args.steps)
        lines.append(f"| {model} | {r['params'] / 1e6:.1f}M | {r['tokens_per_s']:,.0f} | {r['peak_rss_mb']:.0f} |")
    lines += ["", "**Sequence length** (tiny, 4096 tokens per step)", "", "| seq_len | tokens/s | peak RSS MB |",
              "|---|---|---|"]
    for seq in (64, 256, 1024):
        r = child(["model.max_seq_len=1024", f"data.seq_len={seq}", f"training.batch_size={4096 // seq}"], args.steps)
        lines.append(f"| {seq} | {r['tokens_per_s']:,.0f} | {r['peak_rss_mb']:.0f} |")
    lines += ["", "**Corpus size** (tiny; memory-mapped data: RSS must not follow the corpus)", "",
              "| corpus | peak RSS MB |", "|---|---|"]
    rss = {}
    work = Path(tempfile.gettempdir()) / "vishwamai_scaling"
    work.mkdir(exist_ok=True)
    for mb in (1, 100):
        path = corpus(work / f"corpus_{mb}mb.txt", mb)
        # Build the token cache first, in its own process: the run below only maps it.
        child([f"data.path={path}", "training.max_steps=1"], 1)
        rss[mb] = child([f"data.path={path}"], args.steps)["peak_rss_mb"]
        lines.append(f"| {mb} MB | {rss[mb]:.0f} |")
    lines.append(f"\nRSS ratio 100 MB / 1 MB corpus: **{rss[100] / rss[1]:.3f}** (target within 5%: 0.95-1.05)")
    record(f"scaling, {args.steps} steps per configuration", lines)


if __name__ == "__main__":
    main()
