"""Compression report: compare models (fp32 checkpoints, pruned, quantized) side by side.

    python -m vishwamai.evaluate --model fp32=runs/a --model pruned=runs/a/pruned \
        --model int8=runs/a/quantized --output report/ [--data-path P] [--seq-len N] [--compile]

For each model: weights as stored and how many are non-zero, size of its files on disk,
CPU latency per generated token (greedy, batch 1), validation loss and perplexity on the
same validation windows. Writes OUT/evaluation.json, OUT/evaluation.md (a table) and
OUT/evaluation.png (bars per figure). A directory is a model dir, a run dir (its best /
latest / final checkpoint) or a quantized dir (vishwamai.compress.quantize). --compile runs the
int8 models on the compiled torchao path (vishwamai/compress/compiled.py; falls back, logged).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from vishwamai.checkpoint import read_model_config
from vishwamai.compress.measure import (latency_ms_per_token, perplexity, size_on_disk, stored_weight_counts,
                                        validation_loss)
from vishwamai.compress.storage import is_quantized_dir, load_any, resolve_model_dir
from vishwamai.config import DataConfig
from vishwamai.errors import ConfigError

# (key, column title, format) of the comparison table and plot.
COLUMNS = (
    ("parameters", "weights stored", "{:,}"),
    ("nonzero_parameters", "non-zero", "{:,}"),
    ("size_bytes", "size on disk (bytes)", "{:,}"),
    ("ms_per_token", "CPU ms/token", "{:.3f}"),
    ("val_loss", "val loss (nats)", "{:.4f}"),
    ("val_perplexity", "val perplexity", "{:.2f}"),
)


def evaluate_one(directory: str | Path, data_cfg: DataConfig, eval_batches: int, batch_size: int,
                 compile: bool = False) -> dict[str, Any]:
    from vishwamai.compress.quantize import load_validation
    from vishwamai.hf import with_model_tokenizer

    d = resolve_model_dir(directory)
    model_cfg = read_model_config(d)
    val, seq_len = load_validation(with_model_tokenizer(data_cfg, d), model_cfg)
    model = load_any(d, compile=compile)
    loss = validation_loss(model, val, seq_len, batch_size, eval_batches)
    return {
        "path": str(d),
        "kind": f"int8 {model.int8_kernels}" if is_quantized_dir(d) else "fp32",  # the kernels that ran
        **stored_weight_counts(d),
        "size_bytes": size_on_disk(d),
        "ms_per_token": latency_ms_per_token(model, model_cfg.vocab_size),
        "val_loss": loss,
        "val_perplexity": perplexity(loss),
        "seq_len": seq_len,
    }


def markdown_table(results: dict[str, dict]) -> str:
    header = "| model | kind | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, r in results.items():
        cells = [fmt.format(r[key]) for key, _, fmt in COLUMNS]
        lines.append(f"| {name} | {r['kind']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError as e:
        raise ConfigError("--output", "evaluation.png needs matplotlib: pip install 'vishwamai[monitoring]'") from e

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    keys = [(k, t, f) for k, t, f in COLUMNS if k != "val_perplexity"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2))
    names = list(results)
    for ax, (key, title, fmt) in zip(axes, keys):
        bars = ax.bar(names, [results[n][key] for n in names], color=[f"C{i}" for i in range(len(names))])
        ax.bar_label(bars, fmt=fmt, fontsize=7)  # the figures themselves: close losses look alike as bars
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_models(models: dict[str, str | Path], output_dir: str | Path, data_cfg: Optional[DataConfig] = None,
                    *, eval_batches: int = 8, batch_size: int = 8, compile: bool = False) -> dict[str, Any]:
    """Measure every model the same way; write evaluation.json / .md / .png to output_dir."""
    if not models:
        raise ConfigError("--model", "give at least one NAME=DIR")
    data_cfg = data_cfg or DataConfig()
    results = {name: evaluate_one(d, data_cfg, eval_batches, batch_size, compile) for name, d in models.items()}
    report = {"models": results, "threads": torch.get_num_threads(), "eval_batches": eval_batches,
              "batch_size": batch_size, "data_path": data_cfg.path}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(report, indent=1))
    (out / "evaluation.md").write_text("# Compression report\n\n" + markdown_table(results))
    plot(results, out / "evaluation.png")
    return report


def parse_models(specs: list[str]) -> dict[str, str]:
    models = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError("--model", f"expected NAME=DIR, got {spec!r}")
        if name in models:
            raise ConfigError("--model", f"name {name!r} given twice")
        models[name] = path
    return models


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vishwamai.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--output", required=True)
    parser.add_argument("--data-path", default=None, help="validation text (default: the embedded corpus)")
    parser.add_argument("--seq-len", type=int, default=DataConfig.seq_len)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--compile", action="store_true",
                        help="int8 models on the compiled torchao path (mode dynamic; falls back, logged)")
    args = parser.parse_args(argv)
    from vishwamai.errors import VishwamaiError, report_user_error

    try:
        report = evaluate_models(parse_models(args.model), args.output,
                                 DataConfig(path=args.data_path, seq_len=args.seq_len), eval_batches=args.eval_batches,
                                 compile=args.compile)
    except VishwamaiError as e:
        return report_user_error(e)
    print(markdown_table(report["models"]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
