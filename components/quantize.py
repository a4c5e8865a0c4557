from kfp.dsl import Dataset, Input, Metrics, Model, Output


def quantize(pruned: Input[Model], dataset: Input[Dataset], mode: str, calibration_steps: int,
             quantized: Output[Model], metrics: Output[Metrics]):
    """Post-training int8 quantization (mode: dynamic | weight_only | static) of the pruned model."""
    from vishwamai.kubeflow import stages

    stages.quantize(mode, calibration_steps, pruned.path, dataset.path, quantized.path, metrics)
    quantized.metadata.update({"stage": "quantize", "mode": mode})
