# No `from __future__ import annotations`: KFP reads these annotations at definition time.
from kfp.dsl import Dataset, Input, Metrics, Model, Output


def prepare(overrides: list, model_preset: str, pretrain_steps: int, student_overrides: list, distill_steps: int,
            target_sparsity: float, prune_steps: int, dataset: Output[Dataset], metrics: Output[Metrics],
            corpus: Input[Dataset] = None, teacher: Input[Model] = None):
    """Check every stage's config (and the teacher, if given), then tokenise the corpus once.

    Exit code 2 with the culprit named on a user error; the pipeline runs this step without retries."""
    from vishwamai.kubeflow import stages

    checks = stages.stage_checks(overrides, model_preset, pretrain_steps, student_overrides, distill_steps,
                                 target_sparsity, prune_steps, skip_pretrain=teacher is not None)
    info = stages.prepare(checks, dataset.path, corpus.path if corpus else None, teacher.path if teacher else None)
    for key, value in info.items():
        metrics.log_metric(key, float(value))
    dataset.metadata.update({"stage": "prepare", **info})
