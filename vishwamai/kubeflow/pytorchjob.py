"""Multi-node pretraining from the pipeline: a PyTorchJob started, followed and collected by one KFP step.

The `pretrain` stage with `--pretrain-nodes N` (N > 1) runs the launcher component instead of training in
its own pod: it writes a Training Operator v1 PyTorchJob (N pods: Master + N-1 Workers, each
`python -m vishwamai.kubeflow.launch ARGS` as in manifests/base), creates it through the Kubernetes API,
streams the master's log into the step's log, waits (bounded by a timeout) until the job succeeds or
fails, and hands the trained model on as the Model artifact: the job's run directory lives on the shared
ReadWriteMany volume (`--data-pvc`), which the launcher's own pod mounts too.

A retried launcher pod finds the job it created (the name is derived from the KFP run) and follows it
again instead of starting a second one.  The job's pods resume from their last checkpoint on a restart
(`training.resume=auto`), and exit 2 on a user error, which the operator's ExitCode policy does not retry.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
PORT = 23456
UID = 10001
MOUNT = "/data"
CONTAINER = "pytorch"
# The image's writable places: read-only root filesystem, caches on emptyDirs (as in manifests/base).
ENV = {"HOME": "/tmp", "XDG_CACHE_HOME": "/cache", "HF_HOME": "/cache/huggingface", "TORCH_HOME": "/cache/torch",
       "TORCHINDUCTOR_CACHE_DIR": "/cache/inductor", "TRITON_CACHE_DIR": "/cache/triton",
       "MPLCONFIGDIR": "/cache/matplotlib", "PYTHONDONTWRITEBYTECODE": "1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "100"}
# Tracking credentials from the Secret the manifests use; optional, so pods start without it.
SECRET_NAME = "vishwamai-secrets"
SECRET_ENV = {"wandb-api-key": "WANDB_API_KEY", "mlflow-tracking-uri": "MLFLOW_TRACKING_URI",
              "mlflow-tracking-username": "MLFLOW_TRACKING_USERNAME",
              "mlflow-tracking-password": "MLFLOW_TRACKING_PASSWORD"}


def job_name(run_id: str, stage: str = "pretrain") -> str:
    """A DNS-1035 name, the same for every retry of one KFP run's stage, short enough for pod names."""
    return f"vishwamai-{stage}-{hashlib.sha256(run_id.encode()).hexdigest()[:10]}"


def run_dir(name: str) -> str:
    return f"{MOUNT}/kfp/{name}/run"


def secret_env() -> list[dict[str, Any]]:
    return [{"name": env, "valueFrom": {"secretKeyRef": {"name": SECRET_NAME, "key": key, "optional": True}}}
            for key, env in SECRET_ENV.items()]


def security_context() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "privileged": False, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def pod_template(image: str, args: list[str], pvc: str, resources: dict[str, Any], master: bool,
                 priority_class: Optional[str]) -> dict[str, Any]:
    container = {
        "name": CONTAINER, "image": image, "command": ["python", "-m", "vishwamai.kubeflow.launch"], "args": args,
        "env": [{"name": k, "value": v} for k, v in ENV.items()] + secret_env(), "resources": resources,
        "securityContext": security_context(),
        "volumeMounts": [{"name": "data", "mountPath": MOUNT}, {"name": "tmp", "mountPath": "/tmp"},
                         {"name": "cache", "mountPath": "/cache"}, {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False, "terminationGracePeriodSeconds": 120,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": pvc}},
                    {"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}}, {"name": "cache", "emptyDir": {"sizeLimit": "8Gi"}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}],
    }
    if master:
        container["ports"] = [{"name": "pytorchjob-port", "containerPort": PORT, "protocol": "TCP"}]
    else:  # wait for the master's Service instead of crash-looping (vishwamai.kubeflow.wait)
        spec["initContainers"] = [{
            "name": "wait-for-master", "image": image, "command": ["python", "-m", "vishwamai.kubeflow.wait"],
            "args": ["$(JOB_NAME)-master-0", str(PORT), "--timeout", "1800"],
            "env": [{"name": "JOB_NAME", "valueFrom": {"fieldRef": {
                "fieldPath": "metadata.labels['training.kubeflow.org/job-name']"}}}],
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "200m", "memory": "256Mi"}},
            "securityContext": security_context()}]
    if priority_class:
        spec["priorityClassName"] = priority_class
    return {"metadata": {"labels": {"app.kubernetes.io/name": "vishwamai", "app.kubernetes.io/component": "training"},
                         "annotations": {"sidecar.istio.io/inject": "false"}}, "spec": spec}


def build_job(name: str, namespace: str, image: str, overrides: list[str], nodes: int, nproc_per_node: int,
              pvc: str, resources: dict[str, Any], backoff_limit: int = 5, active_deadline_s: int = 172800,
              queue: Optional[str] = None, priority_class: Optional[str] = None) -> dict[str, Any]:
    """The PyTorchJob: `nodes` pods (1 Master + nodes-1 Workers) running the same overrides into run_dir(name)."""
    if nodes < 2:
        raise ValueError(f"a PyTorchJob is for 2 or more nodes, got {nodes}")
    args = ["distributed.strategy=data_parallel", f"hydra.run.dir={run_dir(name)}", f"data.cache_dir={MOUNT}/cache",
            "training.resume=auto", "training.progress_bar=false", *overrides]
    labels = {"app.kubernetes.io/name": "vishwamai", "app.kubernetes.io/component": "training"}
    if queue:
        labels["kueue.x-k8s.io/queue-name"] = queue
    replicas = {"Master": 1, "Worker": nodes - 1}
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "nprocPerNode": str(nproc_per_node),
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": backoff_limit,
                          "activeDeadlineSeconds": active_deadline_s, "ttlSecondsAfterFinished": 604800},
            "pytorchReplicaSpecs": {
                role: {"replicas": count, "restartPolicy": "ExitCode",
                       "template": pod_template(image, args, pvc, resources, role == "Master", priority_class)}
                for role, count in replicas.items()},
        },
    }


