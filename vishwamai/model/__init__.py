"""The transformer and the helpers that build it safely."""

from __future__ import annotations

import os

import torch

from vishwamai.config import ModelConfig
from vishwamai.errors import InsufficientMemoryError
from vishwamai.model.transformer import ModelOutput, Transformer

__all__ = ["ModelOutput", "Transformer", "build_model", "count_parameters", "training_memory_bytes"]

# fp32 weights + fp32 grads + AdamW's two fp32 moments.
TRAINING_BYTES_PER_PARAM = 16


def count_parameters(cfg: ModelConfig) -> int:
    """Exact parameter count, computed on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        return Transformer(cfg).num_parameters()


def training_memory_bytes(cfg: ModelConfig) -> int:
    return count_parameters(cfg) * TRAINING_BYTES_PER_PARAM


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def check_fits(cfg: ModelConfig, device: torch.device, shards: int = 1) -> None:
    """Fail fast, before allocating, if weights + grads + optimizer state cannot fit.

    `shards`: how many ranks one copy of the training state is split over (FSDP's
    shard-group size; 1 when every rank holds a full copy).
    """
    need = training_memory_bytes(cfg) // shards
    have = available_memory_bytes(device)
    if need > have:
        raise InsufficientMemoryError(
            f"model '{cfg.name}' ({count_parameters(cfg) / 1e9:.2f}B parameters) needs about "
            f"{_human(need)} for training (fp32 weights, grads and AdamW state) on {device}, "
            f"but only {_human(have)} is available. Use a smaller `model=`, more devices with "
            f"distributed.strategy=model_parallel, or a machine with more memory."
        )


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", check_memory: bool = True,
                activation_checkpointing: bool = False) -> Transformer:
    device = torch.device(device)
    if check_memory:
        check_fits(cfg, device)
    with torch.device(device):
        return Transformer(cfg, activation_checkpointing)
