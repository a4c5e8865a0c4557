# No `from __future__ import annotations`: KFP reads these annotations at definition time.
from kfp.dsl import Dataset, Input, Metrics, Model, Output


def pretrain(overrides: list, model_preset: str, steps: int, dataset: Input[Dataset],
             model: Output[Model], metrics: Output[Metrics], corpus: Input[Dataset] = None):
    """Train the teacher from scratch (`model=<model_preset>`) on the corpus `prepare` tokenised."""
    from vishwamai.kubeflow import stages

    summary = stages.pretrain(overrides, model_preset, steps, model.path, dataset.path, metrics,
                              corpus.path if corpus else None)
    model.metadata.update({"stage": "pretrain", "num_parameters": summary["num_parameters"]})
