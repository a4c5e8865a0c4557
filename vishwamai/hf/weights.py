"""Tensor names and layouts: Hugging Face Llama/Mistral/Qwen2 <-> vishwamai's Transformer.

One table (`hf_slots`) serves both directions.  vishwamai fuses two HF tensors into one:
  k_proj ; v_proj       -> attn.kv_proj   (rows: keys, then values)
  gate_proj ; up_proj   -> mlp.gate_up    (rows: gate, then up)
so an HF tensor is "part k of n" of a vishwamai tensor, split along rows.  RoPE needs no
permutation: both rotate the two halves of each head (rotate_half).

Loading reads one tensor at a time from each shard (safetensors memory-maps the file) and
copies it into the already-built model, so there is never a second full copy of the weights;
bf16/fp16 tensors are cast into the model's dtype by the copy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from vishwamai.config import ModelConfig
from vishwamai.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Buffers some older checkpoints store; they are recomputed from the config.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Slot:
    target: str  # vishwamai parameter name
    part: int = 0  # which row block of `target`
    parts: int = 1


def hf_slots(cfg: ModelConfig) -> dict[str, Slot]:
    """Every HF tensor name the model has -> where it lives in vishwamai's Transformer."""
    slots = {"model.embed_tokens.weight": Slot("embed.weight"), "model.norm.weight": Slot("norm.weight")}
    if not cfg.tie_embeddings:
        slots["lm_head.weight"] = Slot("lm_head.weight")
    for i in range(cfg.n_layers):
        hf, ours = f"model.layers.{i}.", f"blocks.{i}."
        slots.update({
            hf + "input_layernorm.weight": Slot(ours + "attn_norm.weight"),
            hf + "post_attention_layernorm.weight": Slot(ours + "mlp_norm.weight"),
            hf + "self_attn.o_proj.weight": Slot(ours + "attn.o_proj.weight"),
            hf + "mlp.gate_proj.weight": Slot(ours + "mlp.gate_up.weight", 0, 2),
            hf + "mlp.up_proj.weight": Slot(ours + "mlp.gate_up.weight", 1, 2),
            hf + "mlp.down_proj.weight": Slot(ours + "mlp.down.weight"),
        })
        kinds = ("weight", "bias") if cfg.qkv_bias else ("weight",)
        for kind in kinds:
            slots[hf + f"self_attn.q_proj.{kind}"] = Slot(ours + f"attn.q_proj.{kind}")
            slots[hf + f"self_attn.k_proj.{kind}"] = Slot(ours + f"attn.kv_proj.{kind}", 0, 2)
            slots[hf + f"self_attn.v_proj.{kind}"] = Slot(ours + f"attn.kv_proj.{kind}", 1, 2)
    return slots


def slot_view(tensor: torch.Tensor, slot: Slot) -> torch.Tensor:
    """The rows of `tensor` that `slot` covers (a view: writing to it writes the parameter)."""
    rows = tensor.shape[0] // slot.parts
    return tensor[slot.part * rows:(slot.part + 1) * rows]


# ----------------------------------------------------------------------- files
def _inside(directory: Path, name: str, index: Path) -> Path:
    """A shard named by the index; names that would leave the directory are refused."""
    path = directory / name
    if Path(name).name != name or not path.is_file():
        raise CheckpointError(f"{index} names shard {name!r}, which is not a file in {directory}")
    return path


def weight_files(directory: str | Path) -> dict[Path, list[str] | None]:
    """Shard -> the tensor names the index assigns to it (None: every tensor of a single file)."""
    d = Path(directory)
    if (d / INDEX_FILE).is_file():
        index = d / INDEX_FILE
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
        shards: dict[Path, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(_inside(d, shard, index), []).append(name)
        return shards
    if (d / SINGLE_FILE).is_file():
        return {d / SINGLE_FILE: None}
    if any((d / p).is_file() for p in PICKLE_FILES):
        raise CheckpointError(f"{d} holds only pickle weights (pytorch_model.bin), which vishwamai never loads "
                              "(unpickling can run code): convert them to safetensors first, e.g. "
                              "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True) "
                              "on a machine you trust")
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {d}")


def iter_tensors(directory: str | Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """(name, tensor, file) one at a time, shard by shard."""
    for path, names in weight_files(directory).items():
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
                for name in names if names is not None else sorted(keys):
                    if name not in keys:
                        raise CheckpointError(f"{path} lacks tensor {name!r} that its index assigns to it")
                    yield name, f.get_tensor(name), path
        except SafetensorError as e:
            raise CheckpointError(f"corrupt or truncated weights file {path}: {e}") from e


# ---------------------------------------------------------------------- import
@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, cfg: ModelConfig, directory: str | Path) -> None:
    """Copy the directory's tensors into `model` in place; every tensor must match exactly once."""
    slots = hf_slots(cfg)
    params = dict(model.named_parameters())
    seen: set[str] = set()
    for name, tensor, path in iter_tensors(directory):
        if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and cfg.tie_embeddings):
            continue  # a tied head stored anyway is the embedding again
        slot = slots.get(name)
        if slot is None:
            raise CheckpointError(f"{path}: unexpected tensor {name!r} for this {cfg.name} configuration")
        target = slot_view(params[slot.target], slot)
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, the config "
                                  f"({Path(directory) / 'config.json'}) implies {tuple(target.shape)}")
        target.copy_(tensor)
        seen.add(name)
    missing = sorted(set(slots) - seen)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{directory}: missing tensor(s) {missing[:3]}{more}")


# ---------------------------------------------------------------------- export
def to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """vishwamai-named weights -> HF-named, contiguous, in `dtype` (a tied head is left to HF to tie)."""
    return {name: slot_view(state[slot.target], slot).to(dtype).contiguous()
            for name, slot in hf_slots(cfg).items()}
