"""Read ahead (data.prefetch) on/off: the trainer's tokens/s and the time its loop waits for data.

The corpus is a generated text file large enough (--corpus-mb, tokens.bin twice that) that its
randomly placed windows are real disk reads: the token file is dropped from the page cache
(posix_fadvise DONTNEED) before every run.  Two shapes: the tiny model (compute-bound on a CPU)
and a very small model with a large batch, whose steps are short next to their reads (the
situation of a fast accelerator).  "data wait" is the time the loop spends in window_ids + gather
per step (measured by a wrapper installed at on_train_start); read ahead moves the reads into a
background thread, so that wait is what it can hide.

    python bench/prefetch.py [--steps 20] [--rounds 2] [--corpus-mb 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _harness import interleave, median, record, spread  # noqa: E402

from vishwamai.train.events import Callback  # noqa: E402
from vishwamai.training_v2 import compose_config, run  # noqa: E402

TMP = Path("/tmp/vishwamai_bench/prefetch")
WARMUP = 3
SHAPES = {  # name -> overrides
    "tiny, batch 8": ["model=tiny", "training.batch_size=8"],
    "d_model 64 x 2 layers, batch 64": ["model=tiny", "model.d_model=64", "model.n_layers=2", "model.n_heads=2",
                                        "training.batch_size=64"],
}


class Timed:
    """The loop's sampler, timing the calls the loop makes (window_ids, gather)."""

    def __init__(self, sampler):
        self.sampler, self.wait_s = sampler, 0.0

    def __getattr__(self, name):
        return getattr(self.sampler, name)

    def _timed(self, fn, *args):
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.wait_s += time.perf_counter() - start

    def window_ids(self, n):
        return self._timed(self.sampler.window_ids, n)

    def gather(self, ids):
        return self._timed(self.sampler.gather, ids)


class Clock(Callback):
    def __init__(self, stop_after: int):
        self.stop_after, self.marks, self.waits = stop_after, [], []

    def on_train_start(self, trainer) -> None:
        trainer.sampler = Timed(trainer.sampler)

    def on_step_end(self, trainer) -> None:
        self.marks.append(time.perf_counter())
        self.waits.append(trainer.sampler.wait_s)
        trainer.should_stop = trainer.state.step >= self.stop_after


def corpus(mb: int) -> Path:
    path = TMP / f"corpus_{mb}mb.txt"
    if not path.exists():
        TMP.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        words = np.array([f"w{i}" for i in range(5000)])
        with open(path, "w") as fh:
            while fh.tell() < mb * 2**20:
                fh.write(" ".join(rng.choice(words, 100_000)) + "\n")
    return path


def drop_page_cache(cache_dir: Path) -> None:
    for tokens in cache_dir.glob("*/tokens.bin"):
        with open(tokens, "rb") as fh:
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def trainer(shape: list[str], prefetch: int, steps: int, text: Path) -> dict:
    cache = TMP / "cache"
    overrides = [*shape, f"data.path={text}", f"data.cache_dir={cache}", "data.seq_len=256",
                 f"data.prefetch={prefetch}",
                 f"training.max_steps={steps + WARMUP + 1}", "training.eval_every_n_steps=0",
                 "training.eval_batches=1", "training.progress_bar=false", "training.device=cpu",
                 "training.num_threads=1", "monitoring.enabled=false", "checkpointing.save_best=false"]
    cfg = compose_config(overrides, run_dir=str(TMP / f"run{time.monotonic_ns()}"))
    if cache.exists():
        drop_page_cache(cache)
    clock = Clock(stop_after=steps + WARMUP)
    run(cfg, extra_callbacks=[clock])
    marks, waits = clock.marks[WARMUP - 1:], clock.waits[WARMUP - 1:]
    span = marks[-1] - marks[0]
    tokens = cfg.training.batch_size * 256 * (len(marks) - 1)
    return {"tokens_per_s": tokens / span, "wait_ms": 1000 * (waits[-1] - waits[0]) / (len(marks) - 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--corpus-mb", type=int, default=64)
    args = parser.parse_args()
    text = corpus(args.corpus_mb)
    lines = ["| shape | prefetch=0 tokens/s | data wait ms/step | prefetch=1 tokens/s | data wait ms/step | speed-up |",
             "|---|---|---|---|---|---|"]
    for name, shape in SHAPES.items():
        results = interleave({f"prefetch={d}": (lambda d=d: trainer(shape, d, args.steps, text)) for d in (0, 1)},
                             args.rounds)
        off, on = results["prefetch=0"], results["prefetch=1"]
        tps_off, tps_on = median([r["tokens_per_s"] for r in off]), median([r["tokens_per_s"] for r in on])
        lines.append(f"| {name} | {spread([r['tokens_per_s'] for r in off])} | "
                     f"{median([r['wait_ms'] for r in off]):.2f} | {spread([r['tokens_per_s'] for r in on])} | "
                     f"{median([r['wait_ms'] for r in on]):.2f} | **{tps_on / tps_off:.3f}x** |")
    lines.append(f"\n{args.corpus_mb} MB corpus (byte tokens, uint16), token file dropped from the page cache before "
                 f"each run; seq 256, one thread, {WARMUP} warm-up steps; load average {os.getloadavg()[0]:.1f}.")
    record(f"read ahead (data.prefetch), {args.steps} steps x {args.rounds} rounds", lines)


if __name__ == "__main__":
    main()
