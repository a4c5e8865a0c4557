"""The loss levers of training.compile and training.loss_chunk_rows, side by side (train/loss.py).

One training step (forward, cross-entropy, backward, clipping, fused AdamW) of the tiny architecture
at a given vocabulary, batch 8 x 256, as the Trainer runs it:
  eager                     lm_loss(model), the whole float32 logits
  eager, chunked            lm_loss(model, chunk_rows): lm_head + cross-entropy a block of rows at a time
  compiled model            torch.compile(model), the loss eager (training.compile before this change;
                            still what a callback that reads the outputs, e.g. distillation, gets)
  compiled model+loss       torch.compile(lm_loss): one graph (training.compile now)
  compiled model+loss, chunked
Variants interleaved in one process; tokens/s, and the step's memory: the highest RSS sampled (every
2 ms) during the measured steps above the RSS before them (the whole-run peak RSS would mostly show
compilation).

    python bench/loss.py [--vocab 32000] [--steps 5] [--rounds 3] [--chunk-rows 1024] [--amp] [--only V ...]
"""

from __future__ import annotations

import argparse
import gc
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import psutil
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _harness import interleave, median, record, throughput_table  # noqa: E402

from vishwamai.config import ModelConfig, OptimizerConfig  # noqa: E402
from vishwamai.model import Transformer  # noqa: E402
from vishwamai.train.loss import lm_loss  # noqa: E402
from vishwamai.train.optim import build_optimizer  # noqa: E402

SEQ, BATCH, WARMUP = 256, 8, 3


class RssPeak:
    """Highest RSS above the starting RSS while the `with` block runs, in MB."""

    def __enter__(self):
        gc.collect()
        self.proc, self.stop = psutil.Process(), threading.Event()
        self.start = self.top = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.top = max(self.top, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.mb = (self.top - self.start) / 2**20


def variant(vocab: int, steps: int, compile_what: str, chunk_rows: int, amp: bool) -> Callable[[], dict]:
    """A model and optimizer of their own, warmed up (compiled) now; each call measures `steps` steps."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab, d_model=256, n_layers=4, n_heads=4, max_seq_len=SEQ))
    opt = build_optimizer(model, OptimizerConfig())
    inputs, targets = torch.randint(0, vocab, (BATCH, SEQ)), torch.randint(0, vocab, (BATCH, SEQ))
    step_model = torch.compile(model) if compile_what == "model" else model
    loss_fn = torch.compile(lm_loss) if compile_what == "model+loss" else lm_loss

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(step_model, inputs, targets, chunk_rows)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(WARMUP):
        step()

    def measure() -> dict:
        with RssPeak() as peak:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            seconds = (time.perf_counter() - start) / steps
        return {"tokens_per_s": BATCH * SEQ / seconds, "step_ms": 1000 * seconds, "step_mem_mb": peak.mb}

    return measure


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk-rows", type=int, default=1024)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (amp.enabled=true)")
    parser.add_argument("--only", nargs="+", metavar="VARIANT")
    args = parser.parse_args()
    plans = {"eager": ("", 0), "eager, chunked": ("", args.chunk_rows), "compiled model": ("model", 0),
             "compiled model+loss": ("model+loss", 0), "compiled model+loss, chunked": ("model+loss", args.chunk_rows)}
    plans = {name: plan for name, plan in plans.items() if not args.only or name in args.only}
    variants = {}
    for name, (what, rows) in plans.items():
        print(f"building and warming up {name}", flush=True)
        variants[name] = variant(args.vocab, args.steps, what, rows, args.amp)
    results = interleave(variants, args.rounds)
    tps, lines = throughput_table(results)
    lines[0] += " step memory MB (median) |"
    lines[1] += "---|"
    for i, name in enumerate(results, start=2):
        lines[i] += f" {median([r['step_mem_mb'] for r in results[name]]):.0f} |"
    for name, base in (("compiled model+loss", "compiled model"), ("eager, chunked", "eager"),
                       ("compiled model+loss, chunked", "compiled model+loss")):
        if name in tps and base in tps:
            mem = median([r["step_mem_mb"] for r in results[name]]) / max(
                median([r["step_mem_mb"] for r in results[base]]), 1e-9)
            lines.append(f"- {name} / {base}: tokens/s **{tps[name] / tps[base]:.3f}**, step memory {mem:.2f}")
    mode = "bf16 autocast" if args.amp else "fp32"
    record(f"loss levers (vocab {args.vocab}, {mode}, chunks of {args.chunk_rows} rows), "
           f"{args.steps} steps x {args.rounds} rounds", lines)


if __name__ == "__main__":
    main()
