"""Any causal LM that transformers loads (GPT-2, Phi, Gemma, ...) as a distillation teacher.

The model runs through transformers itself, behind the same interface as vishwamai's
Transformer: `model(idx, output_hidden_states=..., output_attentions=...)` returns a
ModelOutput, and `model.config` carries the shape the distillation plan needs.  Hidden
states follow transformers' convention (index 0 = embeddings; the last one is after the
final norm for most models).  Loading is safetensors only, never remote code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vishwamai.errors import CheckpointError, InsufficientMemoryError
from vishwamai.hf.weights import weight_files
from vishwamai.model import available_memory_bytes
from vishwamai.model.transformer import ModelOutput


@dataclass(frozen=True)
class TeacherShape:
    """What distillation reads from a teacher's config (the subset of ModelConfig it uses)."""

    name: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    max_seq_len: int


class TransformersCausalLM(nn.Module):
    def __init__(self, model: nn.Module, shape: TeacherShape):
        super().__init__()
        self.hf = model
        self.config = shape

    def forward(self, idx: torch.Tensor, *, output_hidden_states: bool = False,
                output_attentions: bool = False) -> ModelOutput:
        out = self.hf(input_ids=idx, output_hidden_states=output_hidden_states,
                      output_attentions=output_attentions, use_cache=False)
        return ModelOutput(logits=out.logits, hidden_states=list(out.hidden_states or ()),
                           attentions=list(out.attentions or ()))


def _shape(config, directory: Path) -> TeacherShape:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        return TeacherShape(name=f"hf-{text.model_type}", vocab_size=text.vocab_size, d_model=text.hidden_size,
                            n_layers=text.num_hidden_layers, n_heads=text.num_attention_heads,
                            max_seq_len=getattr(text, "max_position_embeddings", None) or 2**31)
    except AttributeError as e:
        raise CheckpointError(f"{directory}/config.json: not a decoder config transformers can describe ({e})") from e


def load_transformers_teacher(directory: str | Path, attentions: bool = False) -> TransformersCausalLM:
    """Load through transformers (float32, CPU); `attentions` picks the eager kernel that returns maps."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    weight_files(directory)  # refuses pickle-only and weightless directories with vishwamai's message
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=False, local_files_only=True)
        with torch.device("meta"):  # the memory check, before anything is allocated
            n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"{directory}: transformers cannot load this model without remote code: {e}") from e
    need, have = 4 * n_params, available_memory_bytes(torch.device("cpu"))
    if need > have:
        raise InsufficientMemoryError(f"{directory}: the teacher needs about {need / 2**30:.1f} GiB in float32, "
                                      f"{have / 2**30:.1f} GiB is available")
    model = AutoModelForCausalLM.from_pretrained(
        directory, trust_remote_code=False, use_safetensors=True, local_files_only=True, dtype=torch.float32,
        attn_implementation="eager" if attentions else "sdpa")
    return TransformersCausalLM(model, _shape(config, directory))
