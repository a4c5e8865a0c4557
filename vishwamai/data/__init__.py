"""Tokenizer, corpus -> cached token file read window by window, seeded rank-aware samplers."""

from vishwamai.data.dataset import SequenceSampler, TokenData, eval_batches, load_token_data
from vishwamai.data.tokenizer import ByteTokenizer, build_tokenizer

__all__ = ["ByteTokenizer", "SequenceSampler", "TokenData", "build_tokenizer", "eval_batches", "load_token_data"]
