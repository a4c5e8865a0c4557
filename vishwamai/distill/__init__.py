"""Knowledge distillation (distillation.*): a student learns from frozen teacher model(s).

  teachers.py  load, freeze and check the teacher checkpoint(s)
  plan.py      which student layer meets which teacher layer; projections between widths
  losses.py    KD (chunked KL), representation (MSE / cosine) and attention losses
  callback.py  Distillation: runs the teachers in on_loss and adds the loss terms

build_distillation(cfg) runs in training_v2.build_callbacks, before Trainer.fit: a missing
or unreadable teacher, a vocabulary mismatch or a layer index out of range is a
ConfigError naming the key before any training step.
"""

from __future__ import annotations

from vishwamai.distill.callback import Distillation
from vishwamai.distill.losses import attention_loss, kd_loss, representation_loss
from vishwamai.distill.plan import Pair, build_projections, layer_pairs, uniform_layer_map
from vishwamai.distill.teachers import Teacher, load_teachers
from vishwamai.errors import NotImplementedYet

__all__ = ["Distillation", "Pair", "Teacher", "attention_loss", "build_distillation", "kd_loss",
           "layer_pairs", "load_teachers", "representation_loss", "uniform_layer_map"]


def build_distillation(cfg) -> list:
    """The Distillation callback when distillation.enabled, else nothing."""
    ds = cfg.distillation
    if not ds.enabled:
        return []
    teachers = load_teachers(cfg)
    plans = [layer_pairs(ds, cfg.model.n_layers, t.n_layers, t.key) for t in teachers]
    projections = build_projections(plans, cfg.model.d_model, [t.width for t in teachers], cfg.training.seed)
    if len(projections) and cfg.distributed.strategy == "model_parallel":
        raise NotImplementedYet("distillation.feature_distillation",
                                "width projections (teacher and student widths differ) with "
                                "distributed.strategy=model_parallel; use data_parallel or equal widths")
    return [Distillation(ds, teachers, plans, projections)]