def job_state(job: dict[str, Any]) -> tuple[Optional[str], str]:
    """("Succeeded" | "Failed" | None while running, the deciding condition's message)."""
    for condition in reversed(job.get("status", {}).get("conditions") or []):
        if condition.get("type") in ("Succeeded", "Failed") and condition.get("status") == "True":
            return condition["type"], condition.get("message", "")
    return None, ""


class JobFailed(RuntimeError):
    pass


def create_or_attach(custom, job: dict[str, Any]) -> dict[str, Any]:
    """Create the job, or (a retried launcher) follow the one already there under that name."""
    from kubernetes.client.exceptions import ApiException

    meta = job["metadata"]
    try:
        return custom.create_namespaced_custom_object(GROUP, VERSION, meta["namespace"], PLURAL, job)
    except ApiException as e:
        if e.status != 409:
            raise
        print(f"PyTorchJob {meta['name']} exists: following it", flush=True)
        return custom.get_namespaced_custom_object(GROUP, VERSION, meta["namespace"], PLURAL, meta["name"])


def stream_master_log(core, namespace: str, name: str, stop: threading.Event, out: Callable[[str], None],
                      poll_s: float) -> None:
    """Follow `<name>-master-0`'s log (once the pod can serve one) until it ends or `stop` is set."""
    from kubernetes.client.exceptions import ApiException

    pod = f"{name}-master-0"
    while not stop.is_set():
        try:
            stream = core.read_namespaced_pod_log(pod, namespace, container=CONTAINER, follow=True,
                                                  _preload_content=False)
        except ApiException:  # not scheduled / not started yet
            stop.wait(poll_s)
            continue
        for line in stream.stream():
            out(line.decode(errors="replace").rstrip("\n") if isinstance(line, bytes) else str(line).rstrip("\n"))
            if stop.is_set():
                break
        return


def run_job(custom, core, job: dict[str, Any], timeout_s: float, poll_s: float = 10.0,
            out: Callable[[str], None] = print) -> dict[str, Any]:
    """Create (or attach to) `job`, stream its master's log, and wait until it ends.

    Returns the finished job; raises JobFailed when it failed, TimeoutError (after deleting the job,
    so it stops using the cluster) when it runs past timeout_s."""
    meta = job["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    create_or_attach(custom, job)
    stop = threading.Event()
    logs = threading.Thread(target=stream_master_log, args=(core, namespace, name, stop, out, poll_s), daemon=True)
    logs.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            current = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            state, message = job_state(current)
            if state == "Succeeded":
                logs.join(timeout=poll_s)  # the rest of the master's log
                return current
            if state == "Failed":
                raise JobFailed(f"PyTorchJob {namespace}/{name} failed: {message}")
            if time.monotonic() >= deadline:
                custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
                raise TimeoutError(f"PyTorchJob {namespace}/{name} still running after {timeout_s:.0f} s: deleted")
            time.sleep(poll_s)
    finally:
        stop.set()


def in_cluster_namespace(path: str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace") -> str:
    return Path(path).read_text().strip()


def kubernetes_apis():
    """CustomObjectsApi and CoreV1Api from the pod's service account (or a kubeconfig outside a cluster)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi(), client.CoreV1Api()
