"""Bring your own model: local Hugging Face model directories in, and back out (export.py).

A Hugging Face model directory holds `config.json` and `model.safetensors` (or a sharded
`model.safetensors.index.json`), often with `tokenizer.json`, `tokenizer_config.json` and
`generation_config.json`.  Wherever vishwamai accepts a model path it accepts such a
directory too (the dispatch is `is_hf_model_dir`):

  Llama / Mistral / Qwen2   converted into vishwamai's own Transformer (config.py maps the
                            config, weights.py the tensors, loaded shard by shard)
  any other causal LM       a distillation teacher only, run by transformers itself (auto.py)

Nothing from the directory is executed: no trust_remote_code, never pickle.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vishwamai.config import ModelConfig
from vishwamai.hf.config import HF_CONFIG_FILE, is_convertible, read_hf_config, to_model_config
from vishwamai.hf.weights import load_hf_weights

__all__ = ["adopt_model_tokenizer", "hf_model_config", "is_convertible_dir", "is_hf_model_dir", "load_hf_model",
           "model_tokenizer_file", "with_model_tokenizer"]

TOKENIZER_FILE = "tokenizer.json"


def is_hf_model_dir(path: str | Path) -> bool:
    """A Hugging Face model directory (config.json), not a vishwamai checkpoint (model_config.json)."""
    from vishwamai.checkpoint.io import MODEL_CONFIG_FILE

    p = Path(path).expanduser()
    return (p / HF_CONFIG_FILE).is_file() and not (p / MODEL_CONFIG_FILE).is_file()


def hf_model_config(directory: str | Path) -> ModelConfig:
    return to_model_config(read_hf_config(directory), directory)


def is_convertible_dir(directory: str | Path) -> bool:
    return is_convertible(read_hf_config(directory))


def load_hf_model(directory: str | Path, device: str | torch.device = "cpu"):
    """A Llama/Mistral/Qwen2 directory as vishwamai's Transformer, in float32.

    The memory check runs on the config before anything is allocated; the weights then go
    shard by shard, tensor by tensor, straight into the model.
    """
    from vishwamai.model import build_model

    cfg = hf_model_config(directory)
    model = build_model(cfg, device)
    load_hf_weights(model, cfg, directory)
    return model


def model_tokenizer_file(directory: str | Path) -> Path | None:
    """The tokenizer a model directory carries, if any."""
    path = Path(directory).expanduser() / TOKENIZER_FILE
    return path if path.is_file() else None


def adopt_model_tokenizer(cfg) -> None:
    """data.tokenizer=byte (the default) with an init_from or teacher that is a Hugging Face model directory
    carrying a tokenizer: the data is tokenized with that tokenizer (init_from first, then the teachers)."""
    from vishwamai.distill.teachers import teacher_specs

    if cfg.data.tokenizer != "byte":
        return  # the user chose one; a vocabulary mismatch is caught by the vocabulary checks
    sources = [cfg.training.init_from] if cfg.training.init_from else []
    if cfg.distillation.enabled:
        sources += [spec for _, spec in teacher_specs(cfg.distillation.teacher_model)]
    for source in sources:
        if is_hf_model_dir(source) and model_tokenizer_file(source):
            cfg.data.tokenizer = str(Path(source).expanduser())
            return


def with_model_tokenizer(data_cfg, model_dir: str | Path):
    """`data_cfg` for measuring the model in `model_dir`: its own tokenizer when it carries one and the
    data would otherwise be byte-tokenized (the quantize and evaluate CLIs)."""
    import dataclasses

    if data_cfg.tokenizer == "byte" and is_hf_model_dir(model_dir) and model_tokenizer_file(model_dir):
        return dataclasses.replace(data_cfg, tokenizer=str(model_dir))
    return data_cfg
