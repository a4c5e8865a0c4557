"""The body of each KFP component (components/ only forwards its artifacts here).

A component runs in the project's image, so everything it needs is imported from the
installed package; the functions take artifact *paths* (and the Metrics artifact, duck-typed:
anything with `log_metric`) so they also run, and are tested, without KFP.

Artifacts between stages:
  model    a lean model directory (lean_model): the weights and model config of the run's chosen model
           (best, else latest, else final; a pruning run's pruned/), plus the run's config.yaml,
           metrics.jsonl, summary.json and report - no optimizer state, TensorBoard events, MLflow store
           or second copy.  Training runs in a scratch run directory beside it.  The quantized model is
           the directory vishwamai.compress writes.  (A Hugging Face export of the last Model artifact
           is a later step reading this directory.)
  dataset  the token cache of the corpus (data.cache_dir), built by `prepare`: later stages reuse it
  corpus   optional: the user's text (a file or folder, brought in with dsl.importer): data.path

Errors: a user error (bad override, missing corpus, unusable teacher) ends the component with exit
code 2 and one line naming the culprit (user_errors), never a traceback; `prepare` checks every
stage's config before any training starts, and runs without retries.

Overrides: the pipeline's common `overrides` first, then each stage's own settings (steps, teacher,
sparsity), which win: Hydra applies overrides left to right.
"""

from __future__ import annotations

import base64
import contextlib
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol

from vishwamai.run_files import CONFIG_FILE, METRICS_FILE, REPORT_MD, REPORT_PNG, SUMMARY_FILE


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


# Files of a run directory a later stage (or a person) needs besides the model itself.
RUN_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, REPORT_MD, REPORT_PNG)
# Files of a checkpoint only resuming needs; the manifest is rewritten for what is copied.
TRAINING_ONLY = ("trainer_state.pt", "manifest.json")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A user's mistake ends the component with exit code 2 and one line, not a traceback."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from vishwamai.errors import VishwamaiError, report_user_error

    try:
        yield
    except (HydraException, OmegaConfBaseException, VishwamaiError) as e:
        raise SystemExit(report_user_error(e)) from None


def data_overrides(dataset_dir: str, corpus: Optional[str]) -> list[str]:
    """The token cache and, when the user brought one, the corpus (placed last: they win)."""
    return [f"data.cache_dir={dataset_dir}", *([f"data.path={corpus}"] if corpus else [])]


