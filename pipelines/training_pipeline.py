"""prepare -> pretrain -> distill -> prune -> quantize -> evaluate + export, as one KFP v2 pipeline.

Outputs: the comparison (metrics, report, report_html) and `model`, the final (pruned, quantized)
model exported as a Hugging Face directory (vishwamai.export; int8 weights dequantized to `export_dtype`).

Runtime parameters (chosen per run, in the KFP UI or `vishwamai-pipeline run --param k=v`):
model size, steps per stage, the student's architecture, sparsity, quantization mode, Hydra
overrides applied to every training stage, and - when compiled with them - `corpus_uri` (the
user's text, brought in with dsl.importer) and `teacher_uri` (an existing model directory: then
pretraining is skipped).  Pod settings (image, CPU/memory/GPU requests and limits, node selector,
tolerations, retries, caching, the data volume, multi-node pretraining, Kueue queue) are fixed
when the pipeline is compiled (`PodSettings`, `PipelineShape`, from the CLI's flags), as
Kubernetes needs them in the compiled spec.

Which inputs exist is a compile-time choice (rather than dsl.If branches joined with dsl.OneOf):
the pipeline keeps one flat DAG, and kfp.local can run every shape.
"""

# No `from __future__ import annotations`: KFP reads the pipeline signature's annotations.

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional

from kfp import dsl, kubernetes
from kfp.dsl import HTML, Dataset, Markdown, Metrics, Model

from components import DEFAULT_IMAGE, build_components
from vishwamai.kubeflow.pytorchjob import MOUNT, SECRET_ENV, SECRET_NAME

PIPELINE_NAME = "vishwamai-compress"
STAGE_ORDER = ("prepare", "pretrain", "distill", "prune", "quantize", "evaluate", "export")
IMAGE_UID = 10001  # USER in the Dockerfile
DEFAULT_STUDENT = ["model.d_model=128", "model.n_layers=2", "model.n_heads=4"]


class SettingsError(ValueError):
    """A compile setting that would make an invalid pipeline; names the CLI flags involved."""


def quantity(text: str, flag: str) -> Any:
    from kubernetes.utils.quantity import parse_quantity

    try:
        return parse_quantity(text)
    except ValueError:
        raise SettingsError(f"{flag} {text!r} is not a Kubernetes quantity (e.g. 4, 500m, 8G, 16Gi)") from None


@dataclass
class PodSettings:
    """Resources and scheduling for every stage's pod.

    A limit left as None is the request or the default limit, whichever is larger: the API server
    rejects a pod whose request exceeds its limit.  An explicit limit below its request is an error."""

    cpu_request: str = "2"
    cpu_limit: Optional[str] = None  # default: max(request, DEFAULT_CPU_LIMIT)
    memory_request: str = "4G"
    memory_limit: Optional[str] = None  # default: max(request, DEFAULT_MEMORY_LIMIT)
    gpus: int = 0  # per training pod; 0 = CPU only
    gpu_resource: str = "nvidia.com/gpu"
    node_selector: dict[str, str] = field(default_factory=dict)
    # (key, operator Equal|Exists, value or None, effect or None)
    tolerations: list[tuple[str, str, Optional[str], Optional[str]]] = field(default_factory=list)
    retries: int = 2
    retry_backoff: str = "60s"
    caching: bool = True
    timeout_s: int = 0  # 0 = none
    # kfp.kubernetes.set_security_context needs kfp-kubernetes >= 2.16 and a KFP backend that knows the
    # field (KFP_BACKEND_MIN); off for older backends (the image runs as its non-root user anyway).
    security_context: bool = True
    data_pvc: Optional[str] = None  # a PersistentVolumeClaim mounted at /data in every stage's pod
    kueue_queue: Optional[str] = None  # Kueue LocalQueue (pod label kueue.x-k8s.io/queue-name)
    priority_class: Optional[str] = None  # Kueue WorkloadPriorityClass (KFP sets no priorityClassName)
    secrets: bool = True  # tracking credentials from the Secret vishwamai-secrets (optional keys)

    DEFAULT_CPU_LIMIT = "4"
    DEFAULT_MEMORY_LIMIT = "8G"

    def __post_init__(self) -> None:
        self.cpu_limit = self.checked_limit(self.cpu_request, self.cpu_limit, self.DEFAULT_CPU_LIMIT, "cpu")
        self.memory_limit = self.checked_limit(self.memory_request, self.memory_limit, self.DEFAULT_MEMORY_LIMIT,
                                               "memory")
        if self.gpus < 0 or self.retries < 0:
            raise SettingsError(f"--gpus and --retries must be >= 0, got {self.gpus} and {self.retries}")

    @staticmethod
    def checked_limit(request: str, limit: Optional[str], default: str, name: str) -> str:
        flags = {"cpu": ("--cpu", "--cpu-limit"), "memory": ("--memory", "--memory-limit")}[name]
        asked = quantity(request, flags[0])
        if limit is None:
            return request if asked > quantity(default, "default") else default
        if quantity(limit, flags[1]) < asked:
            raise SettingsError(f"{flags[1]} {limit} is below {flags[0]} {request}: a pod's limit may not be "
                                f"lower than its request (the API server rejects it)")
        return limit

    def apply(self, task: dsl.PipelineTask, gpu: bool) -> dsl.PipelineTask:
        if self.security_context:
            # The image's own non-root user (Dockerfile); KFP adds no privilege escalation, drops capabilities.
            kubernetes.set_security_context(task, run_as_user=IMAGE_UID, run_as_group=IMAGE_UID,
                                            run_as_non_root=True)
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
        if self.retries:
            task.set_retry(num_retries=self.retries, backoff_duration=self.retry_backoff, backoff_factor=2.0)
        task.set_caching_options(self.caching)
        if self.timeout_s:
            kubernetes.set_timeout(task, self.timeout_s)
        if self.data_pvc:
            kubernetes.mount_pvc(task, pvc_name=self.data_pvc, mount_path=MOUNT)
        if self.kueue_queue:
            kubernetes.add_pod_label(task, "kueue.x-k8s.io/queue-name", self.kueue_queue)
        if self.priority_class:
            kubernetes.add_pod_label(task, "kueue.x-k8s.io/priority-class", self.priority_class)
        if self.secrets:
            kubernetes.use_secret_as_env(task, secret_name=SECRET_NAME, secret_key_to_env=SECRET_ENV, optional=True)
        return task

    def resources(self) -> dict[str, Any]:
        """The same requests and limits as a pod spec's `resources` (the PyTorchJob's pods)."""
        requests = {"cpu": self.cpu_request, "memory": self.memory_request}
        limits = {"cpu": self.cpu_limit, "memory": self.memory_limit}
        if self.gpus:
            requests[self.gpu_resource] = limits[self.gpu_resource] = str(self.gpus)
        return {"requests": requests, "limits": limits}


