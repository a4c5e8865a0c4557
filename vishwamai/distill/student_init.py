"""distillation.student_init=teacher_layers: a student that starts as a thinner copy of its teacher.

DistilBERT's recipe: the student keeps the teacher's width and per-block shapes, and block i
starts from the teacher block at the same relative depth (the uniform map of plan.py, so with
hidden distillation each block starts where it is later compared); embeddings, final norm and
output head are copied whole.  The first teacher (teacher_model.path, else paths[0]) is used.
"""

from __future__ import annotations

import torch

from vishwamai.config import ModelConfig
from vishwamai.distill.plan import uniform_layer_map
from vishwamai.errors import ConfigError, VishwamaiError
from vishwamai.model.transformer import ffn_hidden_size

KEY = "distillation.student_init"
# Per-block shapes and numerics the student takes from the teacher (model.n_layers stays its own).
ADOPTED = ("vocab_size", "n_heads", "n_kv_heads", "tie_embeddings", "rope_theta", "rope_scaling", "norm_eps",
           "qkv_bias")


def teacher_config(cfg) -> ModelConfig:
    from vishwamai.checkpoint import find_model_dir, read_model_config
    from vishwamai.distill.teachers import teacher_specs

    key, spec = teacher_specs(cfg.distillation.teacher_model)[0]
    try:
        return read_model_config(find_model_dir(spec))
    except (VishwamaiError, OSError) as e:
        raise ConfigError(KEY, f"teacher_layers needs a teacher vishwamai can convert ({key}={spec}): {e}") from e


def adopt_teacher_shape(cfg) -> None:
    """Before the student is built: its blocks take the teacher's shapes; another width is refused."""
    if cfg.distillation.student_init != "teacher_layers":
        return
    teacher = teacher_config(cfg)
    if cfg.model.d_model != teacher.d_model:
        raise ConfigError(KEY, f"teacher_layers needs the teacher's width: model.d_model={cfg.model.d_model}, "
                               f"the teacher's d_model={teacher.d_model}")
    if cfg.model.n_layers > teacher.n_layers:
        raise ConfigError(KEY, f"the student (model.n_layers={cfg.model.n_layers}) has more blocks than the "
                               f"teacher ({teacher.n_layers})")
    for key in ADOPTED:
        cfg.model[key] = getattr(teacher, key)
    cfg.model.ffn_hidden = ffn_hidden_size(teacher)


@torch.no_grad()
def init_from_teacher(student: torch.nn.Module, teacher: torch.nn.Module) -> list[int]:
    """Copy embeddings, final norm, head and evenly spaced blocks; returns the teacher block of each."""
    n_student, n_teacher = len(student.blocks), len(teacher.blocks)
    chosen = [uniform_layer_map(i, n_student, n_teacher) for i in range(n_student)]
    state = teacher.state_dict()
    source = {name: t for name, t in state.items() if not name.startswith("blocks.")}
    for i, t in enumerate(chosen):
        prefix = f"blocks.{t}."
        source.update({f"blocks.{i}.{name[len(prefix):]}": v for name, v in state.items() if name.startswith(prefix)})
    student.load_state_dict(source, strict=True)
    return chosen
