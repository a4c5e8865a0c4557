"""Figures for comparing models: size on disk, stored/non-zero weights, CPU latency, validation loss.

Shared by the quantization report (quantize.py) and the compression report (vishwamai/evaluate.py).
A model directory is either a float checkpoint (model.safetensors + model_config.json) or a
quantized one (quantized.safetensors + quantization.json + model_config.json).
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from vishwamai.checkpoint.io import MODEL_CONFIG_FILE, WEIGHTS_FILE
# resolve_model_dir: also read from here (vishwamai/hf/export.py); it lives with the int8 files in storage.py.
from vishwamai.compress.storage import (QUANT_META_FILE, QUANT_WEIGHTS_FILE, is_quantized_dir,  # noqa: F401
                                        resolve_model_dir)
from vishwamai.data import eval_batches


def model_files(directory: str | Path) -> list[Path]:
    """The files that make up the model (not optimizer or trainer state beside it)."""
    d = Path(directory)
    names = [QUANT_WEIGHTS_FILE, QUANT_META_FILE] if is_quantized_dir(d) else [WEIGHTS_FILE]
    return [d / n for n in names + [MODEL_CONFIG_FILE] if (d / n).is_file()]


def size_on_disk(directory: str | Path) -> int:
    return sum(f.stat().st_size for f in model_files(directory))


def weights_file(directory: str | Path) -> Path:
    d = Path(directory)
    return d / (QUANT_WEIGHTS_FILE if is_quantized_dir(d) else WEIGHTS_FILE)


def stored_weight_counts(directory: str | Path) -> dict[str, int]:
    """Weights as stored (a tied weight once; quantization scales are not weights), and how many are non-zero."""
    total = nonzero = 0
    with safe_open(str(weights_file(directory)), framework="pt") as f:
        for key in f.keys():
            if key.endswith(".weight_scale"):
                continue
            t = f.get_tensor(key)
            total += t.numel()
            nonzero += int(torch.count_nonzero(t))
    return {"parameters": total, "nonzero_parameters": nonzero}


@torch.no_grad()
def validation_loss(model: nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int = 8,
                    max_batches: int = 8) -> float:
    """Mean cross-entropy (nats/token) on the first validation windows (the same ones every call)."""
    model.eval()
    loss_sum, count = 0.0, 0
    for x, y in eval_batches(tokens, seq_len, batch_size, max_batches):
        logits = model(x).logits
        loss_sum += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
        count += y.numel()
    return loss_sum / count


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


@torch.no_grad()
def latency_ms_per_token(model: nn.Module, vocab_size: int, prompt_len: int = 32, new_tokens: int = 32,
                         repeats: int = 3) -> float:
    """Greedy generation, batch 1: median over repeats of wall ms per generated token (CPU)."""
    model.eval()
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab_size, (1, prompt_len), generator=gen)
    max_len = model.config.max_seq_len

    def once() -> float:
        idx = prompt
        start = time.perf_counter()
        for _ in range(new_tokens):
            nxt = model(idx[:, -max_len:]).logits[:, -1].argmax(-1, keepdim=True)
            idx = torch.cat([idx, nxt], dim=1)
        return (time.perf_counter() - start) * 1000 / new_tokens

    once()  # warm-up: first calls pack weights / pick kernels
    return statistics.median(once() for _ in range(repeats))
