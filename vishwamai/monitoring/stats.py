"""Figures beyond the loop's own: perplexity, FLOP/s and MFU, memory, per-group gradient
norms and parameter/gradient histograms.  Each is computed only on steps that are logged."""

from __future__ import annotations

import math
import re
from typing import Any, Optional

import numpy as np
import torch

from vishwamai.monitoring.logger import MetricsLogger, will_be_logged
from vishwamai.train.events import Callback

# Dense bf16 tensor-core peak of one device, FLOP/s (vendor data sheets; SXM parts).
# Matched in order against torch.cuda.get_device_name(); first match wins.
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("V100", 125e12),  # fp16 (no bf16)
    ("T4", 65e12),  # fp16 (no bf16)
)


def device_peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights plus 12 * layers * width * seq for attention
    scores (the PaLM appendix B estimate)."""
    n_params = sum(p.numel() for p in model.parameters())
    cfg = getattr(model, "config", None)
    attention = 12 * cfg.n_layers * cfg.d_model * seq_len if cfg is not None else 0
    return 6 * n_params + attention


class Throughput:
    """perplexity, achieved FLOP/s and MFU (model FLOPs utilisation) of the logged window."""

    def __init__(self, peak_flops_per_s: Optional[float]):
        self.configured_peak = peak_flops_per_s
        self._per_token: Optional[float] = None
        self._peak: Optional[float] = None

    def __call__(self, trainer, record: dict[str, Any]) -> dict[str, Any]:
        if self._per_token is None:
            self._per_token = flops_per_token(trainer.raw_model, trainer.sampler.seq_len)
            self._peak = self.configured_peak or device_peak_flops(trainer.device)
        out: dict[str, Any] = {}
        if "loss" in record:
            out["perplexity"] = math.exp(min(record["loss"], 50.0))
        if "tokens_per_s" in record:  # tokens of all ranks
            achieved = self._per_token * record["tokens_per_s"]
            out["flops_per_s"] = achieved
            out["mfu"] = achieved / (self._peak * trainer.parallel.world_size) if self._peak else None
        return out


class Memory:
    """CPU resident memory; on GPU allocated/reserved/peak memory and utilisation (nvidia-ml-py)."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self._nvml = None
        self._nvml_tried = False

    def __call__(self, trainer, record: dict[str, Any]) -> dict[str, Any]:
        mib = 2**20
        out: dict[str, Any] = {"memory/cpu_rss_mb": self.process.memory_info().rss / mib}
        device = trainer.device
        if device.type == "cuda":
            out["memory/gpu_allocated_mb"] = torch.cuda.memory_allocated(device) / mib
            out["memory/gpu_reserved_mb"] = torch.cuda.memory_reserved(device) / mib
            out["memory/gpu_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / mib
            handle = self._nvml_handle(device)
            if handle is not None:
                out["gpu/utilization_pct"] = float(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        return out

    def _nvml_handle(self, device: torch.device):
        if not self._nvml_tried:
            self._nvml_tried = True
            try:  # optional: nvidia-ml-py (the `monitoring` extra); absent or no driver -> no utilisation
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            except Exception:  # noqa: BLE001
                self._nvml = None
        if self._nvml is None:
            return None
        index = device.index if device.index is not None else torch.cuda.current_device()
        return self._nvml.nvmlDeviceGetHandleByIndex(index)


# ------------------------------------------------------------------ gradients
def parameter_group(name: str) -> str:
    """embed | attn | mlp | norm | other, from the parameter's module path."""
    parts = name.split(".")
    if any(p.endswith("norm") for p in parts[:-1]):
        return "norm"
    for group, modules in (("attn", {"attn"}), ("mlp", {"mlp"}), ("embed", {"embed", "lm_head"})):
        if modules & set(parts):
            return group
    return "other"


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2), the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _loss_scale(trainer) -> float:
    # Read in on_after_backward, before the precision's unscale_: fp16 gradients are still scaled.
    return trainer.precision.scaler.get_scale() if trainer.precision.uses_loss_scaling else 1.0


class GradGroupNorms(Callback):
    """grad_norm/<group>: the gradient norm of each parameter group, on logged steps only."""

    def __init__(self):
        self._groups: Optional[dict[str, list[torch.nn.Parameter]]] = None

    def on_after_backward(self, trainer) -> None:
        step = trainer.state.step + 1  # the step being taken
        if not will_be_logged(step, trainer.cfg):
            return
        if self._groups is None:
            self._groups = {}
            for name, p in trainer.raw_model.named_parameters():
                if p.requires_grad:
                    self._groups.setdefault(parameter_group(name), []).append(p)
        squares = torch.stack([self._sum_of_squares(params) for params in self._groups.values()])
        if trainer.parallel.sharded:  # each rank holds a shard of every gradient
            squares = trainer.parallel.all_reduce_mean(squares) * trainer.parallel.world_size
        norms = (squares.sqrt() / _loss_scale(trainer)).tolist()
        trainer.metrics.update({f"grad_norm/{g}": n for g, n in zip(self._groups, norms)})

    @staticmethod
    def _sum_of_squares(params: list[torch.nn.Parameter]) -> torch.Tensor:
        grads = [_local(p.grad) for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), dtype=torch.float32, device=params[0].device)
        # One fused kernel per group (as clip_grad_norm_ does); norms in float32.
        return torch.stack(torch._foreach_norm(grads)).float().square().sum()


class Histograms(Callback):
    """Parameter and gradient histograms (TensorBoard) every N steps, from rank 0's shard."""

    def __init__(self, logger: MetricsLogger, every_n_steps: int):
        self.logger = logger
        self.every = every_n_steps

    def on_after_backward(self, trainer) -> None:
        step = trainer.state.step + 1
        if step % self.every or not trainer.is_main or not self.logger.takes_histograms:
            return
        inv_scale = 1.0 / _loss_scale(trainer)
        arrays: dict[str, np.ndarray] = {}
        for name, p in trainer.raw_model.named_parameters():
            tag = re.sub(r"\.", "/", name)
            # Copies: the gradients are zeroed before the background writer gets to them.
            arrays[f"params/{tag}"] = _local(p.detach()).float().cpu().numpy().ravel()
            if p.grad is not None:
                arrays[f"grads/{tag}"] = (_local(p.grad.detach()).float() * inv_scale).cpu().numpy().ravel()
        self.logger.log_histograms(step, arrays)