@dataclass
class PipelineShape:
    """Which inputs and pretraining form the compiled pipeline has."""

    corpus_uri: bool = False  # a `corpus_uri` parameter: the user's text, imported as a Dataset
    teacher_uri: bool = False  # a `teacher_uri` parameter: an existing model, pretraining skipped
    pretrain_nodes: int = 1  # > 1: pretraining is a PyTorchJob of that many pods (needs PodSettings.data_pvc)
    nproc_per_node: int = 1  # processes per PyTorchJob pod (= GPUs per node on GPU nodes)
    pretrain_namespace: str = ""  # where the PyTorchJob goes; "" = the launcher pod's own namespace
    pretrain_timeout_s: int = 172800

    def check(self, pod: PodSettings) -> None:
        if self.pretrain_nodes < 1:
            raise SettingsError(f"--pretrain-nodes must be >= 1, got {self.pretrain_nodes}")
        if self.pretrain_nodes > 1 and self.teacher_uri:
            raise SettingsError("--pretrain-nodes and --teacher-input: with a teacher given, nothing is pretrained")
        if self.pretrain_nodes > 1 and not pod.data_pvc:
            raise SettingsError("--pretrain-nodes > 1 needs --data-pvc: the PyTorchJob's pods and the pipeline "
                                "share the run directory on a ReadWriteMany volume")
        if pod.gpus and self.pretrain_nodes > 1 and self.nproc_per_node != pod.gpus:
            raise SettingsError(f"--nproc-per-node {self.nproc_per_node} differs from --gpus {pod.gpus}: "
                                f"one process per GPU")

    def job_settings(self, image: str, pod: PodSettings) -> dict[str, Any]:
        """vishwamai.kubeflow.pytorchjob.build_job's settings (all but name, namespace and overrides)."""
        settings = {"image": image, "nodes": self.pretrain_nodes, "nproc_per_node": self.nproc_per_node,
                    "pvc": pod.data_pvc, "resources": pod.resources(), "queue": pod.kueue_queue}
        return {k: v for k, v in settings.items() if v is not None}  # KFP constants cannot be None


Outputs = NamedTuple("Outputs", metrics=Metrics, report=Markdown, report_html=HTML, model=Model)


def pipeline_signature(shape: PipelineShape) -> inspect.Signature:
    """The pipeline's runtime parameters.  KFP reads them from the function's signature, so the optional
    inputs (present only in the shapes that use them: never a parameter that is silently ignored) are
    added to it here."""
    P = inspect.Parameter

    def param(name: str, annotation: type, default: Any = P.empty) -> inspect.Parameter:
        return P(name, P.POSITIONAL_OR_KEYWORD, annotation=annotation, default=default)

    params = [param("model_preset", str, "tiny"), param("pretrain_steps", int, 300), param("distill_steps", int, 300),
              param("prune_steps", int, 200), param("student_overrides", list, DEFAULT_STUDENT),
              param("target_sparsity", float, 0.5), param("quantization_mode", str, "dynamic"),
              param("calibration_steps", int, 16), param("export_dtype", str, "bfloat16"), param("overrides", list, [])]
    required = [param(name, str) for name, on in (("corpus_uri", shape.corpus_uri), ("teacher_uri", shape.teacher_uri))
                if on]
    return inspect.Signature(required + params, return_annotation=Outputs)


