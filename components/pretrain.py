# No `from __future__ import annotations`: KFP reads these annotations at definition time.
from kfp.dsl import Dataset, Metrics, Model, Output


def pretrain(overrides: list, model_preset: str, steps: int,
             model: Output[Model], dataset: Output[Dataset], metrics: Output[Metrics]):
    """Train the teacher from scratch (`model=<model_preset>`) on the configured corpus."""
    from vishwamai.kubeflow import stages

    summary = stages.pretrain(overrides, model_preset, steps, model.path, dataset.path, metrics)
    model.metadata.update({"stage": "pretrain", "num_parameters": summary["num_parameters"]})
