"""The body of each KFP component (components/ only forwards its artifacts here).

A component runs in the project's image, so everything it needs is imported from the
installed package; the functions take artifact *paths* (and the Metrics artifact, duck-typed:
anything with `log_metric`) so they also run, and are tested, without KFP.

Artifacts between stages:
  model    a run directory (config.yaml, metrics.jsonl, summary.json, checkpoints/final) for the
           trained stages; a model directory written by vishwamai.compress for the quantized one
  dataset  the token cache of the corpus (data.cache_dir): later stages reuse it, no re-tokenising

Overrides: the pipeline's common `overrides` first, then each stage's own settings (steps, teacher,
sparsity), which win: Hydra applies overrides left to right.
"""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any, Protocol


class MetricsSink(Protocol):
    def log_metric(self, metric: str, value: float) -> None: ...


# Summary keys worth showing in the KFP UI (numbers only; the rest stays in summary.json).
SUMMARY_METRICS = ("final_val_loss", "best_val_loss", "final_train_loss", "steps", "tokens", "tokens_per_s",
                   "train_time_s", "num_parameters")


def model_dir(path: str) -> str:
    """The model a Model artifact stands for: a pruning run's RUN_DIR/pruned/ (its end result, not the
    best checkpoint on the way), else the run's best / latest / final checkpoint, or `path` itself."""
    from vishwamai.checkpoint import find_model_dir
    from vishwamai.compress.measure import is_quantized_dir
    from vishwamai.compress.pruning import PRUNED_DIR

    if (Path(path) / PRUNED_DIR / "model_config.json").is_file():
        return str(Path(path) / PRUNED_DIR)
    return path if is_quantized_dir(path) else str(find_model_dir(path))


def train(overrides: list[str], run_dir: str, dataset_dir: str) -> dict[str, Any]:
    """`python -m vishwamai.training_v2 *overrides` writing into run_dir, data cached in dataset_dir."""
    from vishwamai.training_v2 import compose_config, run

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return run(compose_config([*overrides, f"data.cache_dir={dataset_dir}"], run_dir=run_dir))


def log_summary(metrics: MetricsSink, summary: dict[str, Any]) -> None:
    for key in SUMMARY_METRICS:
        value = summary.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            metrics.log_metric(key, float(value))
    if isinstance(summary.get("final_val_loss"), float):
        metrics.log_metric("val_perplexity", math.exp(min(summary["final_val_loss"], 50.0)))


def pretrain(overrides: list[str], model_preset: str, steps: int, model_out: str, dataset_out: str,
             metrics: MetricsSink) -> dict[str, Any]:
    """The teacher: a model of preset `model_preset` trained from scratch."""
    summary = train([*overrides, f"model={model_preset}", f"training.max_steps={steps}"], model_out, dataset_out)
    log_summary(metrics, summary)
    return summary


def distill(overrides: list[str], student_overrides: list[str], steps: int, teacher: str, dataset: str,
            student_out: str, metrics: MetricsSink) -> dict[str, Any]:
    """A smaller student (architecture from student_overrides, e.g. model.n_layers=2) taught by `teacher`."""
    summary = train([*overrides, *student_overrides, "distillation.enabled=true",
                     f"distillation.teacher_model.path={model_dir(teacher)}", f"training.max_steps={steps}"],
                    student_out, dataset)
    log_summary(metrics, summary)
    return summary


def prune(overrides: list[str], target_sparsity: float, steps: int, student: str, dataset: str,
          pruned_out: str, metrics: MetricsSink) -> dict[str, Any]:
    """Fine-tune the student while the pruning schedule takes it to target_sparsity by the last step."""
    summary = train([*overrides, f"training.init_from={model_dir(student)}", f"training.max_steps={steps}",
                     "distillation.pruning.enabled=true", f"distillation.pruning.target_sparsity={target_sparsity}",
                     "distillation.pruning.begin_step=0", f"distillation.pruning.end_step={steps}"],
                    pruned_out, dataset)
    log_summary(metrics, summary)
    return summary


