"""The compiled int8 path: torchao's dynamic int8 Linear under torch.compile, on the file's own int8 weights.

torch.ao's eager dynamic Linear (int8.py, mode=dynamic) runs one fbgemm/oneDNN call per Linear with
activations quantized per tensor, and everything between the matmuls stays eager fp32. Here each
Linear's weight is a torchao `Int8Tensor` holding exactly the stored int8 rows and per-channel scales
(symmetric; activations are quantized per token at run time) and the whole model goes through
torch.compile, so Inductor fuses the activation quantization, the rescale of the int8 matmul and the
norms / SwiGLU around them. Figures: bench/quantization.py, README "Compression".

Needs torchao (`pip install 'vishwamai[int8]'`) and a working torch.compile (Inductor's CPU backend
needs a C++ compiler). Where either is missing, or compiling fails, the loader logs why and builds
torch.ao's eager kernels from the same file instead (the same weights; loss equal within tolerance).
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

# Warm-up input: batch and length > 1, because torch.compile specialises sizes 0 and 1 and these
# should stay symbolic (dynamic=True): one graph then serves every batch > 1 and length.
WARMUP_SHAPE = (2, 8)


# Loggers quietened while torchao is imported: it logs the CUDA-only extensions it could not load
# (noise on CPU), and torch a deprecation of how torchao registers one of its enums.
_IMPORT_NOISE = ("torchao", "torch.utils._pytree")


def _torchao():
    """torchao's int8 tensor pieces (ImportError where torchao is missing or does not fit this torch)."""
    loggers = [logging.getLogger(name) for name in _IMPORT_NOISE]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        from torchao.quantization.granularity import PerRow
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor, QuantizeTensorToInt8Kwargs
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return Int8Tensor, QuantizeTensorToInt8Kwargs, PerRow


def unavailable_reason() -> Optional[str]:
    """None where the compiled path can be tried here, else why not (cheap checks, nothing compiled)."""
    try:
        _torchao()
    except ImportError as e:  # not installed, or a torchao that does not match this torch
        return f"torchao is not importable ({e}); install it with pip install 'vishwamai[int8]'"
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile (Dynamo) is not supported on this Python/platform"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # InvalidCxxCompiler, or a torch whose Inductor has no CPU toolchain
        return f"torch.compile's CPU backend cannot run: {type(e).__name__}: {e}"
    return None


class TorchaoInt8Linear(nn.Module):
    """y = x W^T + b, W a torchao Int8Tensor (int8 rows + one scale each, activations int8 per token)."""

    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None):
        super().__init__()
        Int8Tensor, ActKwargs, PerRow = _torchao()
        out_features, in_features = weight_int8.shape
        self.in_features, self.out_features = in_features, out_features
        weight = Int8Tensor(weight_int8.contiguous(), scale.float().reshape(out_features, 1).contiguous(),
                            [1, in_features], torch.float32, act_quant_kwargs=ActKwargs(granularity=PerRow()))
        # Buffers, not parameters: nothing here trains, and the loader's parameter check counts only fp32 tensors.
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def torchao_linear(weight_int8: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Module:
    return TorchaoInt8Linear(weight_int8, scale, bias)


def compiled_or_none(build: Callable[[], nn.Module]) -> Optional[nn.Module]:
    """`build()` (a model of TorchaoInt8Linears) compiled and warmed up, or None with the reason logged."""
    reason = unavailable_reason()
    if reason is None:
        start = time.perf_counter()
        try:
            model = build()
            model.compile(dynamic=True)
            # Compiled now, so that a failure falls back here, not in the caller's first forward.
            with torch.no_grad(), warnings.catch_warnings():
                # torchao's Int8Tensor has no stable hash for AOTAutograd's cache: a cache miss, not an error.
                warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching")
                model(torch.zeros(WARMUP_SHAPE[0], min(WARMUP_SHAPE[1], model.config.max_seq_len), dtype=torch.long))
        except Exception as e:  # Dynamo/Inductor raise many types; the eager path needs none of them
            first_line = (str(e).strip().splitlines() or [""])[0]
            reason = f"torch.compile failed: {type(e).__name__}: {first_line}"
        else:
            log.info("int8: torchao dynamic int8 under torch.compile (compiled in %.1f s)", time.perf_counter() - start)
            return model
    log.warning("int8: the compiled torchao path is unavailable, using torch.ao's eager dynamic kernels: %s", reason)
    return None
