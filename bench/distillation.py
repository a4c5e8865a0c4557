"""Knowledge distillation: a student taught by a trained teacher vs the same student from scratch.

On the embedded (demo) corpus: the teacher is model=tiny (d_model 256, 4 blocks) trained
--teacher-steps steps; the student (d_model 128, 2 blocks, 4 heads) trains --student-steps
steps with the same seed, data order and schedule: once from scratch (cross-entropy only)
and once per --variants entry distilled from the teacher (logit KD with the given alpha and
temperature T, optionally plus feature distillation of the student's last block through a learned
128->256 projection). Prints every validation loss and its ratio to the scratch student's
(below 1 = distillation helped), and appends to bench/RESULTS.md.

Then student initialisation (distillation.student_init): a student of the teacher's width (256)
with --init-layers blocks, distilled (alpha 0.5, T 1) for the same --student-steps, once from a
random init and once from evenly spaced teacher blocks + embeddings, final norm and head.

    python bench/distillation.py [--teacher-steps 300] [--student-steps 100] [--seq-len 64] [--batch 8]
                                 [--variants 0.5:1 0.9:1 0.5:2 0.5:1:feature] [--init-layers 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import record  # noqa: E402

from vishwamai.training_v2 import compose_config, run  # noqa: E402

STUDENT = ["model.d_model=128", "model.n_layers=2", "model.n_heads=4"]
# + feature distillation of the student's last block through a learned 128 -> 256 projection.
FEATURE = ["distillation.feature_distillation.enabled=true", "distillation.feature_distillation.layers=[1]",
           "distillation.feature_distillation.loss_weight=0.1"]


def train(overrides: list[str], run_dir: Path) -> dict:
    start = time.perf_counter()
    summary = run(compose_config(overrides, run_dir=str(run_dir)))
    summary["seconds"] = time.perf_counter() - start
    print(f"  {run_dir.name}: val loss {summary['final_val_loss']:.4f} in {summary['seconds']:.0f} s", flush=True)
    return summary


def variant_overrides(spec: str, teacher: Path) -> list[str]:
    """'alpha:T' or 'alpha:T:feature' -> distillation overrides."""
    alpha, temperature, *extra = spec.split(":")
    return ["distillation.enabled=true", f"distillation.teacher_model.path={teacher}",
            f"distillation.teacher_model.alpha={alpha}", f"distillation.teacher_model.temperature={temperature}",
            *(FEATURE if extra == ["feature"] else [])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--student-steps", type=int, default=100)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--variants", nargs="*", default=["0.5:1", "0.9:1", "0.5:2", "0.5:1:feature"],
                    help="distilled students as alpha:T or alpha:T:feature")
    ap.add_argument("--init-layers", type=int, default=2,
                    help="blocks of the teacher-width student in the student_init comparison (0 = skip it)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    common = [f"data.seq_len={args.seq_len}", f"training.batch_size={args.batch}", f"training.optimizer.lr={args.lr}",
              "training.scheduler.warmup_steps=30", "training.eval_every_n_steps=0", "training.eval_batches=20",
              "training.progress_bar=false", "monitoring.enabled=false", "checkpointing.save_best=false",
              f"training.device={args.device}"]
    with tempfile.TemporaryDirectory(prefix="bench_distill_") as tmp:
        root = Path(tmp)
        teacher = train(["model=tiny", f"training.max_steps={args.teacher_steps}", *common], root / "teacher")
        student = [*STUDENT, f"training.max_steps={args.student_steps}", *common]
        scratch = train(student, root / "scratch")
        distilled = {spec: train([*student, *variant_overrides(spec, root / "teacher")], root / spec.replace(":", "_"))
                     for spec in args.variants}
        wide = [f"model.n_layers={args.init_layers}", f"training.max_steps={args.student_steps}", *common,
                *variant_overrides("0.5:1", root / "teacher")]
        inits = {init: train([*wide, f"distillation.student_init={init}"], root / f"init_{init}")
                 for init in ("random", "teacher_layers")} if args.init_layers else {}
    base = scratch["final_val_loss"]
    rows = [f"| {spec} | {s['final_val_loss']:.4f} | {s['final_val_loss'] / base:.3f} | {s['seconds']:.0f} s |"
            for spec, s in distilled.items()]
    record("Distillation: distilled vs scratch student", [
        f"teacher: model=tiny ({teacher['num_parameters']:,} parameters), {args.teacher_steps} steps, "
        f"val loss {teacher['final_val_loss']:.4f}",
        f"student: d_model 128, 2 blocks ({scratch['num_parameters']:,} parameters), {args.student_steps} steps, "
        f"batch {args.batch} x seq {args.seq_len}, lr {args.lr}; same seed and data order in every student run",
        "",
        "| student (alpha:T[:feature]) | val loss (nats/token) | ratio to scratch | train time |",
        "|---|---|---|---|",
        f"| from scratch | {base:.4f} | 1.000 | {scratch['seconds']:.0f} s |",
        *rows,
    ])
    if inits:
        rand, taught = inits["random"]["final_val_loss"], inits["teacher_layers"]["final_val_loss"]
        record("Distillation: student initialised from teacher layers vs random", [
            f"student: the teacher's width (256), {args.init_layers} blocks "
            f"({inits['random']['num_parameters']:,} parameters), distilled alpha 0.5 T 1, {args.student_steps} "
            f"steps; teacher blocks used: {inits['teacher_layers'].get('student_init_teacher_blocks')}",
            "",
            "| distillation.student_init | val loss (nats/token) | ratio to random |",
            "|---|---|---|",
            f"| random | {rand:.4f} | 1.000 |",
            f"| teacher_layers | {taught:.4f} | {taught / rand:.3f} |",
        ])


if __name__ == "__main__":
    main()
