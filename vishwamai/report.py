"""A run's report: RUN_DIR/report.png (loss, lr, throughput and batch-size curves from
metrics.jsonl) and RUN_DIR/report.md (summary.json and the last logged figures).

    python -m vishwamai.report RUN_DIR        (or: vishwamai-report RUN_DIR)

`write_report(run_dir)` is the same for Python callers (training_v2 at the end of a
run, the Kubeflow evaluate step).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from vishwamai.errors import DataError
from vishwamai.monitoring.logger import TIME_KEY
from vishwamai.run_files import METRICS_FILE, REPORT_MD, REPORT_PNG, SUMMARY_FILE

# (panel title, y label, metrics.jsonl keys drawn in it)
PANELS = (
    ("Loss", "nats/token", ("loss", "val_loss")),
    ("Learning rate", "lr", ("lr",)),
    ("Throughput", "tokens/s", ("tokens_per_s",)),
    ("Batch size", "sequences", ("global_batch_size", "batch_size", "micro_batch_size")),
)
SUMMARY_ROWS = (
    ("final validation loss", "final_val_loss"), ("best validation loss", "best_val_loss"),
    ("final train loss", "final_train_loss"), ("steps", "steps"), ("tokens", "tokens"),
    ("tokens/s", "tokens_per_s"), ("parameters", "num_parameters"), ("train time (s)", "train_time_s"),
    ("wall time (s)", "wall_time_s"), ("world size", "world_size"), ("skipped steps", "skipped_steps"),
    ("final checkpoint", "final_checkpoint"), ("best checkpoint", "best_checkpoint"),
    ("TensorBoard", "tensorboard_dir"), ("MLflow", "mlflow_run"),
)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise DataError(f"{path}: no metrics.jsonl (is {run_dir} a run directory?)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise DataError(f"{path} is empty: the run logged no step")
    return records


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    # The object API with the Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (name, ylabel, keys) in zip(fig.subplots(2, 2).flat, PANELS):
        for key in keys:
            steps, values = series(records, key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
        ax.set(title=name, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    fig.suptitle(title)
    fig.savefig(path)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown(run_dir: Path, summary: dict[str, Any], last: dict[str, Any], png: Path) -> str:
    lines = [f"# Run report: {run_dir.name}", "", f"![curves]({png.name})", "", "## Summary", "",
             "| | |", "|---|---|"]
    lines += [f"| {label} | {_fmt(summary[key])} |" for label, key in SUMMARY_ROWS if summary.get(key) is not None]
    when = (datetime.fromtimestamp(last[TIME_KEY], timezone.utc).strftime(", logged %Y-%m-%d %H:%M:%S UTC")
            if TIME_KEY in last else "")
    if summary.get("sample") is not None:  # training.sample_prompt: what the trained model writes
        fence = "~~~~"  # not ``` : the sample may contain backticks itself
        lines += ["", f"## Sample (prompt {summary.get('sample_prompt', '')!r})", "", fence + "text",
                  f"{summary.get('sample_prompt', '')}{summary['sample']}", fence]
    lines += ["", f"## Last logged step ({last['step']}{when})", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in last.items()
              if key not in ("step", TIME_KEY) and value is not None]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, summary: Optional[dict[str, Any]] = None) -> dict[str, Path]:
    """Draw report.png and write report.md in run_dir; returns {"png": ..., "markdown": ...}.

    summary defaults to run_dir/summary.json (absent: the table lists the metrics only)."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if summary is None:
        path = run_dir / SUMMARY_FILE
        summary = json.loads(path.read_text()) if path.is_file() else {}
    png, md = run_dir / REPORT_PNG, run_dir / REPORT_MD
    plot(records, png, title=str(run_dir.resolve()))
    md.write_text(markdown(run_dir, summary, records[-1], png))
    return {"png": png, "markdown": md}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="vishwamai-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (holds metrics.jsonl)")
    args = parser.parse_args(argv)
    try:
        paths = write_report(args.run_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for path in paths.values():
        print(path)


if __name__ == "__main__":
    main()
