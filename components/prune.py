# No `from __future__ import annotations`: KFP reads these annotations at definition time.
from kfp.dsl import Dataset, Input, Metrics, Model, Output


def prune(student: Input[Model], dataset: Input[Dataset], overrides: list, target_sparsity: float, steps: int,
          pruned: Output[Model], metrics: Output[Metrics], corpus: Input[Dataset] = None):
    """Fine-tune the student while pruning it to target_sparsity."""
    from vishwamai.kubeflow import stages

    summary = stages.prune(overrides, target_sparsity, steps, student.path, dataset.path, pruned.path, metrics,
                           corpus.path if corpus else None)
    pruned.metadata.update({"stage": "prune", "target_sparsity": target_sparsity,
                            "num_parameters": summary["num_parameters"]})
