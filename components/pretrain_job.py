# No `from __future__ import annotations`: KFP reads these annotations at definition time.
from kfp.dsl import Dataset, Input, Metrics, Model, Output


def pretrain_job(overrides: list, model_preset: str, steps: int, job_settings: dict, namespace: str, run_id: str,
                 timeout_s: int, model: Output[Model], metrics: Output[Metrics], corpus: Input[Dataset] = None):
    """Train the teacher as a multi-node PyTorchJob (job_settings: image, nodes, GPUs, volume... fixed at
    compile time; see vishwamai.kubeflow.pytorchjob.build_job), follow it, then hand its model on."""
    from vishwamai.kubeflow import pytorchjob, stages

    job = pytorchjob.build_job(pytorchjob.job_name(run_id), namespace or pytorchjob.in_cluster_namespace(),
                               overrides=[], **job_settings)
    summary = stages.pretrain_job(overrides, model_preset, steps, job, model.path, metrics,
                                  corpus.path if corpus else None, timeout_s)
    model.metadata.update({"stage": "pretrain", "nodes": job_settings["nodes"],
                           "num_parameters": summary["num_parameters"]})
