"""Model compression: gradual pruning (pruning.py) and int8 post-training quantization (quantize.py;
the int8 files: storage.py; the kernels: int8.py, and compiled.py for torchao under torch.compile).

Config home: distillation.pruning.* and distillation.quantization.* (the seed nests them
under distillation); both also run without distillation.enabled.
"""

from __future__ import annotations

from pathlib import Path

from vishwamai.compress.pruning import GradualPruning, compact_mlp, compute_masks
from vishwamai.compress.quantize import PostTrainingQuantization, quantize_model_dir
from vishwamai.compress.schedule import sparsity_at
from vishwamai.compress.storage import load_quantized
from vishwamai.errors import NotImplementedYet

__all__ = ["GradualPruning", "PostTrainingQuantization", "build_compression", "compact_mlp", "compute_masks",
           "load_quantized", "quantize_model_dir", "sparsity_at"]


def build_compression(cfg, run_dir: str | Path) -> list:
    """Pruning and quantization callbacks, as configured (pruning first: quantization uses its result)."""
    p, q = cfg.distillation.pruning, cfg.distillation.quantization
    if (p.enabled or q.enabled) and cfg.distributed.strategy == "model_parallel":
        # Sharded weights: magnitudes and the final model are spread over ranks.
        raise NotImplementedYet("distillation.pruning.enabled" if p.enabled else "distillation.quantization.enabled",
                                "with distributed.strategy=model_parallel")
    callbacks: list = []
    pruning = GradualPruning(p, run_dir) if p.enabled else None
    if pruning is not None:
        callbacks.append(pruning)
    if q.enabled:
        callbacks.append(PostTrainingQuantization(cfg, run_dir, pruning))
    return callbacks
