"""Dynamic batch size (dynamic_batch_size.*): see controller.py for the behaviour."""

from vishwamai.batching.controller import BatchSizeMemoryError, DynamicBatchSize, build_dynamic_batch
from vishwamai.batching.oom import is_out_of_memory, release_memory, requested_memory

__all__ = ["BatchSizeMemoryError", "DynamicBatchSize", "build_dynamic_batch", "is_out_of_memory",
           "release_memory", "requested_memory"]
