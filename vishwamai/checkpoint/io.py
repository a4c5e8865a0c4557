"""Model weights on disk: safetensors + the model config beside them.

A saved model directory is loadable without the training config:
  DIR/model.safetensors    weights (no pickle: loading never runs code)
  DIR/model_config.json    the ModelConfig the weights belong to
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vishwamai.config import ModelConfig
from vishwamai.errors import CheckpointError

WEIGHTS_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model_config.json"


def model_state_for_saving(model: torch.nn.Module | None, full_state: dict[str, torch.Tensor] | None = None,
                           copy: bool = False, replace: Mapping[str, torch.Tensor] | None = None
                           ) -> dict[str, torch.Tensor]:
    """State dict with tied weights stored once (safetensors refuses shared storage).

    `full_state`: the whole model's weights when `model` holds only a shard (FSDP), gathered
    beforehand by Parallelism.full_state_dict.  `copy`: new CPU tensors even for a CPU model
    (a snapshot that later optimizer steps cannot change).  `replace`: tensors saved instead of
    the model's under their names (amp O2's float32 masters), moved to the CPU as they are: the
    caller copies them if it must (the model's own copies are then not made at all).
    """
    state, seen, replace = {}, set(), replace or {}
    for name, tensor in (model.state_dict() if full_state is None else full_state).items():
        key = tensor.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        if name in replace:
            state[name] = replace[name].detach().to("cpu").contiguous()
        else:
            state[name] = tensor.detach().to("cpu", copy=copy).contiguous()
    return state


def as_model_config(cfg) -> ModelConfig:
    """A ModelConfig from a dataclass or an OmegaConf node (e.g. cfg.model)."""
    if isinstance(cfg, ModelConfig):
        return cfg
    from omegaconf import OmegaConf

    return ModelConfig(**OmegaConf.to_container(cfg, resolve=True))


def save_model(directory: str | Path, model: torch.nn.Module | None, model_cfg,
               full_state: dict[str, torch.Tensor] | None = None) -> Path:
    directory = Path(directory)
    model_cfg = as_model_config(model_cfg)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(model_state_for_saving(model, full_state), str(directory / WEIGHTS_FILE))
    (directory / MODEL_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model_cfg), indent=1))
    return directory


def read_model_config(directory: str | Path) -> ModelConfig:
    from vishwamai.hf import hf_model_config, is_hf_model_dir

    if is_hf_model_dir(directory):  # a Hugging Face model directory (vishwamai/hf)
        return hf_model_config(directory)
    path = Path(directory) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"no {MODEL_CONFIG_FILE} in {directory}: not a vishwamai model checkpoint")
    try:
        return ModelConfig(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"unreadable model config {path}: {e}") from e


def read_weights(directory: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"no {WEIGHTS_FILE} in {directory}")
    try:
        return load_file(str(weights), device=str(device))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"corrupt or unreadable weights {weights}: {e}") from e


def apply_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], cfg: ModelConfig, source: Path) -> None:
    """Load `state` into `model` in place (strictly, up to the tied lm_head stored once)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied lm_head is stored once, under the embedding's name.
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match its config: missing {missing}, unexpected {unexpected}")


def load_model(directory: str | Path, device: str | torch.device = "cpu"):
    """Build the model its config describes and load its weights (strictly); also a Hugging Face model dir."""
    from vishwamai.hf import is_hf_model_dir, load_hf_model
    from vishwamai.model import build_model

    if is_hf_model_dir(directory):  # Llama/Mistral/Qwen2 in the Hugging Face layout (vishwamai/hf)
        return load_hf_model(directory, device)
    directory = Path(directory)
    cfg = read_model_config(directory)
    state = read_weights(directory, device)
    model = build_model(cfg, device)
    apply_weights(model, state, cfg, directory / WEIGHTS_FILE)
    return model
