"""Teachers: trained models loaded from their checkpoints, frozen, checked against the student.

distillation.teacher_model.path (and .paths for an ensemble) take a run directory of this
project (its best checkpoint, else the latest, else final/), one checkpoint directory, or a
local Hugging Face model directory: Llama/Mistral/Qwen2 become vishwamai Transformers, any
other causal LM runs through transformers itself (vishwamai/hf/auto.py).
Each teacher's architecture comes from its own config, so it may be wider or deeper than
the student; only the vocabulary must match (cross-tokenizer distillation is out of scope).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vishwamai.checkpoint import find_model_dir, load_model
from vishwamai.errors import ConfigError, VishwamaiError
from vishwamai.hf import is_convertible_dir, is_hf_model_dir


@dataclass
class Teacher:
    model: torch.nn.Module  # a Transformer, or a TransformersCausalLM (same call and outputs)
    key: str  # the config key it came from, for error messages
    directory: Path
    weight: float  # share in the ensemble; the teachers' weights sum to 1

    @property
    def n_layers(self) -> int:
        return self.model.config.n_layers

    @property
    def width(self) -> int:
        return self.model.config.d_model


def teacher_specs(tm) -> list[tuple[str, str]]:
    """(config key, path) of every configured teacher, `path` first."""
    specs = [("distillation.teacher_model.path", tm.path)] if tm.path else []
    specs += [(f"distillation.teacher_model.paths[{i}]", p) for i, p in enumerate(tm.paths)]
    return specs


def read_teacher(spec: str, attentions: bool = False) -> tuple[torch.nn.Module, Path]:
    """The model at `spec`: ours (or converted to ours) when possible, else run by transformers."""
    if is_hf_model_dir(spec) and not is_convertible_dir(spec):
        from vishwamai.hf.auto import load_transformers_teacher

        return load_transformers_teacher(spec, attentions), Path(spec)
    directory = find_model_dir(spec)
    return load_model(directory), directory


def load_teacher(key: str, spec: str, dtype: torch.dtype, attentions: bool = False
                 ) -> tuple[torch.nn.Module, Path]:
    """The frozen model at `spec`; any problem reading it is a ConfigError naming `key`."""
    try:
        model, directory = read_teacher(spec, attentions)
    except (VishwamaiError, OSError) as e:
        raise ConfigError(key, f"cannot load the teacher from {spec}: {e}") from e
    model.requires_grad_(False)
    model.eval()  # no dropout: the teacher's targets are deterministic
    # Parameters only: the rotary tables stay float32 (bf16 cos/sin lose precision at long positions).
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model, directory


def load_teachers(cfg) -> list[Teacher]:
    """Every configured teacher on the CPU (moved to the training device by the callback)."""
    tm = cfg.distillation.teacher_model
    specs = teacher_specs(tm)
    raw = list(tm.weights) or [1.0] * len(specs)
    dtype = getattr(torch, tm.dtype)
    teachers = []
    for (key, spec), weight in zip(specs, raw):
        model, directory = load_teacher(key, spec, dtype, cfg.distillation.attention_distillation.enabled)
        check_compatible(model, cfg, key)
        teachers.append(Teacher(model, key, directory, weight / sum(raw)))
    return teachers


def check_compatible(teacher: torch.nn.Module, cfg, key: str) -> None:
    """Teacher and student must predict over the same tokens, on sequences of the run's length."""
    t = teacher.config
    if t.vocab_size != cfg.model.vocab_size:
        raise ConfigError(key, f"the teacher's vocabulary ({t.vocab_size} tokens) differs from the student's "
                               f"(model.vocab_size={cfg.model.vocab_size}): distillation needs the same "
                               "tokenizer and vocabulary")
    if t.max_seq_len < cfg.data.seq_len:
        raise ConfigError(key, f"the teacher's max_seq_len={t.max_seq_len} is shorter than data.seq_len="
                               f"{cfg.data.seq_len}")
