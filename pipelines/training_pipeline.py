"""pretrain -> distill -> prune -> quantize -> evaluate, as one KFP v2 pipeline.

Runtime parameters (chosen per run, in the KFP UI or `vishwamai-pipeline run --param k=v`):
model size, steps per stage, the student's architecture, sparsity, quantization mode, and
Hydra overrides applied to every training stage.  Pod settings (image, CPU/memory/GPU
requests and limits, node selector, tolerations, retries, caching) are fixed when the
pipeline is compiled (`PodSettings`, from the CLI's flags), as Kubernetes needs them in the
compiled spec.
"""

# No `from __future__ import annotations`: KFP reads the pipeline signature's annotations.

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

from kfp import dsl, kubernetes
from kfp.dsl import HTML, Markdown, Metrics

from components import DEFAULT_IMAGE, build_components

PIPELINE_NAME = "vishwamai-compress"
STAGE_ORDER = ("pretrain", "distill", "prune", "quantize", "evaluate")
IMAGE_UID = 10001  # USER in the Dockerfile
DEFAULT_STUDENT = ["model.d_model=128", "model.n_layers=2", "model.n_heads=4"]


@dataclass
class PodSettings:
    """Resources and scheduling for every stage's pod."""

    cpu_request: str = "2"
    cpu_limit: str = "4"
    memory_request: str = "4G"
    memory_limit: str = "8G"
    gpus: int = 0  # per training pod; 0 = CPU only
    gpu_resource: str = "nvidia.com/gpu"
    node_selector: dict[str, str] = field(default_factory=dict)
    # (key, operator Equal|Exists, value or None, effect or None)
    tolerations: list[tuple[str, str, Optional[str], Optional[str]]] = field(default_factory=list)
    retries: int = 2
    retry_backoff: str = "60s"
    caching: bool = True
    timeout_s: int = 0  # 0 = none

    def apply(self, task: dsl.PipelineTask, gpu: bool) -> dsl.PipelineTask:
        # The image's own non-root user (Dockerfile); KFP adds no privilege escalation, drops capabilities.
        kubernetes.set_security_context(task, run_as_user=IMAGE_UID, run_as_group=IMAGE_UID, run_as_non_root=True)
        task.set_cpu_request(self.cpu_request).set_cpu_limit(self.cpu_limit)
        task.set_memory_request(self.memory_request).set_memory_limit(self.memory_limit)
        if gpu and self.gpus > 0:
            task.set_accelerator_type(self.gpu_resource).set_accelerator_limit(self.gpus)
        for key, value in self.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for key, operator, value, effect in self.tolerations:
            kubernetes.add_toleration(task, key=key, operator=operator, value=value, effect=effect)
        # Retries cover the transient failures (evicted pod, lost node); a bad config fails
        # the same way each time, and only costs `retries` quick restarts.
        task.set_retry(num_retries=self.retries, backoff_duration=self.retry_backoff, backoff_factor=2.0)
        task.set_caching_options(self.caching)
        if self.timeout_s:
            kubernetes.set_timeout(task, self.timeout_s)
        return task


def build_pipeline(image: str = DEFAULT_IMAGE, pod: Optional[PodSettings] = None) -> Callable:
    """The pipeline function, its components running in `image` with `pod` settings."""
    pod = pod or PodSettings()
    c = build_components(image)

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="vishwamai: pretrain a teacher, distil a student, prune, int8-quantize, evaluate")
    def vishwamai_pipeline(
        model_preset: str = "tiny",
        pretrain_steps: int = 300,
        distill_steps: int = 300,
        prune_steps: int = 200,
        student_overrides: list = DEFAULT_STUDENT,
        target_sparsity: float = 0.5,
        quantization_mode: str = "dynamic",
        calibration_steps: int = 16,
        overrides: list = [],
    ) -> NamedTuple("Outputs", metrics=Metrics, report=Markdown, report_html=HTML):
        pre = c["pretrain"](overrides=overrides, model_preset=model_preset, steps=pretrain_steps)
        pre.set_display_name("pretrain (teacher)")
        dis = c["distill"](teacher=pre.outputs["model"], dataset=pre.outputs["dataset"], overrides=overrides,
                           student_overrides=student_overrides, steps=distill_steps)
        dis.set_display_name("distill (student)")
        pru = c["prune"](student=dis.outputs["student"], dataset=pre.outputs["dataset"], overrides=overrides,
                         target_sparsity=target_sparsity, steps=prune_steps)
        qua = c["quantize"](pruned=pru.outputs["pruned"], dataset=pre.outputs["dataset"], mode=quantization_mode,
                            calibration_steps=calibration_steps)
        ev = c["evaluate"](teacher=pre.outputs["model"], student=dis.outputs["student"],
                           pruned=pru.outputs["pruned"], quantized=qua.outputs["quantized"],
                           dataset=pre.outputs["dataset"])
        for task in (pre, dis, pru):
            pod.apply(task, gpu=True)
        for task in (qua, ev):  # int8 kernels and the comparison run on CPU
            pod.apply(task, gpu=False)
        outputs = NamedTuple("Outputs", metrics=Metrics, report=Markdown, report_html=HTML)
        return outputs(ev.outputs["metrics"], ev.outputs["report"], ev.outputs["report_html"])

    return vishwamai_pipeline


def compile_pipeline(output: str, image: str = DEFAULT_IMAGE, pod: Optional[PodSettings] = None) -> str:
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(image, pod), package_path=output)
    return output
