from kfp.dsl import Input, Metrics, Model, Output


def quantize(pruned: Input[Model], mode: str, calibration_steps: int,
             quantized: Output[Model], metrics: Output[Metrics]):
    """Post-training int8 quantization (mode: dynamic | weight_only | static) of the pruned model."""
    from vishwamai.kubeflow import stages

    stages.quantize(mode, calibration_steps, pruned.path, quantized.path, metrics)
    quantized.metadata.update({"stage": "quantize", "mode": mode})
