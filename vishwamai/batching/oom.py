"""Recognising an out-of-memory error, reading what it asked for, and freeing what it held."""

from __future__ import annotations

import gc
import re
import traceback
from typing import Optional

import torch

# RuntimeError messages of allocation failures that are not raised as torch.OutOfMemoryError:
# the CPU allocator ("DefaultCPUAllocator: can't allocate memory"), MPS/XPU ("... out of memory"),
# and cuBLAS/cuDNN workspaces ("CUBLAS_STATUS_ALLOC_FAILED").
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "defaultcpuallocator",
                 "status_alloc_failed")
# "Tried to allocate 2.00 GiB" (CUDA) / "you tried to allocate 1125899906842624 bytes" (CPU).
_REQUEST = re.compile(r"tried to allocate\s+([\d.]+)\s*(bytes|[KMGT]i?B)", re.IGNORECASE)


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(error, RuntimeError):
        message = str(error).lower()
        return any(text in message for text in _OOM_MESSAGES)
    return False


def requested_memory(error: BaseException) -> Optional[str]:
    """The size of the failed allocation, as the allocator worded it ("2.00 GiB"), when it says."""
    match = _REQUEST.search(str(error))
    if not match:
        return None
    amount, unit = match.groups()
    if unit.lower() == "bytes":
        return f"{float(amount) / 2**30:.2f} GiB"
    return f"{amount} {unit}"


def release_memory(error: BaseException, device: torch.device) -> None:
    """Drop what the failed step still holds (activations referenced from the traceback's frames)."""
    # The traceback keeps every unwound frame alive, and with it the step's activations;
    # clear_frames skips frames still executing (the trainer's retry loop).
    traceback.clear_frames(error.__traceback__)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def skip_repeated_buffer_sync(model: torch.nn.Module) -> None:
    """Before redoing a failed no-grad forward under DDP: do not broadcast the buffers again.

    DDP broadcasts buffers at the start of the first forward after a training forward, and
    marks them synced only when that forward returns. A forward that ran out of memory has
    already taken part in the broadcast; broadcasting again on this rank alone would meet a
    different collective on the others and hang.
    """
    from torch.nn.parallel import DistributedDataParallel

    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if isinstance(model, DistributedDataParallel) and hasattr(model, "require_forward_param_sync"):
        model.require_forward_param_sync = False
