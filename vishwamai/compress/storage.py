"""The int8 model directory: writing it, reading it back (safetensors + JSON, never a pickle).

    quantized.safetensors  int8 weights `<module>.weight_int8` + fp32 per-row `<module>.weight_scale`
                           for every Linear and the embedding (a tied output head is stored once,
                           as the embedding); other tensors (norm weights) as fp32
    quantization.json      format, mode, scheme, which modules are int8, calibration used
    model_config.json      the architecture

Its own module so that measuring (measure.py) and quantizing (quantize.py) both read models
without importing each other.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from vishwamai.checkpoint.io import MODEL_CONFIG_FILE, as_model_config, read_model_config
from vishwamai.compress.int8 import MODES, Int8Embedding, int8_linear
from vishwamai.errors import CheckpointError, ConfigError

FORMAT = "vishwamai-int8"
FORMAT_VERSION = 1
QUANT_WEIGHTS_FILE = "quantized.safetensors"
QUANT_META_FILE = "quantization.json"


def is_quantized_dir(directory: str | Path) -> bool:
    return (Path(directory) / QUANT_META_FILE).is_file()


def resolve_model_dir(directory: str | Path) -> Path:
    """A quantized dir as is; else the model dir of a run or checkpoint dir (find_model_dir)."""
    from vishwamai.checkpoint import find_model_dir

    return Path(directory) if is_quantized_dir(directory) else find_model_dir(directory)


def save_quantized(directory: str | Path, tensors: dict, meta: dict, model_cfg) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / QUANT_WEIGHTS_FILE))
    (d / QUANT_META_FILE).write_text(json.dumps(meta, indent=1))
    (d / MODEL_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(as_model_config(model_cfg)), indent=1))
    return d


LinearFactory = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], nn.Module]


def assemble(model_cfg, tensors: dict[str, torch.Tensor], meta: dict, make_linear: LinearFactory) -> nn.Module:
    """The Transformer of `model_cfg` whose Linears are `make_linear(int8 weight, scales, bias)`."""
    from vishwamai.model import Transformer

    model = Transformer(model_cfg)
    for name in meta["linear_modules"]:
        parent, _, child = name.rpartition(".")
        module = make_linear(tensors[f"{name}.weight_int8"], tensors[f"{name}.weight_scale"],
                             tensors.get(f"{name}.bias"))
        setattr(model.get_submodule(parent) if parent else model, child, module)
    model.embed = Int8Embedding(tensors["embed.weight_int8"], tensors["embed.weight_scale"])
    if meta["tied_embeddings"]:
        model.lm_head = make_linear(tensors["embed.weight_int8"], tensors["embed.weight_scale"], None)
    left = {n for n, _ in model.named_parameters()}
    if left != set(meta["fp32_tensors"]):
        raise CheckpointError(f"quantized weights do not match the model: fp32 tensors {sorted(left)} expected, "
                              f"file has {meta['fp32_tensors']}")
    with torch.no_grad():  # copied one by one: torch.ao's modules insist on their own keys in load_state_dict
        for name in left:
            model.get_parameter(name).copy_(tensors[name])
    return model.eval()


def build_quantized(model_cfg, tensors: dict[str, torch.Tensor], meta: dict, mode: str,
                    compile: bool = False) -> nn.Module:
    """The int8 model on CPU. `compile`: torchao's kernels under torch.compile (mode dynamic only),
    else, with the reason logged, torch.ao's eager ones. `model.int8_kernels` says which ran."""
    if compile:
        if mode != "dynamic":
            raise ConfigError("compile", f"the compiled int8 path runs mode=dynamic, not {mode!r}")
        from vishwamai.compress.compiled import compiled_or_none, torchao_linear

        model = compiled_or_none(lambda: assemble(model_cfg, tensors, meta, torchao_linear))
        if model is not None:
            model.int8_kernels = "dynamic compiled"  # torchao under torch.compile
            return model
    model = assemble(model_cfg, tensors, meta, functools.partial(int8_linear, mode))
    model.int8_kernels = mode
    return model


def load_quantized(directory: str | Path, mode: Optional[str] = None, compile: bool = False) -> nn.Module:
    """Rebuild a saved quantized model (safetensors + JSON only). `mode` overrides the saved kernel choice;
    `compile=True` runs mode dynamic through torchao + torch.compile where available (build_quantized)."""
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
    mode = mode or ("dynamic" if compile else meta["mode"])  # both modes read the same int8 weights
    if mode not in MODES:
        raise CheckpointError(f"{meta_path}: unknown mode {mode!r}, expected one of {list(MODES)}")
    return build_quantized(read_model_config(d), read_quantized_tensors(d), meta, mode, compile)


def read_quantized_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """A quantized dir's tensors (int8 weights, scales, fp32 norms); CheckpointError naming a missing or corrupt file."""
    path = Path(directory) / QUANT_WEIGHTS_FILE
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for missing or corrupt files
        raise CheckpointError(f"corrupt or missing {path}: {e}") from e


def load_any(directory: str | Path, compile: bool = False) -> nn.Module:
    """A float or quantized model directory -> model in eval mode on CPU (never unpickles).
    `compile` applies to quantized models (load_quantized)."""
    from vishwamai.checkpoint import load_model

    d = resolve_model_dir(directory)
    model = load_quantized(d, compile=compile) if is_quantized_dir(d) else load_model(d)
    return model.eval()