def build_pipeline(image: str = DEFAULT_IMAGE, pod: Optional[PodSettings] = None,
                   shape: Optional[PipelineShape] = None) -> Callable:
    """The pipeline function, its components running in `image` with `pod` settings and `shape`'s inputs."""
    pod, shape = pod or PodSettings(), shape or PipelineShape()
    shape.check(pod)
    c = build_components(image)

    def stages(p: dict[str, Any]) -> tuple:
        corpus = {}
        if shape.corpus_uri:
            corpus["corpus"] = dsl.importer(artifact_uri=p["corpus_uri"], artifact_class=Dataset,
                                            reimport=False).set_display_name("corpus").output
        given = (dsl.importer(artifact_uri=p["teacher_uri"], artifact_class=Model, reimport=False)
                 .set_display_name("teacher (given)").output if shape.teacher_uri else None)
        prep = c["prepare"](overrides=p["overrides"], model_preset=p["model_preset"],
                            pretrain_steps=p["pretrain_steps"], student_overrides=p["student_overrides"],
                            distill_steps=p["distill_steps"], target_sparsity=p["target_sparsity"],
                            prune_steps=p["prune_steps"], **corpus, **({"teacher": given} if given else {}))
        prep.set_display_name("prepare (check config, tokenise)")
        dataset = prep.outputs["dataset"]
        common = {"dataset": dataset, **corpus}
        trained, cpu_only = [], [prep]
        if given is not None:
            teacher = given
        elif shape.pretrain_nodes > 1:
            pre = c["pretrain_job"](overrides=p["overrides"], model_preset=p["model_preset"], steps=p["pretrain_steps"],
                                    job_settings=shape.job_settings(image, pod), namespace=shape.pretrain_namespace,
                                    run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, timeout_s=shape.pretrain_timeout_s,
                                    **corpus)
            pre.set_display_name(f"pretrain (teacher, PyTorchJob x{shape.pretrain_nodes})").after(prep)
            teacher = pre.outputs["model"]
            cpu_only.append(pre)  # the launcher only watches; the job's pods hold the GPUs
        else:
            pre = c["pretrain"](overrides=p["overrides"], model_preset=p["model_preset"], steps=p["pretrain_steps"],
                                **common)
            pre.set_display_name("pretrain (teacher)")
            teacher, trained = pre.outputs["model"], [pre]
        dis = c["distill"](teacher=teacher, overrides=p["overrides"], student_overrides=p["student_overrides"],
                           steps=p["distill_steps"], **common)
        dis.set_display_name("distill (student)")
        pru = c["prune"](student=dis.outputs["student"], overrides=p["overrides"],
                         target_sparsity=p["target_sparsity"], steps=p["prune_steps"], **common)
        qua = c["quantize"](pruned=pru.outputs["pruned"], mode=p["quantization_mode"],
                            calibration_steps=p["calibration_steps"], **common)
        ev = c["evaluate"](teacher=teacher, student=dis.outputs["student"], pruned=pru.outputs["pruned"],
                           quantized=qua.outputs["quantized"], **common)
        ex = c["export"](quantized=qua.outputs["quantized"], pruned=pru.outputs["pruned"], dtype=p["export_dtype"])
        ex.set_display_name("export (Hugging Face)")
        for task in (*trained, dis, pru):
            pod.apply(task, gpu=True)
        for task in (*cpu_only, qua, ev, ex):  # int8 kernels, the comparison, export, checks, the job launcher: CPU
            pod.apply(task, gpu=False)
        prep.set_retry(num_retries=0)  # its failures are user errors: fail once, at once
        return ev, ex

    signature = pipeline_signature(shape)

    def vishwamai_pipeline(*args, **kwargs):
        ev, ex = stages(dict(signature.bind(*args, **kwargs).arguments))
        return Outputs(ev.outputs["metrics"], ev.outputs["report"], ev.outputs["report_html"], ex.outputs["exported"])

    vishwamai_pipeline.__signature__ = signature
    vishwamai_pipeline.__annotations__ = {**{n: p.annotation for n, p in signature.parameters.items()},
                                          "return": Outputs}
    return dsl.pipeline(name=PIPELINE_NAME,
                        description="vishwamai: pretrain a teacher, distil a student, prune, int8-quantize, "
                                    "evaluate, export to the Hugging Face layout")(vishwamai_pipeline)


def compile_pipeline(output: str, image: str = DEFAULT_IMAGE, pod: Optional[PodSettings] = None,
                     shape: Optional[PipelineShape] = None) -> str:
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(image, pod, shape), package_path=output)
    return output
