"""Activation checkpointing (training.activation_checkpointing) on/off: peak memory and speed.

Each variant trains in a fresh process (the trainer as a user runs it), so its peak resident memory
(ru_maxrss: weights, gradients, AdamW state and activations) is its own; on CUDA the peak of
torch.cuda.max_memory_allocated is reported too.  Speed is tokens/s over the steps after warm-up.
The variants alternate (off, on, off, on...) so drift on a shared machine hits both alike.

    python bench/activation_checkpointing.py [--models small 125M] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import median, record  # noqa: E402

TMP = Path("/tmp/vishwamai_bench/activation_checkpointing")
# model -> (seq_len, batch, warm-up steps, measured steps): 125M is slow on a CPU, so fewer, shorter.
SHAPES = {"small": (256, 8, 1, 4), "125M": (256, 4, 1, 2)}


def child(model: str, checkpointing: bool) -> None:
    """One training run; prints its figures as a JSON line."""
    import torch

    from vishwamai.train.events import Callback
    from vishwamai.training_v2 import compose_config, run

    seq, batch, warmup, steps = SHAPES[model]

    class Clock(Callback):
        def __init__(self):
            self.marks: list[float] = []

        def on_step_end(self, trainer) -> None:
            self.marks.append(time.perf_counter())
            trainer.should_stop = trainer.state.step >= warmup + steps

    device = "cuda" if torch.cuda.is_available() else "cpu"
    overrides = [f"model={model}", f"data.seq_len={seq}", f"training.batch_size={batch}",
                 f"training.max_steps={warmup + steps + 1}", "training.eval_every_n_steps=0",
                 "training.eval_batches=1", "training.progress_bar=false", f"training.device={device}",
                 "monitoring.enabled=false", "checkpointing.save_best=false",
                 f"training.activation_checkpointing={str(checkpointing).lower()}"]
    if device == "cpu":
        overrides.append("training.num_threads=1")
    clock = Clock()
    run(compose_config(overrides, run_dir=str(TMP / f"run{time.monotonic_ns()}")), extra_callbacks=[clock])
    marks = clock.marks[warmup - 1:] if warmup else clock.marks
    out = {"tokens_per_s": seq * batch * (len(marks) - 1) / (marks[-1] - marks[0]),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out), flush=True)


def measure(model: str, checkpointing: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", model, str(int(checkpointing))], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {model} activation_checkpointing={checkpointing}: {result}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--child", nargs=2)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], bool(int(args.child[1])))
    memory_key = "peak_rss_mb"
    lines = []
    for model in args.models:
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for _ in range(args.rounds):
            for flag in (False, True):
                runs[flag].append(measure(model, flag))
        if "peak_cuda_mb" in runs[False][0]:
            memory_key = "peak_cuda_mb"
        off, on = ({k: median([r[k] for r in runs[f]]) for k in runs[f][0]} for f in (False, True))
        seq, batch, warmup, steps = SHAPES[model]
        mem, tps = (off[memory_key], on[memory_key]), (off["tokens_per_s"], on["tokens_per_s"])
        lines.append(f"| {model} (seq {seq}, batch {batch}, {steps} steps) | {mem[0]:,.0f} | {mem[1]:,.0f} | "
                     f"**{mem[1] / mem[0]:.2f}x** | {tps[0]:,.0f} | {tps[1]:,.0f} | **{tps[1] / tps[0]:.2f}x** |")
    what = "peak CUDA MB allocated" if memory_key == "peak_cuda_mb" else "peak RSS MB (whole process)"
    header = [f"| model | {what}, off | on | memory ratio | tokens/s, off | on | speed ratio |",
              "|---|---|---|---|---|---|---|"]
    record(f"activation checkpointing, {args.rounds} round(s)",
           header + lines + [f"\nOne fresh process per variant; load average {os.getloadavg()[0]:.1f} at the end."])


if __name__ == "__main__":
    main()
