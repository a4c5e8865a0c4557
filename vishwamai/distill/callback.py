"""The distillation callback: runs the frozen teacher(s) on the student's inputs and adds loss terms.

Terms added in on_loss (each logged as loss_<name>; they are the weighted contributions,
so loss = the sum of all loss_<name>):
  ce         (1 - alpha) * cross-entropy with the data        (the loop's term, rescaled)
  kd         alpha * T^2 * KL(teacher || student), softened by T
  feature    feature_distillation.loss_weight   * mean over the chosen block pairs
  hidden     hidden_distillation.loss_weight    * mean over every student block's pair
  embedding  embedding_distillation.loss_weight * (1 - cosine) of the embedding outputs
  attention  attention_distillation.loss_weight * mean over the mapped blocks' attention maps
With several teachers every term is the teachers' weighted mean.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vishwamai.distill.losses import attention_loss, kd_loss, representation_loss
from vishwamai.distill.plan import KINDS, REPRESENTATION_KINDS, Pair, projection_key
from vishwamai.distill.student_init import init_from_teacher
from vishwamai.distill.teachers import Teacher
from vishwamai.errors import CheckpointError
from vishwamai.train.events import ORDER_FEATURE, Callback


class Distillation(Callback):
    state_key = "distillation"
    order = ORDER_FEATURE  # adds loss terms: the step the checkpoint and loggers see includes them

    def __init__(self, ds, teachers: list[Teacher], plans: list[dict[str, list[Pair]]],
                 projections: nn.ModuleDict):
        tm = ds.teacher_model
        self.teachers, self.plans, self.projections = teachers, plans, projections
        self.student_init = ds.student_init
        self.alpha, self.temperature, self.chunk_size = tm.alpha, tm.temperature, tm.kd_chunk_size
        sections = {kind: getattr(ds, f"{kind}_distillation") for kind in KINDS}
        self.weights = {kind: s.loss_weight for kind, s in sections.items() if s.enabled}
        # The embedding loss is always cosine: embedding scales differ between models.
        self.kinds = {kind: getattr(s, "loss", "cosine") for kind, s in sections.items() if s.enabled}
        self.normalize = {kind: getattr(s, "normalize", False) for kind, s in sections.items() if s.enabled}
        wants_hidden = any(kind in self.weights for kind in REPRESENTATION_KINDS)
        # The extra outputs are computed only when a loss needs them (hidden states are cheap,
        # attention maps disable the fused attention kernel).
        self.model_outputs = {key: True for key, on in (("output_hidden_states", wants_hidden),
                                                        ("output_attentions", "attention" in self.weights)) if on}

    # ------------------------------------------------------------------ events
    def on_init(self, trainer) -> None:
        """Before any resume: the projections join the optimizer, so their state is saved with it."""
        if self.student_init == "teacher_layers":  # before the teachers move: the student is on its device
            chosen = init_from_teacher(trainer.raw_model, self.teachers[0].model)
            trainer.summary["student_init_teacher_blocks"] = chosen
        for teacher in self.teachers:
            teacher.model.to(trainer.device)
        self.projections.to(trainer.device)
        params = list(self.projections.parameters())
        if params:  # trained with the student's optimizer, lr schedule and gradient clipping
            trainer.add_param_group(params, weight_decay=trainer.cfg.training.optimizer.weight_decay)
        trainer.forward_kwargs.update(self.model_outputs)
        trainer.summary["distillation_teachers"] = [str(t.directory) for t in self.teachers]

    def on_loss(self, trainer, *, inputs, targets, outputs, terms: dict) -> None:
        with torch.no_grad():  # under the loop's autocast: AMP applies to the teacher too
            taught = [t.model(inputs, **self.model_outputs) for t in self.teachers]
        if self.alpha > 0:
            terms["ce"] = terms["ce"] * (1.0 - self.alpha)
            terms["kd"] = self.alpha * kd_loss(outputs.logits, [o.logits for o in taught], self.temperature,
                                               [t.weight for t in self.teachers], self.chunk_size)
        for kind, weight in self.weights.items():
            per_teacher = [t.weight * self._kind_loss(kind, k, outputs, o)
                           for k, (t, o) in enumerate(zip(self.teachers, taught))]
            terms[kind] = weight * sum(per_teacher)

    def on_after_backward(self, trainer) -> None:
        # The projections live outside the DDP-wrapped student: average their gradients here.
        if trainer.parallel.world_size > 1:
            for p in self.projections.parameters():
                if p.grad is not None:
                    p.grad.copy_(trainer.parallel.all_reduce_mean(p.grad))

    # ------------------------------------------------------------------ losses
    def _kind_loss(self, kind: str, k: int, student, teacher) -> torch.Tensor:
        pairs = self.plans[k][kind]
        if kind == "attention":
            losses = [attention_loss(student.attentions[p.student], teacher.attentions[p.teacher], self.kinds[kind])
                      for p in pairs]
        else:
            losses = [representation_loss(self._project(k, p.student, student.hidden_states[p.student]),
                                          teacher.hidden_states[p.teacher], self.kinds[kind], self.normalize[kind])
                      for p in pairs]
        return sum(losses) / len(losses)

    def _project(self, k: int, index: int, hidden: torch.Tensor) -> torch.Tensor:
        key = projection_key(k, index)
        return self.projections[key](hidden) if key in self.projections else hidden

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The projection weights (their AdamW moments are in the optimizer's own state)."""
        return {"projections": {k: v.detach().cpu() for k, v in self.projections.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("projections", {})
        expected = set(self.projections.state_dict())
        if set(saved) != expected:
            raise CheckpointError(f"the checkpoint's distillation projections {sorted(saved)} do not match this "
                                  f"run's {sorted(expected)} (different teacher, student or distillation layers)")
        self.projections.load_state_dict(saved)  # copies in place: the optimizer keeps its references
