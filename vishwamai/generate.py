"""Text from a model: `generate_text`, and the end-of-run sample (training.sample_prompt).

A newcomer's first run should show that the model learned something: with
training.sample_prompt set (the demo sets it) the run ends by generating
training.sample_tokens tokens from the prompt; the text is printed, goes into
summary.json ("sample") and into the run report.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from vishwamai.train.events import Callback

# Mildly sharpened sampling: greedy decoding of a small model loops on one line.
TEMPERATURE = 0.8
TOP_K = 40


@torch.no_grad()
def generate_text(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int, *,
                  temperature: float = TEMPERATURE, top_k: Optional[int] = TOP_K, seed: int = 0,
                  autocast=None) -> str:
    """`prompt` continued by `max_new_tokens` sampled tokens (the prompt not included), decoded.

    Seeded and run on a forked RNG: the same model gives the same text, and the caller's random
    state (saved in checkpoints) is untouched.  `autocast`: a context factory (amp; required
    when the weights are in a half-precision dtype, amp O2)."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            with autocast() if autocast else contextlib.nullcontext():
                out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, len(ids):].tolist())


class Sample(Callback):
    """At the end of training: a sample from the trained model into the summary (and so the report)."""

    def __init__(self, prompt: str, max_new_tokens: int, tokenizer_spec: str, seed: int):
        self.prompt, self.max_new_tokens, self.seed = prompt, max_new_tokens, seed
        self.tokenizer_spec = tokenizer_spec

    def on_train_end(self, trainer) -> None:
        from vishwamai.data.tokenizer import build_tokenizer

        # Every rank generates: under FSDP each forward gathers the shards from all of them.
        text = generate_text(trainer.raw_model, build_tokenizer(self.tokenizer_spec), self.prompt,
                             self.max_new_tokens, seed=self.seed, autocast=trainer.precision.autocast)
        trainer.summary.update(sample_prompt=self.prompt, sample=text)


def build_sampling(cfg) -> list[Callback]:
    t = cfg.training
    if not t.sample_prompt:
        return []
    return [Sample(t.sample_prompt, t.sample_tokens, cfg.data.tokenizer, t.seed)]
