"""The per-step cost of monitoring: trainer steps/s with monitoring off vs on (defaults:
TensorBoard + MLflow, every training.log_every_n_steps=10 steps), interleaved in one process.

Steps/s is timed between on_step_end events, so it includes the callbacks (grad-group
norms, figures, queueing records) and not just the step; the time spent inside the
monitoring callbacks is also summed directly, and the process CPU time per step (all
threads, so the background writers count) is compared: both are less sensitive than
steps/s to other processes on a shared machine.  The MLflow store is created once
up front (its creation, seconds, is a start-up cost measured separately) so that the timed
window is the steady state.

    python bench/monitoring_overhead.py [--steps 30] [--rounds 3] [--small]

Model: the default config (model=tiny, sequence 256, batch 16); --small: 2 layers, 128 wide,
sequence 128, batch 8, where the fixed per-record cost weighs most.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import interleave, median, record  # noqa: E402

from vishwamai.train.events import Callback  # noqa: E402
from vishwamai.training_v2 import compose_config, run  # noqa: E402

WARMUP = 5
SMALL = ["model.d_model=128", "model.n_layers=2", "model.n_heads=2", "data.seq_len=128", "training.batch_size=8"]


class StepClock(Callback):
    """Times each step end to end, and the time spent inside the monitoring callbacks."""

    def __init__(self):
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # process CPU time, all threads (background writers too)
        self.in_monitoring: list[float] = []  # seconds per step inside monitoring callbacks
        self._spent = 0.0

    def on_train_start(self, trainer) -> None:
        for cb in trainer.callbacks:
            if type(cb).__module__.startswith("vishwamai.monitoring"):
                for event in ("on_step_start", "on_after_backward", "on_step_end"):
                    setattr(cb, event, self._timed(getattr(cb, event)))

    def _timed(self, method):
        def timed(trainer, **kwargs):
            start = time.perf_counter()
            method(trainer, **kwargs)
            self._spent += time.perf_counter() - start
        return timed

    def on_step_end(self, trainer) -> None:  # runs after the monitoring callbacks (added last)
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.process_time())
        self.in_monitoring.append(self._spent)
        self._spent = 0.0


def steps_per_s(steps: int, tmp: Path, extra: list[str]) -> dict:
    """extra: overrides (model size, monitoring on/off)."""
    clock = StepClock()
    overrides = [f"training.max_steps={steps + WARMUP + 1}", "training.eval_every_n_steps=0",
                 "training.eval_batches=1", "training.progress_bar=false", "training.log_every_n_steps=10",
                 "monitoring.report=false", *extra]
    run(compose_config(overrides, run_dir=str(tmp / f"r{time.monotonic_ns()}")), extra_callbacks=[clock])
    # Steps WARMUP..last-1: the last step also evaluates.
    window = clock.times[WARMUP:-1]
    seconds = window[-1] - window[0]
    cpu = clock.cpu_times[WARMUP:-1]
    return {"steps_per_s": (len(window) - 1) / seconds, "cpu_ms_per_step": 1000 * (cpu[-1] - cpu[0]) / (len(cpu) - 1),
            "monitoring_share": sum(clock.in_monitoring[WARMUP + 1:-1]) / seconds}


def store_creation_s(tmp: Path) -> float:
    from mlflow.tracking import MlflowClient

    start = time.perf_counter()
    MlflowClient(tracking_uri=f"sqlite:///{tmp / 'fresh.db'}").search_experiments()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="a small model: the worst case for the ratio")
    args = parser.parse_args()
    tmp = Path("/tmp/vishwamai_bench_monitoring") / str(time.monotonic_ns())
    tmp.mkdir(parents=True)
    import_start = time.perf_counter()
    import mlflow  # noqa: F401

    import_s = time.perf_counter() - import_start
    create_s = store_creation_s(tmp)
    model = SMALL if args.small else []
    uri = f"sqlite:///{tmp / 'fresh.db'}"  # already created: the timed runs see the steady state
    variants = {
        "monitoring off": lambda: steps_per_s(args.steps, tmp, [*model, "monitoring.enabled=false"]),
        "monitoring on (defaults)": lambda: steps_per_s(
            args.steps, tmp, [*model, "monitoring.enabled=true", f"monitoring.mlflow.tracking_uri={uri}"]),
    }
    results = interleave(variants, args.rounds)
    base = median([r["steps_per_s"] for r in results["monitoring off"]])
    base_cpu = median([r["cpu_ms_per_step"] for r in results["monitoring off"]])
    lines = ["| variant | steps/s | ratio to off | CPU ms/step (all threads) | ratio to off "
             "| time in monitoring callbacks |", "|---|---|---|---|---|---|"]
    for name, rs in results.items():
        values = [r["steps_per_s"] for r in rs]
        cpu = median([r["cpu_ms_per_step"] for r in rs])
        share = median([r["monitoring_share"] for r in rs])
        lines.append(f"| {name} | {median(values):.3f} (±{(max(values) - min(values)) / 2 / median(values):.1%}) "
                     f"| {median(values) / base:.3f} | {cpu:.1f} | {cpu / base_cpu:.3f} | {share:.2%} of step time |")
    lines += ["", f"start-up, paid once per run on a background thread: import mlflow {import_s:.1f} s, "
                  f"create a new sqlite store {create_s:.1f} s"]
    size = "small model (2x128, seq 128, batch 8)" if args.small else "default config (tiny, seq 256, batch 16)"
    record(f"monitoring overhead, {size}, {args.steps} steps x {args.rounds} rounds, log every 10 steps", lines)


if __name__ == "__main__":
    main()
