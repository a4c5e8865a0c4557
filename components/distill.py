# No `from __future__ import annotations`: KFP reads these annotations at definition time.
from kfp.dsl import Dataset, Input, Metrics, Model, Output


def distill(teacher: Input[Model], dataset: Input[Dataset], overrides: list, student_overrides: list,
            steps: int, student: Output[Model], metrics: Output[Metrics], corpus: Input[Dataset] = None):
    """Distil the teacher into a smaller student (architecture from student_overrides)."""
    from vishwamai.kubeflow import stages

    summary = stages.distill(overrides, student_overrides, steps, teacher.path, dataset.path, student.path, metrics,
                             corpus.path if corpus else None)
    student.metadata.update({"stage": "distill", "num_parameters": summary["num_parameters"]})
