# No `from __future__ import annotations`: KFP reads these annotations at definition time.
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output


def evaluate(teacher: Input[Model], student: Input[Model], pruned: Input[Model], quantized: Input[Model],
             dataset: Input[Dataset], metrics: Output[Metrics], report: Output[Markdown],
             report_html: Output[HTML], corpus: Input[Dataset] = None):
    """Compare the four models (loss, perplexity, size, latency): metrics, a report and its plot."""
    import tempfile

    from vishwamai.kubeflow import stages

    models = {"teacher": teacher.path, "student": student.path, "pruned": pruned.path, "quantized": quantized.path}
    with tempfile.TemporaryDirectory() as out:
        stages.evaluate(models, dataset.path, out, metrics, report.path, report_html.path,
                        corpus.path if corpus else None)