def train(overrides: list[str], model_out: str, dataset_dir: str, corpus: Optional[str] = None) -> dict[str, Any]:
    """`python -m vishwamai.training_v2 *overrides` in a scratch run directory, data cached in dataset_dir;
    the chosen model and the run's records then go to model_out (lean_model).

    training.resume=auto, as every pod command here: a run directory that already holds checkpoints is
    continued, never refused (the multi-node job's, on a shared volume, does survive a restart)."""
    from vishwamai.training_v2 import compose_config, run

    scratch = tempfile.mkdtemp(prefix="vishwamai-run-")
    try:
        with user_errors():
            summary = run(compose_config([*overrides, *data_overrides(dataset_dir, corpus), "training.resume=auto"],
                                         run_dir=scratch))
        lean_model(scratch, model_out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return summary


def lean_model(run_dir: str, out: str) -> Path:
    """What the next stage needs from a run: its model's files (no optimizer state) with a fresh manifest,
    and the run's config, metrics, summary and report."""
    from vishwamai.checkpoint.manifest import write_manifest

    source, dest = Path(model_dir(run_dir)), Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    step = read_step(source)
    for f in source.iterdir():
        if f.is_file() and f.name not in TRAINING_ONLY:
            shutil.copy2(f, dest / f.name)
    for name in RUN_FILES:
        if (Path(run_dir) / name).is_file():
            shutil.copy2(Path(run_dir) / name, dest / name)
    write_manifest(dest, step, required=["model.safetensors", "model_config.json"])
    return dest


def read_step(model: Path) -> int:
    import json

    try:
        return int(json.loads((model / "manifest.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def prepare(stage_overrides: dict[str, list[str]], dataset_out: str, corpus: Optional[str] = None,
            teacher: Optional[str] = None) -> dict[str, Any]:
    """The quick first step: every stage's config composed and validated, the teacher (if given) checked,
    and the corpus tokenised once into dataset_out.  Any user error ends it with exit code 2."""
    from vishwamai.data import load_token_data
    from vishwamai.errors import VishwamaiError
    from vishwamai.kubeflow.launch import check_config
    from vishwamai.training_v2 import compose_config

    data = data_overrides(dataset_out, corpus)
    with user_errors():
        for stage, overrides in stage_overrides.items():
            error = check_config([*overrides, *data])
            if error:
                raise VishwamaiError(f"{stage} stage: {error}")
        if teacher is not None:
            model_dir(teacher)  # CheckpointError naming the path when it is no model
        first = next(iter(stage_overrides.values()))
        tokens = load_token_data(compose_config([*first, *data], run_dir=tempfile.mkdtemp()).data)
    return {"tokens": len(tokens.train) + len(tokens.val), "vocab_size": tokens.vocab_size}


def log_summary(metrics: MetricsSink, summary: dict[str, Any]) -> None:
    for key in SUMMARY_METRICS:
        value = summary.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            metrics.log_metric(key, float(value))
    if isinstance(summary.get("final_val_loss"), float):
        metrics.log_metric("val_perplexity", math.exp(min(summary["final_val_loss"], 50.0)))


def pretrain_overrides(overrides: list[str], model_preset: str, steps: int) -> list[str]:
    return [*overrides, f"model={model_preset}", f"training.max_steps={steps}"]


def distill_overrides(overrides: list[str], student_overrides: list[str], steps: int,
                      teacher: Optional[str] = None) -> list[str]:
    """`teacher` None: the settings without the teacher's path (what prepare can check before it exists)."""
    return [*overrides, *student_overrides, *(["distillation.enabled=true",
                                                f"distillation.teacher_model.path={model_dir(teacher)}"]
                                               if teacher else []), f"training.max_steps={steps}"]


def prune_overrides(overrides: list[str], target_sparsity: float, steps: int, student: Optional[str] = None
                    ) -> list[str]:
    return [*overrides, *([f"training.init_from={model_dir(student)}"] if student else []),
            f"training.max_steps={steps}", "distillation.pruning.enabled=true",
            f"distillation.pruning.target_sparsity={target_sparsity}", "distillation.pruning.begin_step=0",
            f"distillation.pruning.end_step={steps}"]


def stage_checks(overrides: list[str], model_preset: str, pretrain_steps: int, student_overrides: list[str],
                 distill_steps: int, target_sparsity: float, prune_steps: int, skip_pretrain: bool = False
                 ) -> dict[str, list[str]]:
    """Each training stage's overrides as far as they are known before it runs (for `prepare`)."""
    checks = {"pretrain": pretrain_overrides(overrides, model_preset, pretrain_steps),
              "distill": distill_overrides(overrides, student_overrides, distill_steps),
              "prune": prune_overrides(overrides, target_sparsity, prune_steps)}
    if skip_pretrain:
        del checks["pretrain"]
    return checks


def pretrain(overrides: list[str], model_preset: str, steps: int, model_out: str, dataset_out: str,
             metrics: MetricsSink, corpus: Optional[str] = None) -> dict[str, Any]:
    """The teacher: a model of preset `model_preset` trained from scratch."""
    summary = train(pretrain_overrides(overrides, model_preset, steps), model_out, dataset_out, corpus)
    log_summary(metrics, summary)
    return summary


def distill(overrides: list[str], student_overrides: list[str], steps: int, teacher: str, dataset: str,
            student_out: str, metrics: MetricsSink, corpus: Optional[str] = None) -> dict[str, Any]:
    """A smaller student (architecture from student_overrides, e.g. model.n_layers=2) taught by `teacher`."""
    with user_errors():
        stage = distill_overrides(overrides, student_overrides, steps, teacher)
    summary = train(stage, student_out, dataset, corpus)
    log_summary(metrics, summary)
    return summary


def prune(overrides: list[str], target_sparsity: float, steps: int, student: str, dataset: str,
          pruned_out: str, metrics: MetricsSink, corpus: Optional[str] = None) -> dict[str, Any]:
    """Fine-tune the student while the pruning schedule takes it to target_sparsity by the last step."""
    with user_errors():
        stage = prune_overrides(overrides, target_sparsity, steps, student)
    summary = train(stage, pruned_out, dataset, corpus)
    log_summary(metrics, summary)
    return summary


def run_data_config(run_dir: str, dataset_dir: str, corpus: Optional[str] = None):
    """The data settings `run_dir` trained with (seq_len, corpus...), reading the token cache in dataset_dir
    and the corpus where this pod has it."""
    import dataclasses

    from omegaconf import OmegaConf

    from vishwamai.config import DataConfig

    recorded = OmegaConf.to_container(OmegaConf.load(Path(run_dir) / CONFIG_FILE).data)
    known = {f.name for f in dataclasses.fields(DataConfig)}
    here = {"cache_dir": dataset_dir, **({"path": corpus} if corpus else {})}
    return DataConfig(**{**{k: v for k, v in recorded.items() if k in known}, **here})


def log_numbers(metrics: MetricsSink, tree: Any) -> None:
    for name, value in flatten_numbers(tree):
        metrics.log_metric(name, value)


def quantize(mode: str, calibration_steps: int, pruned: str, dataset: str, quantized_out: str,
             metrics: MetricsSink, corpus: Optional[str] = None) -> dict[str, Any]:
    """Post-training int8 quantization of the pruned model, calibrated on the pruned run's data."""
    from vishwamai.compress.quantize import quantize_model_dir

    report = quantize_model_dir(model_dir(pruned), quantized_out, mode, calibration_steps,
                                run_data_config(pruned, dataset, corpus))
    log_numbers(metrics, report)
    return report


def export(quantized: str, pruned: str, dtype: str, exported_out: str) -> str:
    """The pipeline's final model as a Hugging Face directory (vishwamai.export): the quantized model's
    weights dequantized to `dtype`, with the tokenizer of the run it came from (the pruned run's
    config.yaml travels in its lean Model artifact; the quantized artifact carries no run files)."""
    from vishwamai.hf.export import export as export_hf, run_tokenizer

    with user_errors():  # KFP creates the output artifact's directory empty: export() accepts that
        return str(export_hf(quantized, exported_out, dtype, tokenizer=run_tokenizer(Path(model_dir(pruned)))))


def evaluate(models: dict[str, str], dataset: str, output_dir: str, metrics: MetricsSink, report_md: str,
             report_html: str, corpus: Optional[str] = None) -> dict[str, Any]:
    """Compare the stages' models on the same validation windows (loss, perplexity, size, latency).

    KFP metrics `<model>_<figure>`; a Markdown report (the comparison table, then each training
    stage's run report); an HTML page with the comparison plot and each stage's training curves.
    The data settings are those of the first model with a recorded run config (the teacher's, or the
    student's when the teacher was brought in), so every model sees the windows it trained on.
    """
    from vishwamai.evaluate import evaluate_models

    out = Path(output_dir)
    recorded = [path for path in models.values() if (Path(path) / CONFIG_FILE).is_file()]
    data_cfg = run_data_config(recorded[0], dataset, corpus)
    results = evaluate_models({name: model_dir(path) for name, path in models.items()}, out, data_cfg)
    log_numbers(metrics, results["models"])
    sections, plots = [(out / "evaluation.md").read_text()], [out / "evaluation.png"]
    for name, path in models.items():
        if (Path(path) / METRICS_FILE).is_file():  # a training stage's run directory
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
    for name in (METRICS_FILE, SUMMARY_FILE):
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


def pretrain_job(overrides: list[str], model_preset: str, steps: int, job: dict[str, Any], model_out: str,
                 metrics: MetricsSink, corpus: Optional[str] = None, timeout_s: float = 172800,
                 apis: Optional[tuple] = None, poll_s: float = 10.0) -> dict[str, Any]:
    """The teacher trained by a multi-node PyTorchJob (vishwamai.kubeflow.pytorchjob): `job` is the job without
    its training overrides; the user's corpus, if any, is copied onto the shared volume first."""
    import json

    from vishwamai.errors import VishwamaiError
    from vishwamai.kubeflow import pytorchjob as pj
    from vishwamai.kubeflow.launch import check_config

    name = job["metadata"]["name"]
    stage = pretrain_overrides(overrides, model_preset, steps)
    if corpus:  # the job's pods see only the shared volume, not this pod's artifacts
        shared = Path(pj.run_dir(name)).parent / "corpus" / Path(corpus).name
        if not shared.exists():
            copy = shutil.copytree if Path(corpus).is_dir() else shutil.copy2
            shared.parent.mkdir(parents=True, exist_ok=True)
            copy(corpus, shared)
        stage.append(f"data.path={shared}")
    with user_errors():
        error = check_config(stage)
        if error:
            raise VishwamaiError(f"pretrain stage: {error}")
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        replica["template"]["spec"]["containers"][0]["args"].extend(stage)
    custom, core = apis or pj.kubernetes_apis()
    pj.run_job(custom, core, job, timeout_s, poll_s)
    lean_model(pj.run_dir(name), model_out)
    summary = json.loads((Path(model_out) / SUMMARY_FILE).read_text())
    log_summary(metrics, summary)
    return summary
