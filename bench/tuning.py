"""Tuning backends: Ray's per-trial overhead against Optuna's on the same 4-trial study, and
population-based training against random search at equal compute (best validation loss).

    python bench/tuning.py [--steps 40] [--pbt-steps 120]

Overhead: each study runs the same 4 trials (fixed learning rates, no pruning) of the tiny model;
per-trial overhead = (study wall time - the trials' own training time) / 4.  Ray's figure excludes
starting the local Ray instance (reported apart: paid once per study, not per trial).
PBT vs random: both on Ray, 4 trials x --pbt-steps steps, 2 at a time; the same initial samples
(sampler seed), PBT perturbing lr and weight decay every quarter of the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _harness import record  # noqa: E402

TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64", "data.seq_len=32",
        "data.embedded_max_bytes=200000", "training.batch_size=4", "training.eval_batches=2",
        "training.log_every_n_steps=10", "training.progress_bar=false", "monitoring.enabled=false",
        "tuning.enabled=true", "tuning.pruner=none", "tuning.sampler=random", "tuning.sampler_seed=0",
        "++tuning.search_space={model.dropout_rate: null}"]
FIXED = ("tuning.enqueue_trials=[{training.optimizer.lr: 3e-3, training.optimizer.weight_decay: 0.1}, "
         "{training.optimizer.lr: 1e-3, training.optimizer.weight_decay: 0.0}, "
         "{training.optimizer.lr: 3e-4, training.optimizer.weight_decay: 0.05}, "
         "{training.optimizer.lr: 1e-4, training.optimizer.weight_decay: 0.2}]")


def study(overrides: list[str], run_dir: Path) -> tuple[float, dict]:
    from vishwamai import training_v2

    start = time.perf_counter()
    summary = training_v2.study(training_v2.compose_config(TINY + overrides, run_dir=str(run_dir)))
    return time.perf_counter() - start, summary


def train_time(summary: dict) -> float:
    return sum(json.loads((Path(t["run_dir"]) / "summary.json").read_text())["train_time_s"]
               for t in summary["trials"])


def overhead(tmp: Path, steps: int) -> list[str]:
    import ray

    common = [f"training.max_steps={steps}", f"training.eval_every_n_steps={steps // 2}", "tuning.num_trials=4",
              "tuning.n_jobs=1", FIXED]
    optuna_s, optuna_summary = study(common + ["tuning.framework=optuna"], tmp / "optuna")
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - start
    ray_s, ray_summary = study(common + ["tuning.framework=ray"], tmp / "ray")
    per_trial = {name: (wall - train_time(s)) / 4 for name, wall, s in
                 (("optuna", optuna_s, optuna_summary), ("ray", ray_s, ray_summary))}
    return [f"4-trial study of the tiny model, {steps} steps a trial, 1 trial at a time:",
            f"- Optuna: {optuna_s:.1f} s, per-trial overhead {per_trial['optuna']:.2f} s",
            f"- Ray: {ray_s:.1f} s (+ {ray_init_s:.1f} s to start the local Ray instance), "
            f"per-trial overhead {per_trial['ray']:.2f} s",
            f"- Ray / Optuna per-trial overhead: **{per_trial['ray'] / per_trial['optuna']:.2f}**; "
            f"study wall time (Ray without its start): **{ray_s / optuna_s:.2f}**"]


def pbt_vs_random(tmp: Path, steps: int) -> list[str]:
    every = steps // 12
    common = [f"training.max_steps={steps}", f"training.eval_every_n_steps={every}", "tuning.num_trials=4",
              "tuning.n_jobs=2", "tuning.framework=ray", "training.scheduler.name=constant",
              "++tuning.search_space={model.dropout_rate: null, "
              "training.optimizer.lr: {type: log_float, low: 1.0e-5, high: 3.0e-3}}"]
    results = {}
    for name, extra in (("random", []), ("pbt", ["tuning.pruner=pbt", f"tuning.pbt.perturbation_interval={every * 3}",
                                                 "tuning.pbt.quantile_fraction=0.5"])):
        wall, summary = study(common + extra, tmp / name)
        results[name] = (summary["best_value"], wall, len(summary.get("exploits", [])))
    (r_best, r_wall, _), (p_best, p_wall, exploits) = results["random"], results["pbt"]
    return [f"4 trials x {steps} steps each (equal compute), 2 at a time, same initial samples (seed 0):",
            f"- random search: best validation loss {r_best:.4f} ({r_wall:.0f} s)",
            f"- PBT (every {every * 3} steps, {exploits} exploits): best validation loss {p_best:.4f} ({p_wall:.0f} s)",
            f"- PBT / random best validation loss: **{p_best / r_best:.3f}** (< 1: PBT found a better model)"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--pbt-steps", type=int, default=120)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lines = overhead(Path(tmp), args.steps) + [""] + pbt_vs_random(Path(tmp), args.pbt_steps)
    record("tuning backends", lines)


if __name__ == "__main__":
    main()
