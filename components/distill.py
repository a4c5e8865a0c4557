from kfp.dsl import Dataset, Input, Metrics, Model, Output


def distill(teacher: Input[Model], dataset: Input[Dataset], overrides: list, student_overrides: list,
            steps: int, student: Output[Model], metrics: Output[Metrics]):
    """Distil the teacher into a smaller student (architecture from student_overrides)."""
    from vishwamai.kubeflow import stages

    summary = stages.distill(overrides, student_overrides, steps, teacher.path, dataset.path, student.path, metrics)
    student.metadata.update({"stage": "distill", "num_parameters": summary["num_parameters"]})
