# No `from __future__ import annotations`: KFP reads these annotations at definition time.
from kfp.dsl import Dataset, Input, Metrics, Model, Output


def quantize(pruned: Input[Model], dataset: Input[Dataset], mode: str, calibration_steps: int,
             quantized: Output[Model], metrics: Output[Metrics], corpus: Input[Dataset] = None):
    """Post-training int8 quantization (mode: dynamic | weight_only) of the pruned model.

    `quantized` is the pipeline's final model (a later HF-format export step reads this artifact)."""
    from vishwamai.kubeflow import stages

    stages.quantize(mode, calibration_steps, pruned.path, dataset.path, quantized.path, metrics,
                    corpus.path if corpus else None)
    quantized.metadata.update({"stage": "quantize", "mode": mode})
