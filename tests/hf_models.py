"""Tiny random Hugging Face models, built with transformers and saved to a temp dir (never downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 300
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)


def save_tiny(kind: str, directory: Path, dtype: torch.dtype = torch.float32, shard_size: str | None = None,
              **overrides) -> Path:
    """A random LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM / GPT2LMHeadModel saved as safetensors."""
    import transformers

    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                                         bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
                                         **overrides)
        model = transformers.GPT2LMHeadModel(config)
    else:
        names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[kind]
        config = getattr(transformers, f"{names}Config")(**{**SHAPE, "rope_theta": 5000.0, **overrides})
        model = getattr(transformers, f"{names}ForCausalLM")(config)
        with torch.no_grad():  # random norms and biases, so a mix-up of either shows in the logits
            for name, p in model.named_parameters():
                if name.endswith("norm.weight") or name.endswith(".bias"):
                    p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    model.to(dtype).save_pretrained(directory, **({"max_shard_size": shard_size} if shard_size else {}))
    return directory


def hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, use_safetensors=True)
    with torch.no_grad():
        return model.eval()(tokens).logits


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
