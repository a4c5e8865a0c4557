"""Post-training int8 quantization of a model's Linear layers (distillation.quantization.*).

    python -m vishwamai.compress.quantize --model RUN_OR_MODEL_DIR --output OUT_DIR \
        [--mode dynamic|weight_only] [--calibration-steps N] [--data-path P]

On disk (OUT_DIR), nothing is pickled, so loading never runs code:
  quantized.safetensors  int8 weights `<module>.weight_int8` + fp32 per-row `<module>.weight_scale`
                         for every Linear and the embedding (a tied output head is stored once,
                         as the embedding); other tensors (norm weights) as fp32
  quantization.json      format, mode, scheme, which modules are int8, calibration used
  model_config.json      the architecture; load_quantized(dir) rebuilds the model from the three
  report.json            the figures: sizes, fp32 vs int8 validation loss and latency
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
from safetensors.torch import load_file, save, save_file

from vishwamai.checkpoint.io import MODEL_CONFIG_FILE, as_model_config, read_model_config
from vishwamai.compress.int8 import (MODES, GramCollector, Int8Embedding, calibrated_scales, int8_linear,
                                     quantize_rows)
from vishwamai.compress.measure import (QUANT_META_FILE, QUANT_WEIGHTS_FILE, is_quantized_dir, latency_ms_per_token,
                                        resolve_model_dir, size_on_disk, validation_loss)
from vishwamai.config import DataConfig
from vishwamai.errors import CheckpointError, ConfigError
from vishwamai.train.events import Callback

FORMAT = "vishwamai-int8"
FORMAT_VERSION = 1
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


def build_quantized(model_cfg, tensors: dict[str, torch.Tensor], meta: dict, mode: str) -> nn.Module:
    """The Transformer of `model_cfg` with int8 modules holding `tensors` (runs on CPU)."""
    from vishwamai.model import Transformer

    model = Transformer(model_cfg)
    for name in meta["linear_modules"]:
        parent, _, child = name.rpartition(".")
        bias = tensors.get(f"{name}.bias")
        module = int8_linear(mode, tensors[f"{name}.weight_int8"], tensors[f"{name}.weight_scale"], bias)
        setattr(model.get_submodule(parent) if parent else model, child, module)
    model.embed = Int8Embedding(tensors["embed.weight_int8"], tensors["embed.weight_scale"])
    if meta["tied_embeddings"]:
        model.lm_head = int8_linear(mode, tensors["embed.weight_int8"], tensors["embed.weight_scale"], None)
    left = {n for n, _ in model.named_parameters()}
    if left != set(meta["fp32_tensors"]):
        raise CheckpointError(f"quantized weights do not match the model: fp32 tensors {sorted(left)} expected, "
                              f"file has {meta['fp32_tensors']}")
    with torch.no_grad():  # copied one by one: torch.ao's modules insist on their own keys in load_state_dict
        for name in left:
            model.get_parameter(name).copy_(tensors[name])
    return model.eval()


def save_quantized(directory: str | Path, tensors: dict, meta: dict, model_cfg) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / QUANT_WEIGHTS_FILE))
    (d / QUANT_META_FILE).write_text(json.dumps(meta, indent=1))
    (d / MODEL_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(as_model_config(model_cfg)), indent=1))
    return d


def load_quantized(directory: str | Path, mode: Optional[str] = None) -> nn.Module:
    """Rebuild a saved quantized model (safetensors + JSON only). `mode` overrides the saved kernel choice."""
    d = Path(directory)
    meta_path = d / QUANT_META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"no {QUANT_META_FILE} in {d}: not a quantized vishwamai model")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"unreadable {meta_path}: {e}") from e
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION or meta.get("precision") != "int8":
        raise CheckpointError(f"{meta_path}: unsupported quantization format {meta.get('format')!r} "
                              f"v{meta.get('version')} precision {meta.get('precision')!r}")
    mode = mode or meta["mode"]
    if mode not in MODES:
        raise CheckpointError(f"{meta_path}: unknown mode {mode!r}, expected one of {list(MODES)}")
    try:
        tensors = load_file(str(d / QUANT_WEIGHTS_FILE))
    except Exception as e:  # safetensors raises several types for missing or corrupt files
        raise CheckpointError(f"corrupt or missing {d / QUANT_WEIGHTS_FILE}: {e}") from e
    return build_quantized(read_model_config(d), tensors, meta, mode)


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
                        val_tokens, seq_len: int, batch_size: int = 8, eval_batches: int = 8) -> dict[str, Any]:
    """Quantize `model` into output_dir, reload it from disk, and compare it with the fp32 model."""
    if mode not in MODES:
        raise ConfigError("distillation.quantization.mode", f"got {mode!r}, expected one of {list(MODES)}")
    model = model.float().cpu().eval()
    start = time.perf_counter()
    tensors, meta = quantize_state(model, calibration_batches(val_tokens, seq_len, calibration_steps, batch_size))
    meta["mode"] = mode
    out = save_quantized(output_dir, tensors, meta, model_cfg)
    quantize_s = time.perf_counter() - start
    qmodel = load_quantized(out)  # measure what was saved, not the in-memory copy
    vocab = as_model_config(model_cfg).vocab_size
    report = {
        "mode": mode, "precision": "int8", "calibration_steps": meta["calibration_steps"],
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
                       calibration_steps: int = 100, data_cfg: Optional[DataConfig] = None) -> dict[str, Any]:
    """Quantize a saved model (a model dir, or a run dir: its best/latest/final checkpoint)."""
    from vishwamai.checkpoint import load_model
    from vishwamai.hf import with_model_tokenizer

    if mode not in MODES:
        raise ConfigError("mode", f"got {mode!r}, expected one of {list(MODES)}")
    if calibration_steps < 0:
        raise ConfigError("calibration_steps", f"must be >= 0, got {calibration_steps}")
    source = resolve_model_dir(model_dir)
    if is_quantized_dir(source):
        raise CheckpointError(f"{source} is already quantized; give the fp32 model it came from")
    model_cfg = read_model_config(source)
    val, seq_len = load_validation(with_model_tokenizer(data_cfg or DataConfig(), source), model_cfg)
    report = quantize_and_report(load_model(source), model_cfg, output_dir, mode, calibration_steps, val, seq_len)
    report["source_model"] = str(source)
    (Path(output_dir) / REPORT_FILE).write_text(json.dumps(report, indent=1))
    return report


# --------------------------------------------------------------------- callback
class PostTrainingQuantization(Callback):
    """After training: quantize the final model (the pruned one if pruning ran) into RUN_DIR/quantized/."""

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
    parser.add_argument("--calibration-steps", type=int, default=100)
    parser.add_argument("--data-path", default=None, help="calibration/validation text (default: embedded corpus)")
    parser.add_argument("--seq-len", type=int, default=DataConfig.seq_len)
    args = parser.parse_args(argv)
    from vishwamai.errors import VishwamaiError

    try:
        report = quantize_model_dir(args.model, args.output, args.mode, args.calibration_steps,
                                    DataConfig(path=args.data_path, seq_len=args.seq_len))
    except VishwamaiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
