"""Dynamic batch size: throughput before an out-of-memory, right after the shrink, and after growing back.

One run (plain mode, the default; a small model, so per-step costs make small batches slow even
on CPU): batch 32; after --phase-steps measured steps one forward raises torch.OutOfMemoryError
(a transient failure, as when another process briefly holds the memory); the batch shrinks
32 -> 4 (shrink_factor 0.125), the step is redone with the same samples, and the batch grows back
4 -> 8 -> 16 -> 32 (growth_factor 2; back to the size that failed only after twice the stable
steps). Prints median tokens/s per phase and the ratios to the phase before the failure.

    python bench/dynamic_batch.py [--stable-steps 6] [--phase-steps 8] [--rounds 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _harness import record  # noqa: E402

from vishwamai.train.events import Callback  # noqa: E402
from vishwamai.training_v2 import compose_config, run  # noqa: E402

SEQ, BATCH, WARMUP = 64, 32, 3


class TransientOOM(Callback):
    """The first forward of step `step` fails with out-of-memory; later tries succeed."""

    def __init__(self, step: int):
        self.step, self.fired = step, False

    def on_train_start(self, trainer):
        trainer.raw_model.register_forward_pre_hook(lambda module, args: self._maybe_fail(trainer, module))

    def _maybe_fail(self, trainer, module):
        if module.training and not self.fired and trainer.state.step + 1 == self.step:
            self.fired = True
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (injected by the bench)")


def one_round(stable: int, phase_steps: int, device: str) -> dict:
    oom_step = WARMUP + phase_steps + 1
    # 32 -> 4 at oom_step; 4 -> 8 -> 16 after s stable steps each; 16 -> 32 after 2s (32 failed once).
    regrown = oom_step + 4 * stable
    max_steps = regrown + phase_steps
    overrides = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", f"data.seq_len={SEQ}",
                 f"training.batch_size={BATCH}", f"training.max_steps={max_steps}", "training.eval_every_n_steps=0",
                 "training.eval_batches=1", "training.log_every_n_steps=1", "training.progress_bar=false",
                 "training.num_threads=1", "monitoring.enabled=false", f"training.device={device}",
                 "dynamic_batch_size.enabled=true", f"dynamic_batch_size.initial_batch_size={BATCH}",
                 f"dynamic_batch_size.target_batch_size={BATCH}", "dynamic_batch_size.min_batch_size=4",
                 "dynamic_batch_size.shrink_factor=0.125", f"dynamic_batch_size.stable_steps={stable}"]
    run_dir = Path("/tmp/vishwamai_bench") / f"dynamic_batch_{time.monotonic_ns()}"
    summary = run(compose_config(overrides, run_dir=str(run_dir)), extra_callbacks=[TransientOOM(oom_step)])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    def phase(first: int, last: int) -> dict:
        rows = [r for r in records if first <= r["step"] <= last]
        return {"steps": f"{first}-{last}" if last > first else str(first),
                "batch": "/".join(str(b) for b in sorted({r["batch_size"] for r in rows})),
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows)}

    return {
        "phases": {"before the OOM": phase(WARMUP + 1, oom_step - 1),
                   "the failed step, redone (micro-batch 4)": phase(oom_step, oom_step),
                   "right after the shrink": phase(oom_step + 1, oom_step + stable),
                   "after growing back": phase(regrown + 1, max_steps)},
        "events": [(c["step"], c["reason"], c["batch_size"]) for c in summary["dynamic_batch_size"]["changes"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stable-steps", type=int, default=6)
    parser.add_argument("--phase-steps", type=int, default=8, help="steps measured before the failure")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    rounds = [one_round(args.stable_steps, args.phase_steps, args.device) for _ in range(args.rounds)]
    names = list(rounds[0]["phases"])
    tps = {name: [r["phases"][name]["tokens_per_s"] for r in rounds] for name in names}
    before = statistics.median(tps[names[0]])
    lines = [f"size changes (step, reason, batch): {rounds[0]['events']}", "",
             "| phase | steps | batch | tokens/s (median of rounds; per round) | ratio to before |",
             "|---|---|---|---|---|"]
    for name in names:
        p, m = rounds[0]["phases"][name], statistics.median(tps[name])
        per_round = ", ".join(f"{v:,.0f}" for v in tps[name])
        lines.append(f"| {name} | {p['steps']} | {p['batch']} | {m:,.0f} ({per_round}) | {m / before:.2f} |")
    lines += ["", f"{args.rounds} rounds. The failed step is redone on all its {BATCH} samples "
                  "(batch column), split into micro-batches of 4."]
    record(f"dynamic batch: throughput through an out-of-memory shrink and regrowth "
           f"(stable_steps={args.stable_steps})", lines)


if __name__ == "__main__":
    main()
