"""Which student layer is compared with which teacher layer, and the projections between widths.

Indices: "block i" is the i-th transformer block (0-based).  In a ModelOutput,
hidden_states[0] is the embedding output and hidden_states[i + 1] the output of block i;
attentions[i] is block i's attention map.  A Pair's `student` / `teacher` index
hidden_states for the representation losses and attentions for the attention loss.

Depth mapping (uniform): student block i of Ls is matched with teacher block
    round((i + 1) * Lt / Ls) - 1        (halves round up)
i.e. the teacher block at the same relative depth, counting block outputs from the top:
the student's last block always meets the teacher's last block, and equal depths map
block i to block i.  E.g. Ls=2, Lt=4: 0->1, 1->3;  Ls=3, Lt=12: 0->3, 1->7, 2->11.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vishwamai.errors import ConfigError

REPRESENTATION_KINDS = ("feature", "hidden", "embedding")
KINDS = REPRESENTATION_KINDS + ("attention",)


@dataclass(frozen=True)
class Pair:
    student: int
    teacher: int


def uniform_layer_map(block: int, n_student: int, n_teacher: int) -> int:
    """The teacher block at the same relative depth as student block `block` (see module doc)."""
    mapped = math.floor((block + 1) * n_teacher / n_student + 0.5) - 1
    return min(n_teacher - 1, max(0, mapped))


def _check_blocks(blocks, n_layers: int, key: str, whose: str) -> None:
    bad = [b for b in blocks if not 0 <= b < n_layers]
    if bad:
        raise ConfigError(key, f"block index {bad[0]} is out of range: the {whose} has {n_layers} blocks "
                               f"(valid: 0..{n_layers - 1})")


def layer_pairs(ds, n_student: int, n_teacher: int, teacher_key: str) -> dict[str, list[Pair]]:
    """Pairs per enabled loss kind for one teacher; a bad layer index is a ConfigError."""
    pairs: dict[str, list[Pair]] = {}
    f = ds.feature_distillation
    if f.enabled:
        _check_blocks(f.layers, n_student, "distillation.feature_distillation.layers", "student")
        if f.teacher_layers is not None:
            _check_blocks(f.teacher_layers, n_teacher, "distillation.feature_distillation.teacher_layers",
                          f"teacher ({teacher_key})")
            targets = list(f.teacher_layers)
        else:
            targets = [uniform_layer_map(b, n_student, n_teacher) for b in f.layers]
        pairs["feature"] = [Pair(s + 1, t + 1) for s, t in zip(f.layers, targets)]
    if ds.hidden_distillation.enabled:  # every block's output
        pairs["hidden"] = [Pair(b + 1, uniform_layer_map(b, n_student, n_teacher) + 1) for b in range(n_student)]
    if ds.embedding_distillation.enabled:
        pairs["embedding"] = [Pair(0, 0)]
    a = ds.attention_distillation
    if a.enabled:
        blocks = list(range(n_student)) if a.layers is None else list(a.layers)
        _check_blocks(blocks, n_student, "distillation.attention_distillation.layers", "student")
        if not blocks:
            raise ConfigError("distillation.attention_distillation.layers", "must not be empty (null = all)")
        pairs["attention"] = [Pair(b, uniform_layer_map(b, n_student, n_teacher)) for b in blocks]
    return pairs


def projection_key(teacher_index: int, hidden_index: int) -> str:
    return f"teacher{teacher_index}_hidden{hidden_index}"


def build_projections(plans: list[dict[str, list[Pair]]], student_width: int, teacher_widths: list[int],
                      seed: int) -> nn.ModuleDict:
    """A bias-free Linear(student width -> teacher width) per compared student hidden state and
    teacher whose width differs (shared by the feature/hidden/embedding losses that use it)."""
    generator = torch.Generator().manual_seed(seed)  # own stream: the global RNG is not disturbed
    projections = nn.ModuleDict()
    for k, (plan, width) in enumerate(zip(plans, teacher_widths)):
        if width == student_width:
            continue
        for kind in REPRESENTATION_KINDS:
            for pair in plan.get(kind, ()):
                key = projection_key(k, pair.student)
                if key not in projections:
                    layer = nn.Linear(student_width, width, bias=False)
                    nn.init.normal_(layer.weight, std=student_width ** -0.5, generator=generator)
                    projections[key] = layer
    return projections
