"""Tokenizer, corpus -> cached token file read window by window, seeded rank-aware samplers
(read ahead in a background thread: prefetch.py)."""

from vishwamai.data.dataset import SequenceSampler, TokenData, eval_batches, load_token_data
from vishwamai.data.prefetch import PrefetchingSampler, train_sampler
from vishwamai.data.tokenizer import ByteTokenizer, build_tokenizer

__all__ = ["ByteTokenizer", "PrefetchingSampler", "SequenceSampler", "TokenData", "build_tokenizer", "eval_batches",
           "load_token_data", "train_sampler"]
