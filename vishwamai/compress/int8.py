"""int8 building blocks: per-channel weight quantization, calibration, and the int8 modules.

Weights are symmetric int8 with one fp32 scale per output channel (per row of an
embedding). Computation uses kernels that ship with torch, chosen by `mode`:
  dynamic      torch.ao's dynamically quantized Linear (fbgemm/oneDNN): activations are
               quantized to int8 at run time, int8 x int8 matmuls. Fastest eager CPU path.
  weight_only  torch's int8 weight-only matmul (aten::_weight_int8pack_mm, the kernel torchao
               uses): activations are not quantized; the matmul runs in bfloat16 (the kernel's
               fast CPU path; with fp32 inputs it falls back to a slow reference loop), and the
               output is cast back. Best for batch-1 decoding; slower than fp32 for long prefills.
Both modes store the same int8 weights + scales, so a saved model may run either way, or on the
compiled torchao path (compiled.py, load_quantized(compile=True)), which is faster than both.

Calibration: the clipping of each output channel's range is chosen to minimise the error
of that channel's output on calibration activations, ||X (w - q(w))||^2, computed from the
Gram matrix X^T X accumulated over the calibration batches (no activations are kept).
Clipping a few outliers trades their error for finer steps on every other weight.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

QMAX = 127
# Candidate clipping ratios of a channel's max |w| tried during calibration (1.0 = plain absmax).
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
MODES = ("dynamic", "weight_only")


def quantize_rows(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(w / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)


def absmax_scales(w: torch.Tensor) -> torch.Tensor:
    return (w.abs().amax(1) / QMAX).clamp_min(1e-12)


@torch.no_grad()
def calibrated_scales(w: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
    """Per-row scales minimising the output error (w - q(w)) G (w - q(w))^T, row by row."""
    w = w.float()
    base = absmax_scales(w)
    if gram is None:
        return base
    best_err, best = None, base
    for ratio in CLIP_RATIOS:
        scale = (base * ratio).clamp_min(1e-12)
        err = w - quantize_rows(w, scale).float() * scale[:, None]
        e = ((err @ gram) * err).sum(1)
        if best_err is None:
            best_err, best = e, scale
        else:
            better = e < best_err
            best_err, best = torch.where(better, e, best_err), torch.where(better, scale, best)
    return best


class GramCollector:
    """Accumulates X^T X of each watched Linear's input over calibration forwards."""

    def __init__(self, modules: dict[str, nn.Linear]):
        self.gram: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            g = x.T @ x
            self.gram[name] = self.gram[name] + g if name in self.gram else g

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()


# ----------------------------------------------------------------------- modules
class Int8WeightOnlyLinear(nn.Module):
    """y = x W^T + b with W stored int8 (+ per-row scales); x is not quantized (bf16 in the matmul)."""

    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = weight_int8.shape[1], weight_int8.shape[0]
        # A fresh copy: tensors read from a safetensors file can sit at unaligned addresses,
        # which the int8 kernel does not check (it crashes).
        self.register_buffer("weight_int8", weight_int8.clone(memory_format=torch.contiguous_format))
        self.register_buffer("weight_scale", scale.float().contiguous())
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch._weight_int8pack_mm(flat, self.weight_int8, self.weight_scale.to(torch.bfloat16))
        y = y.to(x.dtype).reshape(*shape, self.out_features)
        return y if self.bias is None else y + self.bias


def dynamic_linear(weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """torch.ao's dynamic int8 Linear holding exactly these int8 weights and scales."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    out_features, in_features = weight_int8.shape
    with warnings.catch_warnings():
        # torch 2.13 marks quantized tensors deprecated in favour of torchao; they are what the
        # fbgemm/oneDNN dynamic kernels consume, and the fastest eager int8 path on CPU here.
        warnings.simplefilter("ignore")
        module = DynamicLinear(in_features, out_features, bias_=bias is not None, dtype=torch.qint8)
        qweight = torch._make_per_channel_quantized_tensor(
            weight_int8, scale.double(), torch.zeros(out_features, dtype=torch.long), 0)
        module.set_weight_bias(qweight, bias)
    return module


def int8_linear(mode: str, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    if mode == "dynamic":
        return dynamic_linear(weight_int8, scale, bias)
    if mode == "weight_only":
        return Int8WeightOnlyLinear(weight_int8, scale, bias)
    raise ValueError(f"unknown int8 mode {mode!r}, expected one of {list(MODES)}")


class Int8Embedding(nn.Module):
    """Embedding rows stored int8 with one scale per row (token)."""

    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("weight_int8", weight_int8.contiguous())
        self.register_buffer("weight_scale", scale.float().contiguous())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight_int8).float() * self.weight_scale[idx].unsqueeze(-1)