def run_data_config(run_dir: str, dataset_dir: str):
    """The data settings `run_dir` trained with (seq_len, corpus...), reading the token cache in dataset_dir."""
    import dataclasses

    from omegaconf import OmegaConf

    from vishwamai.config import DataConfig

    recorded = OmegaConf.to_container(OmegaConf.load(Path(run_dir) / "config.yaml").data)
    known = {f.name for f in dataclasses.fields(DataConfig)}
    return DataConfig(**{**{k: v for k, v in recorded.items() if k in known}, "cache_dir": dataset_dir})


def log_numbers(metrics: MetricsSink, tree: Any) -> None:
    for name, value in flatten_numbers(tree):
        metrics.log_metric(name, value)


def quantize(mode: str, calibration_steps: int, pruned: str, dataset: str, quantized_out: str,
             metrics: MetricsSink) -> dict[str, Any]:
    """Post-training int8 quantization of the pruned model, calibrated on the pruned run's data."""
    from vishwamai.compress.quantize import quantize_model_dir

    report = quantize_model_dir(model_dir(pruned), quantized_out, mode, calibration_steps,
                                run_data_config(pruned, dataset))
    log_numbers(metrics, report)
    return report


def evaluate(models: dict[str, str], dataset: str, output_dir: str, metrics: MetricsSink, report_md: str,
             report_html: str) -> dict[str, Any]:
    """Compare the stages' models on the same validation windows (loss, perplexity, size, latency).

    KFP metrics `<model>_<figure>`; a Markdown report (the comparison table, then each training
    stage's run report); an HTML page with the comparison plot and each stage's training curves.
    The data settings are the first model's (the teacher's) run, so every model sees the windows
    it trained on.
    """
    from vishwamai.evaluate import evaluate_models

    out = Path(output_dir)
    data_cfg = run_data_config(next(iter(models.values())), dataset)
    results = evaluate_models({name: model_dir(path) for name, path in models.items()}, out, data_cfg)
    log_numbers(metrics, results["models"])
    sections, plots = [(out / "evaluation.md").read_text()], [out / "evaluation.png"]
    for name, path in models.items():
        if (Path(path) / "metrics.jsonl").is_file():  # a training stage's run directory
            run_report = training_report(path, out / name)
            body = run_report["markdown"].read_text().split("\n", 1)[1]  # minus its title
            body = "\n".join(line for line in body.splitlines() if not line.startswith("!["))  # plots go to HTML
            sections.append(f"## {name}: training\n{body}\n")
            plots.append(run_report["png"])
    markdown = "\n".join(sections)
    Path(report_md).write_text(markdown)
    Path(report_html).write_text(html_report(markdown, plots))
    return results


def training_report(run_dir: str, out: Path) -> dict[str, Path]:
    """vishwamai.report's curves and summary of a run, written into `out` (input artifacts stay untouched)."""
    import shutil

    from vishwamai.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "summary.json"):
        if (Path(run_dir) / name).is_file():
            shutil.copy(Path(run_dir) / name, out / name)
    return write_report(out)


def flatten_numbers(tree: Any, prefix: str = "") -> list[tuple[str, float]]:
    """[(a_b_c, value)] for every finite number in nested dicts/lists (KFP metrics are flat)."""
    if isinstance(tree, dict):
        return [kv for k, v in tree.items() for kv in flatten_numbers(v, f"{prefix}{k}_")]
    if isinstance(tree, list):
        return [kv for i, v in enumerate(tree) for kv in flatten_numbers(v, f"{prefix}{i}_")]
    if isinstance(tree, (int, float)) and not isinstance(tree, bool) and math.isfinite(tree):
        return [(prefix.rstrip("_"), float(tree))]
    return []


def html_report(markdown: str, plots: list[Path]) -> str:
    """A self-contained page (the KFP UI shows HTML artifacts inline): the plots, then the report text."""
    import html

    images = "".join(f'<p><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
                     f"</p>" for p in plots if p.is_file())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>vishwamai evaluation</title></head>"
            f"<body>{images}<pre>{html.escape(markdown)}</pre></body></html>")
