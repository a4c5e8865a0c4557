"""Export a vishwamai model as a Hugging Face model directory (transformers, vLLM, TGI, llama.cpp read it).

    DIR/config.json              LlamaForCausalLM, or Qwen2ForCausalLM when q/k/v carry biases
    DIR/model.safetensors        the weights in --dtype
    DIR/generation_config.json   the end-of-document token
    DIR/tokenizer.json (+ tokenizer_config.json)   the run's tokenizer, when it had one

The source is a run or checkpoint directory (resolved as training.init_from resolves it), a
pruned/ directory (structured pruning's smaller widths are just another config), or a quantized/
directory: its int8 weights are dequantized (int8 x per-channel scale) into --dtype, so the export
holds full-size weights with the int8 rounding baked in, not an int8 model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from vishwamai.checkpoint.io import read_model_config, read_weights
from vishwamai.config import ModelConfig
from vishwamai.errors import ConfigError
from vishwamai.hf.config import GENERATION_CONFIG_FILE, HF_CONFIG_FILE, from_model_config
from vishwamai.hf.weights import SINGLE_FILE, to_hf_state
from vishwamai.run_files import CONFIG_FILE

DTYPES = ("float32", "bfloat16", "float16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def dequantized_state(directory: Path) -> dict[str, torch.Tensor]:
    """A quantized/ directory's weights as float32: int8 rows times their scales."""
    from vishwamai.compress.storage import read_quantized_tensors

    tensors = read_quantized_tensors(directory)
    state = {}
    for name, t in tensors.items():
        if name.endswith(".weight_int8"):
            base = name[: -len("_int8")]
            state[base] = t.float() * tensors[base + "_scale"][:, None]
        elif not name.endswith(".weight_scale"):
            state[name] = t.float()
    return state


def source_state(directory: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from vishwamai.compress.measure import is_quantized_dir

    from vishwamai.checkpoint.io import load_model
    from vishwamai.hf import is_hf_model_dir

    cfg = read_model_config(directory)
    if is_quantized_dir(directory):
        return cfg, dequantized_state(directory)
    if is_hf_model_dir(directory):  # HF in, HF out: through our model (e.g. Mistral -> Llama layout)
        return cfg, load_model(directory).state_dict()
    return cfg, read_weights(directory)


def run_tokenizer(directory: Path) -> str:
    """data.tokenizer of the run the model came from, else the directory's own tokenizer, else "byte"."""
    for candidate in (directory, directory.parent, directory.parent.parent):
        config = candidate / CONFIG_FILE
        if config.is_file():
            return str(OmegaConf.select(OmegaConf.load(config), "data.tokenizer", default="byte"))
    if (directory / "tokenizer.json").is_file():  # a Hugging Face model directory's own
        return str(directory)
    return "byte"


def copy_tokenizer(spec: str, output: Path) -> tuple[int | None, int | None]:
    """Write the run's tokenizer into `output`; returns its (eos, bos) ids."""
    from vishwamai.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(spec)
    if spec == "byte":  # ids are UTF-8 bytes; transformers has no tokenizer file for that
        return tokenizer.eos_id, None
    source = Path(spec).expanduser()
    if source.is_dir():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, output / name)
    else:
        shutil.copyfile(source, output / "tokenizer.json")
    return tokenizer.eos_id, getattr(tokenizer, "bos_id", None)


def export(source: str | Path, output: str | Path, dtype: str = "float32", tokenizer: str | None = None) -> Path:
    """Write the Hugging Face directory for `source` at `output` (atomically: all files or none).

    `tokenizer`: a data.tokenizer spec; by default that of the run the model came from (run_tokenizer).
    """
    from vishwamai.compress.measure import resolve_model_dir

    if dtype not in DTYPES:
        raise ConfigError("--dtype", f"got {dtype!r}, expected one of {list(DTYPES)}")
    output = Path(output).expanduser()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError("--output", f"{output} already exists and is not empty; choose a new directory")
    directory = resolve_model_dir(source)
    cfg, state = source_state(directory)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        eos, bos = copy_tokenizer(tokenizer or run_tokenizer(directory), staging)
        save_file(to_hf_state(state, cfg, getattr(torch, dtype)), str(staging / SINGLE_FILE),
                  metadata={"format": "pt"})
        (staging / HF_CONFIG_FILE).write_text(json.dumps(from_model_config(cfg, dtype, eos, bos), indent=2))
        generation = {"eos_token_id": eos, "bos_token_id": bos, "max_length": cfg.max_seq_len}
        (staging / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2))
        if output.exists():
            output.rmdir()  # empty (checked above)
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output
