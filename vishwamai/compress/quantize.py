"""Post-training int8 quantization of a model's Linear layers (distillation.quantization.*).

    python -m vishwamai.compress.quantize --model RUN_OR_MODEL_DIR --output OUT_DIR \
        [--mode dynamic|weight_only] [--compile] [--calibration-steps N] [--data-path P]

OUT_DIR holds the int8 model (storage.py: safetensors + JSON, nothing pickled) and report.json, the
figures: sizes, fp32 vs int8 validation loss and latency (--compile: of the compiled int8 path, compiled.py).
See int8.py for the kernels and the calibration.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn
from safetensors.torch import save

from vishwamai.checkpoint.io import as_model_config, read_model_config
from vishwamai.compress.int8 import MODES, GramCollector, calibrated_scales, quantize_rows
from vishwamai.compress.measure import latency_ms_per_token, size_on_disk, validation_loss
from vishwamai.compress.storage import (FORMAT, FORMAT_VERSION, is_quantized_dir, load_quantized, resolve_model_dir,
                                        save_quantized)
from vishwamai.config import DataConfig
from vishwamai.errors import CheckpointError, ConfigError
from vishwamai.train.events import ORDER_FEATURE, Callback

QUANTIZED_DIR = "quantized"
REPORT_FILE = "report.json"


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def quantize_state(model: nn.Module, calibration: Iterable[torch.Tensor] = ()) -> tuple[dict, dict]:
    """int8 tensors (+ fp32 rest) for `model`, and the metadata; `calibration`: input id batches."""
    model = model.eval()
    linears = _linears(model)
    collector = GramCollector(linears)
    steps = 0
    try:
        for idx in calibration:
            model(idx)
            steps += 1
    finally:
        collector.close()
    tied = model.lm_head.weight is model.embed.weight
    tensors: dict[str, torch.Tensor] = {}
    done: set[int] = set()
    for name, linear in linears.items():
        if tied and name == "lm_head":
            continue  # stored once, as the embedding below (calibrated as the output head)
        w = linear.weight.float()
        scale = calibrated_scales(w, collector.gram.get(name))
        tensors[f"{name}.weight_int8"], tensors[f"{name}.weight_scale"] = quantize_rows(w, scale), scale
        if linear.bias is not None:
            tensors[f"{name}.bias"] = linear.bias.float()
        done.add(id(linear.weight))
    emb = model.embed.weight.float()
    emb_scale = calibrated_scales(emb, collector.gram.get("lm_head") if tied else None)
    tensors["embed.weight_int8"], tensors["embed.weight_scale"] = quantize_rows(emb, emb_scale), emb_scale
    done.add(id(model.embed.weight))
    fp32 = {name: p.detach().float() for name, p in model.named_parameters() if id(p) not in done}
    tensors.update(fp32)
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "precision": "int8",
        "weight_scheme": "symmetric int8, one fp32 scale per output channel (embedding: per row)",
        "linear_modules": [n for n in linears if not (tied and n == "lm_head")],
        "tied_embeddings": tied, "fp32_tensors": sorted(fp32),
        "calibration_steps": steps,
        "calibration": "per-channel clip ratio minimising output error on calibration activations"
                       if steps else "none (absmax scales)",
    }
    return {k: v.contiguous().cpu() for k, v in tensors.items()}, meta


def fp32_size_bytes(model: nn.Module, model_cfg) -> int:
    """Bytes save_model would write for `model` (weights file + config), without writing it."""
    from vishwamai.checkpoint.io import model_state_for_saving

    config = json.dumps(dataclasses.asdict(as_model_config(model_cfg)), indent=1)
    return len(save(model_state_for_saving(model))) + len(config.encode())


def calibration_batches(val_tokens, seq_len: int, steps: int, batch_size: int = 8, seed: int = 1234):
    """`steps` batches of seeded random windows of the validation split."""
    from vishwamai.data import SequenceSampler

    sampler = SequenceSampler(val_tokens, seq_len, seed)
    for _ in range(steps):
        yield sampler.next_batch(batch_size)[0]


def quantize_and_report(model: nn.Module, model_cfg, output_dir: str | Path, mode: str, calibration_steps: int,
                        val_tokens, seq_len: int, batch_size: int = 8, eval_batches: int = 8,
                        compile: bool = False) -> dict[str, Any]:
    """Quantize `model` into output_dir, reload it from disk, and compare it with the fp32 model.
    `compile`: the int8 figures are those of the compiled path (load_quantized(compile=True))."""
    if mode not in MODES:
        raise ConfigError("distillation.quantization.mode", f"got {mode!r}, expected one of {list(MODES)}")
    model = model.float().cpu().eval()
    start = time.perf_counter()
    tensors, meta = quantize_state(model, calibration_batches(val_tokens, seq_len, calibration_steps, batch_size))
    meta["mode"] = mode
    out = save_quantized(output_dir, tensors, meta, model_cfg)
    quantize_s = time.perf_counter() - start
    qmodel = load_quantized(out, compile=compile)  # measure what was saved, not the in-memory copy
    vocab = as_model_config(model_cfg).vocab_size
    report = {
        "mode": mode, "int8_kernels": qmodel.int8_kernels, "precision": "int8",
        "calibration_steps": meta["calibration_steps"],
        "quantized_model": str(out), "quantize_s": quantize_s,
        "fp32_size_bytes": fp32_size_bytes(model, model_cfg), "quantized_size_bytes": size_on_disk(out),
        "fp32_val_loss": validation_loss(model, val_tokens, seq_len, batch_size, eval_batches),
        "quantized_val_loss": validation_loss(qmodel, val_tokens, seq_len, batch_size, eval_batches),
        "fp32_ms_per_token": latency_ms_per_token(model, vocab),
        "quantized_ms_per_token": latency_ms_per_token(qmodel, vocab),
        "threads": torch.get_num_threads(),
    }
    report["size_ratio"] = report["quantized_size_bytes"] / report["fp32_size_bytes"]
    report["latency_ratio"] = report["quantized_ms_per_token"] / report["fp32_ms_per_token"]
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1))
    return report


def load_validation(data_cfg: Optional[DataConfig], model_cfg):
    """Validation tokens and the window length for `model_cfg` (checks the tokenizer fits the model)."""
    from vishwamai.data import load_token_data

    data_cfg = data_cfg or DataConfig()
    data = load_token_data(data_cfg)
    if data.vocab_size > model_cfg.vocab_size:
        raise ConfigError("data.tokenizer", f"tokenizer vocabulary {data.vocab_size} exceeds the model's "
                                            f"vocab_size {model_cfg.vocab_size}")
    return data.val, min(data_cfg.seq_len, model_cfg.max_seq_len)


def quantize_model_dir(model_dir: str | Path, output_dir: str | Path, mode: str = "dynamic",
                       calibration_steps: int = 100, data_cfg: Optional[DataConfig] = None,
                       compile: bool = False) -> dict[str, Any]:
    """Quantize a saved model (a model dir, or a run dir: its best/latest/final checkpoint)."""
    from vishwamai.checkpoint import load_model
    from vishwamai.hf import with_model_tokenizer

    if mode not in MODES:
        raise ConfigError("mode", f"got {mode!r}, expected one of {list(MODES)}")
    if compile and mode != "dynamic":
        raise ConfigError("compile", f"the compiled int8 path runs mode=dynamic, not {mode!r}")
    if calibration_steps < 0:
        raise ConfigError("calibration_steps", f"must be >= 0, got {calibration_steps}")
    source = resolve_model_dir(model_dir)
    if is_quantized_dir(source):
        raise CheckpointError(f"{source} is already quantized; give the fp32 model it came from")
    model_cfg = read_model_config(source)
    val, seq_len = load_validation(with_model_tokenizer(data_cfg or DataConfig(), source), model_cfg)
    report = quantize_and_report(load_model(source), model_cfg, output_dir, mode, calibration_steps, val, seq_len,
                                 compile=compile)
    report["source_model"] = str(source)
    (Path(output_dir) / REPORT_FILE).write_text(json.dumps(report, indent=1))
    return report


# --------------------------------------------------------------------- callback
class PostTrainingQuantization(Callback):
    """After training: quantize the final model (the pruned one if pruning ran) into RUN_DIR/quantized/."""
    order = ORDER_FEATURE  # with pruning, whose result it quantizes (before the final checkpoint, as before)

    def __init__(self, cfg, run_dir: str | Path, pruning=None):
        self.cfg, self.run_dir, self.pruning = cfg, Path(run_dir), pruning

    def on_train_end(self, trainer) -> None:
        if not trainer.is_main or trainer.summary.get("preempted"):  # preempted: quantize when it resumes and ends
            return
        q, t = self.cfg.distillation.quantization, self.cfg.training
        model, model_cfg = trainer.raw_model, as_model_config(self.cfg.model)
        if self.pruning is not None and self.pruning.final_model is not None:
            model, model_cfg = self.pruning.final_model, self.pruning.final_model_cfg
        report = quantize_and_report(copy.deepcopy(model), model_cfg, self.run_dir / QUANTIZED_DIR, q.mode,
                                     q.calibration_steps, trainer.val_tokens, trainer.sampler.seq_len,
                                     t.batch_size, t.eval_batches)
        trainer.summary.update({k: report[k] for k in (
            "fp32_size_bytes", "quantized_size_bytes", "quantized_val_loss", "fp32_val_loss",
            "fp32_ms_per_token", "quantized_ms_per_token", "quantized_model")})


# -------------------------------------------------------------------------- CLI
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vishwamai.compress.quantize", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model dir, or a run dir (its best/latest/final checkpoint)")
    parser.add_argument("--output", required=True, help="where to write the quantized model")
    parser.add_argument("--mode", default="dynamic", choices=MODES)
    parser.add_argument("--compile", action="store_true",
                        help="measure the int8 model on the compiled torchao path (mode dynamic; falls back, logged)")
    parser.add_argument("--calibration-steps", type=int, default=100)
    parser.add_argument("--data-path", default=None, help="calibration/validation text (default: embedded corpus)")
    parser.add_argument("--seq-len", type=int, default=DataConfig.seq_len)
    args = parser.parse_args(argv)
    from vishwamai.errors import VishwamaiError, report_user_error

    try:
        report = quantize_model_dir(args.model, args.output, args.mode, args.calibration_steps,
                                    DataConfig(path=args.data_path, seq_len=args.seq_len), args.compile)
    except VishwamaiError as e:
        return report_user_error(e)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
