# No `from __future__ import annotations`: KFP reads these annotations at definition time.
from kfp.dsl import Input, Model, Output


def export(quantized: Input[Model], pruned: Input[Model], dtype: str, exported: Output[Model]):
    """The pipeline's final model as a Hugging Face directory (config.json, model.safetensors,
    generation_config.json, the run's tokenizer): transformers, vLLM and TGI load it. int8 weights
    are written dequantized in `dtype` (float32 | bfloat16 | float16)."""
    from vishwamai.kubeflow import stages

    stages.export(quantized.path, pruned.path, dtype, exported.path)
    exported.metadata.update({"stage": "export", "format": "huggingface", "dtype": dtype})
